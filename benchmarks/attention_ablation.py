"""Where does the captioner look? Query style x visual sentinel x score on the built-in shapes.

    python benchmarks/attention_ablation.py                          # 8 variants x seed 0
    python benchmarks/attention_ablation.py --variants additive/previous,additive/current/sentinel --seeds 0,1,2
    python benchmarks/attention_ablation.py --report-only            # table from the runs done so far

Each run trains through the real CLI and config (``captioning fit --config configs/shapes.yaml``
plus overrides) in its own subprocess (OMP_NUM_THREADS=2, OMP_WAIT_POLICY=PASSIVE, W&B
disabled, its own run folder). The budget is the config's epoch count for every variant (not
wall-clock: the machine is shared); ``max_time`` is raised so it never cuts a run. Per run:

* test scores the run wrote (``test_after_fit``: metrics.csv): BLEU-4, CIDEr-D, the pointing
  game over object words (``localisation``) and shape nouns alone (``localisation_nouns``)
  with their chance levels (captioning/eval/localisation.py);
* the best checkpoint (``captioning.io.model_loading.load_model``) captions the test scenes with
  :func:`captioning.models.inference.caption_images`: the mean sentinel weight beta over *object
  words* (the shapes' SHAPES, COLORS, SIZES) and over *function words* (every other generated
  word), token-weighted, plus beta per word; the pointing game is recomputed from these
  captions as a cross-check of the logged figure;
* one overlay of a fixed test scene (``attention_overlay(..., sentinel=beta)``), written as a
  128-colour PNG to ``docs/images/ablation/<variant>.png`` (seed 0 only).

Then ``--step-repeats`` training steps per variant (encoder + decoder forward, loss, backward,
clip, AdamW: what one Lightning step does, on one fixed batch of 64 training scenes), the
variants interleaved round-robin so load on the shared machine hits them alike; medians are
reported. Nothing is asserted on time.

Runs are resumable: a run whose ``result.json`` exists is skipped. Results go to
``benchmarks/results/attention_ablation.{json,md}``; run folders to ``--work``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see docs/results.md

import torch  # noqa: E402

from captioning.data.shape_scenes import COLORS, SHAPES, SIZES  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import cpu_name  # noqa: E402  (benchmarks/machine.py)

OBJECT_WORDS = frozenset(SHAPES) | frozenset(COLORS) | frozenset(SIZES)

# name -> overrides of model.init_args; everything else is configs/shapes.yaml as it is, except the
# regulariser weight, pinned at the value these variants were measured with (ALPHA_C).
VARIANTS: dict[str, dict] = {
    "additive/previous": {"attention": "additive", "query": "previous", "sentinel": False},
    "additive/previous/sentinel": {"attention": "additive", "query": "previous", "sentinel": True},
    "additive/current": {"attention": "additive", "query": "current", "sentinel": False},
    "additive/current/sentinel": {"attention": "additive", "query": "current", "sentinel": True},
    "scaled_dot/previous": {"attention": "scaled_dot", "query": "previous", "sentinel": False},
    "scaled_dot/previous/sentinel": {"attention": "scaled_dot", "query": "previous", "sentinel": True},
    "scaled_dot/current": {"attention": "scaled_dot", "query": "current", "sentinel": False},
    "scaled_dot/current/sentinel": {"attention": "scaled_dot", "query": "current", "sentinel": True},
}
FIRST_EIGHT = list(VARIANTS)
ALPHA_C = 0.1  # configs/shapes.yaml before this ablation; '@alpha_c=0' is configs/shapes.yaml since


def variant_overrides(name: str) -> dict:
    """Overrides of a variant name: a key of VARIANTS, optionally followed by ``@key=value,...``
    model options (e.g. ``additive/current@alpha_c=0``)."""
    base, _, extra = name.partition("@")
    if base not in VARIANTS:
        raise SystemExit(f"unknown variant {base!r}; known: {', '.join(VARIANTS)}")
    out = {**VARIANTS[base], "alpha_c": ALPHA_C}
    for item in filter(None, extra.split(",")):
        key, _, value = item.partition("=")
        out[key] = json.loads(value) if value not in ("true", "false") else value == "true"
    return out


def slug(name: str) -> str:
    return name.replace("/", "-").replace("@", "-").replace("=", "").replace(",", "-")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--variants",
        default=",".join(FIRST_EIGHT),
        help="comma list of variants (VARIANTS keys, optionally '@alpha_c=0,...'); default: the 8",
    )
    p.add_argument("--seeds", default="0", help="comma list of --seed_everything values")
    p.add_argument("--work", default="runs/attention_ablation", help="run folders (resumable)")
    p.add_argument("--out", default="benchmarks/results/attention_ablation", help="writes OUT.json and OUT.md")
    p.add_argument("--images", default="docs/images/ablation", help="overlay PNGs (seed 0 of each variant)")
    p.add_argument("--threads", type=int, default=2, help="OMP/torch threads of every run")
    p.add_argument("--fit-args", default="", help="extra CLI arguments for every fit (same for all variants)")
    p.add_argument("--beta-images", type=int, default=500, help="test scenes captioned for the beta statistics")
    p.add_argument(
        "--overlay-index", type=int, default=None, help="test scene of the overlays (default: the first with 3 objects)"
    )
    p.add_argument("--step-repeats", type=int, default=15, help="timed training steps per variant (0 = skip)")
    p.add_argument("--report-only", action="store_true", help="no training: table from existing results")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- one run
def fit(variant: str, seed: int, run_dir: Path, a: argparse.Namespace) -> dict:
    """Train one variant through the CLI in a subprocess; returns wall time and exit status."""
    args = [
        sys.executable,
        "-m",
        "captioning",
        "fit",
        "--config",
        "configs/shapes.yaml",
        "--seed_everything",
        str(seed),
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.logger.init_args.save_dir",
        str(run_dir),
        "--trainer.max_time",
        "00:12:00:00",
    ]  # the epoch budget decides, never the safety net
    for key, value in variant_overrides(variant).items():
        args += [f"--model.init_args.{key}", json.dumps(value) if not isinstance(value, str) else value]
    args += a.fit_args.split()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(a.threads),
        "MKL_NUM_THREADS": str(a.threads),
        "OMP_WAIT_POLICY": "PASSIVE",
        "WANDB_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with open(run_dir / "fit.log", "w") as log:
        rc = subprocess.run(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    return {
        "command": " ".join(args[1:]),
        "returncode": rc,
        "fit_wall_s": round(time.perf_counter() - start, 1),
        "load_avg_1min_before": round(load_before, 2),
        "load_avg_1min_after": round(os.getloadavg()[0], 2),
    }


def test_metrics(run_dir: Path) -> dict:
    """The test/* scores and the last step of the run's metrics.csv."""
    files = sorted(run_dir.glob("lightning_logs/version_*/metrics.csv"))
    if not files:
        raise RuntimeError(f"no metrics.csv under {run_dir}")
    out, steps = {}, 0
    with open(files[-1]) as f:
        for row in csv.DictReader(f):
            steps = max(steps, int(row.get("step") or 0))
            for k, v in row.items():
                if k.startswith("test/") and v not in ("", None):
                    out[k[5:]] = float(v)
    out["last_logged_step"] = steps
    return out


