"""Tests for captioning.metrics: COCO caption scores (Java and Python paths), attention
localisation, text seq2seq scores and attention/alignment agreement."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from captioning import metrics
from captioning.metrics import (
    CaptionMetricsWarning,
    alignment_score,
    caption_scores,
    localisation_score,
    text_scores,
)

HAS_JAVA = shutil.which("java") is not None

REFS = {
    1: ["a red circle above a blue square", "a red circle over a blue square",
        "there is a red circle on top of a blue square"],
    2: ["a green triangle next to a small yellow circle", "a green triangle beside a yellow circle",
        "a yellow circle to the right of a green triangle"],
    3: ["two blue squares and a red triangle", "a red triangle with two blue squares",
        "blue squares near a red triangle"],
    4: ["a large purple circle", "one big purple circle", "a purple circle in the middle"],
}
PERFECT = {i: refs[0] for i, refs in REFS.items()}
WRONG = {1: "a green triangle next to a yellow circle", 2: "two blue squares",
         3: "a large purple circle", 4: "a red circle above a blue square"}


@pytest.fixture
def fresh_state(monkeypatch):
    """Each test starts with no warning issued and Java not marked broken."""
    monkeypatch.setattr(metrics, "_warned", False)
    monkeypatch.setattr(metrics, "_java_broken", None)
    monkeypatch.delenv(metrics.NO_JAVA_ENV, raising=False)


def _caption_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, CaptionMetricsWarning)]


@pytest.mark.parametrize("use_java", [False, pytest.param(
    None, marks=pytest.mark.skipif(not HAS_JAVA, reason="needs java"))])
def test_perfect_beats_wrong_captions(fresh_state, use_java):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptionMetricsWarning)
        good = caption_scores(PERFECT, REFS, use_java=use_java)
        bad = caption_scores(WRONG, REFS, use_java=use_java)
    assert good["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert good["bleu1"] == pytest.approx(1.0, abs=1e-6)
    assert good["rougeL"] == pytest.approx(1.0)
    assert good["cider"] > 1.0  # CIDEr-D is on a 0-10 scale, not 0-1
    for key in ("bleu1", "bleu4", "rougeL", "cider"):
        assert bad[key] < good[key], key
    assert all(isinstance(v, float) for v in good.values())


@pytest.mark.skipif(not HAS_JAVA, reason="needs java")
def test_java_path_has_meteor_and_no_warning(fresh_state):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        good = caption_scores(PERFECT, REFS)
        bad = caption_scores(WRONG, REFS)
    assert set(good) == {"bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rougeL", "cider"}
    assert good["meteor"] == pytest.approx(1.0)
    assert 0.0 <= bad["meteor"] < good["meteor"]
    assert _caption_warnings(record) == []
    # The PTB tokenizer strips punctuation and case just like the references' tokenisation.
    shouted = {i: c.upper() + "." for i, c in PERFECT.items()}
    assert caption_scores(shouted, REFS)["bleu4"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("how", ["argument", "env", "no_java_on_path"])
def test_fallback_skips_meteor_and_warns_once(fresh_state, monkeypatch, how):
    kwargs = {}
    if how == "argument":
        kwargs["use_java"] = False
    elif how == "env":
        monkeypatch.setenv(metrics.NO_JAVA_ENV, "1")
    else:
        monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = caption_scores(PERFECT, REFS, **kwargs)
        caption_scores(WRONG, REFS, **kwargs)
    assert "meteor" not in first
    assert set(first) == {"bleu1", "bleu2", "bleu3", "bleu4", "rougeL", "cider"}
    found = _caption_warnings(record)
    assert len(found) == 1
    assert "METEOR is skipped" in str(found[0].message)


def test_broken_java_tokenizer_falls_back(fresh_state, monkeypatch):
    def broken(sentences):
        raise RuntimeError("PTB tokenizer exited with 1")

    monkeypatch.setattr(metrics.shutil, "which", lambda name: "/usr/bin/java")
    monkeypatch.setattr(metrics, "_ptb_tokenize", broken)
    with pytest.warns(CaptionMetricsWarning, match="PTB tokenizer"):
        scores = caption_scores(PERFECT, REFS)
    assert "meteor" not in scores and scores["bleu4"] == pytest.approx(1.0, abs=1e-6)


def test_hanging_meteor_is_killed_not_waited_for(fresh_state, monkeypatch):
    """A METEOR process that never answers must cost a timeout, not a hang."""

    class Silent(metrics._MeteorProcess):
        def __init__(self):
            self.meteor_p = subprocess.Popen(
                [sys.executable, "-c", "import time; time.sleep(60)"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            self.lock = metrics.threading.Lock()
            self.owner_pid = metrics.os.getpid()

    python_tokens = lambda sentences: [" ".join(metrics.tokenize(s)) for s in sentences]  # noqa
    monkeypatch.setattr(metrics.shutil, "which", lambda name: "/usr/bin/java")
    monkeypatch.setattr(metrics, "_ptb_tokenize", python_tokens)
    monkeypatch.setattr(metrics, "_MeteorProcess", Silent)
    monkeypatch.setattr(metrics, "_meteor", None)
    monkeypatch.setattr(metrics, "JAVA_TIMEOUT_S", 0.5)
    with pytest.warns(CaptionMetricsWarning, match="METEOR"):
        scores = caption_scores(PERFECT, REFS)
    assert "meteor" not in scores and "cider" in scores
    assert metrics._meteor is None  # the dead process is not reused


def test_empty_predictions_do_not_crash(fresh_state):
    preds = dict(PERFECT)
    preds[2] = ""
    preds[3] = "   "
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptionMetricsWarning)
        scores = caption_scores(preds, REFS, use_java=False)
        all_empty = caption_scores({i: "" for i in REFS}, REFS, use_java=False)
        empty_refs = caption_scores({1: "", 2: "a"}, {1: [""], 2: ["..."]}, use_java=False)
    assert 0.0 < scores["bleu4"] < 1.0
    assert all_empty["bleu4"] == pytest.approx(0.0, abs=1e-6)
    assert all_empty["cider"] == 0.0
    assert empty_refs["cider"] == 0.0


def test_bad_ids_and_inputs_raise(fresh_state):
    with pytest.raises(ValueError, match="'img-9'"):
        caption_scores({"img-9": "a red circle"}, {"img-1": ["a red circle"]}, use_java=False)
    with pytest.raises(ValueError, match="non-empty"):
        caption_scores({1: "a red circle"}, {1: []}, use_java=False)
    with pytest.raises(ValueError, match="empty"):
        caption_scores({}, REFS, use_java=False)


def test_extra_reference_ids_are_ignored(fresh_state):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptionMetricsWarning)
        subset = {i: PERFECT[i] for i in (1, 2)}
        scores = caption_scores(subset, REFS, use_java=False)
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------- localisation
SCENE = [
    {"shape": "circle", "color": "red", "size": "small", "box": [0.0, 0.0, 0.5, 0.5]},
    {"shape": "circle", "color": "blue", "size": "small", "box": [0.5, 0.5, 1.0, 1.0]},
    {"shape": "square", "color": "green", "size": "large", "box": [0.5, 0.0, 1.0, 0.5]},
]
OBJECT_WORDS = {"circle", "square", "triangle"}


def _peaks(cells: list[tuple[int, int]], grid: int = 4) -> torch.Tensor:
    """(T, grid, grid) attention with a single peak at each (row, col)."""
    alpha = torch.full((len(cells), grid, grid), 0.01)
    for t, (r, c) in enumerate(cells):
        alpha[t, r, c] = 0.9
    return alpha


def test_localisation_hits_and_misses():
    words = ["a", "square", "and", "a", "circle"]
    inside = _peaks([(3, 3), (0, 3), (3, 3), (3, 3), (3, 0)])  # square top-right: hit
    out = localisation_score([words], [inside], [SCENE], OBJECT_WORDS)
    # "circle" peaks at bottom-left (row 3, col 0): inside neither circle -> miss
    assert (out["localisation_hits"], out["localisation_total"]) == (1, 2)
    assert out["localisation"] == pytest.approx(0.5)
    outside = _peaks([(3, 3), (3, 0), (3, 3), (3, 3), (0, 0)])
    out = localisation_score([words], [outside], [SCENE], OBJECT_WORDS)
    assert (out["localisation_hits"], out["localisation_total"]) == (1, 2)  # circle hit only


def test_localisation_colour_disambiguates():
    words = ["a", "blue", "circle"]
    on_red = _peaks([(0, 0), (0, 0), (0, 0)])
    on_blue = _peaks([(0, 0), (0, 0), (3, 3)])
    assert localisation_score([words], [on_red], [SCENE], OBJECT_WORDS)["localisation_hits"] == 0
    assert localisation_score([words], [on_blue], [SCENE], OBJECT_WORDS)["localisation_hits"] == 1
    # Without the colour either circle counts; an unmatched colour does not narrow.
    plain = localisation_score([["a", "circle"]], [on_red[1:]], [SCENE], OBJECT_WORDS)
    purple = localisation_score([["purple", "circle"]], [on_red[1:]], [SCENE], OBJECT_WORDS,
                                color_words={"purple", "red", "blue"})
    assert plain["localisation_hits"] == purple["localisation_hits"] == 1
    # The colour before an earlier object word does not qualify a later one.
    chain = localisation_score([["blue", "square", "circle"]], [_peaks([(0, 0)] * 3)], [SCENE],
                               OBJECT_WORDS)
    assert chain["localisation_total"] == 2 and chain["localisation_hits"] == 1


def test_localisation_hallucinated_object_is_a_miss():
    words = ["a", "triangle"]
    out = localisation_score([words], [_peaks([(0, 0), (0, 0)])], [SCENE], OBJECT_WORDS)
    assert (out["localisation"], out["localisation_hits"], out["localisation_total"]) == (0.0, 0, 1)
    assert (out["localisation_nouns_hits"], out["localisation_nouns_total"]) == (0, 1)


def test_localisation_scores_attribute_words_of_the_phrase_separately_from_nouns():
    # "a large green square and a small blue circle": attributes look at their object,
    # the first noun looks away, the second noun looks at its object.
    words = ["a", "large", "green", "square", "and", "a", "small", "blue", "circle"]
    cells = [(0, 0), (0, 3), (1, 2), (3, 0), (0, 0), (0, 0), (3, 3), (2, 2), (3, 3)]
    out = localisation_score([words], [_peaks(cells)], [SCENE], OBJECT_WORDS,
                             attribute_words={"large", "small", "green", "blue", "red"})
    assert (out["localisation_hits"], out["localisation_total"]) == (5, 6)
    assert (out["localisation_nouns_hits"], out["localisation_nouns_total"]) == (1, 2)
    assert out["localisation"] == pytest.approx(5 / 6) and out["localisation_nouns"] == pytest.approx(0.5)
    # Without attribute words only nouns count (the noun-only score is the same).
    nouns = localisation_score([words], [_peaks(cells)], [SCENE], OBJECT_WORDS)
    assert (nouns["localisation_hits"], nouns["localisation_total"]) == (1, 2)
    # A hallucinated noun makes its attributes miss too.
    ghost = localisation_score([["a", "small", "red", "triangle"]], [_peaks([(0, 0)] * 4)], [SCENE],
                               OBJECT_WORDS, attribute_words={"small", "red"})
    assert (ghost["localisation_hits"], ghost["localisation_total"]) == (0, 3)


def test_localisation_half_cell_tolerance_and_flat_alpha():
    tiny = [{"shape": "circle", "color": "red", "size": "small", "box": [0.26, 0.26, 0.3, 0.3]}]
    near = _peaks([(1, 1)]).flatten(1)  # (T, S) form; centre 0.375 is within half a cell
    far = _peaks([(0, 0)])  # centre 0.125 is more than half a cell away
    assert localisation_score([["circle"]], [near], [tiny], OBJECT_WORDS)["localisation"] == 1.0
    assert localisation_score([["circle"]], [far], [tiny], OBJECT_WORDS)["localisation"] == 0.0


def test_localisation_rejects_bad_input():
    with pytest.raises(ValueError, match="image 0"):
        localisation_score([["a", "circle"]], [_peaks([(0, 0)])], [SCENE], OBJECT_WORDS)
    bad_box = [{"shape": "circle", "color": "red", "size": "small", "box": [0.5, 0, 0.2, 1]}]
    with pytest.raises(ValueError, match="box"):
        localisation_score([["circle"]], [_peaks([(0, 0)])], [bad_box], OBJECT_WORDS)


# ---------------------------------------------------------------- text and alignment
def test_text_scores():
    out = text_scores(["the cat sat on the mat", "a dog", "hello  world"],
                      ["the cat sat on the mat", "a cat", "hello world"])
    assert out["exact_match"] == pytest.approx(2 / 3)
    assert 0.0 < out["bleu"] < 100.0 and 0.0 < out["chrf"] < 100.0
    assert "nrefs:1" in out["bleu_signature"]
    same = text_scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["bleu"] == pytest.approx(100.0) and same["exact_match"] == 1.0
    with pytest.raises(ValueError):
        text_scores(["a"], ["a", "b"])


def test_alignment_score():
    a = torch.tensor([[0.7, 0.1, 0.1, 0.1],
                      [0.1, 0.1, 0.7, 0.1],   # true 1, argmax 2: wrong
                      [0.1, 0.1, 0.1, 0.7]])  # true -1: ignored
    b = torch.tensor([[0.2, 0.8], [0.9, 0.1]])
    assert alignment_score([a], [[0, 1, -1]]) == pytest.approx(0.5)
    assert alignment_score([a, b], [[0, 1, -1], [1, 0]]) == pytest.approx(3 / 4)
    assert alignment_score([a], [[-1, -1, -1]]) == 0.0
    with pytest.raises(ValueError, match="outside"):
        alignment_score([b], [[0, 2]])
    with pytest.raises(ValueError, match="sequence 0"):
        alignment_score([b], [[0]])
