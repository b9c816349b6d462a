"""Tokenizer and source/target vocabularies of the text seq2seq model, as plain data.

Everything here round-trips through ``to_dict``/``from_dict`` (JSON-able) so it travels in
the checkpoint's hyperparameters: translating from a checkpoint tokenises exactly as in
training. The datamodules build a :class:`TextVocab`; ``TextVocab.to_dict()`` is the
datamodule's ``vocab_data`` that the CLI links into ``model.init_args.vocab``::

    {"source": {"itos": [...]}, "target": {"itos": [...]},
     "tokenizer": {"kind": "word" | "char", "lowercase": bool}}
"""

from __future__ import annotations

import re
import unicodedata
from typing import Sequence

from captioning.vocab import EOS, Vocabulary

TOKENIZER_KINDS = ("word", "char")
SPACE = "\u2581"  # "▁": a visible space token for the character tokenizer

# Words (any script, with inner apostrophes: "don't", "l'homme") or single punctuation marks.
_WORD_RE = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")
# Detokenisation: no space before closing marks / after opening marks, none around joiners,
# so "2026 - 11 - 21" -> "2026-11-21" and "go ." -> "go.".
_NO_SPACE_BEFORE = set(",.!?;:%)]}…")
_NO_SPACE_AFTER = set("([{¿¡")
_JOINERS = {"-", "/"}


class TextTokenizer:
    """``word``: words and punctuation marks (Unicode aware); ``char``: characters, spaces as "▁".

    Both NFC-normalise and collapse whitespace first; ``lowercase`` lowercases.
    """

    def __init__(self, kind: str = "word", lowercase: bool = True) -> None:
        if kind not in TOKENIZER_KINDS:
            raise ValueError(f"tokenizer must be one of {TOKENIZER_KINDS}, got {kind!r}")
        self.kind, self.lowercase = kind, bool(lowercase)

    def __call__(self, text: str) -> list[str]:
        text = " ".join(unicodedata.normalize("NFC", text).split())
        if self.lowercase:
            text = text.lower()
        if self.kind == "char":
            return [SPACE if ch == " " else ch for ch in text]
        return _WORD_RE.findall(text)

    def detokenize(self, tokens: Sequence[str]) -> str:
        """Tokens -> text (the inverse of ``__call__`` up to spacing around punctuation)."""
        if self.kind == "char":
            return "".join(tokens).replace(SPACE, " ").strip()
        out = ""
        prev = None
        for tok in tokens:
            if prev is None:
                out = tok
            elif tok in _NO_SPACE_BEFORE or prev in _NO_SPACE_AFTER or tok in _JOINERS or prev in _JOINERS:
                out += tok
            else:
                out += " " + tok
            prev = tok
        return out

    def to_dict(self) -> dict:
        return {"kind": self.kind, "lowercase": self.lowercase}

    @classmethod
    def from_dict(cls, data: dict | str | None) -> "TextTokenizer":
        if data is None:
            return cls()
        if isinstance(data, str):
            return cls(data)
        return cls(data.get("kind", "word"), data.get("lowercase", True))

    def __repr__(self) -> str:
        return f"TextTokenizer(kind={self.kind!r}, lowercase={self.lowercase})"


class TextVocab:
    """Source and target :class:`Vocabulary` plus the tokenizer that produced their tokens.

    Source ids are ``tokens + [eos]`` (no BOS: the encoder reads the whole sentence, and EOS
    gives attention an "end of sentence" position); target ids are ``[bos] + tokens + [eos]``.
    """

    def __init__(self, source: Vocabulary, target: Vocabulary, tokenizer: TextTokenizer) -> None:
        self.source, self.target, self.tokenizer = source, target, tokenizer

    def encode_source(self, text_or_tokens: str | Sequence[str]) -> list[int]:
        tokens = self.tokenizer(text_or_tokens) if isinstance(text_or_tokens, str) else text_or_tokens
        return self.source.encode(tokens, add_bos=False, add_eos=True)

    def encode_target(self, text_or_tokens: str | Sequence[str]) -> list[int]:
        tokens = self.tokenizer(text_or_tokens) if isinstance(text_or_tokens, str) else text_or_tokens
        return self.target.encode(tokens)

    def source_labels(self, ids: Sequence[int]) -> list[str]:
        """Encoded source ids -> display labels, one per position (EOS shown as ``<eos>``)."""
        return [EOS if int(i) == self.source.eos_id else self.source.itos[int(i)] for i in ids]

    def to_dict(self) -> dict:
        return {"source": self.source.to_dict(), "target": self.target.to_dict(),
                "tokenizer": self.tokenizer.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "TextVocab":
        if not isinstance(data, dict) or "source" not in data or "target" not in data:
            raise ValueError("text vocabulary data must be a dict with 'source' and 'target' vocabularies "
                             "({'itos': [...]} each) and an optional 'tokenizer'; the CLI links it from the "
                             "datamodule's vocab_data")
        return cls(Vocabulary.from_dict(data["source"]), Vocabulary.from_dict(data["target"]),
                   TextTokenizer.from_dict(data.get("tokenizer")))
