"""CIDEr-D fast enough to score every sampled caption of every training batch (self-critical training).

:class:`CiderD` computes exactly what pycocoevalcap's ``Cider`` computes (CIDEr-D: tf-idf
weighted n-grams of orders 1-4, clipped matches, a Gaussian length penalty with sigma 6 on
the number of bigrams, times 10), with two differences that make it usable as a reward:

* the document frequencies come from a fixed reference corpus, counted once when the scorer
  is built (self-critical training uses the training references: an n-gram's idf does not
  depend on which images a batch happens to hold). Built on the same references that
  pycocoevalcap is given, the scores agree with it to 1e-9 (tests/eval/test_cider.py);
* the n-grams are counted with array operations instead of Python dictionaries: every n-gram
  is an integer key (word ids in base ``B``), the references of an image are cooked once and
  kept, and a batch of hypotheses is matched against them with one sort and one search.

Words are whitespace tokens; callers tokenise first (the captioner uses
:func:`captioning.data.vocab.tokenize`, like its vocabulary).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np

ORDERS = 4
SIGMA = 6.0
#: Largest key base whose 4-gram keys fit in int64 (B**4 < 2**63).
_MAX_BASE = 55_000


class CiderD:
    """CIDEr-D against a fixed reference corpus.

    Args:
        references: image key -> that image's reference captions (whitespace-tokenised strings,
            at least one each). Their n-grams give the document frequencies (one count per
            image that has the n-gram in any of its references) and ``log(number of images)``.
        extra_words: words hypotheses may contain that the references lack (e.g. a model's
            vocabulary), so :meth:`score_ids` can map token ids without a dictionary per call.

    ``score`` / ``score_ids`` return one CIDEr-D per hypothesis (float64), on pycocoevalcap's
    scale (x10); the corpus figure pycocoevalcap reports is their mean.
    """

    def __init__(self, references: Mapping[Hashable, Sequence[str]], extra_words: Sequence[str] = ()) -> None:
        if not references:
            raise ValueError("CiderD: no references")
        self.keys = list(references)
        self.slot = {k: i for i, k in enumerate(self.keys)}
        words: dict[str, int] = {}
        ref_rows: list[list[int]] = []
        owner: list[int] = []
        for i, k in enumerate(self.keys):
            refs = references[k]
            if isinstance(refs, str) or len(refs) == 0:
                raise ValueError(f"CiderD: references of {k!r} must be a non-empty list of strings")
            for r in refs:
                ref_rows.append([words.setdefault(w, len(words)) for w in r.split()])
                owner.append(i)
        self.num_ref_words = len(words)
        for w in extra_words:
            words.setdefault(w, len(words))
        self.words = words
        # Ids are shifted by 1 so every order has its own key range: an n-gram's key lies in [B^(n-1), B^n).
        self.base = len(words) + 2 + 512  # + room for a hypothesis's own unseen words (see _word_ids)
        if self.base >= _MAX_BASE:
            raise ValueError(
                f"CiderD: {len(words):,} distinct words; n-gram keys fit in 64 bits up to {_MAX_BASE - 514:,}"
            )
        ids, lengths = _pad(ref_rows)
        row, key, tf = _ngrams(ids, lengths, self.base)
        owner_arr = np.asarray(owner, dtype=np.int64)
        # Document frequency: images whose references contain the n-gram.
        per_image = np.unique(np.stack([owner_arr[row], key], 1), axis=0)
        self.ngram_keys, df = np.unique(per_image[:, 1], return_counts=True)  # sorted keys
        self.log_df = np.log(np.maximum(1.0, df.astype(np.float64)))
        self.ref_len = float(np.log(float(len(self.keys))))
        # Each image's references as one table: its distinct n-grams (by rank in ngram_keys)
        # x its references (weights, 0 where a reference lacks the n-gram).
        rank = np.searchsorted(self.ngram_keys, key)
        weight = tf * (self.ref_len - self.log_df[rank])
        order = _order(key, self.base)
        self.num_refs = np.bincount(owner_arr, minlength=len(self.keys))
        self.max_refs = int(self.num_refs.max())
        first_ref = np.concatenate([[0], np.cumsum(self.num_refs)[:-1]])
        local_ref = np.arange(len(owner_arr)) - first_ref[owner_arr]  # index of a reference within its image
        self.ref_norm = np.zeros((len(self.keys), self.max_refs, ORDERS))
        np.add.at(self.ref_norm, (owner_arr[row], local_ref[row], order), weight**2)
        self.ref_norm = np.sqrt(self.ref_norm)
        self.ref_bigrams = np.zeros((len(self.keys), self.max_refs))
        two = order == 1
        np.add.at(self.ref_bigrams, (owner_arr[row[two]], local_ref[row[two]]), tf[two])
        # Table rows sorted by (image, rank): composite = image * R + rank.
        self.num_ngrams = len(self.ngram_keys)
        composite = owner_arr[row] * self.num_ngrams + rank
        self.table_keys, where = np.unique(composite, return_inverse=True)
        self.table_weights = np.zeros((len(self.table_keys), self.max_refs))
        self.table_weights[where, local_ref[row]] = weight

    # ------------------------------------------------------------------ public
    def score(self, image_keys: Sequence[Hashable], hypotheses: Sequence[str]) -> np.ndarray:
        """CIDEr-D of each hypothesis (a whitespace-tokenised string) against its image's references."""
        if len(image_keys) != len(hypotheses):
            raise ValueError(f"CiderD: {len(image_keys)} image keys but {len(hypotheses)} hypotheses")
        rows = []
        for h in hypotheses:
            toks = h.split()
            unseen: dict[str, int] = {}
            # A word outside the corpus matches nothing; it only needs an id of its own within
            # this hypothesis (for its term frequency), past every corpus word's id.
            rows.append([self.words[w] if w in self.words else self._unseen(unseen, w) for w in toks])
        ids, lengths = _pad(rows)
        return self._score(self._slots(image_keys), ids, lengths)

    def score_ids(self, image_keys: Sequence[Hashable], word_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Like :meth:`score` for hypotheses already as ids of :attr:`words` ((N, T) int, ``lengths`` (N,))."""
        ids = np.asarray(word_ids, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        if ids.ndim != 2 or lengths.shape != (ids.shape[0],) or len(image_keys) != ids.shape[0]:
            raise ValueError(
                f"CiderD: ids {ids.shape}, lengths {lengths.shape} and {len(image_keys)} image keys do not agree"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.words)):
            raise ValueError(f"CiderD: word ids must lie in [0, {len(self.words)})")
        return self._score(self._slots(image_keys), ids, lengths)

    # ------------------------------------------------------------------ internals
    def _unseen(self, unseen: dict[str, int], word: str) -> int:
        if word not in unseen:
            if len(unseen) >= 512:
                raise ValueError("CiderD: a hypothesis with more than 512 distinct words outside the vocabulary")
            unseen[word] = len(self.words) + len(unseen)
        return unseen[word]

    def _slots(self, image_keys: Sequence[Hashable]) -> np.ndarray:
        try:
            return np.asarray([self.slot[k] for k in image_keys], dtype=np.int64)
        except KeyError as err:
            raise KeyError(f"CiderD: image {err.args[0]!r} has no references in this scorer") from None

    def _score(self, slots: np.ndarray, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        n = len(slots)
        out = np.zeros(n)
        if n == 0 or self.num_ngrams == 0:  # no reference has a word: nothing can match
            return out
        row, key, tf = _ngrams(ids, lengths, self.base)
        order = _order(key, self.base)
        rank = np.searchsorted(self.ngram_keys, key).clip(max=max(self.num_ngrams - 1, 0))
        known = self.ngram_keys[rank] == key
        log_df = np.where(known, self.log_df[rank], 0.0)  # an n-gram no image has: df 0 -> log(max(1, 0)) = 0
        weight = tf * (self.ref_len - log_df)
        norm = np.zeros((n, ORDERS))
        np.add.at(norm, (row, order), weight**2)
        norm = np.sqrt(norm)
        bigrams = np.bincount(row[order == 1], weights=tf[order == 1], minlength=n)
        # Clipped matches with each reference of the hypothesis's image.
        composite = slots[row] * self.num_ngrams + rank
        pos = np.searchsorted(self.table_keys, composite).clip(max=len(self.table_keys) - 1)
        hit = known & (self.table_keys[pos] == composite)
        ref_w = self.table_weights[pos[hit]]  # (E, max_refs)
        val = np.zeros((n, ORDERS, self.max_refs))
        np.add.at(val, (row[hit], order[hit]), np.minimum(weight[hit, None], ref_w) * ref_w)
        ref_norm = self.ref_norm[slots]  # (n, max_refs, 4)
        denom = norm[:, :, None] * ref_norm.transpose(0, 2, 1)  # (n, 4, max_refs)
        val = np.where(denom != 0, val / np.where(denom != 0, denom, 1.0), val)
        delta = bigrams[:, None] - self.ref_bigrams[slots]  # (n, max_refs)
        val = val * np.exp(-(delta**2) / (2 * SIGMA**2))[:, None, :]
        valid = np.arange(self.max_refs)[None, :] < self.num_refs[slots][:, None]
        per_ref = val.mean(1) * valid  # mean over orders, padding references out
        return per_ref.sum(1) / self.num_refs[slots] * 10.0


def _pad(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.asarray([len(r) for r in rows], dtype=np.int64)
    ids = np.full((len(rows), max(int(lengths.max(initial=0)), 1)), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    return ids, lengths


def _ngrams(ids: np.ndarray, lengths: np.ndarray, base: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every n-gram (orders 1-4) of every row: (row, key, term frequency), one entry per distinct
    n-gram of a row. ids (N, T) word ids (anything past ``lengths`` is ignored)."""
    n, t = ids.shape
    shifted = ids + 1
    rows, keys = [], []
    for k in range(1, ORDERS + 1):
        if t < k:
            break
        key = np.zeros((n, t - k + 1), dtype=np.int64)
        for j in range(k):
            key = key * base + shifted[:, j : t - k + 1 + j]
        ok = np.arange(t - k + 1)[None, :] + k <= lengths[:, None]
        r = np.broadcast_to(np.arange(n)[:, None], key.shape)
        rows.append(r[ok])
        keys.append(key[ok])
    if not rows:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    pairs, counts = np.unique(np.stack([np.concatenate(rows), np.concatenate(keys)], 1), axis=0, return_counts=True)
    return pairs[:, 0], pairs[:, 1], counts.astype(np.float64)


def _order(key: np.ndarray, base: int) -> np.ndarray:
    """0-based n-gram order of each key (an n-gram's key lies in [base^(n-1), base^n))."""
    order = np.zeros(key.shape, dtype=np.int64)
    for k in range(1, ORDERS):
        order += key >= base**k
    return order