def caption_statistics(model, scenes: list, betas_wanted: bool) -> dict:
    """Caption the scenes; beta per word class and the pointing game recomputed."""
    from PIL import Image

    from captioning.data.shape_scenes import named_boxes
    from captioning.eval.localisation import pointing_game
    from captioning.models.inference import caption_images

    caps = []
    for k in range(0, len(scenes), 100):
        caps += caption_images(model, [Image.fromarray(s.pixels) for s in scenes[k : k + 100]])
    loc = pointing_game([c.words for c in caps], [c.attention for c in caps], [named_boxes(s.objects) for s in scenes])
    out = {
        "recomputed_localisation": round(loc["localisation"], 4),
        "recomputed_localisation_nouns": round(loc["localisation_nouns"], 4),
        "exact_caption_rate": round(
            sum(c.text == s.captions[0] or c.text in s.captions for c, s in zip(caps, scenes)) / len(scenes), 4
        ),
    }
    if not betas_wanted or caps[0].sentinel is None:
        return out
    per_word: dict[str, list[float]] = {}
    for c in caps:
        for w, b in zip(c.words, c.sentinel):
            per_word.setdefault(w, []).append(b)
    groups = {
        "object": [b for w, bs in per_word.items() if w in OBJECT_WORDS for b in bs],
        "function": [b for w, bs in per_word.items() if w not in OBJECT_WORDS for b in bs],
        "noun": [b for w, bs in per_word.items() if w in SHAPES for b in bs],
        "attribute": [b for w, bs in per_word.items() if w in COLORS or w in SIZES for b in bs],
    }
    for g, bs in groups.items():
        out[f"beta_{g}_mean"] = round(statistics.fmean(bs), 4) if bs else None
        out[f"beta_{g}_tokens"] = len(bs)
    out["beta_per_word"] = {
        w: [round(statistics.fmean(bs), 4), len(bs)]
        for w, bs in sorted(per_word.items(), key=lambda kv: -statistics.fmean(kv[1]))
    }
    return out


