"""The fast CIDEr-D used as self-critical training's reward equals pycocoevalcap's CIDEr-D."""

import random

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from captioning.eval.cider import CiderD


def _corpus(seed: int, images: int = 150):
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(30)]
    refs = {
        i: [" ".join(rng.choice(words[:18]) for _ in range(rng.randint(1, 14))) for _ in range(rng.randint(1, 6))]
        for i in range(images)
    }
    hyps = {i: " ".join(rng.choice(words) for _ in range(rng.randint(0, 16))) for i in range(images)}
    hyps[0] = refs[0][0]  # a hypothesis equal to a reference
    hyps[1] = "w1 w1 w1 w1 w1 unseen unseen other"  # repeats and words no reference has
    hyps[2] = ""  # an empty caption
    return refs, hyps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_cider_d_equals_pycocoevalcap_per_image_and_for_the_corpus(seed):
    refs, hyps = _corpus(seed)
    mean, per_image = Cider().compute_score(refs, {i: [h] for i, h in hyps.items()})
    fast = CiderD(refs).score(list(hyps), list(hyps.values()))
    np.testing.assert_allclose(fast, per_image, rtol=0, atol=1e-9)
    assert abs(fast.mean() - mean) < 1e-9
    assert fast[0] > fast[2] == 0.0


def test_document_frequencies_come_from_the_corpus_the_scorer_was_built_on():
    refs, hyps = _corpus(3)
    scorer = CiderD(refs)
    some = [5, 9, 40]
    # A batch of three images is scored with the whole corpus's idf, exactly as in the full run.
    np.testing.assert_allclose(
        scorer.score(some, [hyps[i] for i in some]), scorer.score(list(hyps), list(hyps.values()))[some], atol=0
    )
    # pycocoevalcap on just those three images counts df over them: a different, batch-dependent number.
    _, alone = Cider().compute_score({i: refs[i] for i in some}, {i: [hyps[i]] for i in some})
    assert not np.allclose(alone, scorer.score(some, [hyps[i] for i in some]))


def test_ids_and_strings_give_the_same_scores():
    refs, hyps = _corpus(4)
    scorer = CiderD(refs, extra_words=["unseen", "other", *(f"w{i}" for i in range(30))])
    keys = list(hyps)[:20]
    rows = [[scorer.words[w] for w in hyps[k].split()] for k in keys]
    width = max(len(r) for r in rows)
    ids = np.array([r + [0] * (width - len(r)) for r in rows])  # padding past each length is ignored
    lengths = np.array([len(r) for r in rows])
    np.testing.assert_allclose(scorer.score_ids(keys, ids, lengths), scorer.score(keys, [hyps[k] for k in keys]))


def test_a_hypothesis_for_an_image_without_references_is_an_error_naming_it():
    scorer = CiderD({"a": ["a dog"], "b": ["a cat"]})
    with pytest.raises(KeyError, match="'zebra'"):
        scorer.score(["zebra"], ["a dog"])
    with pytest.raises(ValueError, match="references of 'c'"):
        CiderD({"c": []})
