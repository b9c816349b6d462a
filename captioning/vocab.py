"""Vocabulary and tokenizer shared by the image captioner and the text seq2seq model.

The vocabulary is plain data (a list of tokens plus a few settings) so it can travel inside
a Lightning checkpoint's hyperparameters and be loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)

_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]", re.UNICODE)


def tokenize(text: str, lowercase: bool = True, keep_punctuation: bool = False) -> list[str]:
    """Split a caption into word tokens.

    Lowercases, splits on whitespace and punctuation; punctuation is dropped unless
    ``keep_punctuation`` (captions are scored without it, as the COCO PTB tokenizer does).
    """
    if lowercase:
        text = text.lower()
    tokens = _TOKEN_RE.findall(text) if lowercase else text.split()
    if not keep_punctuation:
        tokens = [t for t in tokens if any(ch.isalnum() for ch in t)]
    return tokens


class Vocabulary:
    """Token <-> index mapping with the four special tokens at indices 0..3.

    ``pad_id=0, bos_id=1, eos_id=2, unk_id=3``; padding is always 0 so ``pad_sequence``
    defaults work.
    """

    def __init__(self, tokens: Sequence[str]) -> None:
        tokens = list(tokens)
        if tokens[: len(SPECIALS)] != list(SPECIALS):
            tokens = list(SPECIALS) + [t for t in tokens if t not in SPECIALS]
        if len(set(tokens)) != len(tokens):
            raise ValueError("Vocabulary tokens must be unique")
        self.itos: list[str] = tokens
        self.stoi: dict[str, int] = {t: i for i, t in enumerate(tokens)}

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(
        cls,
        token_lists: Iterable[Sequence[str]],
        min_count: int = 1,
        max_size: int | None = None,
    ) -> "Vocabulary":
        """Build from tokenised training text: keep tokens seen ``min_count`` times or more.

        Order: by descending frequency, ties alphabetical (deterministic across runs).
        ``max_size`` caps the number of non-special tokens.
        """
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counts = Counter(t for tokens in token_lists for t in tokens)
        kept = sorted((t for t, c in counts.items() if c >= min_count and t not in SPECIALS),
                      key=lambda t: (-counts[t], t))
        if max_size is not None:
            kept = kept[:max_size]
        return cls(list(SPECIALS) + kept)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def encode(self, tokens: Sequence[str], add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Tokens -> ids, unknown tokens -> ``unk_id``; wraps in BOS/EOS by default."""
        ids = [self.stoi.get(t, self.unk_id) for t in tokens]
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Iterable[int], strip_special: bool = True) -> list[str]:
        """Ids -> tokens; stops at the first EOS and drops PAD/BOS when ``strip_special``."""
        out = []
        for i in ids:
            i = int(i)
            if strip_special and i == self.eos_id:
                break
            if strip_special and i in (self.pad_id, self.bos_id):
                continue
            out.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return out

    def to_dict(self) -> dict:
        """Plain JSON-able form (what checkpoints and ``save`` store)."""
        return {"itos": list(self.itos)}

    @classmethod
    def from_dict(cls, data: dict) -> "Vocabulary":
        if not isinstance(data, dict) or "itos" not in data:
            raise ValueError("Vocabulary data must be a dict with an 'itos' list")
        return cls(data["itos"])

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, ValueError) as err:
            raise ValueError(f"Cannot read vocabulary file {path}: {err}") from err

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocabulary(size={len(self)})"
