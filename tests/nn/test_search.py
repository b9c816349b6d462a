"""Greedy and batched beam search, on a toy decoder whose best sequence we can enumerate."""

import functools
import itertools

import pytest
import torch

from captioning.nn.image_decoder import ShowAttendTellDecoder
from captioning.nn.search import beam_search, greedy_search, sample_search

PAD, BOS, EOS = 0, 1, 2


class MarkovDecoder(torch.nn.Module):
    """Next-word log-probs depend only on the previous word: table[item, prev] (V,)."""

    def __init__(self, table):  # (B, V, V) logits
        super().__init__()
        self.table = table

    def prepare_memory(self):
        return {"table": self.table, "s": torch.zeros(self.table.shape[0], 3)}

    def init_state(self, memory):
        return {"dummy": memory["s"].clone()}

    def step(self, tokens, state, memory):
        rows = memory["table"][torch.arange(tokens.shape[0]), tokens]  # (N, V)
        alpha = torch.softmax(memory["s"], -1)
        return rows, alpha, state


def _best_by_enumeration(table, length):
    """Highest total log-prob sequence of exactly ``length`` words or ending in EOS earlier."""
    logp = torch.log_softmax(table, -1)
    v = table.shape[-1]
    best, best_seq = -float("inf"), None
    for n in range(1, length + 1):
        for seq in itertools.product(range(v), repeat=n):
            if EOS in seq[:-1] or (n < length and seq[-1] != EOS) or PAD in seq:
                continue
            prev, total = BOS, 0.0
            for w in seq:
                total += float(logp[prev, w])
                prev = w
            if total > best:
                best, best_seq = total, seq
    return best, best_seq


def test_beam_search_finds_the_best_sequence_greedy_misses():
    torch.manual_seed(3)
    v, length = 5, 4
    found_gap = False
    for _ in range(20):
        table = torch.randn(1, v, v) * 2.0
        table[..., PAD] = -1e9
        dec = MarkovDecoder(table)
        best, seq = _best_by_enumeration(table[0], length)
        res = beam_search(dec, dec.prepare_memory(), 1, BOS, EOS, PAD, beam_size=v * v, max_length=length)
        n = int(res.lengths[0])
        assert tuple(res.tokens[0, :n].tolist()) == seq
        assert res.scores[0].item() == pytest.approx(best, abs=1e-4)
        greedy = greedy_search(dec, dec.prepare_memory(), 1, BOS, EOS, PAD, max_length=length)
        assert greedy.scores[0] <= res.scores[0] + 1e-5
        found_gap |= bool(greedy.scores[0] < res.scores[0] - 1e-3)
    assert found_gap, "toy problem never had a greedy-suboptimal case"


def test_no_beam_emits_eos_does_not_crash():
    table = torch.zeros(2, 6, 6)
    table[..., EOS] = -1e9  # EOS impossible
    table[..., PAD] = -1e9
    dec = MarkovDecoder(table)
    res = beam_search(dec, dec.prepare_memory(), 2, BOS, EOS, PAD, beam_size=3, max_length=7)
    assert res.tokens.shape == (2, 7) and torch.all(res.lengths == 7)
    assert not (res.tokens == EOS).any()
    g = greedy_search(dec, dec.prepare_memory(), 2, BOS, EOS, PAD, max_length=7)
    assert torch.all(g.lengths == 7)


def _decoder(score="additive"):
    torch.manual_seed(0)
    return ShowAttendTellDecoder(30, 12, 8, 16, 10, attention=score, dropout=0.0, max_positions=9).double().eval()


@pytest.mark.parametrize("score", ["additive", "none"])
def test_caption_does_not_depend_on_the_other_images_in_the_batch(score):
    dec = _decoder(score)
    feats = torch.randn(5, 9, 12, dtype=torch.double)
    full = beam_search(dec, dec.prepare_memory(feats), 5, BOS, EOS, PAD, beam_size=3, max_length=15)
    for i in range(5):
        alone = beam_search(dec, dec.prepare_memory(feats[i : i + 1]), 1, BOS, EOS, PAD, beam_size=3, max_length=15)
        n = int(alone.lengths[0])
        assert torch.equal(alone.tokens[0, :n], full.tokens[i, :n])
        torch.testing.assert_close(alone.scores[0], full.scores[i])
        torch.testing.assert_close(alone.alphas[0, :n], full.alphas[i, :n])
    shuffled = beam_search(dec, dec.prepare_memory(feats.flip(0)), 5, BOS, EOS, PAD, beam_size=3, max_length=15)
    assert torch.equal(shuffled.tokens.flip(0), full.tokens)


