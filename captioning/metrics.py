"""Evaluation metrics: COCO caption scores, attention localisation, text seq2seq scores.

* :func:`caption_scores` -- BLEU-1..4, METEOR, ROUGE-L, CIDEr-D as pycocoevalcap computes
  them. Its PTB tokenizer and METEOR need Java: without a working ``java`` captions are
  tokenised by :func:`captioning.vocab.tokenize`, METEOR is left out, and one warning per
  process says so (``use_java=False`` or ``CAPTIONING_NO_JAVA=1`` force this fallback).
* :func:`localisation_score` -- does the attention peak of an object word land on that object?
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
from typing import Hashable, Mapping, Sequence

import sacrebleu
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as _meteor_module
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer as _ptb_module
from torch import Tensor

from captioning.vocab import tokenize

NO_JAVA_ENV = "CAPTIONING_NO_JAVA"
#: Seconds allowed for the PTB tokenizer run; METEOR gets this plus 0.05 s per image.
JAVA_TIMEOUT_S = 120.0


class CaptionMetricsWarning(UserWarning):
    """Issued (once per process) when METEOR is skipped because Java is unavailable."""


_warned = False  # one warning per process, whatever the reason
_java_broken: str | None = None  # set after a Java failure so later calls skip it at once
_meteor: "_MeteorProcess | None" = None
_meteor_lock = threading.Lock()


def _warn_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"METEOR is skipped and captions are tokenised in Python instead of "
                      f"with the PTB tokenizer: {reason}. Scores are not comparable to "
                      "published COCO numbers.", CaptionMetricsWarning, stacklevel=3)


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
    jar = os.path.join(os.path.dirname(os.path.abspath(_ptb_module.__file__)),
                       _ptb_module.STANFORD_CORENLP_3_4_1_JAR)
    cmd = ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer",
           "-preserveLines", "-lowerCase", "-encoding", "utf-8"]
    # str.split() also removes \r, \u2028, ... which Java may treat as line breaks.
    flat = [" ".join(s.split()) for s in sentences]
    todo = [i for i, s in enumerate(flat) if s]
    out = [""] * len(flat)
    if not todo:
        return out
    text = "\n".join(flat[i] for i in todo) + "\n"
    proc = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True,
                          timeout=JAVA_TIMEOUT_S, check=False)
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
        self.meteor_cmd = ["java", "-jar", "-Xmx2G", _meteor_module.METEOR_JAR,
                           "-", "-", "-stdio", "-l", "en", "-norm"]
        self.meteor_p = subprocess.Popen(self.meteor_cmd, cwd=jar_dir, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
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


def caption_scores(predictions: Mapping[Hashable, str],
                   references: Mapping[Hashable, Sequence[str]],
                   use_java: bool | None = None) -> dict[str, float]:
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
            raise ValueError(f"caption_scores: prediction for id {i!r} must be a str, "
                             f"got {type(predictions[i]).__name__}")
        refs = references[i]
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"caption_scores: references for id {i!r} must be a non-empty "
                             f"list of strings, got {refs!r}")

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
        gts[i] = tokens[pos:pos + len(rs)]
        pos += len(rs)

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"bleu{n}": float(value) for n, value in enumerate(bleu, start=1)}
    if problem is None:
        # METEOR's protocol uses '|||' as separator; never let a caption contain one.
        clean = lambda s: s.replace("|||", " ")  # noqa: E731
        try:
            scores["meteor"] = _meteor_score({i: [clean(r) for r in g] for i, g in gts.items()},
                                             {i: [clean(h[0])] for i, h in res.items()})
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


def _peak_centres(alpha: Tensor, where: str) -> tuple[Tensor, Tensor, int, int]:
    """alpha (T, H, W) or (T, S) with square S -> peak centres x (T,), y (T,) in [0, 1], H, W."""
    alpha = alpha.detach().float().cpu()
    if alpha.dim() == 2:
        side = int(round(alpha.shape[1] ** 0.5))
        if side * side != alpha.shape[1]:
            raise ValueError(f"{where}: alpha of shape {tuple(alpha.shape)} is not (T, H, W) "
                             "and S is not a square grid")
        alpha = alpha.view(alpha.shape[0], side, side)
    if alpha.dim() != 3:
        raise ValueError(f"{where}: alpha must be (T, H, W), got shape {tuple(alpha.shape)}")
    t, h, w = alpha.shape
    flat_idx = alpha.reshape(t, h * w).argmax(dim=1)  # ties -> first (row-major) cell
    rows, cols = flat_idx // w, flat_idx % w
    return (cols.double() + 0.5) / w, (rows.double() + 0.5) / h, h, w


def localisation_score(words: Sequence[Sequence[str]], alphas: Sequence[Tensor],
                       objects: Sequence[Sequence[Mapping]], object_words: set[str],
                       color_words: set[str] | None = None,
                       attribute_words: set[str] | None = None) -> dict[str, float | int]:
    """Share of generated object words whose attention peak lies on the object they name.

    An object phrase is a shape word (``object_words``, the noun) and the attribute words
    (``attribute_words``, e.g. sizes and colours) since the previous noun: "large red
    circle". Every word of the phrase refers to the same object. Definition, per image i:

    1. Referred objects of a noun w at position t: the scene objects with ``shape == w``.
       If the nearest preceding colour word -- searching back from t-1 and stopping at the
       previous noun or the caption start -- is the colour of at least one of them, keep
       only those of that colour (otherwise keep all of them).
    2. No scene object has that shape -> every word of the phrase is a miss (hallucinated).
    3. Peak of a word: the cell (row, col) of ``alphas[i][t]`` with the largest weight (first
       on ties), centre ``x = (col + 0.5) / W, y = (row + 0.5) / H``.
    4. Hit if the centre lies in some referred object's box ``[x0, y0, x1, y1]`` widened by
       half a cell on every side (``0.5 / W`` horizontally, ``0.5 / H`` vertically), so
       boxes smaller than a cell can still be hit by the nearest cell.

    Args:
        words: per image its T_i generated words (no bos/eos); a string is split on spaces.
        alphas: per image attention (T_i, H, W) (or (T_i, H*W) for a square grid), one row
            per word in ``words[i]``.
        objects: per image its objects ``{"shape", "color", "size", "box"}``, box in [0, 1].
        object_words: the shape words that name objects (e.g. {"circle", "square"}).
        color_words: colour words; None = every colour that occurs in ``objects``.
        attribute_words: words describing the next named object (sizes, colours); None =
            nouns only.

    Returns:
        ``localisation`` = hits / total over all object-phrase words (nouns and
        attributes; 0.0 when none was generated), ``localisation_hits``,
        ``localisation_total``, and the same over nouns only: ``localisation_nouns``,
        ``localisation_nouns_hits``, ``localisation_nouns_total``.
    """
    if not (len(words) == len(alphas) == len(objects)):
        raise ValueError(f"localisation_score: got {len(words)} word lists, {len(alphas)} "
                         f"alphas and {len(objects)} object lists; they must match")
    if color_words is None:
        color_words = {str(o["color"]) for scene in objects for o in scene}
    attribute_words = set(attribute_words or ())
    hits = total = noun_hits = noun_total = 0
    for i, (ws, alpha, scene) in enumerate(zip(words, alphas, objects)):
        ws = ws.split() if isinstance(ws, str) else list(ws)
        where = f"localisation_score: image {i}"
        xs, ys, h, w = _peak_centres(alpha, where)
        if len(xs) != len(ws):
            raise ValueError(f"{where}: {len(ws)} words but {len(xs)} alpha steps (drop eos)")
        for k, box in enumerate(o.get("box") for o in scene):
            if (box is None or len(box) != 4 or not all(0.0 <= float(v) <= 1.0 for v in box)
                    or box[0] > box[2] or box[1] > box[3]):
                raise ValueError(f"{where}, object {k}: box must be [x0, y0, x1, y1] in [0, 1] "
                                 f"with x0 <= x1 and y0 <= y1, got {box!r}")
        tol_x, tol_y = 0.5 / w, 0.5 / h

        def on_object(t: int, referred: list) -> bool:
            x, y = float(xs[t]), float(ys[t])
            return any(o["box"][0] - tol_x <= x <= o["box"][2] + tol_x
                       and o["box"][1] - tol_y <= y <= o["box"][3] + tol_y for o in referred)

        phrase_start = 0
        for t, word in enumerate(ws):
            if word not in object_words:
                continue
            attributes = [j for j in range(phrase_start, t) if ws[j] in attribute_words]
            phrase_start = t + 1
            referred = [o for o in scene if o["shape"] == word]
            for prev in reversed(ws[:t]):
                if prev in object_words or prev in color_words:
                    if prev not in object_words:
                        referred = [o for o in referred if o["color"] == prev] or referred
                    break
            noun_total += 1
            total += 1 + len(attributes)
            if not referred:
                continue  # hallucinated object: every word of the phrase misses
            noun_hit = on_object(t, referred)
            noun_hits += noun_hit
            hits += noun_hit + sum(on_object(j, referred) for j in attributes)
    return {"localisation": hits / total if total else 0.0,
            "localisation_hits": hits, "localisation_total": total,
            "localisation_nouns": noun_hits / noun_total if noun_total else 0.0,
            "localisation_nouns_hits": noun_hits, "localisation_nouns_total": noun_total}


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
    return {"bleu": float(bleu.corpus_score(hyps, [refs]).score),
            "chrf": float(chrf.corpus_score(hyps, [refs]).score),
            "exact_match": same / len(hyps), "bleu_signature": str(bleu.get_signature())}


def alignment_score(alphas: Sequence[Tensor], true_alignments: Sequence[Sequence[int]]) -> float:
    """Share of target tokens whose attention argmax is their true source position.

    ``alphas[i]`` is (T_i, S) attention of sequence i; ``true_alignments[i][t]`` is the
    source index that target token t copies, or -1 (not counted, e.g. eos or inserted
    tokens). Ties go to the first position. Returns 0.0 when no token is counted.
    """
    if len(alphas) != len(true_alignments):
        raise ValueError(f"alignment_score: {len(alphas)} alphas but "
                         f"{len(true_alignments)} alignments")
    correct = counted = 0
    for i, (alpha, truth) in enumerate(zip(alphas, true_alignments)):
        alpha = alpha.detach().float().cpu()
        truth = torch.as_tensor(list(truth), dtype=torch.long)
        if alpha.dim() != 2 or alpha.shape[0] != len(truth):
            raise ValueError(f"alignment_score: sequence {i}: alpha shape {tuple(alpha.shape)} "
                             f"does not match {len(truth)} alignments (need (T, S))")
        bad = (truth < -1) | (truth >= alpha.shape[1])
        if bad.any():
            raise ValueError(f"alignment_score: sequence {i}: alignment "
                             f"{int(truth[bad][0])} outside [-1, {alpha.shape[1] - 1}]")
        keep = truth >= 0
        counted += int(keep.sum())
        correct += int((alpha.argmax(dim=1)[keep] == truth[keep]).sum())
    return correct / counted if counted else 0.0
