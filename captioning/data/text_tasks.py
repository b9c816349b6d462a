"""Built-in synthetic text tasks whose true alignment is known, with no files.

:class:`SyntheticTextDataModule`: ``dates`` ("21 nov 2026, 3 feb 1999" -> "2026-11-21, 1999-02-03": reordering within
each date, month names to numbers, days zero-padded) and ``reverse`` ("a b c" -> "c b a").
Lengths are counted in items (dates or symbols) and can go far past what one fixed context
vector holds. Item i of a split is a pure function of (seed, split, i) and the settings.

It exposes ``vocab_data`` and batches as :class:`captioning.data.text.TsvTextDataModule` does.
"""

from __future__ import annotations

import calendar
import functools
import random
from collections.abc import Sequence

from captioning.data.text import SPLITS, TextPairDataset, _check_int, _TextDataModule
from captioning.data.text_vocab import TextTokenizer, TextVocab
from captioning.data.vocab import Vocabulary

MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
YEARS = range(1950, 2050)
SYMBOLS = tuple("abcdefghijklmnopqrstuvwxyz0123456789")
TASKS = ("dates", "reverse")
_TOKENIZER = TextTokenizer("word", lowercase=True)


def dates_example(rng: random.Random, n_items: int) -> tuple[list[str], list[str], list[int]]:
    """``n_items`` dates "d mon yyyy" joined by "," -> "yyyy-mm-dd" joined by ",".

    Returns source tokens, target tokens and, per target token plus the final EOS, the
    source index it comes from; -1 (not scored) for the inserted "-", the EOS and the ","
    separators: every source comma is the same token, so which one a model looks at for an
    output comma is arbitrary (measured: trained models pick a later comma most of the time).
    """
    src: list[str] = []
    tgt: list[str] = []
    align: list[int] = []
    for k in range(n_items):
        if k:
            src.append(",")
            tgt.append(",")
            align.append(-1)
        year, month = rng.choice(YEARS), rng.randint(1, 12)
        day = rng.randint(1, calendar.monthrange(year, month)[1])
        base = len(src)
        src += [str(day), MONTHS[month - 1], str(year)]
        tgt += [str(year), "-", f"{month:02d}", "-", f"{day:02d}"]
        align += [base + 2, -1, base + 1, -1, base]
    return src, tgt, align + [-1]


def reverse_example(rng: random.Random, n_items: int, num_symbols: int) -> tuple[list[str], list[str], list[int]]:
    """``n_items`` random symbols -> the same in reverse order; target t comes from n-1-t."""
    src = [rng.choice(SYMBOLS[:num_symbols]) for _ in range(n_items)]
    return src, src[::-1], [n_items - 1 - t for t in range(n_items)] + [-1]


def synthetic_vocab(task: str, num_symbols: int = 26) -> TextVocab:
    """Every token the task can produce (fixed, no data needed)."""
    if task == "dates":
        source = [str(d) for d in range(1, 32)] + list(MONTHS) + [str(y) for y in YEARS] + [","]
        target = [str(y) for y in YEARS] + [f"{d:02d}" for d in range(1, 32)] + ["-", ","]
    else:
        source = target = list(SYMBOLS[:num_symbols])
    return TextVocab(Vocabulary(sorted(set(source))), Vocabulary(sorted(set(target))), _TOKENIZER)


class SyntheticTextDataModule(_TextDataModule):
    """Built-in seq2seq tasks with known alignments (see the module docstring).

    Args:
        task: "dates" or "reverse".
        min_items, max_items: items per training example (dates: 4 source tokens each, the
            comma included; reverse: 1 symbol each), drawn uniformly.
        eval_min_items, eval_max_items: the same for val/test; None = the training range.
        num_symbols: alphabet size of "reverse" (2..36).
        train_size, val_size, test_size: examples per split.
        bucket_by_length: training batches of similar length (validation and test are always
            decoded in length order).
        batch_size, num_workers, seed: loaders; item i of a split depends only on
            (seed, split, i) and the settings.
    """

    def __init__(
        self,
        task: str = "dates",
        min_items: int = 1,
        max_items: int = 8,
        eval_min_items: int | None = None,
        eval_max_items: int | None = None,
        num_symbols: int = 26,
        train_size: int = 20000,
        val_size: int = 500,
        test_size: int = 1000,
        bucket_by_length: bool = False,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        owner = "SyntheticTextDataModule"
        if task not in TASKS:
            raise ValueError(f"{owner}: task must be one of {TASKS}, got {task!r}")
        eval_min = min_items if eval_min_items is None else eval_min_items
        eval_max = max_items if eval_max_items is None else eval_max_items
        for name, value, low in (
            ("min_items", min_items, 1),
            ("max_items", max_items, 1),
            ("eval_min_items", eval_min, 1),
            ("eval_max_items", eval_max, 1),
            ("train_size", train_size, 1),
            ("val_size", val_size, 1),
            ("test_size", test_size, 1),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("num_symbols", num_symbols, 2),
        ):
            _check_int(owner, name, value, low)
        if min_items > max_items or eval_min > eval_max:
            raise ValueError(
                f"{owner}: min_items must be <= max_items (train {min_items}..{max_items}, eval {eval_min}..{eval_max})"
            )
        if num_symbols > len(SYMBOLS):
            raise ValueError(f"{owner}: num_symbols must be <= {len(SYMBOLS)}, got {num_symbols}")
        self.save_hyperparameters()
        self.task, self.num_symbols, self.seed = task, num_symbols, seed
        self.batch_size, self.num_workers, self.bucket_by_length = batch_size, num_workers, bucket_by_length
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.limits = {"train": (min_items, max_items), "val": (eval_min, eval_max), "test": (eval_min, eval_max)}
        self._vocab = synthetic_vocab(task, num_symbols)

    @property
    def text_vocab(self) -> TextVocab:
        return self._vocab

    def _rng(self, split: str, index: int) -> random.Random:
        return random.Random(f"{self.seed}:{split}:{index}")  # str seeds hash the same in every process

    def source_lengths(self, split: str) -> list[int] | None:
        """Items per example (its first random draw), which orders examples by source length."""
        if split == "train" and not self.bucket_by_length:
            return None
        return [self._rng(split, i).randint(*self.limits[split]) for i in range(self.sizes[split])]

    def example(self, split: str, index: int) -> dict:
        """Item ``index`` of ``split`` (deterministic), with its true alignment."""
        rng = self._rng(split, index)
        n = rng.randint(*self.limits[split])
        if self.task == "dates":
            src, tgt, align = dates_example(rng, n)
        else:
            src, tgt, align = reverse_example(rng, n, self.num_symbols)
        v = self._vocab
        return {
            "id": index,
            "source": v.encode_source(src),
            "target": v.encode_target(tgt),
            "source_text": _TOKENIZER.detokenize(src),
            "reference": _TOKENIZER.detokenize(tgt),
            "alignment": align,
        }

    def dataset(self, split: str) -> TextPairDataset:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return TextPairDataset(make=functools.partial(self.example, split), size=self.sizes[split])

    def examples(self, split: str, indices: Sequence[int]) -> list[dict]:
        return [self.example(split, int(i)) for i in indices]