def overlay_scene_index(dataset, wanted: int | None) -> int:
    if wanted is not None:
        return wanted
    return next(i for i in range(len(dataset)) if len(dataset.scene(i).objects) == 3)


def write_overlay(model, scene, path: Path, title: str) -> dict:
    """Overlay of one scene as a 128-colour PNG; returns its caption and betas."""
    from PIL import Image

    from captioning.models.inference import caption_images
    from captioning.viz import attention_overlay

    cap = caption_images(model, [Image.fromarray(scene.pixels)])[0]
    fig = attention_overlay(scene.pixels, cap.words, cap.attention, title=title, panel_size=96, sentinel=cap.sentinel)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    peaks = cap.attention.reshape(len(cap.words), -1).argmax(1).tolist()
    side = cap.attention.shape[-1]
    return {
        "png": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
        "bytes": path.stat().st_size,
        "caption": cap.text,
        "sentinel": None if cap.sentinel is None else [round(b, 3) for b in cap.sentinel],
        "peak_cells_row_col": [[p // side, p % side] for p in peaks],
    }


def run_one(variant: str, seed: int, a: argparse.Namespace, test_set, overlay_index: int) -> dict:
    from captioning.io.model_loading import load_model

    run_dir = ROOT / a.work / slug(variant) / f"seed{seed}"
    result_file = run_dir / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    print(f"[ablation] {variant} seed {seed}: training in {run_dir}", file=sys.stderr, flush=True)
    info = fit(variant, seed, run_dir, a)
    if info["returncode"] != 0:
        raise RuntimeError(
            f"fit of {variant} seed {seed} failed (exit {info['returncode']}); see {run_dir / 'fit.log'}"
        )
    best = sorted(run_dir.glob("lightning_logs/version_*/checkpoints/best-*.ckpt"))
    if not best:
        raise RuntimeError(f"no best checkpoint under {run_dir}")
    model = load_model(best[-1])
    ckpt = torch.load(best[-1], map_location="cpu", weights_only=True)
    info.update(
        variant=variant,
        overrides=variant_overrides(variant),
        seed=seed,
        best_checkpoint=str(best[-1]),
        best_epoch=int(ckpt.get("epoch", -1)),
        global_step=int(ckpt.get("global_step", -1)),
        test=test_metrics(run_dir),
    )
    scenes = [test_set.scene(i) for i in range(min(a.beta_images, len(test_set)))]
    info["captions"] = caption_statistics(model, scenes, betas_wanted=True)
    info["captions"]["images"] = len(scenes)
    if seed == 0 or not (ROOT / a.images / f"{slug(variant)}.png").exists():  # seed 0's when there is one
        info["overlay"] = write_overlay(
            model,
            test_set.scene(overlay_index),
            ROOT / a.images / f"{slug(variant)}.png",
            f"{variant} (seed {seed}), test scene {overlay_index}",
        )
        info["overlay"]["test_index"] = overlay_index
    result_file.write_text(json.dumps(info, indent=1) + "\n")
    print(f"[ablation] {variant} seed {seed}: {json.dumps(info['test'])}", file=sys.stderr, flush=True)
    return info


# --------------------------------------------------------------------------- speed
def step_times(variants: list[str], a: argparse.Namespace) -> dict:
    """Median seconds per training step of each variant, round-robin on one fixed batch."""
    from captioning.data.batches import collate_captions as collate
    from captioning.data.shapes import ShapesDataModule
    from captioning.io.model_loading import load_model

    torch.set_num_threads(a.threads)
    dm = ShapesDataModule(batch_size=64)
    train = dm.dataset("train", per_caption=True)
    torch.manual_seed(0)
    batch = collate([train[i] for i in range(64)])
    setups = {}
    for v in variants:
        ckpts = sorted((ROOT / a.work / slug(v)).glob("seed*/lightning_logs/version_*/checkpoints/best-*.ckpt"))
        if not ckpts:
            continue
        model = load_model(ckpts[0]).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
        setups[v] = (model, opt)

    def step(model, opt) -> None:
        total, _, _ = model.loss(model.encode(batch), batch["captions"])
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()

    samples: dict[str, list[float]] = {v: [] for v in setups}
    for m, o in setups.values():  # warm-up
        for _ in range(2):
            step(m, o)
    for _ in range(a.step_repeats):
        for v, (m, o) in setups.items():
            t = time.perf_counter()
            step(m, o)
            samples[v].append(time.perf_counter() - t)
    return {
        v: {"median_ms": round(statistics.median(s) * 1e3, 1), "min_ms": round(min(s) * 1e3, 1), "samples": len(s)}
        for v, s in samples.items()
    }


# --------------------------------------------------------------------------- report
def mean_spread(values: list[float]) -> dict:
    out = {"mean": round(statistics.fmean(values), 4), "n": len(values), "values": [round(v, 4) for v in values]}
    if len(values) > 1:
        out["std"] = round(statistics.stdev(values), 4)
        out["min"], out["max"] = round(min(values), 4), round(max(values), 4)
    return out


METRICS = [
    ("bleu4", "BLEU-4"),
    ("cider", "CIDEr-D"),
    ("localisation", "loc. object words"),
    ("localisation_chance", "chance"),
    ("localisation_nouns", "loc. nouns"),
    ("localisation_nouns_chance", "chance"),
]


def summarise(results: list[dict]) -> dict:
    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    table = {}
    for v, runs in by_variant.items():
        row = {k: mean_spread([r["test"][k] for r in runs]) for k, _ in METRICS}
        for k in ("beta_function_mean", "beta_object_mean", "beta_noun_mean", "beta_attribute_mean"):
            vals = [r["captions"][k] for r in runs if r["captions"].get(k) is not None]
            if vals:
                row[k] = mean_spread(vals)
        row["seeds"] = sorted(r["seed"] for r in runs)
        row["fit_wall_s"] = mean_spread([r["fit_wall_s"] for r in runs])
        row["fit_s_per_step"] = mean_spread([r["fit_wall_s"] / max(1, r["global_step"]) for r in runs])
        table[v] = row
    return table


def fmt(cell: dict | None, digits: int = 3) -> str:
    if not cell:
        return "–"
    if cell["n"] > 1:
        return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"
    return f"{cell['mean']:.{digits}f}"


def markdown(report: dict) -> str:
    lines = [
        "| variant | seeds | BLEU-4 | CIDEr-D | loc. object words (chance) | loc. nouns (chance) "
        "| beta function words | beta object words | train step ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v, row in report["table"].items():
        speed = report.get("step_ms", {}).get(v, {}).get("median_ms")
        lines.append(
            f"| `{v}` | {len(row['seeds'])} | {fmt(row['bleu4'])} | {fmt(row['cider'], 2)} "
            f"| {fmt(row['localisation'], 2)} ({row['localisation_chance']['mean']:.2f}) "
            f"| {fmt(row['localisation_nouns'], 2)} ({row['localisation_nouns_chance']['mean']:.2f}) "
            f"| {fmt(row.get('beta_function_mean'), 2)} | {fmt(row.get('beta_object_mean'), 2)} "
            f"| {speed if speed is not None else '–'} |"
        )
    lines.append("")
    lines.append(
        "Mean ± sample standard deviation over seeds where there are several; test split, 500 scenes; "
        f"alpha_c {ALPHA_C} unless the variant names another. Localisation: the pointing game (the "
        "attention peak inside the box of the object a word names) over object words (size, colour, "
        "shape) and over shape nouns alone, with the chance level. beta: mean sentinel weight per "
        "generated token. Train step: encoder + decoder forward, loss, backward and AdamW on one batch "
        "of 64 scenes, median, variants interleaved."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    variants = (
        [v.strip() for v in a.variants.split(",") if v.strip()]
        if "@" not in a.variants
        else _split_variants(a.variants)
    )
    seeds = [int(s) for s in a.seeds.split(",")]
    from captioning.data.shapes import ShapesDataModule

    test_set = ShapesDataModule().dataset("test")
    overlay_index = overlay_scene_index(test_set, a.overlay_index)
    if not a.report_only:
        for seed in seeds:
            for v in variants:
                run_one(v, seed, a, test_set, overlay_index)
    # Paths relative to the checkout: the report is about the runs, not about this machine's folders.
    results = [
        json.loads(p.read_text().replace(f"{ROOT}/", "")) for p in sorted((ROOT / a.work).glob("*/seed*/result.json"))
    ]
    report = {
        "machine": {
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "threads": a.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "omp_wait_policy": "PASSIVE",
        },
        "budget": "configs/shapes.yaml (8 epochs x 125 steps of 64 scenes), max_time raised, alpha_c "
        f"{ALPHA_C} unless the variant says otherwise; same seeds for every variant",
        "object_words": sorted(OBJECT_WORDS),
        "overlay_test_index": overlay_index,
        "table": summarise(results),
        "runs": results,
    }
    old = ROOT / f"{a.out}.json"
    if a.step_repeats > 0 and not a.report_only:
        report["load_avg_1min_before_steps"] = round(os.getloadavg()[0], 2)
        report["step_ms"] = step_times(list(report["table"]), a)
        report["load_avg_1min_after_steps"] = round(os.getloadavg()[0], 2)
        report["step_ms_note"] = (
            "encoder + decoder forward, loss, backward, clip, AdamW on one fixed batch of 64 "
            "training scenes; variants interleaved; median"
        )
    elif old.exists():  # keep the last measured step times
        prev = json.loads(old.read_text())
        for k in ("step_ms", "step_ms_note", "load_avg_1min_before_steps", "load_avg_1min_after_steps"):
            if k in prev:
                report[k] = prev[k]
    old.parent.mkdir(parents=True, exist_ok=True)
    old.write_text(json.dumps(report, indent=1) + "\n")
    (ROOT / f"{a.out}.md").write_text(markdown(report))
    print(json.dumps({"table": report["table"], "step_ms": report.get("step_ms")}, indent=1))
    return report


def _split_variants(text: str) -> list[str]:
    """Comma list where a variant's '@a=1,b=2' options also use commas: split before known names."""
    out: list[str] = []
    for part in text.split(","):
        if part.split("@")[0] in VARIANTS:
            out.append(part)
        else:
            out[-1] += "," + part
    return out


if __name__ == "__main__":
    main()
