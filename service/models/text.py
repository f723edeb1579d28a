"""Word-level vocabulary for token-id sequence models."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
_TOKEN = re.compile(r"[a-z0-9']+")


def tokenize(text: str) -> list[str]:
    """Lowercase, then the runs of ``[a-z0-9']``."""
    return _TOKEN.findall(text.lower())


class Vocabulary:
    """Token <-> id mapping; id 0 is "<pad>", id 1 is "<unk>"."""

    tokenize = staticmethod(tokenize)

    def __init__(self, tokens: list[str]):
        if list(tokens[:2]) != [PAD, UNK]:
            raise ValueError(f"a vocabulary starts with {PAD!r}, {UNK!r}; got {list(tokens[:2])!r}")
        self.tokens = list(tokens)
        self.ids = {tok: i for i, tok in enumerate(self.tokens)}
        if len(self.ids) != len(self.tokens):
            raise ValueError("vocabulary tokens must be unique")

    @classmethod
    def build(cls, texts: Iterable[str], max_size: int, min_freq: int = 1) -> Vocabulary:
        """The most frequent tokens (ties by token), seen >= ``min_freq`` times;
        ``max_size`` counts the two special tokens, so it can be the model's vocab_size."""
        if max_size < 2:
            raise ValueError(f"max_size must be >= 2 (room for {PAD} and {UNK}), got {max_size}")
        counts = Counter(tok for text in texts for tok in tokenize(text))
        counts.pop(PAD, None), counts.pop(UNK, None)
        ranked = sorted((tok for tok, n in counts.items() if n >= min_freq), key=lambda t: (-counts[t], t))
        return cls([PAD, UNK, *ranked[: max_size - 2]])

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; unknown tokens map to 1."""
        return [self.ids.get(tok, UNK_ID) for tok in tokenize(text)]

    def to_list(self) -> list[str]:
        """The tokens in id order (JSON-serialisable)."""
        return list(self.tokens)

    @classmethod
    def from_list(cls, tokens: list[str]) -> Vocabulary:
        """Inverse of :meth:`to_list`."""
        return cls(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.tokens == other.tokens

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens)"
