"""Text pair datamodules for the seq2seq model: TSV parallel files (built-in synthetic tasks:
:mod:`captioning.data.text_tasks`).

:class:`TsvTextDataModule` reads ``source<TAB>target`` lines (Tatoeba / manythings.org Anki
files; columns after the second, such as Anki's attribution, are ignored; blank lines are
skipped). A malformed line (no tab, an empty side, bytes that are not valid text in the
file's encoding) raises :class:`TsvFormatError` naming the file and line, or, with
``skip_malformed: true``, is skipped and counted (``dm.skipped``, plus one warning per file).
Its tokenizer (BPE subwords by default in configs/text_tsv.yaml) is learnt on the training
pairs; training batches are bucketed by source length; validation and test are decoded in
length order while the datasets keep file order.

Both expose ``vocab_data`` (source/target vocabularies + tokenizer settings as plain data)
that the CLI links into ``model.init_args.vocab``; batches follow the text batch described in
:mod:`captioning.models.seq2seq`.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

# Imported at module level on purpose: Lightning records the init args of BatchSampler
# subclasses that exist when it calls the dataloader hooks, so it can rebuild the sampler
# with a DistributedSampler underneath under DDP.
from captioning.data.batches import MovesTensorsOnly, collate_text
from captioning.data.sampling import LengthBucketBatchSampler
from captioning.data.text_vocab import SUBWORD_KINDS, TextTokenizer, TextVocab
from captioning.hyperparameters import TypedHyperparameters

SPLITS = ("train", "val", "test")


class TsvFormatError(ValueError):
    """A malformed line in a TSV file; the message names the file and the line number."""


# --------------------------------------------------------------------------- batches
class TextPairDataset(Dataset):
    """Encoded pairs: a list of dicts, or a function ``index -> dict`` (synthetic tasks).

    Items: {"id", "source" (ids), "target" (ids), "source_text", "reference", "alignment" or None}.
    """

    def __init__(self, items: list[dict] | None = None, make=None, size: int = 0) -> None:
        self.items, self.make, self.size = items, make, len(items) if items is not None else size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"dataset has {self.size} items, got index {index}")
        return self.items[index] if self.items is not None else self.make(index)


class _TextDataModule(TypedHyperparameters, MovesTensorsOnly, L.LightningDataModule):
    """Loaders shared by both datamodules; subclasses provide ``dataset(split)`` and ``text_vocab``."""

    batch_size: int
    num_workers: int
    seed: int

    @property
    def text_vocab(self) -> TextVocab:
        raise NotImplementedError

    def dataset(self, split: str) -> TextPairDataset:
        raise NotImplementedError

    @property
    def vocab_data(self) -> dict:
        """{"source", "target", "tokenizer"} as plain data (what the model stores)."""
        return self.text_vocab.to_dict()

    def _loader(self, split: str, shuffle: bool, by_length: bool = False) -> DataLoader:
        data = self.dataset(split)
        common: dict[str, Any] = dict(
            num_workers=self.num_workers, collate_fn=collate_text, persistent_workers=self.num_workers > 0
        )
        lengths = self.source_lengths(split) if by_length else None
        if lengths is None:
            return DataLoader(data, batch_size=self.batch_size, shuffle=shuffle, **common)
        if shuffle:  # training: similar lengths per batch, a new mix every epoch
            sampler = RandomSampler(data, generator=torch.Generator().manual_seed(self.seed))
            batches = LengthBucketBatchSampler(sampler, self.batch_size, False, lengths=lengths, seed=self.seed)
            return DataLoader(data, batch_sampler=batches, **common)
        # Evaluation: decode in order of source length (less padding, earlier stops); the
        # dataset keeps file order, so "the first N validation items" stay the same ones.
        order = sorted(range(len(data)), key=lambda i: lengths[i])
        return DataLoader(data, batch_size=self.batch_size, sampler=order, **common)

    def source_lengths(self, split: str) -> list[int] | None:
        """Source length of every item of ``split`` (for length-sorted batches), or None."""
        return None

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True, by_length=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False, by_length=True)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False, by_length=True)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def _check_int(owner: str, name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{owner}: {name} must be an int >= {low}, got {value!r}")


# --------------------------------------------------------------------------- TSV files
def read_tsv(
    path: str | Path, skip_malformed: bool = False, encoding: str = "utf-8"
) -> tuple[list[tuple[int, str, str]], list[str]]:
    """Read ``source<TAB>target`` lines.

    Returns:
        pairs: (line number starting at 1, source, target), sides stripped of whitespace;
        problems: "line N: reason" for every skipped malformed line (empty unless skipping).
    Raises:
        FileNotFoundError: no such file. TsvFormatError: the first malformed line, unless
        ``skip_malformed``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TSV file {path} does not exist")
    pairs: list[tuple[int, str, str]] = []
    problems: list[str] = []
    # Split bytes on b"\n" ourselves: a bad byte is then reported on its own line, and
    # Unicode line separators (\u2028, \x85) inside a sentence do not break a pair in two.
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        problem = None
        try:
            line = raw.decode(encoding).rstrip("\r")
        except UnicodeDecodeError as err:
            line, problem = "", (f"not valid {encoding} text (byte 0x{raw[err.start]:02x} at column {err.start + 1})")
        if number == 1:
            line = line.lstrip("\ufeff")  # byte order mark written by some editors
        if problem is None:
            if not line.strip():
                continue  # blank lines (e.g. the one after the final newline) are not data
            if "\t" not in line:
                problem = "missing tab (expected 'source<TAB>target')"
            else:
                source, target = (side.strip() for side in line.split("\t")[:2])
                if not source or not target:
                    problem = f"empty {'source' if not source else 'target'} side"
                else:
                    pairs.append((number, source, target))
                    continue
        if not skip_malformed:
            raise TsvFormatError(
                f"{path}, line {number}: {problem}; fix the line or set "
                "skip_malformed: true to skip and count malformed lines"
            )
        problems.append(f"line {number}: {problem}")
    return pairs, problems


