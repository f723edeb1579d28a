"""RNN family: RNN/GRU/LSTM over float features or token ids, with a linear head."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from service.models.configs import RNN_CELLS, RNNConfig

if TYPE_CHECKING:
    from service.models.spec import ModelSpec

#: The torch module of each of the config's cells (RNN_CELLS).
CELLS = dict(zip(RNN_CELLS, (nn.RNN, nn.GRU, nn.LSTM), strict=True))


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
