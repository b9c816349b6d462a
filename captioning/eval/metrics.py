"""Evaluation metrics: COCO caption scores and text seq2seq scores (localisation: captioning/eval/localisation.py).

* :func:`caption_scores` -- BLEU-1..4, METEOR, ROUGE-L, CIDEr-D as pycocoevalcap computes
  them. Its PTB tokenizer and METEOR need Java: without a working ``java`` captions are
  tokenised by :func:`captioning.data.vocab.tokenize`, METEOR is left out, and one warning per
  process says so (``use_java=False`` or ``CAPTIONING_NO_JAVA=1`` force this fallback).
* :func:`text_scores` -- sacrebleu corpus BLEU (with its signature), chrF, exact match.
* :func:`alignment_score` -- attention argmax vs. known source alignment (synthetic seq2seq).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import threading
import warnings
from collections.abc import Hashable, Mapping, Sequence

import sacrebleu
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as _meteor_module
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer as _ptb_module
from torch import Tensor

from captioning.data.vocab import tokenize

NO_JAVA_ENV = "CAPTIONING_NO_JAVA"
#: Seconds allowed for the PTB tokenizer run; METEOR gets this plus 0.05 s per image.
JAVA_TIMEOUT_S = 120.0


class CaptionMetricsWarning(UserWarning):
    """Issued (once per process) when METEOR is skipped because Java is unavailable."""


_warned = False  # one warning per process, whatever the reason
_java_broken: str | None = None  # set after a Java failure so later calls skip it at once
_meteor: _MeteorProcess | None = None
_meteor_lock = threading.Lock()


def _warn_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"METEOR is skipped and captions are tokenised in Python instead of "
            f"with the PTB tokenizer: {reason}. Scores are not comparable to "
            "published COCO numbers.",
            CaptionMetricsWarning,
            stacklevel=3,
        )


def _java_problem(use_java: bool | None) -> str | None:
    """Why Java cannot be used (None if it can)."""
    if use_java is False:
        return "Java disabled by use_java=False"
    if use_java is None and os.environ.get(NO_JAVA_ENV, "").strip() not in ("", "0", "false"):
        return f"Java disabled by the environment variable {NO_JAVA_ENV}"
    if shutil.which("java") is None:
        return "no 'java' executable on PATH (install a Java runtime to get METEOR)"
    return _java_broken


def _ptb_tokenize(sentences: list[str]) -> list[str]:
    """pycocoevalcap's PTB tokenisation (same jar, flags and punctuation filter).

    Unlike ``PTBTokenizer.tokenize`` it sends text via stdin (the package directory may be
    read-only), has a timeout, and checks the line count so a caption can never be matched
    with another caption's tokens. Empty captions stay empty and are not sent.
    """
    jar = os.path.join(os.path.dirname(os.path.abspath(_ptb_module.__file__)), _ptb_module.STANFORD_CORENLP_3_4_1_JAR)
    cmd = [
        "java",
        "-cp",
        jar,
        "edu.stanford.nlp.process.PTBTokenizer",
        "-preserveLines",
        "-lowerCase",
        "-encoding",
        "utf-8",
    ]
    # str.split() also removes \r, \u2028, ... which Java may treat as line breaks.
    flat = [" ".join(s.split()) for s in sentences]
    todo = [i for i, s in enumerate(flat) if s]
    out = [""] * len(flat)
    if not todo:
        return out
    text = "\n".join(flat[i] for i in todo) + "\n"
    proc = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True, timeout=JAVA_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise RuntimeError(f"PTB tokenizer exited with {proc.returncode}: {' | '.join(err)}")
    lines = proc.stdout.decode("utf-8", "replace").split("\n")
    if lines and lines[-1] == "":  # after the final newline
        lines.pop()
    if len(lines) != len(todo):
        raise RuntimeError(f"PTB tokenizer returned {len(lines)} lines for {len(todo)} captions")
    for i, line in zip(todo, lines):
        out[i] = " ".join(w for w in line.split() if w not in _ptb_module.PUNCTUATIONS)
    return out


class _MeteorProcess(_meteor_module.Meteor):
    """pycocoevalcap's METEOR with a safer lifecycle: stderr to /dev/null (an unread PIPE
    can fill and block Java); ``close`` never takes the scorer's lock (the parent's
    ``__del__`` deadlocks if ``compute_score`` raised while holding it)."""

    def __init__(self) -> None:  # not super().__init__: we choose the Popen arguments
        jar_dir = os.path.dirname(os.path.abspath(_meteor_module.__file__))
        self.meteor_cmd = ["java", "-jar", "-Xmx2G", _meteor_module.METEOR_JAR, "-", "-", "-stdio", "-l", "en", "-norm"]
        self.meteor_p: subprocess.Popen | None = subprocess.Popen(
            self.meteor_cmd, cwd=jar_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        self.lock = threading.Lock()
        self.owner_pid = os.getpid()

    def alive(self) -> bool:
        p = self.meteor_p
        return p is not None and self.owner_pid == os.getpid() and p.poll() is None

    def close(self) -> None:
        p = getattr(self, "meteor_p", None)
        if p is None or getattr(self, "owner_pid", None) != os.getpid():
            return  # a forked child must not kill its parent's Java process
        self.meteor_p = None
        # Kill before closing the pipes: closing stdout while a reader thread is blocked
        # on it waits for that read, i.e. forever if Java hangs.
        p.kill()
        p.wait(timeout=10)
        for stream in (p.stdin, p.stdout):
            with contextlib.suppress(OSError):
                stream.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown nothing more to do
            self.close()


def close_meteor() -> None:
    """Stop the shared METEOR Java process (it is started lazily and reused across calls)."""
    global _meteor
    with _meteor_lock:
        scorer, _meteor = _meteor, None
        if scorer is not None:
            scorer.close()


atexit.register(close_meteor)


def warm_up_meteor(use_java: bool | None = None) -> bool:
    """Start the shared METEOR process now (it loads for seconds) without waiting for it.

    Call it e.g. at fit start so the first validation does not pay the Java start-up.
    Returns whether a process is (now) running; never warns or raises.
    """
    if _java_problem(use_java) is not None:
        return False
    with _meteor_lock:
        try:
            _shared_meteor()
        except OSError:
            return False
        return True


def _shared_meteor() -> _MeteorProcess:
    """The running shared METEOR process, started if needed (call with _meteor_lock held)."""
    global _meteor
    if _meteor is None or not _meteor.alive():
        _meteor = _MeteorProcess()
    return _meteor


def _meteor_score(gts: dict, res: dict) -> float:
    """Corpus METEOR from the shared Java process; raises RuntimeError on failure/timeout."""
    global _meteor
    with _meteor_lock:
        scorer, result = _shared_meteor(), {}

        def work() -> None:
            try:
                result["score"] = scorer.compute_score(gts, res)[0]
            except Exception as exc:  # reported to the caller below
                result["error"] = exc

        # A worker thread gives a hard deadline: killing Java unblocks its pipe reads.
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        thread.join(JAVA_TIMEOUT_S + 0.05 * len(gts))
        if "score" in result:
            return float(result["score"])
        _meteor = None
        scorer.close()
        thread.join(10)
        raise RuntimeError(f"METEOR failed ({result.get('error', 'timed out')!r})")


def caption_scores(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], use_java: bool | None = None
) -> dict[str, float]:
    """COCO caption metrics of one generated caption per image.

    Args:
        predictions: image id -> generated caption (a string; may be empty).
        references: image id -> all reference captions of that image (non-empty list).
            Only ids in ``predictions`` are scored; extra reference ids are ignored.
        use_java: None = Java tools when available (unless ``CAPTIONING_NO_JAVA=1``),
            False = force the Python fallback, True = try Java even if the env var is set.

    Returns:
        ``bleu1..bleu4``, ``rougeL``, ``cider`` (CIDEr-D; its idf comes from the scored
        references, so a single image always gets 0) and ``meteor`` when Java worked.

    Raises:
        ValueError: no predictions, a prediction id with no references, or a non-string.
    """
    global _java_broken
    if not predictions:
        raise ValueError("caption_scores: predictions is empty")
    ids = list(predictions)
    for i in ids:
        if i not in references:
            raise ValueError(f"caption_scores: image id {i!r} has a prediction but no references")
        if not isinstance(predictions[i], str):
            raise ValueError(
                f"caption_scores: prediction for id {i!r} must be a str, got {type(predictions[i]).__name__}"
            )
        refs = references[i]
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(
                f"caption_scores: references for id {i!r} must be a non-empty list of strings, got {refs!r}"
            )

    ref_lists = [list(references[i]) for i in ids]
    flat = [predictions[i] for i in ids] + [r for rs in ref_lists for r in rs]
    problem, tokens = _java_problem(use_java), None
    if problem is None:
        try:
            tokens = _ptb_tokenize(flat)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            problem = _java_broken = f"the Java PTB tokenizer failed ({exc})"
    if tokens is None:
        tokens = [" ".join(tokenize(s)) for s in flat]

    res = {i: [tokens[k]] for k, i in enumerate(ids)}
    gts, pos = {}, len(ids)
    for i, rs in zip(ids, ref_lists):
        gts[i] = tokens[pos : pos + len(rs)]
        pos += len(rs)

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"bleu{n}": float(value) for n, value in enumerate(bleu, start=1)}
    if problem is None:
        # METEOR's protocol uses '|||' as separator; never let a caption contain one.
        clean = lambda s: s.replace("|||", " ")  # noqa: E731
        try:
            scores["meteor"] = _meteor_score(
                {i: [clean(r) for r in g] for i, g in gts.items()}, {i: [clean(h[0])] for i, h in res.items()}
            )
        except (OSError, RuntimeError, ValueError) as exc:
            problem = _java_broken = str(exc)
    scores["rougeL"] = float(Rouge().compute_score(gts, res)[0])
    # CiderScorer asserts / calls max() on an empty document frequency when no reference
    # has a single token: that corpus has no n-grams to match, so its CIDEr is 0.
    has_ngrams = any(r.split() for rs in gts.values() for r in rs)
    scores["cider"] = float(Cider().compute_score(gts, res)[0]) if has_ngrams else 0.0
    if problem is not None:
        _warn_once(problem)
    return scores


def text_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float | str]:
    """Corpus scores of a text seq2seq model (one reference per hypothesis).

    Returns ``bleu`` and ``chrf`` on sacrebleu's 0-100 scale, ``exact_match`` in [0, 1]
    (share of pairs equal after collapsing whitespace) and ``bleu_signature``, sacrebleu's
    signature string (e.g. ``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.x``)
    to log next to the score.
    """
    hyps, refs = list(hypotheses), list(references)
    if len(hyps) != len(refs):
        raise ValueError(f"text_scores: {len(hyps)} hypotheses but {len(refs)} references")
    if not hyps:
        raise ValueError("text_scores: no hypotheses to score")
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    same = sum(" ".join(h.split()) == " ".join(r.split()) for h, r in zip(hyps, refs))
    return {
        "bleu": float(bleu.corpus_score(hyps, [refs]).score),
        "chrf": float(chrf.corpus_score(hyps, [refs]).score),
        "exact_match": same / len(hyps),
        "bleu_signature": str(bleu.get_signature()),
    }


def alignment_score(alphas: Sequence[Tensor], true_alignments: Sequence[Sequence[int]]) -> float:
    """Share of target tokens whose attention argmax is their true source position.

    ``alphas[i]`` is (T_i, S) attention of sequence i; ``true_alignments[i][t]`` is the
    source index that target token t copies, or -1 (not counted, e.g. eos or inserted
    tokens). Ties go to the first position. Returns 0.0 when no token is counted.
    """
    if len(alphas) != len(true_alignments):
        raise ValueError(f"alignment_score: {len(alphas)} alphas but {len(true_alignments)} alignments")
    correct = counted = 0
    for i, (alpha, truth) in enumerate(zip(alphas, true_alignments)):
        alpha = alpha.detach().float().cpu()
        target = torch.as_tensor(list(truth), dtype=torch.long)
        if alpha.dim() != 2 or alpha.shape[0] != len(target):
            raise ValueError(
                f"alignment_score: sequence {i}: alpha shape {tuple(alpha.shape)} "
                f"does not match {len(target)} alignments (need (T, S))"
            )
        bad = (target < -1) | (target >= alpha.shape[1])
        if bad.any():
            raise ValueError(
                f"alignment_score: sequence {i}: alignment {int(target[bad][0])} outside [-1, {alpha.shape[1] - 1}]"
            )
        keep = target >= 0
        counted += int(keep.sum())
        correct += int((alpha.argmax(dim=1)[keep] == target[keep]).sum())
    return correct / counted if counted else 0.0