def test_beam_of_one_equals_greedy_and_results_are_consistent():
    dec = _decoder()
    feats = torch.randn(4, 9, 12, dtype=torch.double)
    mem = dec.prepare_memory(feats)
    g = greedy_search(dec, mem, 4, BOS, EOS, PAD, max_length=12)
    b = beam_search(dec, mem, 4, BOS, EOS, PAD, beam_size=1, max_length=12)
    assert torch.equal(g.tokens, b.tokens)
    torch.testing.assert_close(g.scores, b.scores)
    # alphas: one distribution per generated word, each summing to 1
    torch.testing.assert_close(b.alphas.sum(-1), torch.ones(4, b.tokens.shape[1], dtype=torch.float))
    # after EOS only padding
    for row, n in zip(b.tokens, b.lengths):
        assert torch.all(row[int(n) :] == PAD)


def test_wider_beam_never_scores_worse_without_length_penalty():
    dec = _decoder()
    feats = torch.randn(6, 9, 12, dtype=torch.double)
    mem = dec.prepare_memory(feats)
    s1 = beam_search(dec, mem, 6, BOS, EOS, PAD, beam_size=1, max_length=10).scores
    s4 = beam_search(dec, mem, 6, BOS, EOS, PAD, beam_size=4, max_length=10).scores
    assert torch.all(s4 >= s1 - 1e-6)


def test_length_penalty_prefers_longer_finished_hypotheses():
    # After word 3, EOS (log p -0.60) beats going on (-0.80, then -0.47): the short caption
    # [3, EOS] totals -0.60 against -1.27 for [3, 4, 5, EOS]. With GNMT alpha=4 the long one
    # wins (-0.60/1.85 = -0.32 vs -1.27/5.06 = -0.25).
    table = torch.full((1, 6, 6), -1e9)
    table[0, BOS, 3] = 0.0
    table[0, 3, EOS] = 0.0
    table[0, 3, 4] = -0.2
    table[0, 4, 5] = 0.5
    table[0, 4, EOS] = 0.0
    table[0, 5, EOS] = 0.0
    dec = MarkovDecoder(table)
    short = beam_search(dec, dec.prepare_memory(), 1, BOS, EOS, PAD, beam_size=3, max_length=6)
    long = beam_search(dec, dec.prepare_memory(), 1, BOS, EOS, PAD, beam_size=3, max_length=6, length_penalty=4.0)
    assert short.tokens[0, :2].tolist() == [3, EOS]
    assert long.tokens[0, :4].tolist() == [3, 4, 5, EOS]


def test_invalid_beam_size():
    dec = _decoder()
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(dec, dec.prepare_memory(torch.randn(1, 9, 12, dtype=torch.double)), 1, BOS, EOS, beam_size=0)


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_banned_tokens_are_never_emitted_even_when_most_likely(search):
    unk = 3
    table = torch.randn(4, 6, 6)
    table[..., unk] = 10.0  # <unk> is by far the likeliest word after every word
    table[..., PAD] = -1e9
    dec = MarkovDecoder(table)
    run = (
        (lambda **kw: greedy_search(dec, dec.prepare_memory(), 4, BOS, EOS, PAD, max_length=6, **kw))
        if search == "greedy"
        else (lambda **kw: beam_search(dec, dec.prepare_memory(), 4, BOS, EOS, PAD, beam_size=3, max_length=6, **kw))
    )
    assert (run().tokens == unk).any()  # without the ban it is chosen
    banned = run(banned_ids=[unk])
    assert not (banned.tokens == unk).any()
    assert torch.isfinite(banned.scores).all()


class SentinelMarkovDecoder(MarkovDecoder):
    """MarkovDecoder whose step also reports a beta that encodes the word it was given:
    beta = previous word / 100, so a result's betas can be checked against its own words."""

    def step(self, tokens, state, memory):
        rows, alpha, state = super().step(tokens, state, memory)
        from captioning.nn.search import StepOutput

        return StepOutput(rows, alpha, state, tokens.double() / 100)


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_betas_belong_to_the_words_of_the_returned_hypothesis(search):
    torch.manual_seed(5)
    table = torch.randn(3, 8, 8) * 2
    table[..., PAD] = -1e9
    dec = SentinelMarkovDecoder(table)
    if search == "greedy":
        res = greedy_search(dec, dec.prepare_memory(), 3, BOS, EOS, PAD, max_length=6)
    else:
        res = beam_search(dec, dec.prepare_memory(), 3, BOS, EOS, PAD, beam_size=4, max_length=6)
    assert res.betas.shape == res.tokens.shape
    previous = torch.cat([torch.full((3, 1), BOS), res.tokens[:, :-1]], 1)  # the word each step was given
    for row in range(3):
        n = int(res.lengths[row])
        torch.testing.assert_close(res.betas[row, :n], previous[row, :n].float() / 100)
    plain = MarkovDecoder(table)  # a (logits, alpha, state) step: no betas
    assert greedy_search(plain, plain.prepare_memory(), 3, BOS, EOS, PAD, max_length=6).betas is None


