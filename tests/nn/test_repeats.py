"""Repetition blocking that allows what the training captions repeat: n-gram keys, the repeats
of a caption set, the block in greedy and beam search, and the buffer that keeps them."""

import functools
import itertools

import pytest
import torch

from captioning.nn.repeats import MAX_LEARNT_N, RepeatableNgrams, ngram_keys, repeated_ngrams
from captioning.nn.search import beam_search, greedy_search

PAD, BOS, EOS = 0, 1, 2


class _Markov(torch.nn.Module):
    """Next-word logits depend on the previous word only: table[prev] (V,), one table for all items."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def prepare_memory(self):
        return {"s": torch.zeros(3, 2)}

    def init_state(self, memory):
        return {"dummy": memory["s"].clone()}

    def step(self, tokens, state, memory):
        n = tokens.shape[0]
        return self.table[tokens].clone(), torch.full((n, 2), 0.5), state


def _loop(vocab=9):
    """Prefers the loop 3 -> 4 -> 5 -> 3 ... (EOS unlikely), with 6 and 7 as second choices."""
    table = torch.full((vocab, vocab), -4.0)
    for prev, nxt in ((BOS, 3), (3, 4), (4, 5), (5, 3)):
        table[prev, nxt] = 3.0
    table[:, 6] = table[:, 7] = 0.0
    table[:, EOS] = -1.0
    return table


def _ngrams(words, n):
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def test_keys_are_one_number_per_ngram():
    v = 7
    grams = torch.tensor(list(itertools.product(range(v), repeat=3)))
    keys = ngram_keys(grams, v)
    assert len(torch.unique(keys)) == len(grams)
    assert int(ngram_keys(torch.tensor([2, 5, 1]), v)) == 2 * 49 + 5 * 7 + 1


def test_repeated_ngrams_are_those_a_caption_holds_twice():
    rows = repeated_ngrams([[5, 6, 7, 5, 6, 8], [9, 10, 11]]).tolist()
    as_tuples = {tuple(x for x in r if x >= 0) for r in rows}
    assert as_tuples == {(5,), (6,), (5, 6)}  # (6, 7), (9, 10) ... occur once
    assert all(len(r) == MAX_LEARNT_N for r in rows)
    assert repeated_ngrams([]).shape == (0, MAX_LEARNT_N)


@pytest.mark.parametrize("beam", [1, 3])
@pytest.mark.parametrize("n", [2, 3])
def test_an_allowed_ngram_repeats_and_no_other_does(n, beam):
    dec = _Markov(_loop())
    search = greedy_search if beam == 1 else functools.partial(beam_search, beam_size=beam)
    allowed = (3, 4, 5)[:n]
    keys = ngram_keys(torch.tensor([allowed]), 9)
    result = search(dec, dec.prepare_memory(), 3, BOS, EOS, PAD, max_length=12, no_repeat_ngram=n, repeatable=keys)
    blocked = search(dec, dec.prepare_memory(), 3, BOS, EOS, PAD, max_length=12, no_repeat_ngram=n)
    for row, length in zip(result.tokens.tolist(), result.lengths.tolist()):
        grams = _ngrams(row[:length], n)
        assert grams.count(allowed) == 2, row  # the loop's allowed n-gram comes back once ...
        assert all(grams.count(g) == 1 for g in set(grams) - {allowed}), row  # ... and nothing else repeats
    for row, length in zip(blocked.tokens.tolist(), blocked.lengths.tolist()):
        grams = _ngrams(row[:length], n)
        assert len(set(grams)) == len(grams), row


def test_learn_splits_at_unknown_words_and_keys_select_one_size():
    stoi = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "a": 3, "small": 4, "red": 5, "and": 6}
    holder = RepeatableNgrams()
    # "zebra" is unknown: no n-gram holds it; "a small red" repeats across it.
    holder.learn([["a", "small", "red", "zebra", "and", "a", "small", "red"]], stoi)
    bigrams = holder.keys(2, len(stoi))
    assert bigrams is not None
    assert bigrams.tolist() == sorted(int(ngram_keys(torch.tensor(g), 7)) for g in ([3, 4], [4, 5]))
    trigrams = holder.keys(3, len(stoi))
    assert trigrams is not None and trigrams.tolist() == [int(ngram_keys(torch.tensor([3, 4, 5]), 7))]
    assert holder.keys(4, len(stoi)) is None  # no 4-gram repeats
    assert holder.keys(MAX_LEARNT_N + 1, len(stoi)) is None  # longer blocks allow no repeat
    assert holder.keys(4, 100_000) is None  # V^4 would not fit int64


def test_the_buffer_loads_whatever_size_was_saved_and_weights_saved_before_it():
    saved = RepeatableNgrams()
    saved.ngrams = repeated_ngrams([[3, 4, 3, 4]])
    loaded = RepeatableNgrams()
    loaded.load_state_dict(saved.state_dict())
    assert torch.equal(loaded.ngrams, saved.ngrams)
    loaded.load_state_dict({})  # weights from before the buffer existed: nothing allowed
    assert loaded.ngrams.shape == (0, MAX_LEARNT_N)
    with pytest.raises(RuntimeError, match="ngrams"):
        loaded.load_state_dict({"ngrams": torch.zeros(3, 2, dtype=torch.long)})
