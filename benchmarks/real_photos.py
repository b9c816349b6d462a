"""Real-photo evaluation a user can rerun: train each variant on the same budget, score the test split.

Takes a public Karpathy-format caption set (json + the photos) whose features were written in
the cache format (docs/feature_cache.md) by any ImageNet-pretrained extractor, trains every
variant through the documented command line (``captioning fit --config
configs/features_external.yaml``, then ``configs/scst.yaml`` on top of the cross-entropy run),
and writes one table: BLEU-4, METEOR, CIDEr-D, distinct captions, words used, captions with a
repeated trigram, with and without the repetition block, next to a nearest-neighbour baseline
(the caption of the training photo whose mean feature is closest). It also chooses the decoding
settings (repetition block n, length penalty) on the validation split.

    python benchmarks/real_photos.py --karpathy_json data/photos/dataset.json \\
        --features data/photos/features --grid 10 --channels 1280 --extractor "EfficientNet-Lite0" \\
        --minutes 12 --scst_minutes 10 --work_dir runs/real_photos \\
        --json benchmarks/results/real_photos.json --results_md docs/results.md

A variant whose run folder already holds a finished run (``<work_dir>/<name>.done``) is not
trained again (delete the marker to retrain). Never commit the photos or the features.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- real-photos:begin -->", "<!-- real-photos:end -->"

#: name -> (extra fit arguments, cross-entropy run it starts from or None). A self-critical run
#: also gets the model arguments of the run it starts from (the weights must fit).
PAPER = ["--model.init_args.query", "previous", "--model.init_args.alpha_c", "1.0"]
VARIANTS: dict[str, tuple[list[str], str | None]] = {
    "xe_previous": ([*PAPER, "--model.init_args.sentinel", "false"], None),
    "xe_current": (
        [
            "--model.init_args.query",
            "current",
            "--model.init_args.alpha_c",
            "0.0",
            "--model.init_args.sentinel",
            "false",
        ],
        None,
    ),
    "xe_sentinel": ([*PAPER, "--model.init_args.sentinel", "true"], None),  # the photo configs' settings
    "scst_mean": (["--model.init_args.scst_baseline", "mean"], "xe_previous"),
    "scst_greedy": (["--model.init_args.scst_baseline", "greedy"], "xe_previous"),
    "scst_mean_xe": (
        ["--model.init_args.scst_baseline", "mean", "--model.init_args.scst_xe_weight", "1.0"],
        "xe_previous",
    ),
    "scst_sentinel_mean_xe": (
        ["--model.init_args.scst_baseline", "mean", "--model.init_args.scst_xe_weight", "1.0"],
        "xe_sentinel",
    ),
}


def fit_command(args: argparse.Namespace, name: str, extra: list[str], start: str | None) -> list[str]:
    run = Path(args.work_dir) / name
    vocab = Path(args.work_dir) / (start or name) / "vocab.json"
    cmd = [sys.executable, "-m", "captioning", "fit", "--config", str(ROOT / "configs/features_external.yaml")]
    minutes = args.minutes
    if start is not None:
        cmd += [
            "--config",
            str(ROOT / "configs/scst.yaml"),
            "--model.init_args.init_from",
            str(Path(args.work_dir) / start),
        ]
        # Each image once per epoch, validated four times an epoch: SCST's best comes early.
        cmd += ["--data.init_args.captions_per_epoch", "one", "--trainer.val_check_interval", "0.25"]
        minutes = args.scst_minutes
    enc = "--model.init_args.encoder.init_args."
    return cmd + [
        "--test_after_fit", "true",
        "--trainer.default_root_dir", str(run),
        "--trainer.max_time", f"00:{minutes // 60:02d}:{minutes % 60:02d}:00",
        "--trainer.max_epochs", "1000",
        enc + "grid_size", str(args.grid),
        enc + "channels", str(args.channels),
        enc + "extractor", args.extractor,
        "--data.init_args.cache_dir", args.features,
        "--data.init_args.data.init_args.karpathy_json", args.karpathy_json,
        "--data.init_args.data.init_args.image_root", str(Path(args.karpathy_json).parent),
        "--data.init_args.data.init_args.vocab_path", str(vocab),
        *extra,
    ]  # fmt: skip


def train(args: argparse.Namespace, name: str) -> None:
    extra, start = VARIANTS[name]
    if start is not None:
        extra = VARIANTS[start][0] + extra
    run_once(Path(args.work_dir), name, fit_command(args, name, extra, start))


def run_once(work_dir: Path, name: str, cmd: list[str]) -> None:
    """Run a variant's training command unless ``<work_dir>/<name>.done`` says it ran: output in
    ``<name>.log``, the marker (with the seconds it took) written only when it succeeded."""
    done = work_dir / f"{name}.done"
    if done.exists():
        print(f"{name}: trained before ({done}); reusing it", flush=True)
        return
    print(f"{name}: {' '.join(cmd)}", flush=True)
    log = work_dir / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: training failed (exit {proc.returncode}); see {log}")
    done.write_text(f"{time.perf_counter() - t0:.0f} s\n")


# ---------------------------------------------------------------------------- evaluation
def _datamodule(args: argparse.Namespace, vocab: str):
    from captioning.data.coco import CocoCaptionsDataModule

    return CocoCaptionsDataModule(
        karpathy_json=args.karpathy_json,
        image_root=str(Path(args.karpathy_json).parent),
        vocab_path=vocab,
        check_images="none",
    )


def _references_and_features(args: argparse.Namespace, split: str, vocab: str):
    from captioning.data.feature_cache import FeatureCache

    refs = _datamodule(args, vocab).references(split)
    per_split = Path(args.features) / split  # one folder per split, or one for all (docs/feature_cache.md)
    cache = FeatureCache(per_split if (per_split / "index.json").is_file() else args.features)
    ids = [i for i in refs if i in set(cache.image_ids)]
    feats = torch.from_numpy(np.asarray(cache.read(cache.rows_of(ids)), dtype=np.float32))
    return ids, refs, feats


def caption_quality(predictions: dict, references: dict) -> dict[str, float]:
    """COCO scores plus what the captions look like: distinct captions, words used, repeats."""
    from captioning.eval.metrics import caption_scores

    scores = caption_scores(predictions, references)
    caps = list(predictions.values())
    return {
        "bleu4": scores["bleu4"],
        "meteor": scores.get("meteor", float("nan")),
        "cider": scores["cider"],
        "distinct_captions": len(set(caps)),
        "words_used": len({w for c in caps for w in c.split()}),
        "repeated_trigram_share": sum(map(repeats_trigram, caps)) / len(caps),
        "mean_length": float(np.mean([len(c.split()) for c in caps])),
        "images": len(caps),
    }


def repeats_trigram(caption: str) -> bool:
    """Whether a caption says some three words twice ("... a white shirt and a white shirt")."""
    w = caption.split()
    grams = [tuple(w[i : i + 3]) for i in range(len(w) - 2)]
    return len(set(grams)) < len(grams)


def decode(model, feats: torch.Tensor, ids: list, no_repeat_ngram: int, length_penalty: float) -> dict:
    model.hparams.no_repeat_ngram = no_repeat_ngram
    model.hparams.length_penalty = length_penalty
    out = {}
    with torch.no_grad():
        for k in range(0, len(ids), 64):
            result = model.generate(feats[k : k + 64])
            for i, w in zip(ids[k : k + 64], model.words(result)):
                out[i] = " ".join(w)
    return out


def choose_decoding(model, args: argparse.Namespace, vocab: str) -> tuple[dict, list[dict]]:
    """The repetition block and length penalty with the best validation CIDEr-D among those that
    leave at most 1% of validation captions with a repeated trigram."""
    ids, refs, feats = _references_and_features(args, "val", vocab)
    grid = []
    for n in (0, 2, 3, 4):
        for lp in (0.0, 0.5, 1.0):
            q = caption_quality(decode(model, feats, ids, n, lp), {i: refs[i] for i in ids})
            grid.append({"no_repeat_ngram": n, "length_penalty": lp, **q})
            print(f"  val: no_repeat_ngram {n}, length_penalty {lp}: CIDEr-D {q['cider']:.3f}", flush=True)
    return pick_decoding(grid), grid


def pick_decoding(grid: list[dict]) -> dict:
    """Captions that loop are the failure to avoid: among the settings that leave at most 1% of
    validation captions with a repeated trigram, the best CIDEr-D (any setting if none does)."""
    clean = [r for r in grid if r["repeated_trigram_share"] <= 0.01] or grid
    best = max(clean, key=lambda r: r["cider"])
    return {"no_repeat_ngram": best["no_repeat_ngram"], "length_penalty": best["length_penalty"]}


def paired_cider_change(new: dict, old: dict, references: dict, draws: int = 2000, seed: int = 0) -> dict[str, float]:
    """Relative CIDEr-D change of the ``new`` captions over the ``old`` ones on the same photos,
    with a 95% paired bootstrap interval: the photos are drawn with replacement and both models
    are scored on the same draw, so what the photos share cancels (the idf of the whole split is
    kept). On a test split of about a hundred photos the interval says whether a change is more
    than which photos happened to be in it."""
    from captioning.eval.cider import CiderD

    ids = list(references)
    scorer = CiderD({i: references[i] for i in ids})
    a = scorer.score(ids, [new[i] for i in ids])
    b = scorer.score(ids, [old[i] for i in ids])
    draw = np.random.default_rng(seed).integers(0, len(ids), size=(draws, len(ids)))
    ratios = a[draw].mean(1) / np.maximum(b[draw].mean(1), 1e-12) - 1.0
    low, high = np.percentile(ratios, [2.5, 97.5])
    return {"change": float(a.mean() / max(b.mean(), 1e-12) - 1.0), "low": float(low), "high": float(high)}


def nearest_neighbour(args: argparse.Namespace, vocab: str) -> dict[str, float]:
    """Each test photo gets the consensus caption of its nearest training photo (cosine of mean features)."""
    from captioning.eval.cider import CiderD

    train_ids, train_refs, train_feats = _references_and_features(args, "train", vocab)
    ids, refs, feats = _references_and_features(args, "test", vocab)

    def unit(x: torch.Tensor) -> torch.Tensor:
        m = x.mean(1)
        return m / m.norm(dim=1, keepdim=True).clamp(min=1e-8)

    nearest = (unit(feats) @ unit(train_feats).t()).argmax(1).tolist()
    preds = {}
    for i, j in zip(ids, nearest):
        caps = train_refs[train_ids[j]]
        if len(caps) > 1:  # the caption closest to the image's other captions
            others = {k: [c for m, c in enumerate(caps) if m != k] for k in range(len(caps))}
            preds[i] = caps[int(np.argmax(CiderD(others).score(list(others), caps)))]
        else:
            preds[i] = caps[0]
    return caption_quality(preds, {i: refs[i] for i in ids})


def evaluate(args: argparse.Namespace, name: str, decoding: dict | None) -> dict:
    from captioning.io.model_loading import load_model

    model = load_model(Path(args.work_dir) / name)
    start = VARIANTS[name][1]
    vocab = str(Path(args.work_dir) / (start or name) / "vocab.json")
    model.learn_repeatable_ngrams(_datamodule(args, vocab))  # as fit does (runs of earlier versions lack them)
    row: dict = {"variant": name}
    if decoding is None:
        decoding, row["decoding_grid"] = choose_decoding(model, args, vocab)
        row["chosen_on_val"] = decoding
    ids, refs, feats = _references_and_features(args, "test", vocab)
    test_refs = {i: refs[i] for i in ids}
    row["plain"] = caption_quality(decode(model, feats, ids, 0, 0.0), test_refs)
    blocked = decode(model, feats, ids, decoding["no_repeat_ngram"], decoding["length_penalty"])
    row["blocked"] = caption_quality(blocked, test_refs)
    row["blocked_captions"] = blocked  # for the paired comparison with the run it starts from
    row["decoding"] = decoding
    val_ids, val_refs, val_feats = _references_and_features(args, "val", vocab)
    row["val_blocked"] = caption_quality(
        decode(model, val_feats, val_ids, decoding["no_repeat_ngram"], decoding["length_penalty"]),
        {i: val_refs[i] for i in val_ids},
    )
    # The same block without the n-grams training captions repeat (every repeat blocked).
    learnt = model.repeatable.ngrams
    model.repeatable.ngrams = learnt[:0]
    for split, (i_, r_, f_) in {"test": (ids, test_refs, feats), "val": (val_ids, val_refs, val_feats)}.items():
        row[f"{split}_blocked_every_repeat"] = caption_quality(
            decode(model, f_, i_, decoding["no_repeat_ngram"], decoding["length_penalty"]), {i: r_[i] for i in i_}
        )
    model.repeatable.ngrams = learnt
    done = Path(args.work_dir) / f"{name}.done"
    row["train_seconds"] = done.read_text().strip() if done.exists() else None
    return row


# ---------------------------------------------------------------------------- report
def table(rows: list[dict], nn_row: dict, args: argparse.Namespace, machine: str) -> str:
    d = rows[0]["decoding"]
    lines = [
        BEGIN,
        f"Test split of {nn_row['images']} photos; features: {args.extractor} ({args.grid}x{args.grid}x"
        f"{args.channels}); budget {args.minutes} min of cross-entropy, then {args.scst_minutes} min of SCST; "
        f'beam 3; {machine}. "blocked": repetition block n={d["no_repeat_ngram"]} (n-grams that training '
        f"captions repeat stay allowed) and length penalty {d['length_penalty']}, chosen on the validation "
        "split (the best CIDEr-D with at most 1% of captions repeating a trigram); the last column blocks "
        "every repeat instead. The change of an SCST model is over the cross-entropy run it starts from, on "
        "the same test photos, with a 95% paired bootstrap interval (photos redrawn 2,000 times). "
        "`benchmarks/real_photos.py` writes this table.",
        "",
        "| model | decoding | BLEU-4 | METEOR | CIDEr-D | distinct captions | words used | repeated trigrams "
        "| val CIDEr-D | CIDEr-D, every repeat blocked | CIDEr-D change over the start (95% interval) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cells(q: dict) -> str:
        return (
            f"{q['bleu4']:.3f} | {q['meteor']:.3f} | {q['cider']:.3f} | {q['distinct_captions']} | "
            f"{q['words_used']} | {100 * q['repeated_trigram_share']:.1f}% |"
        )

    for r in rows:
        for mode in ("plain", "blocked"):
            extra = " | |"
            if mode == "blocked":
                every = r["test_blocked_every_repeat"]["cider"]
                extra = f" {r['val_blocked']['cider']:.3f} | {every:.3f} |"
            change = r.get("change_over_start") if mode == "blocked" else None
            if change and change["low"] == change["high"] == change["change"] == 0.0:
                extra += " its start kept (no SCST validation beat it) |"  # the same captions
            elif change:
                c, lo, hi = (100 * change[k] for k in ("change", "low", "high"))
                extra += f" {c:+.0f}% ({lo:+.0f}% to {hi:+.0f}%) |"
            else:
                extra += " |"
            lines.append(f"| {r['variant']} | {mode} | " + cells(r[mode]) + extra)
    lines.append("| nearest-neighbour retrieval | - | " + cells(nn_row) + " | | |")
    lines.append(END)
    return "\n".join(lines)


def write_results_md(path: Path, block: str, heading: str = "Real photos") -> None:
    """Put ``block`` (its first and last lines are its markers) in place of the one between the
    same markers in ``path``, or add it under a new ``heading`` at the end."""
    begin, end = block.splitlines()[0], block.splitlines()[-1]
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--karpathy_json", required=True)
    p.add_argument("--features", required=True, help="feature cache folder (docs/feature_cache.md)")
    p.add_argument("--grid", type=int, required=True)
    p.add_argument("--channels", type=int, required=True)
    p.add_argument("--extractor", required=True, help="what made the features (named in the table)")
    p.add_argument("--minutes", type=int, default=12, help="cross-entropy budget per variant")
    p.add_argument("--scst_minutes", type=int, default=10, help="self-critical budget per variant")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--work_dir", default="runs/real_photos")
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--results_md", default=None, help="put the table into this Markdown file")
    p.add_argument("--machine", default=None, help="the machine, named in the table")
    args = p.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    for name in names:  # cross-entropy runs first: the SCST ones start from them
        if VARIANTS[name][1] and VARIANTS[name][1] not in names:
            names.insert(names.index(name), VARIANTS[name][1])
    names = list(dict.fromkeys(sorted(names, key=lambda n: VARIANTS[n][1] is not None)))
    os.makedirs(args.work_dir, exist_ok=True)
    for name in names:
        train(args, name)
    rows: list[dict] = []
    decoding = None
    for name in names:
        row = evaluate(args, name, decoding)
        decoding = row["decoding"]  # chosen once, on the first model's validation split, used for all
        start = VARIANTS[name][1]
        if start is not None:  # SCST: the change over its cross-entropy start, photo by photo
            before, captions = next(r for r in rows if r["variant"] == start), row["blocked_captions"]
            refs = _datamodule(args, str(Path(args.work_dir) / start / "vocab.json")).references("test")
            row["change_over_start"] = paired_cider_change(
                captions, before["blocked_captions"], {i: refs[i] for i in captions}
            )
        rows.append(row)
        print(f"{name}: plain {row['plain']}\n  blocked {row['blocked']}", flush=True)
    nn_row = nearest_neighbour(args, str(Path(args.work_dir) / names[0] / "vocab.json"))
    machine = args.machine or f"{os.cpu_count()}-core CPU, torch {torch.__version__}"
    block = table(rows, nn_row, args, machine)
    print(block)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": rows, "nearest_neighbour": nn_row, "machine": machine}, indent=1)
        )
    if args.results_md:
        write_results_md(Path(args.results_md), block)


if __name__ == "__main__":
    main()
