"""Vocabulary and tokenizer shared by the image captioner and the text seq2seq model.

The vocabulary is plain data (a list of tokens plus a few settings) so it can travel inside
a Lightning checkpoint's hyperparameters and be loaded with ``weights_only=True``.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)

# Invisible characters in web text: removed inside words, or (zero-width space) a word break.
_INVISIBLE = str.maketrans({"\u00ad": None, "\ufeff": None, "\u2060": None, "\u200b": " "})


def _code_point_class(wanted: Callable[[str], bool], start: int, stop: int) -> str:
    """A regex character-class body for the code points in [start, stop) that ``wanted`` accepts."""
    ranges, first = [], None
    for cp in range(start, stop + 1):
        if cp < stop and wanted(chr(cp)):
            first = cp if first is None else first
        elif first is not None:
            last = cp - 1
            ranges.append(re.escape(chr(first)) + ("" if last == first else "-" + re.escape(chr(last))))
            first = None
    return "".join(ranges)


@functools.cache
def _token_re() -> re.Pattern[str]:
    """The caption token pattern; built once (0.03-0.1 s) from this Python's Unicode tables."""
    marks = "".join(
        _code_point_class(lambda ch: unicodedata.category(ch)[0] == "M", a, b)
        for a, b in ((0x300, 0x20000), (0xE0100, 0xE01F0))
    )
    pictographs = _code_point_class(lambda ch: unicodedata.category(ch) == "So", 0x2000, 0x20000)
    # Written as "run of letters, then (marks, letters)*" and guarded by a cheap range check
    # before the large classes: the plain alternation was 5x slower on English captions.
    mark = rf"(?:(?=[^\x00-\u02ff])[{marks}])"
    alnum_run = rf"[^\W_]+(?:{mark}+[^\W_]*)*"  # letters/digits with their combining marks
    letter_run = rf"[^\W\d_]+(?:{mark}+[^\W\d_]*)*"
    # ZWNJ/ZWJ join parts of one word in Persian and Indic scripts.
    word = rf"{alnum_run}(?:[\u200c\u200d]{alnum_run})*(?:['\u2019]{letter_run})?"
    extend = rf"[{marks}\U0001F3FB-\U0001F3FF\U000E0020-\U000E007F]"  # VS16, skin tones, flag tags
    emoji = (
        rf"[#*]\ufe0f?\u20e3|(?=[^\x00-\u1fff])(?:[\U0001F1E6-\U0001F1FF]{{2}}"
        rf"|[{pictographs}]{extend}*(?:\u200d[{pictographs}]{extend}*)*)"
    )
    return re.compile(rf"(?P<word>{word})|(?P<emoji>{emoji})|(?P<other>\S{mark}*)")


def tokenize(text: str, lowercase: bool = True, keep_punctuation: bool = False) -> list[str]:
    """Split a caption into word tokens, in any script.

    The text is NFKC-normalised (full-width letters, ligatures and other compatibility forms
    become plain ones), then lowercased with ``str.lower()`` when ``lowercase``. Tokens are:

    * words: runs of letters and digits of any script with their combining marks ("carré",
      "café au lait" -> ["café", "au", "lait"]; Hindi and Thai vowel signs stay inside the
      word), plus one apostrophe contraction ("it's", "dog's"; "it’s" with a typographic
      apostrophe becomes "it's"). Hyphens, underscores, dots and other punctuation split
      words: "t-shirt" -> ["t", "shirt"], "3.5" -> ["3", "5"], as before for ASCII text.
    * scripts written without spaces (Chinese, Japanese, Thai) are not segmented: a run of
      letters between spaces or punctuation is one token ("日本の猫" -> ["日本の猫"],
      "猫が、寝ている" -> ["猫が", "寝ている"]). Put spaces between words for word tokens.
    * emoji: each emoji (with its skin tone, variation selector or ZWJ sequence; a flag) is
      one token and is kept, since it carries meaning. Other symbols ("°", "©") and
      punctuation are one token per mark, dropped unless ``keep_punctuation`` (captions are
      scored without punctuation, as the COCO PTB tokenizer does).

    Soft hyphens, byte-order marks and word joiners are removed; a zero-width space separates
    words. ``lowercase=False`` keeps case and tokenises the same way.
    """
    text = unicodedata.normalize("NFKC", text).translate(_INVISIBLE)
    if lowercase:
        text = text.lower()
    return [
        match[0].replace("\u2019", "'")
        for match in _token_re().finditer(text)
        if keep_punctuation or match.lastgroup != "other"
    ]


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
    ) -> Vocabulary:
        """Build from tokenised training text: keep tokens seen ``min_count`` times or more.

        Order: by descending frequency, ties alphabetical (deterministic across runs).
        ``max_size`` caps the number of non-special tokens.
        """
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counts = Counter(t for tokens in token_lists for t in tokens)
        kept = sorted(
            (t for t, c in counts.items() if c >= min_count and t not in SPECIALS), key=lambda t: (-counts[t], t)
        )
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
    def from_dict(cls, data: dict) -> Vocabulary:
        if not isinstance(data, dict) or "itos" not in data:
            raise ValueError("Vocabulary data must be a dict with an 'itos' list")
        return cls(data["itos"])

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, ValueError) as err:
            raise ValueError(f"Cannot read vocabulary file {path}: {err}") from err

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocabulary(size={len(self)})"
