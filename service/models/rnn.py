"""RNN family: RNN/GRU/LSTM over float features or token ids, with a linear head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from service.errors import InvalidSpec
from service.models._schema import Schema, field

if TYPE_CHECKING:
    from service.models.spec import ModelSpec

CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


@dataclass(frozen=True)
class RNNConfig(Schema):
    """Exactly one of ``input_size`` (float features) or ``vocab_size`` (token ids) is set."""

    cell: str = field("lstm", choices=tuple(CELLS))
    input_size: int | None = field(None, ge=1)
    vocab_size: int | None = field(None, ge=2)
    embedding_dim: int = field(64, ge=1)
    hidden_size: int = field(64, ge=1)
    num_layers: int = field(1, ge=1)
    bidirectional: bool = False
    dropout: float = field(0.0, ge=0, lt=1)
    pooling: str = field("last", choices=("last", "mean", "max"))

    def check(self, path: str) -> None:
        if (self.input_size is None) == (self.vocab_size is None):
            raise InvalidSpec(f"{path}.input_size", f"set exactly one of {path}.input_size (float features) "
                              f"or {path}.vocab_size (token ids)")

    @property
    def sequence_kind(self) -> str:
        """"features" or "tokens"."""
        return "features" if self.input_size is not None else "tokens"


class SequenceClassifier(nn.Module):
    """Recurrent encoder over packed sequences, pooled, then a linear head.

    ``forward(x, lengths)``: ``x`` is float (B, T, input_size) or token ids (B, T);
    ``lengths`` (B,) counts each row's valid steps (None: all T). Padding beyond a
    row's length never affects its output.
    """

    def __init__(self, cfg: RNNConfig, num_classes: int):
        super().__init__()
        self.pooling = cfg.pooling
        self.embedding = None
        if cfg.vocab_size is not None:
            self.embedding = nn.Embedding(cfg.vocab_size, cfg.embedding_dim, padding_idx=0)
        self.rnn = CELLS[cfg.cell](
            cfg.input_size if cfg.input_size is not None else cfg.embedding_dim,
            cfg.hidden_size,
            num_layers=cfg.num_layers,
            batch_first=True,
            bidirectional=cfg.bidirectional,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
        )
        self.fc = nn.Linear(cfg.hidden_size * (2 if cfg.bidirectional else 1), num_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        batch, steps = x.shape[:2]
        if lengths is None:
            lengths = torch.full((batch,), steps, dtype=torch.int64)
        lengths = lengths.to("cpu", torch.int64)
        if self.embedding is not None:
            x = self.embedding(x)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        output, hidden = self.rnn(packed)
        if self.pooling == "last":
            h_n = hidden[0] if isinstance(hidden, tuple) else hidden  # LSTM: (h_n, c_n)
            directions = 2 if self.rnn.bidirectional else 1
            pooled = torch.cat(list(h_n[-directions:]), dim=1)
        elif self.pooling == "mean":
            padded, _ = pad_packed_sequence(output, batch_first=True, total_length=steps)
            pooled = padded.sum(dim=1) / lengths.to(padded.device, padded.dtype).unsqueeze(1)
        else:  # max over each row's valid steps
            padded, _ = pad_packed_sequence(output, batch_first=True, total_length=steps,
                                            padding_value=float("-inf"))
            pooled = padded.max(dim=1).values
        return self.fc(pooled)


def build_rnn(spec: ModelSpec) -> nn.Module:
    """A fresh SequenceClassifier for ``spec.config``."""
    return SequenceClassifier(spec.config, spec.num_classes)
