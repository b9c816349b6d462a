"""Tokenizer and source/target vocabularies of the text seq2seq model, as plain data.

Everything here round-trips through ``to_dict``/``from_dict`` (JSON-able) so it travels in
the checkpoint's hyperparameters: translating from a checkpoint tokenises exactly as in
training. The datamodules build a :class:`TextVocab`; ``TextVocab.to_dict()`` is the
datamodule's ``vocab_data`` that the CLI links into ``model.init_args.vocab``::

    {"source": {"itos": [...]}, "target": {"itos": [...]},
     "tokenizer": {"kind": "word" | "char" | "bpe", "lowercase": bool, ["model": {...}]},
     ["source_words": [...], "longest_source": int]}

Tokenizers (all first NFC-normalise, collapse whitespace and, with ``lowercase``, lowercase:
that normalised text is what references are and what exact match compares):

* ``word``: words (any script, inner apostrophes kept) and single punctuation marks;
  detokenising guesses the spacing around punctuation, so it is not always the inverse.
* ``char``: characters, spaces as "▁".
* ``bpe``: byte-pair-encoding subwords (Sennrich et al. 2016) trained on the training split
  with Hugging Face ``tokenizers``; words are marked by a leading "▁" (SentencePiece style),
  so detokenising is exact: ``detokenize(tokenize(t)) == normalize(t)`` for any text whose
  characters were seen in training. The trained model (its JSON) is stored in ``model``.
  Unigram models are not offered: tokenizers' unigram trainer gives a different model on
  every run (measured with 0.23), so a re-run datamodule could not rebuild the checkpoint's
  vocabulary for ``test`` or resuming.

``source_words`` (subword vocabularies only): the most frequent words of the training sources,
so ``translate`` can warn about inputs made of words never seen in training (subwords spell
any word, so "unknown" has to be judged on words). ``longest_source``: tokens of the longest
training source, for the warning about inputs longer than anything seen in training.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import cached_property
from typing import Any

from captioning.data.vocab import EOS, SPECIALS, UNK, Vocabulary

TOKENIZER_KINDS = ("word", "char", "bpe")
SUBWORD_KINDS = ("bpe",)
SPACE = "\u2581"  # "▁": a visible space token (char tokenizer) / word-start mark (subwords)
MAX_SOURCE_WORDS = 50_000  # known-word list kept in the checkpoint for subword models

# Words (any script, with inner apostrophes: "don't", "l'homme") or single punctuation marks.
_WORD_RE = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")
# Detokenisation: no space before closing marks / after opening marks, none around joiners,
# so "2026 - 11 - 21" -> "2026-11-21" and "go ." -> "go.".
_NO_SPACE_BEFORE = set(",.!?;:%)]}…")
_NO_SPACE_AFTER = set("([{¿¡")
_JOINERS = {"-", "/"}


def _has_alnum(token: str) -> bool:
    return any(ch.isalnum() for ch in token)


def words(text: str) -> list[str]:
    """Word-level split (the ``word`` tokenizer's rule) of already normalised text."""
    return _WORD_RE.findall(text)


# The one subword pipeline :meth:`TextTokenizer.train` writes. A tokenizer read from a file is
# refused unless it is exactly this: the tokenizers library would otherwise run whatever the
# file names (regular-expression splits that backtrack for minutes, normalisers, templates).
_BPE_PIPELINE: dict[str, Any] = {
    "truncation": None,
    "padding": None,
    "normalizer": None,
    "post_processor": None,
    "decoder": None,
    "pre_tokenizer": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "always", "split": True},
            {"type": "Punctuation", "behavior": "Isolated"},
        ],
    },
}
_BPE_MODEL: dict[str, Any] = {
    "type": "BPE",
    "dropout": None,
    "unk_token": UNK,
    "continuing_subword_prefix": None,
    "end_of_word_suffix": None,
    "fuse_unk": False,
    "byte_fallback": False,
    "ignore_merges": False,
}
MAX_SUBWORD_PIECES = 1_000_000


