"""The repetition block on the built-in scenes: does it keep the repeats the captions need?

Scores a model trained on the built-in dataset (e.g. the quickstart's ``runs/shapes``) on its test
split with no block, and with ``no_repeat_ngram`` n = 2 and 3 either allowing the n-grams the
training captions repeat (what the model does) or blocking every repeat. The scenes' captions
say "a small" twice whenever two objects are small, so a block that forbids every repeat must
make them wrong.

    python benchmarks/repetition_block.py --ckpt_path runs/shapes --json benchmarks/results/repetition_block_shapes.json

The scenes are rebuilt from the data settings the checkpoint recorded.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def evaluate(ckpt_path: str, ngrams: tuple[int, ...] = (2, 3)) -> list[dict]:
    import lightning.pytorch as pl

    from captioning.data.shapes import ShapesDataModule
    from captioning.io.checkpoint_integrity import find_checkpoint
    from captioning.io.model_loading import load_model, read_checkpoint

    ckpt = find_checkpoint(ckpt_path)
    settings = dict(read_checkpoint(ckpt).get("datamodule_hyper_parameters") or {})
    refusal = f"{ckpt}: not trained on the built-in dataset (this benchmark rebuilds its scenes)"
    if not settings or settings.get("_class_path", "captioning.data.shapes.ShapesDataModule") != (
        "captioning.data.shapes.ShapesDataModule"
    ):
        raise SystemExit(refusal)
    settings = {k: v for k, v in settings.items() if not k.startswith("_")}
    settings["num_workers"] = 0
    try:
        dm = ShapesDataModule(**settings)
    except TypeError:
        raise SystemExit(refusal) from None
    dm.setup("fit")
    model = load_model(ckpt)
    model.learn_repeatable_ngrams(dm)
    learnt = model.repeatable.ngrams
    model._learn_missing_repeats = lambda: None  # "every repeat" must stay without them during test
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    rows = []
    for n, block in [(0, "none")] + [(n, b) for n in ngrams for b in ("learnt", "every repeat")]:
        model.hparams.no_repeat_ngram = n
        model.repeatable.ngrams = learnt if block == "learnt" else learnt[:0]
        scores = trainer.test(model, datamodule=dm, verbose=False)[0]
        row = {"no_repeat_ngram": n, "block": block}
        row.update({k.removeprefix("test/"): v for k, v in scores.items() if not k.endswith("_chance")})
        rows.append(row)
        print(
            f"n={n} {block:12s} BLEU-4 {row['bleu4']:.4f} CIDEr-D {row['cider']:.3f} "
            f"localisation {row.get('localisation', float('nan')):.3f}",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt_path", required=True, help="checkpoint or run folder of a model of the built-in dataset")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--machine", default=None, help="the machine, recorded with the figures")
    args = p.parse_args(argv)
    rows = evaluate(args.ckpt_path)
    if args.json:
        machine = args.machine or f"{os.cpu_count()}-core CPU, torch {torch.__version__}"
        figures = {"ckpt": str(args.ckpt_path), "machine": machine, "rows": rows}
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
