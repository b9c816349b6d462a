"""Repetition blocking for decoding, and the n-grams the training captions themselves repeat.

Decoding with ``no_repeat_ngram: n`` never writes an n-gram a caption already holds, which stops
loops such as "a man in a man in a". Some captions repeat word groups on purpose ("a small red
square and a small blue circle" repeats "a small"); a block that forbade those would make such
captions impossible to write. So the block learns from the training captions which n-grams may
repeat: any n-gram that occurs twice within one training caption stays allowed
(:class:`RepeatableNgrams`, kept with the model's weights), and every other repeat is blocked.

N-grams are compared as int64 keys (:func:`ngram_keys`): sum_i w_i V^(n-1-i) over word ids w and
vocabulary size V, a distinct key per n-gram while V^n < 2^63 (n <= 4 for vocabularies up to
55,000 words). Allowed n-grams are looked up by binary search in their sorted keys: a fixed
number of tensor operations per step, no host sync (CUDA-graph safe).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

#: The longest n-gram whose repeats are learnt from the training captions; blocks of longer
#: n-grams allow no repeat at all.
MAX_LEARNT_N = 4


def ngram_keys(grams: Tensor, vocab_size: int) -> Tensor:
    """Word ids (..., n) -> int64 keys (...): sum_i w_i V^(n-1-i), one key per n-gram while V^n < 2^63."""
    keys = torch.zeros(grams.shape[:-1], dtype=torch.long, device=grams.device)
    for i in range(grams.shape[-1]):
        keys = keys * vocab_size + grams[..., i]
    return keys


def block_repeats(
    logits: Tensor, seq: Tensor, t: Tensor, n: int, eos_id: int, repeatable: Tensor | None = None
) -> Tensor:
    """Forbid every word that would repeat an n-gram the row has already produced (in place).

    logits (N, V), changed in place and returned; seq (N, L) each row's words so far (positions
    < ``t`` are real); t: 0-dim step counter on the device; n >= 1; ``repeatable``: sorted int64
    keys (:func:`ngram_keys` with V = logits.shape[1]) of the n-grams that may repeat, or None.
    A word w is banned when the row's last n-1 words followed by w already occur in it and that
    n-gram is not repeatable. Fixed shapes and no host sync (CUDA-graph safe): every window of
    ``seq`` is compared with the row's current prefix and windows at or past ``t - n`` ignored.
    A row left with no word at all (a tiny vocabulary) may still end: EOS.
    """
    length = seq.shape[1]
    if length < n:
        return logits
    starts = torch.arange(length - n + 1, device=seq.device)  # window j covers j .. j+n-1
    usable = starts <= t - n  # the whole window, its last word included, was produced
    following = seq[:, n - 1 :]  # (N, L-n+1): the word after each window's first n-1
    if n == 1:
        hit = usable.unsqueeze(0).expand(seq.shape[0], -1)
    else:
        prefix_pos = (t - (n - 1) + torch.arange(n - 1, device=seq.device)).clamp(min=0)
        prefix = seq.index_select(1, prefix_pos)  # (N, n-1): the row's last n-1 words
        windows = seq.unfold(1, n - 1, 1)[:, : length - n + 1]  # (N, L-n+1, n-1)
        hit = (windows == prefix.unsqueeze(1)).all(-1) & usable
    if repeatable is not None and repeatable.numel():
        # The n-gram each window would repeat (the row's last n-1 words + the window's next word).
        keys = following if n == 1 else ngram_keys(prefix, logits.shape[1]).unsqueeze(1) * logits.shape[1] + following
        keys = keys.contiguous()  # searchsorted copies a strided input anyway
        at = torch.searchsorted(repeatable, keys).clamp_(max=repeatable.numel() - 1)
        hit = hit & (repeatable[at] != keys)
    penalty = torch.zeros_like(following, dtype=logits.dtype).masked_fill_(hit, float("-inf"))
    logits.scatter_add_(1, following, penalty)
    # A row with every word at -inf may end: EOS at 0 (one reduction and one column, not a full copy).
    dead = logits.amax(1) == float("-inf")
    logits[:, eos_id] = logits[:, eos_id].masked_fill(dead, 0.0)
    return logits


def repeated_ngrams(captions: Iterable[Sequence[int]], max_n: int = MAX_LEARNT_N) -> Tensor:
    """Every n-gram (1 <= n <= ``max_n``) that occurs at least twice within one caption.

    captions: word-id sequences (no BOS/EOS); a negative id (a word outside the vocabulary) is in
    no n-gram. Returns (M, max_n) int64, one n-gram per row, right-aligned and left-padded with
    -1, sorted and unique."""
    found: set[tuple[int, ...]] = set()
    for ids in captions:
        ids = list(ids)
        for n in range(1, max_n + 1):
            seen: set[tuple[int, ...]] = set()
            for i in range(len(ids) - n + 1):
                gram = tuple(ids[i : i + n])
                if min(gram) < 0:
                    continue
                if gram in seen:
                    found.add(gram)
                seen.add(gram)
    rows = sorted((-1,) * (max_n - len(g)) + g for g in found)
    return torch.tensor(rows, dtype=torch.long).view(-1, max_n)


class RepeatableNgrams(nn.Module):
    """The n-grams decoding may repeat (those the training captions repeat), saved with the weights.

    Buffer ``ngrams`` (M, :data:`MAX_LEARNT_N`) int64 word ids, right-aligned, left-padded with -1
    (:func:`repeated_ngrams`). Its size follows the data: loading resizes it to the stored one,
    and weights saved before it existed load with none (every repeat blocked, as then).
    """

    ngrams: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("ngrams", torch.empty(0, MAX_LEARNT_N, dtype=torch.long))

    def learn(self, captions: Iterable[Sequence[str]], stoi: dict[str, int]) -> None:
        """Collect the repeated n-grams of tokenised training ``captions``; an n-gram holding a word
        outside the vocabulary (``stoi``) is left out (decoding never writes it as such)."""
        as_ids = [[stoi.get(w, -1) for w in words] for words in captions]
        self.ngrams = repeated_ngrams(as_ids).to(self.ngrams.device)

    def keys(self, n: int, vocab_size: int) -> Tensor | None:
        """Sorted keys (:func:`ngram_keys`) of the repeatable n-grams of size ``n``, or None
        when there are none (or n is longer than those learnt, or V^n would not fit int64)."""
        if not 1 <= n <= MAX_LEARNT_N or vocab_size**n >= 2**63 or not self.ngrams.numel():
            return None
        rows = self.ngrams
        width = rows.shape[1]
        of_size = (rows[:, width - n] >= 0) & ((rows[:, : width - n] < 0).all(1) if width > n else True)
        grams = rows[of_size][:, width - n :]
        grams = grams[((grams >= 0) & (grams < vocab_size)).all(1)]  # ids a stored file made up: none
        if not len(grams):
            return None
        return torch.unique(ngram_keys(grams, vocab_size))  # sorted

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "ngrams"
        stored = state_dict.get(key)
        if stored is None:  # saved before the model kept them: none
            stored = state_dict[key] = torch.empty(0, MAX_LEARNT_N, dtype=torch.long, device=self.ngrams.device)
        if stored.dim() != 2 or stored.shape[1] != MAX_LEARNT_N:
            error_msgs.append(f"size mismatch for {key}: shape {tuple(stored.shape)}, expected (M, {MAX_LEARNT_N})")
            return
        self.ngrams = torch.empty(stored.shape, dtype=torch.long, device=self.ngrams.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