def _looping_table(items=3, vocab=9):
    """A Markov chain that prefers the loop 3 -> 4 -> 5 -> 3 ... and ends late (EOS unlikely)."""
    table = torch.full((items, vocab, vocab), -4.0)
    for prev, nxt in ((BOS, 3), (3, 4), (4, 5), (5, 3)):
        table[:, prev, nxt] = 3.0
    table[:, :, EOS] = -1.0
    table += 0.3 * torch.randn(items, vocab, vocab, generator=torch.Generator().manual_seed(0))
    return table


def _ngrams(seq, n):
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("beam", [1, 3])
def test_repetition_blocking_never_emits_a_repeated_ngram(n, beam):
    dec = MarkovDecoder(_looping_table())
    search = greedy_search if beam == 1 else functools.partial(beam_search, beam_size=beam)
    loose = search(dec, dec.prepare_memory(), 3, BOS, EOS, PAD, max_length=12)
    assert any(len(set(_ngrams(r, n))) < len(_ngrams(r, n)) for r in loose.tokens.tolist())  # it loops unblocked
    result = search(dec, dec.prepare_memory(), 3, BOS, EOS, PAD, max_length=12, no_repeat_ngram=n)
    for row, length in zip(result.tokens.tolist(), result.lengths.tolist()):
        words = row[:length]
        assert len(set(_ngrams(words, n))) == len(_ngrams(words, n)), words
        assert PAD not in words


def test_repetition_blocking_leaves_a_caption_without_repeats_unchanged():
    table = torch.full((2, 8, 8), -5.0)
    for prev, nxt in ((BOS, 3), (3, 4), (4, 5), (5, 6), (6, EOS)):
        table[:, prev, nxt] = 4.0
    dec = MarkovDecoder(table)
    for beam in (1, 3):
        plain = beam_search(dec, dec.prepare_memory(), 2, BOS, EOS, PAD, beam_size=beam, max_length=10)
        blocked = beam_search(
            dec, dec.prepare_memory(), 2, BOS, EOS, PAD, beam_size=beam, max_length=10, no_repeat_ngram=2
        )
        assert torch.equal(plain.tokens, blocked.tokens)
        torch.testing.assert_close(plain.scores, blocked.scores)


def test_a_row_with_every_word_blocked_ends_instead_of_failing():
    table = torch.zeros(1, 4, 4)  # words: PAD BOS EOS 3; only one real word
    table[:, :, EOS] = -50.0
    dec = MarkovDecoder(table)
    result = greedy_search(
        dec, dec.prepare_memory(), 1, BOS, EOS, PAD, max_length=6, banned_ids=[BOS, PAD], no_repeat_ngram=1
    )
    assert result.tokens[0, :2].tolist() == [3, EOS]
    assert torch.isfinite(result.scores).all()


def test_invalid_no_repeat_ngram_is_refused():
    dec = MarkovDecoder(_looping_table())
    with pytest.raises(ValueError, match="no_repeat_ngram"):
        greedy_search(dec, dec.prepare_memory(), 3, BOS, EOS, PAD, no_repeat_ngram=-1)


def test_sampling_draws_from_the_model_distribution_k_captions_per_item():
    torch.manual_seed(0)
    table = torch.full((2, 6, 6), -30.0)
    table[0, BOS, 3] = table[0, BOS, 4] = 0.0  # item 0: word 3 or 4 with equal odds, then EOS
    table[1, BOS, 5] = 0.0  # item 1: always word 5
    table[:, 3:, EOS] = 0.0
    dec = MarkovDecoder(table)
    result = sample_search(dec, dec.prepare_memory(), 2, BOS, EOS, PAD, num_samples=400, max_length=5)
    assert result.tokens.shape[0] == 800
    first = result.tokens[:, 0].view(2, 400)
    share_3 = (first[0] == 3).float().mean().item()
    assert 0.4 < share_3 < 0.6 and set(first[0].tolist()) == {3, 4}
    assert (first[1] == 5).all()
    assert (result.tokens[:, 1] == EOS).all() and (result.lengths == 2).all()
    torch.testing.assert_close(result.scores.view(2, 400)[1], torch.zeros(400), atol=1e-6, rtol=0)
    torch.testing.assert_close(result.scores.view(2, 400)[0], torch.full((400,), -0.6931), atol=1e-3, rtol=0)
