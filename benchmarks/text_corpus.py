"""French->English on the Tatoeba/Anki file: our model next to the PyTorch tutorial's, same split
and budget; prints ONE JSON object (docs/text.md, "Real-corpus recipe").

    # with the real file (download fra-eng.zip from manythings.org/anki, unzip fra.txt):
    python benchmarks/text_corpus.py --fra data/fra.txt --budget_min 12 --out benchmarks/results/text_corpus_fra.json
    # without it: a generated stand-in with the same format and filter (develops the script;
    # its scores say nothing about French)
    python benchmarks/text_corpus.py --synthetic --budget_min 2

Steps: (1) the tutorial's filter ("i am / he is / you are ..." English, both sides under 10
words after its normalisation) on ``English<TAB>French<TAB>attribution`` lines; (2) a seeded
split, by default 500 validation and 1,000 test pairs, the rest for training, written as
``French<TAB>English`` files in ``--work_dir``; (3) ``captioning fit --config
configs/text_tsv.yaml`` with only the three paths (plus ``--trainer.max_time``) in a child
process (its test numbers come from ``test_after_fit``); (4) ``captioning translate`` of the
test sources from the best checkpoint, scored offline with
:func:`captioning.models.translations.score_translations` (the same definition as ``test``: the two
must agree); (5) the tutorial model (benchmarks/text_tutorial_model.py) trained in a child
process for the same wall-clock budget, greedy on the test split.

Scores: ``ours``: against the references as our tokenizer normalises them (NFC, lowercase);
``tutorial``: against the tutorial's normalised references (ASCII, punctuation dropped).
``both_tutorial_normalised`` scores both systems after the tutorial's normalisation, the one
common ground. Throughput: training pairs per second of the fit (validation included) and
the CPU time / wall time of each child (200% = both cores busy).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from text_tutorial_model import keep_pair, normalize  # noqa: E402

# ---------------------------------------------------------------------------- stand-in corpus
_SUBJECTS = [  # English prefixes of the tutorial's filter -> French, with agreement (gender, plural)
    ("i am", "je suis", "", ""),
    ("i'm", "je suis", "", ""),
    ("he is", "il est", "", ""),
    ("he's", "il est", "", ""),
    ("she is", "elle est", "e", ""),
    ("she's", "elle est", "e", ""),
    ("you are", "tu es", "", ""),
    ("you're", "vous êtes", "", "s"),
    ("we are", "nous sommes", "", "s"),
    ("we're", "nous sommes", "", "s"),
    ("they are", "ils sont", "", "s"),
    ("they're", "elles sont", "e", "s"),
]
_SYL_EN = ["ba", "ter", "lo", "mi", "sen", "ra", "dor", "ki", "pel", "an", "ste", "ful", "ing", "ous", "ly"]
_SYL_FR = ["bé", "teu", "lo", "mi", "sen", "ra", "dor", "qui", "pel", "an", "été", "eux", "ant", "oir", "ié"]


def synthetic_fra(n_lines: int = 17000, n_words: int = 3000, seed: int = 0) -> list[str]:
    """Lines in fra.txt's format (``English<TAB>French<TAB>attribution``), generated: subject +
    "very"/"not" + 1-4 Zipf-distributed adjectives or "a <noun>" phrases (French: agreement
    suffixes, noun-adjective order, accents), ``.`` or ``!``; a share of lines fail the filter,
    as in the real file. A stand-in for developing the recipe, not a language."""
    rng = random.Random(seed)
    lexicon = []
    for i in range(n_words):
        k = rng.randint(1, 3)
        parts = [rng.randrange(len(_SYL_EN)) for _ in range(k)]
        lexicon.append(
            (
                "".join(_SYL_EN[p] for p in parts) + str(i % 7 if i > 2000 else ""),
                "".join(_SYL_FR[p] for p in parts) + str(i % 7 if i > 2000 else ""),
            )
        )
    weights = [1.0 / (r + 1) for r in range(n_words)]
    lines = []
    for _ in range(n_lines):
        en_subj, fr_subj, fem, plural = rng.choice(_SUBJECTS)
        if rng.random() < 0.15:  # not one of the filter's prefixes
            en_subj, fr_subj = rng.choice([("it is", "c'est"), ("this is", "ceci est"), ("go", "va")])
        en, fr = [en_subj], [fr_subj]
        if rng.random() < 0.3:
            en.append("not")
            fr.append("pas")
        if rng.random() < 0.3:
            en.append("very")
            fr.append("très")
        for _ in range(rng.choice([1, 1, 2, 2, 3, 4, 6])):
            w_en, w_fr = rng.choices(lexicon, weights)[0]
            if rng.random() < 0.3:
                noun_en, noun_fr = rng.choices(lexicon, weights)[0]
                en += ["a", w_en, noun_en]
                fr += ["un", noun_fr, w_fr + fem]
            else:
                en.append(w_en)
                fr.append(w_fr + fem + plural)
        end = rng.choice([".", ".", ".", "!"])
        english = " ".join(en) + end
        french = " ".join(fr) + (" !" if end == "!" else ".")
        lines.append(f"{english[0].upper()}{english[1:]}\t{french[0].upper()}{french[1:]}\tCC-BY 2.0 (France)")
    return lines


# ---------------------------------------------------------------------------- split
def prepare(lines: list[str], work_dir: Path, n_val: int, n_test: int, seed: int) -> dict:
    """Filter, deduplicate, split; write train/val/test.tsv (French<TAB>English)."""
    pairs, seen = [], set()
    for line in lines:
        cols = line.rstrip("\r\n").split("\t")
        if len(cols) < 2 or not keep_pair(cols[0], cols[1]):
            continue
        if (cols[0], cols[1]) in seen:
            continue
        seen.add((cols[0], cols[1]))
        pairs.append((cols[1].strip(), cols[0].strip()))  # French source, English target
    random.Random(seed).shuffle(pairs)
    if len(pairs) <= n_val + n_test:
        raise ValueError(f"only {len(pairs)} pairs pass the filter: too few for {n_val} + {n_test} held out")
    splits = {"val": pairs[:n_val], "test": pairs[n_val : n_val + n_test], "train": pairs[n_val + n_test :]}
    work_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        (work_dir / f"{name}.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in rows), encoding="utf-8")
    return {name: len(rows) for name, rows in splits.items()}


# ---------------------------------------------------------------------------- runs
def run_child(cmd: list[str], env: dict, log: Path) -> dict:
    """Run a child process; wall seconds, its own CPU seconds (``wait4``: this child's alone, also
    when another runs beside it), CPU utilisation (%)."""
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall, cpu = time.perf_counter() - t0, usage.ru_utime + usage.ru_stime
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); see {log}")
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "cpu_percent": round(100 * cpu / wall)}


def ours(args: argparse.Namespace, work: Path, env: dict) -> dict:
    from captioning.data.text_vocab import TextTokenizer
    from captioning.io.model_loading import find_checkpoint, read_checkpoint
    from captioning.models.translations import score_translations

    root = work / "runs"
    cmd = [
        sys.executable,
        "-m",
        "captioning",
        "fit",
        "--config",
        str(ROOT / "configs" / "text_tsv.yaml"),
        "--data.init_args.train_path",
        str(work / "train.tsv"),
        "--data.init_args.val_path",
        str(work / "val.tsv"),
        "--data.init_args.test_path",
        str(work / "test.tsv"),
        "--trainer.max_time",
        f"00:00:{int(args.budget_min):02d}:{int(args.budget_min % 1 * 60):02d}",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger.init_args.save_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        *args.ours_args,
    ]
    fit = run_child(cmd, env, work / "ours_fit.log")
    with open(next(root.rglob("metrics.csv")), encoding="utf-8") as f:
        metrics = list(csv.DictReader(f))
    epochs_done = 1 + max((int(row["epoch"]) for row in metrics if row.get("val/bleu")), default=-1)
    test = {k.split("/", 1)[1]: float(v) for row in metrics for k, v in row.items() if k.startswith("test/") and v}
    last = read_checkpoint(next(root.rglob("last.ckpt")))
    steps, hp = int(last["global_step"]), last["hyper_parameters"]
    best = find_checkpoint(root)
    sources = [line.split("\t")[0] for line in (work / "test.tsv").read_text(encoding="utf-8").splitlines()]
    refs = [line.split("\t")[1] for line in (work / "test.tsv").read_text(encoding="utf-8").splitlines()]
    (work / "test.src").write_text("\n".join(sources) + "\n", encoding="utf-8")
    hyps_path = work / "ours_test.hyp"
    with open(hyps_path, "w", encoding="utf-8") as out:
        subprocess.check_call(
            [
                sys.executable,
                "-m",
                "captioning",
                "translate",
                "--ckpt_path",
                str(best),
                "--input",
                str(work / "test.src"),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        )
    hyps = hyps_path.read_text(encoding="utf-8").splitlines()
    offline = score_translations(hyps, refs, TextTokenizer.from_dict(hp["vocab"]["tokenizer"]))
    common = score_translations([normalize(h) for h in hyps], [normalize(r) for r in refs])
    with open(work / "train.tsv", encoding="utf-8") as f:
        n_train = sum(1 for _ in f)
    params = sum(v.numel() for v in last["state_dict"].values())
    return {
        "test_after_fit": test,
        "translate_scored_offline": _round(offline),
        "tutorial_normalised": _round(common),
        "fit": fit,
        "steps": steps,
        "epochs": epochs_done,  # validated epochs (a time-limited stop may add part of one)
        "train_pairs_per_s_wall": round(epochs_done * n_train / fit["wall_s"], 1),
        "train_pairs_per_cpu_s": round(epochs_done * n_train / fit["cpu_s"], 1),
        "params": params,
        "examples": list(zip(sources[:5], hyps[:5], refs[:5])),
    }


def tutorial(args: argparse.Namespace, work: Path, env: dict) -> dict:
    out = work / "tutorial.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_tutorial_child",
        str(work),
        "--budget_min",
        str(args.budget_min),
        "--seed",
        str(args.seed),
    ]
    fit = run_child(cmd, env, work / "tutorial.log")
    result = json.loads(out.read_text())
    result["fit"] = fit
    return result


def tutorial_child(work: Path, budget_s: float, seed: int) -> None:
    """Train the tutorial model for ``budget_s`` seconds (in this process), then score greedy test."""
    import torch
    from text_tutorial_model import Lang, TutorialModel, to_array

    from captioning.models.translations import score_translations

    torch.manual_seed(seed)
    read = lambda name: [line.split("\t") for line in (work / name).read_text(encoding="utf-8").splitlines()]  # noqa
    train, test = read("train.tsv"), read("test.tsv")
    src, tgt = [normalize(s) for s, _ in train], [normalize(t) for _, t in train]
    model = TutorialModel(Lang(src), Lang(tgt))
    x, y = to_array(model.input_lang, src), to_array(model.output_lang, tgt)
    t0, steps = time.perf_counter(), 0
    while time.perf_counter() - t0 < budget_s:
        for idx in torch.randperm(len(x)).split(32):
            model.train_step(x[idx], y[idx])
            steps += 1
            if time.perf_counter() - t0 >= budget_s:
                break
    wall = time.perf_counter() - t0
    hyps = model.translate([normalize(s) for s, _ in test])
    scores = score_translations(hyps, [normalize(t) for _, t in test])
    (work / "tutorial.json").write_text(
        json.dumps(
            {
                "tutorial_normalised": _round(scores),
                "steps": steps,
                "epochs": round(steps * 32 / len(x), 2),
                "train_pairs_per_s_wall": round(steps * 32 / wall, 1),
                "params": model.parameters(),
                "examples": list(zip([s for s, _ in test[:5]], hyps[:5], [t for _, t in test[:5]])),
            }
        )
    )


def _round(scores: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--fra",
        "--pairs",
        dest="fra",
        help="an Anki/Tatoeba file of manythings.org/anki (English<TAB>other language<TAB>attribution): "
        "fra.txt, deu.txt, ...; the other language is translated into English",
    )
    p.add_argument("--synthetic", action="store_true", help="use a generated stand-in instead of --pairs")
    p.add_argument("--work_dir", default="runs/text_corpus", help="split files, runs and logs go here")
    p.add_argument("--n_val", type=int, default=500)
    p.add_argument("--n_test", type=int, default=1000)
    p.add_argument("--budget_min", type=float, default=12.0, help="training wall-clock minutes, each system")
    p.add_argument(
        "--budgets",
        help="several budgets in minutes, comma-separated (e.g. 2,5,10): one run of each system per budget",
    )
    p.add_argument(
        "--concurrent",
        action="store_true",
        help="train ours and the tutorial's model at the same time (one core each with --threads 1)",
    )
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of both children")
    p.add_argument("--skip_tutorial", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--plot", help="with --budgets: quality against budget as a PNG")
    p.add_argument(
        "--ours_args",
        nargs=argparse.REMAINDER,
        default=[],
        help="further `captioning fit` options (last on the command line)",
    )
    p.add_argument(
        "--plot_from",
        nargs="+",
        metavar="TITLE=JSON",
        help="only draw --plot from earlier --budgets results, one row per corpus (e.g. 'German->English=deu.json')",
    )
    p.add_argument("--_tutorial_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plot_from:
        if not args.plot:
            p.error("--plot_from needs --plot PNG")
        corpora = [
            (t, json.loads(Path(f).read_text(encoding="utf-8"))["runs"])
            for t, f in (a.split("=", 1) for a in args.plot_from)
        ]
        return plot_budgets(corpora, Path(args.plot))
    if args._tutorial_child:
        return tutorial_child(Path(args._tutorial_child), args.budget_min * 60, args.seed)
    if bool(args.fra) == args.synthetic:
        p.error("give --pairs FILE (the real corpus) or --synthetic (a generated stand-in)")
    lines = synthetic_fra(seed=args.seed) if args.synthetic else Path(args.fra).read_text(encoding="utf-8").splitlines()
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        OMP_WAIT_POLICY="PASSIVE",
        WANDB_MODE=os.environ.get("WANDB_MODE", "disabled"),
        PYTHONPATH=str(ROOT),
    )
    budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else [args.budget_min]
    runs = []
    for budget in budgets:
        args.budget_min = budget
        work = Path(args.work_dir) / (f"{budget:g}min" if args.budgets else "")
        sizes = prepare(lines, work, args.n_val, args.n_test, args.seed)
        result = {
            "corpus": "synthetic stand-in (NOT French: develops the script only)" if args.synthetic else str(args.fra),
            "pairs": sizes,
            "budget_min": budget,
            "concurrent": args.concurrent,
            "threads": {"OMP_NUM_THREADS": args.threads, "OMP_WAIT_POLICY": "PASSIVE"},
            "cpu_count": os.cpu_count(),
            "load_avg_1min_before": round(os.getloadavg()[0], 2),
        }
        if args.concurrent and not args.skip_tutorial:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(2) as pool:
                mine, theirs = pool.submit(ours, args, work, env), pool.submit(tutorial, args, work, env)
                result["ours"], result["tutorial"] = mine.result(), theirs.result()
        else:
            result["ours"] = ours(args, work, env)
            if not args.skip_tutorial:
                result["tutorial"] = tutorial(args, work, env)
        result["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
        runs.append(result)
        print(json.dumps(result, ensure_ascii=False), file=sys.stderr, flush=True)
    output = runs[0] if not args.budgets else {"runs": runs}
    text = json.dumps(output, indent=1, ensure_ascii=False)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    if args.plot and args.budgets:
        plot_budgets([(Path(str(runs[0]["corpus"])).name, runs)], Path(args.plot))


def plot_budgets(corpora: list[tuple[str, list[dict]]], path: Path) -> None:
    """BLEU and chrF (tutorial normalisation, the common ground) against the training budget:
    one row per corpus (title, its runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(len(corpora), 2, figsize=(9, 3.4 * len(corpora)), squeeze=False)
    for axes, (title, runs) in zip(grid, corpora):
        budgets = [r["budget_min"] for r in runs]
        for ax, metric in zip(axes, ("bleu", "chrf")):
            for system, style in (("ours", "o-"), ("tutorial", "s--")):
                values = [r[system]["tutorial_normalised"][metric] for r in runs if system in r]
                if values:
                    ax.plot(budgets[: len(values)], values, style, label=system)
            ax.set_xlabel("training budget (minutes)")
            ax.set_ylabel(metric.upper() if metric == "bleu" else "chrF")
            ax.set_title(f"{title}: {'BLEU' if metric == 'bleu' else 'chrF'}", fontsize=10)
            ax.set_xticks(budgets)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
