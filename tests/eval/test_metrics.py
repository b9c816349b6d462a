"""Tests for captioning.eval.metrics: COCO caption scores (Java and Python paths),
text seq2seq scores and attention/alignment agreement."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from captioning.eval import metrics
from captioning.eval.metrics import (
    CaptionMetricsWarning,
    alignment_score,
    caption_scores,
    text_scores,
)

HAS_JAVA = shutil.which("java") is not None

REFS = {
    1: [
        "a red circle above a blue square",
        "a red circle over a blue square",
        "there is a red circle on top of a blue square",
    ],
    2: [
        "a green triangle next to a small yellow circle",
        "a green triangle beside a yellow circle",
        "a yellow circle to the right of a green triangle",
    ],
    3: [
        "two blue squares and a red triangle",
        "a red triangle with two blue squares",
        "blue squares near a red triangle",
    ],
    4: ["a large purple circle", "one big purple circle", "a purple circle in the middle"],
}
PERFECT = {i: refs[0] for i, refs in REFS.items()}
WRONG = {
    1: "a green triangle next to a yellow circle",
    2: "two blue squares",
    3: "a large purple circle",
    4: "a red circle above a blue square",
}


@pytest.fixture
def fresh_state(monkeypatch):
    """Each test starts with no warning issued and Java not marked broken."""
    monkeypatch.setattr(metrics, "_warned", False)
    monkeypatch.setattr(metrics, "_java_broken", None)
    monkeypatch.delenv(metrics.NO_JAVA_ENV, raising=False)


def _caption_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, CaptionMetricsWarning)]


@pytest.mark.parametrize(
    "use_java", [False, pytest.param(None, marks=pytest.mark.skipif(not HAS_JAVA, reason="needs java"))]
)
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
                [sys.executable, "-c", "import time; time.sleep(60)"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
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
        all_empty = caption_scores(dict.fromkeys(REFS, ""), REFS, use_java=False)
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


# ---------------------------------------------------------------- text and alignment
def test_text_scores():
    out = text_scores(
        ["the cat sat on the mat", "a dog", "hello  world"], ["the cat sat on the mat", "a cat", "hello world"]
    )
    assert out["exact_match"] == pytest.approx(2 / 3)
    assert 0.0 < out["bleu"] < 100.0 and 0.0 < out["chrf"] < 100.0
    assert "nrefs:1" in out["bleu_signature"]
    same = text_scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["bleu"] == pytest.approx(100.0) and same["exact_match"] == 1.0
    with pytest.raises(ValueError):
        text_scores(["a"], ["a", "b"])


def test_alignment_score():
    a = torch.tensor(
        [
            [0.7, 0.1, 0.1, 0.1],
            [0.1, 0.1, 0.7, 0.1],  # true 1, argmax 2: wrong
            [0.1, 0.1, 0.1, 0.7],
        ]
    )  # true -1: ignored
    b = torch.tensor([[0.2, 0.8], [0.9, 0.1]])
    assert alignment_score([a], [[0, 1, -1]]) == pytest.approx(0.5)
    assert alignment_score([a, b], [[0, 1, -1], [1, 0]]) == pytest.approx(3 / 4)
    assert alignment_score([a], [[-1, -1, -1]]) == 0.0
    with pytest.raises(ValueError, match="outside"):
        alignment_score([b], [[0, 2]])
    with pytest.raises(ValueError, match="sequence 0"):
        alignment_score([b], [[0]])