class TsvTextDataModule(_TextDataModule):
    """Parallel text from tab-separated files; tokenizer and vocabularies come from the train split.

    Args:
        train_path: TSV file of training pairs.
        val_path: TSV of validation pairs; None = hold out ``val_fraction`` of train_path
            (a seeded random subset, excluded from training and from the vocabularies).
        test_path: TSV of test pairs (test and predict); None = the validation pairs.
        val_fraction: share of train_path held out when val_path is None.
        tokenizer: "bpe" (subwords trained on the training pairs, both sides jointly),
            "word" (words and punctuation) or "char"; lowercase: lowercase first.
        subword_vocab_size: BPE vocabulary size (pieces; both languages share it).
        min_count, max_vocab_size: vocabulary cut-offs per side (rarer tokens become <unk>).
        max_train_length: training pairs with more tokens on either side are dropped (counted in
            ``dropped_long``); None keeps all. Validation and test pairs are never dropped (the
            model cuts sources past its ``max_source_length``).
        reverse: translate column 2 -> column 1 instead of 1 -> 2.
        skip_malformed: skip and count malformed lines instead of raising TsvFormatError.
        encoding: text encoding of the files.
        bucket_by_length: training batches of similar source length (less padding, faster);
            validation and test are always decoded in length order.
        batch_size, num_workers, seed: loaders and the held-out split.

    References (what BLEU, chrF and exact match compare against) are the target sentences
    normalised as the tokenizer does (Unicode NFC, whitespace collapsed, lowercased with
    ``lowercase``): :func:`captioning.models.translations.score_translations` scores ``translate``
    output against a file the same way.
    """

    def __init__(
        self,
        train_path: str,
        val_path: str | None = None,
        test_path: str | None = None,
        val_fraction: float = 0.05,
        tokenizer: str = "word",
        lowercase: bool = True,
        subword_vocab_size: int = 4000,
        min_count: int = 1,
        max_vocab_size: int | None = None,
        max_train_length: int | None = 100,
        reverse: bool = False,
        skip_malformed: bool = False,
        encoding: str = "utf-8",
        bucket_by_length: bool = True,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        owner = "TsvTextDataModule"
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("min_count", min_count, 1),
            ("subword_vocab_size", subword_vocab_size, 8),
        ):
            _check_int(owner, name, value, low)
        if val_path is None and not 0.0 < val_fraction < 1.0:
            raise ValueError(f"{owner}: without val_path, val_fraction must be in (0, 1), got {val_fraction!r}")
        if tokenizer not in ("word", "char", *SUBWORD_KINDS):
            raise ValueError(
                f"{owner}: tokenizer must be one of word, char, {', '.join(SUBWORD_KINDS)}; got {tokenizer!r}"
            )
        self.save_hyperparameters()
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.bucket_by_length = bucket_by_length
        self.skipped: dict[str, int] = {}
        self.dropped_long = 0
        self._data: dict[str, list[dict]] | None = None
        self._vocab: TextVocab | None = None

    def _read(self, path: str) -> list[tuple[str, str, str]]:
        hp = self.hparams
        pairs, problems = read_tsv(path, hp.skip_malformed, hp.encoding)
        self.skipped[str(path)] = len(problems)
        if problems:
            shown = "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else "")
            warnings.warn(f"{path}: skipped {len(problems)} malformed line(s) ({shown})", stacklevel=2)
        if not pairs:
            raise TsvFormatError(f"{path}: no valid 'source<TAB>target' lines")
        name = Path(path).name
        return [(f"{name}:{n}", *((t, s) if hp.reverse else (s, t))) for n, s, t in pairs]

    def _load(self) -> None:
        """Read every split, build the vocabularies from train, encode (once, cached)."""
        if self._data is not None:
            return
        hp = self.hparams
        train = self._read(hp.train_path)
        if hp.val_path is not None:
            val = self._read(hp.val_path)
        else:
            order = list(range(len(train)))
            random.Random(hp.seed).shuffle(order)
            n_val = max(1, round(len(train) * hp.val_fraction))
            if n_val >= len(train):
                raise ValueError(
                    f"{hp.train_path}: {len(train)} pair(s) are too few to hold out a validation split; give val_path"
                )
            held = set(order[:n_val])
            val = [p for i, p in enumerate(train) if i in held]
            train = [p for i, p in enumerate(train) if i not in held]
        test = self._read(hp.test_path) if hp.test_path is not None else val
        # Subword models learn from the training pairs only (both sides: one shared model).
        self.tokenizer = TextTokenizer.train(
            hp.tokenizer, (text for _, s, t in train for text in (s, t)), hp.lowercase, hp.subword_vocab_size
        )
        tok = {
            split: [(i, self.tokenizer(s), self.tokenizer(t), s, t) for i, s, t in pairs]
            for split, pairs in (("train", train), ("val", val), ("test", test))
        }
        limit = hp.max_train_length
        if limit is not None:
            kept = [p for p in tok["train"] if len(p[1]) <= limit and len(p[2]) <= limit]
            self.dropped_long = len(tok["train"]) - len(kept)
            if not kept:
                raise ValueError(f"{hp.train_path}: every training pair is longer than max_train_length={limit}")
            tok["train"] = kept
        train_pairs = tok["train"]
        self._vocab = v = TextVocab.build(
            self.tokenizer,
            [p[1] for p in train_pairs],
            [p[2] for p in train_pairs],
            [p[3] for p in train_pairs],
            hp.min_count,
            hp.max_vocab_size,
        )
        self._data = {
            split: [
                {
                    "id": i,
                    "source": v.encode_source(st),
                    "target": v.encode_target(tt),
                    "source_text": s,
                    "reference": self.tokenizer.normalize(t),
                    "alignment": None,
                }
                for i, st, tt, s, t in pairs
            ]
            for split, pairs in tok.items()
        }

    def source_lengths(self, split: str) -> list[int] | None:
        if split == "train" and not self.bucket_by_length:
            return None
        return [len(self.dataset(split)[i]["source"]) for i in range(len(self.dataset(split)))]

    @property
    def text_vocab(self) -> TextVocab:
        self._load()
        assert self._vocab is not None
        return self._vocab

    def setup(self, stage: str | None = None) -> None:
        self._load()

    def dataset(self, split: str) -> TextPairDataset:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self._load()
        assert self._data is not None
        return TextPairDataset(self._data[split])
