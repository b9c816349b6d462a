"""Bahdanau et al. 2015, Figure 2, on a synthetic task: score against source length.

Trains the text seq2seq model twice on the same data and for the same wall-clock budget --
with attention (default: additive, Bahdanau query) and with ``attention: none`` (one fixed
context vector, the RNNenc baseline) -- then decodes a test set with an equal number of
examples per length and reports, per source length: exact match, sacrebleu BLEU and, for the
attention model, the alignment score (attention peak on the true source position).

    python benchmarks/seq2seq_length.py                      # dates task, ~11 min on 2 cores
    python benchmarks/seq2seq_length.py --budget_s 60 --eval_per_length 20   # smoke run

Writes ``<out_dir>/seq2seq_length_<task>.{json,md,png}`` and prints the markdown table and
the JSON. Timings depend on machine load; the scores are what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# OpenMP threads that spin-wait are many times slower when other processes share the cores
# (measured here: 7.7 s vs 0.9 s per step); passive waiting costs nothing when idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="dates", choices=["dates", "reverse"])
    p.add_argument("--min_items", type=int, default=1, help="items per training example (dates: 4 tokens each)")
    p.add_argument("--max_items", type=int, default=10, help="longest training example (10 dates = 39 tokens)")
    p.add_argument(
        "--eval_max_items", type=int, default=12, help="longest test example (past max_items: unseen lengths)"
    )
    p.add_argument("--eval_step", type=int, default=1, help="test every eval_step-th length (e.g. 5 for reverse)")
    p.add_argument("--eval_per_length", type=int, default=100, help="test examples per length")
    p.add_argument("--variants", default="additive,none", help="comma-separated attention scores to compare")
    p.add_argument("--query", default="bahdanau", choices=["bahdanau", "luong"])
    p.add_argument("--budget_s", type=float, default=300.0, help="training wall-clock seconds per variant")
    p.add_argument("--max_epochs", type=int, default=100)
    p.add_argument("--train_size", type=int, default=50000)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--embed_dim", type=int, default=64)
    p.add_argument("--encoder_dim", type=int, default=64, help="BiLSTM hidden size per direction")
    p.add_argument("--decoder_dim", type=int, default=128)
    p.add_argument("--attention_dim", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", default=str(Path(__file__).resolve().parent / "results"))
    return p.parse_args(argv)


def train(args: argparse.Namespace, attention: str):
    import lightning.pytorch as pl

    from captioning.data.text_tasks import SyntheticTextDataModule
    from captioning.models.seq2seq import Seq2SeqModel

    pl.seed_everything(args.seed, verbose=False)
    dm = SyntheticTextDataModule(
        task=args.task,
        min_items=args.min_items,
        max_items=args.max_items,
        train_size=args.train_size,
        val_size=1,
        test_size=1,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    model = Seq2SeqModel(
        vocab=dm.vocab_data,
        attention=attention,
        query=args.query,
        embed_dim=args.embed_dim,
        encoder_dim=args.encoder_dim,
        decoder_dim=args.decoder_dim,
        attention_dim=args.attention_dim,
        dropout=0.0,
        lr=args.lr,
        weight_decay=0.0,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.max_epochs,
        max_time={"seconds": args.budget_s},
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.time()
    trainer.fit(model, datamodule=dm)
    info = {
        "train_seconds": round(time.time() - start, 1),
        "steps": int(trainer.global_step),
        "examples_seen": int(trainer.global_step) * args.batch_size,
    }
    return model.eval(), info


@torch.no_grad()
def evaluate(args: argparse.Namespace, model, lengths: list[int]) -> list[dict]:
    """Per length n: exact match, BLEU, chrF and (attention only) alignment on fresh test examples."""
    from captioning.data.batches import collate_text as collate
    from captioning.data.text_tasks import SyntheticTextDataModule
    from captioning.eval.metrics import alignment_score, text_scores

    rows = []
    for n in lengths:
        # A separate seed space from training (seed + 1000): test sentences are unseen.
        dm = SyntheticTextDataModule(
            task=args.task, min_items=n, max_items=n, test_size=args.eval_per_length, seed=args.seed + 1000
        )
        items = dm.examples("test", range(args.eval_per_length))
        hyps, refs, alphas, truths = [], [], [], []
        for start in range(0, len(items), 100):
            batch = collate(items[start : start + 100])
            _, a = model.loss(batch)
            result = model.generate(batch["source"], batch["source_lengths"], beam_size=1)
            hyps += [model.detokenize(t) for t in model.hypothesis_tokens(result)]
            refs += batch["references"]
            for i, truth in enumerate(batch["alignments"]):
                alphas.append(a[i, : len(truth), : int(batch["source_lengths"][i])])
                truths.append(truth)
        scores = text_scores(hyps, refs)
        rows.append(
            {
                "items": n,
                "source_tokens": len(items[0]["source"]) - 1,
                "exact_match": round(scores["exact_match"], 4),
                "bleu": round(scores["bleu"], 2),
                "chrf": round(scores["chrf"], 2),
                "alignment": (
                    round(alignment_score(alphas, truths), 4) if model.decoder.attention is not None else None
                ),
                "example": {"source": items[0]["source_text"], "reference": refs[0], "output": hyps[0]},
                "bleu_signature": scores["bleu_signature"],
            }
        )
    return rows


def markdown_table(results: dict) -> str:
    variants = list(results["variants"])
    head = (
        "| source tokens | "
        + " | ".join(
            f"{v}: exact match | {v}: BLEU" + (" | " + f"{v}: alignment" if v != "none" else "") for v in variants
        )
        + " |"
    )
    cols = sum(3 if v != "none" else 2 for v in variants)
    lines = [head, "|---:|" + "---:|" * cols]
    n_rows = len(results["variants"][variants[0]]["per_length"])
    for r in range(n_rows):
        cells = [str(results["variants"][variants[0]]["per_length"][r]["source_tokens"])]
        for v in variants:
            row = results["variants"][v]["per_length"][r]
            cells += [f"{row['exact_match']:.2f}", f"{row['bleu']:.1f}"]
            if v != "none":
                cells.append("-" if row["alignment"] is None else f"{row['alignment']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for v, res in results["variants"].items():
        xs = [r["source_tokens"] for r in res["per_length"]]
        label = f"attention: {v}" if v != "none" else "attention: none (fixed context)"
        axes[0].plot(xs, [r["bleu"] for r in res["per_length"]], marker="o", label=label)
        axes[1].plot(xs, [r["exact_match"] for r in res["per_length"]], marker="o", label=label)
    train_max = results["settings"]["train_max_source_tokens"]
    for ax, name in zip(axes, ("BLEU", "exact match")):
        ax.axvline(train_max, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("source length (tokens)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(
        f"Score vs source length, synthetic '{results['settings']['task']}' task (dotted: longest training source)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    eval_max = max(args.eval_max_items or args.max_items, 1)
    step = max(1, args.eval_step)
    lengths = list(range(step, eval_max + 1, step))
    per_item = 4 if args.task == "dates" else 1
    results = {
        "settings": {
            **vars(args),
            "train_max_source_tokens": args.max_items * per_item - (per_item > 1),
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_at_start": list(os.getloadavg()),
        },
        "variants": {},
    }
    for attention in [v.strip() for v in args.variants.split(",") if v.strip()]:
        model, info = train(args, attention)
        print(f"[{attention}] trained {info['steps']} steps in {info['train_seconds']} s", file=sys.stderr)
        start = time.time()
        rows = evaluate(args, model, lengths)
        info["eval_seconds"] = round(time.time() - start, 1)
        results["variants"][attention] = {**info, "per_length": rows}
    results["settings"]["load_average_at_end"] = list(os.getloadavg())
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"seq2seq_length_{args.task}"
    table = markdown_table(results)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    stem.with_suffix(".md").write_text(table + "\n")
    plot(results, stem.with_suffix(".png"))
    print(table)
    print(
        json.dumps(
            {v: {k: r[k] for k in ("train_seconds", "steps", "eval_seconds")} for v, r in results["variants"].items()}
        )
    )
    print(f"wrote {stem}.json, {stem}.md and {stem}.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