def check_subword_model(model: Any) -> None:
    """Refuse a stored BPE model that is not the pipeline :meth:`TextTokenizer.train` writes.

    Raises:
        ValueError: naming the first part that differs.
    """
    if not isinstance(model, dict):
        raise ValueError(f"the stored subword tokenizer is not a mapping ({type(model).__name__})")
    for key, expected in _BPE_PIPELINE.items():
        if model.get(key) != expected:
            raise ValueError(
                f"the stored subword tokenizer's {key} is not the one this package trains ({_brief(model.get(key))}); "
                "refused: a tokenizer from a file may only be the package's own BPE pipeline"
            )
    body = model.get("model")
    if not isinstance(body, dict):
        raise ValueError("the stored subword tokenizer has no BPE model")
    for key, expected in _BPE_MODEL.items():
        if body.get(key) != expected:
            raise ValueError(
                f"the stored subword tokenizer's model.{key} is {_brief(body.get(key))}, not the package's {expected!r}"
            )
    vocab, merges, added = body.get("vocab"), body.get("merges"), model.get("added_tokens")
    if not isinstance(vocab, dict) or not isinstance(merges, list) or not isinstance(added, list):
        raise ValueError("the stored subword tokenizer's vocab, merges or added_tokens are malformed")
    if len(vocab) > MAX_SUBWORD_PIECES or len(merges) > MAX_SUBWORD_PIECES or len(added) > 16:
        raise ValueError(f"the stored subword tokenizer is too large ({len(vocab):,} pieces, {len(merges):,} merges)")
    if any(not isinstance(t, dict) or t.get("content") != UNK for t in added):
        raise ValueError("the stored subword tokenizer adds tokens other than <unk>")


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class TextTokenizer:
    """``word``, ``char`` or ``bpe`` tokenisation (module docstring); ``model``: the trained BPE
    model (Hugging Face tokenizer JSON as a dict), only for ``bpe``; see :meth:`train`."""

    def __init__(self, kind: str = "word", lowercase: bool = True, model: dict | None = None) -> None:
        if kind not in TOKENIZER_KINDS:
            raise ValueError(f"tokenizer must be one of {TOKENIZER_KINDS}, got {kind!r}")
        if (kind in SUBWORD_KINDS) != (model is not None):
            raise ValueError(
                f"tokenizer {kind!r}: "
                + ("needs a trained model (TextTokenizer.train)" if model is None else "takes no model")
            )
        if model is not None:
            check_subword_model(model)
        self.kind, self.lowercase, self.model = kind, bool(lowercase), model

    # ------------------------------------------------------------------ training
    @classmethod
    def train(cls, kind: str, texts: Iterable[str], lowercase: bool = True, vocab_size: int = 4000) -> TextTokenizer:
        """A tokenizer of ``kind``; subword kinds learn their model from ``texts`` (training text).

        ``vocab_size``: the subword vocabulary size (pieces, the ``<unk>`` included; fewer
        when the text has fewer). Deterministic: the same texts give the same model.
        """
        if kind not in SUBWORD_KINDS:
            return cls(kind, lowercase)
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE(unk_token=UNK))
        # "▁" marks a word start; punctuation marks stand alone (never merged into a word).
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[UNK], show_progress=False)
        base = cls("word", lowercase)
        tok.train_from_iterator((base.normalize(t) for t in texts), trainer)
        return cls(kind, lowercase, json.loads(tok.to_str()))

    @cached_property
    def _subword(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_str(json.dumps(self.model))

    # ------------------------------------------------------------------ use
    def normalize(self, text: str) -> str:
        """NFC, whitespace runs -> one space, stripped, lowercased when ``lowercase``."""
        text = " ".join(unicodedata.normalize("NFC", text).split())
        return text.lower() if self.lowercase else text

    def __call__(self, text: str) -> list[str]:
        text = self.normalize(text)
        if self.kind == "char":
            return [SPACE if ch == " " else ch for ch in text]
        if self.kind == "word":
            return words(text)
        if not text:
            return []
        try:
            return self._subword.encode(text).tokens
        except BaseException as err:  # the Rust library panics (pyo3's PanicException is a BaseException)
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            raise ValueError(f"the subword tokenizer failed on this text ({type(err).__name__})") from None

    def detokenize(self, tokens: Sequence[str]) -> str:
        """Tokens -> text (exact inverse for ``char`` and ``bpe``; ``word`` guesses the spacing)."""
        if self.kind != "word":
            return " ".join("".join(tokens).replace(SPACE, " ").split())
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
        data = {"kind": self.kind, "lowercase": self.lowercase}
        if self.model is not None:
            data["model"] = self.model
        return data

    @classmethod
    def from_dict(cls, data: dict | str | None) -> TextTokenizer:
        if data is None:
            return cls()
        if isinstance(data, str):
            return cls(data)
        return cls(data.get("kind", "word"), data.get("lowercase", True), data.get("model"))

    def __repr__(self) -> str:
        return f"TextTokenizer(kind={self.kind!r}, lowercase={self.lowercase})"


class TextVocab:
    """Source and target :class:`Vocabulary` plus the tokenizer that produced their tokens.

    Source ids are ``tokens + [eos]`` (no BOS: the encoder reads the whole sentence, and EOS
    gives attention an "end of sentence" position); target ids are ``[bos] + tokens + [eos]``.
    ``source_words`` and ``longest_source``: see the module docstring (None when unknown).
    """

    def __init__(
        self,
        source: Vocabulary,
        target: Vocabulary,
        tokenizer: TextTokenizer,
        source_words: Sequence[str] | None = None,
        longest_source: int | None = None,
    ) -> None:
        self.source, self.target, self.tokenizer = source, target, tokenizer
        self.source_words = None if source_words is None else list(source_words)
        self.longest_source = longest_source

    @classmethod
    def build(
        cls,
        tokenizer: TextTokenizer,
        sources: Sequence[Sequence[str]],
        targets: Sequence[Sequence[str]],
        source_texts: Sequence[str] = (),
        min_count: int = 1,
        max_size: int | None = None,
    ) -> TextVocab:
        """Vocabularies from tokenised training pairs; ``source_texts`` (raw) give subword models
        their known-word list."""
        known = None
        if tokenizer.kind in SUBWORD_KINDS:
            counts = Counter(w for t in source_texts for w in words(tokenizer.normalize(t)))
            known = sorted(counts, key=lambda w: (-counts[w], w))[:MAX_SOURCE_WORDS]
        return cls(
            Vocabulary.build(sources, min_count, max_size),
            Vocabulary.build(targets, min_count, max_size),
            tokenizer,
            known,
            max((len(s) for s in sources), default=0) + 1,
        )

    def encode_source(self, text_or_tokens: str | Sequence[str]) -> list[int]:
        tokens = self.tokenizer(text_or_tokens) if isinstance(text_or_tokens, str) else text_or_tokens
        return self.source.encode(tokens, add_bos=False, add_eos=True)

    def encode_target(self, text_or_tokens: str | Sequence[str]) -> list[int]:
        tokens = self.tokenizer(text_or_tokens) if isinstance(text_or_tokens, str) else text_or_tokens
        return self.target.encode(tokens)

    def source_labels(self, ids: Sequence[int]) -> list[str]:
        """Encoded source ids -> display labels, one per position (EOS shown as ``<eos>``)."""
        return [EOS if int(i) == self.source.eos_id else self.source.itos[int(i)] for i in ids]

    @cached_property
    def _known_words(self) -> frozenset[str] | None:
        return None if self.source_words is None else frozenset(self.source_words)

    @cached_property
    def _seen_letters(self) -> frozenset[str]:
        """Letters of the training sources (from the known-word list, else the source vocabulary)."""
        pieces = self.source_words if self.source_words is not None else self.source.itos
        return frozenset(ch for piece in pieces if piece not in SPECIALS for ch in piece if ch.isalpha())

    def unseen_letters(self, text: str) -> list[str]:
        """Letters beyond ASCII in ``text`` (as the tokenizer normalises it) that no training source
        had, in order of appearance: an accent the training text was stripped of (é, ç), another
        script. (A plain ASCII letter missing from a toy corpus is not worth a warning.)"""
        seen, out = self._seen_letters, list[str]()
        if not seen:
            return out
        for ch in self.tokenizer.normalize(text):
            if ord(ch) > 127 and ch.isalpha() and ch not in seen and ch not in out:
                out.append(ch)
        return out

    def unknown_share(self, text: str) -> tuple[int, int]:
        """(unknown, total) of a source text's words (characters for ``char``; punctuation marks
        not counted): never seen in the training sources (subword models), else out of the
        source vocabulary (they become ``<unk>``)."""
        if self._known_words is not None:
            found = [w for w in words(self.tokenizer.normalize(text)) if _has_alnum(w)]
            return sum(w not in self._known_words for w in found), len(found)
        tokens = [t for t in self.tokenizer(text) if _has_alnum(t)]
        return sum(t not in self.source or t in SPECIALS for t in tokens), len(tokens)

    def to_dict(self) -> dict:
        data: dict[str, Any] = {
            "source": self.source.to_dict(),
            "target": self.target.to_dict(),
            "tokenizer": self.tokenizer.to_dict(),
        }
        if self.source_words is not None:
            data["source_words"] = list(self.source_words)
        if self.longest_source is not None:
            data["longest_source"] = int(self.longest_source)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TextVocab:
        if not isinstance(data, dict) or "source" not in data or "target" not in data:
            raise ValueError(
                "text vocabulary data must be a dict with 'source' and 'target' vocabularies "
                "({'itos': [...]} each) and an optional 'tokenizer'; the CLI links it from the "
                "datamodule's vocab_data"
            )
        return cls(
            Vocabulary.from_dict(data["source"]),
            Vocabulary.from_dict(data["target"]),
            TextTokenizer.from_dict(data.get("tokenizer")),
            data.get("source_words"),
            data.get("longest_source"),
        )
