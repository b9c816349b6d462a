"""Training throughput of the text seq2seq model next to the PyTorch tutorial's; prints ONE JSON object.

    python benchmarks/text_speed.py                                   # generated corpus, 3 rounds
    python benchmarks/text_speed.py --tsv data/train.tsv --ddp --default_sizes \\
        --out benchmarks/results/text_speed_cpu.json

Systems, measured in the same run on the same pairs and interleaved round by round (a shared
machine's load then weighs on all alike; medians over rounds are reported):

* ``tutorial``: the tutorial's model and plain loop (benchmarks/text_tutorial_model.py: GRU +
  Bahdanau, hidden 128, batch 32, every batch padded to 10 words);
* ``tutorial_2threads_active`` (``--tutorial_active``): the same in a child process with 2
  torch threads and ``OMP_WAIT_POLICY=ACTIVE`` (OpenMP's spinning threads: how a plain script
  shows ~195% CPU on 2 cores, much of it spinning; our CLI sets PASSIVE);
* ``ours_tutorial_sizes``: our model at the tutorial's sizes (embedding = decoder = attention
  = 128, one-layer BiLSTM encoder of 64 per direction, so its states are 128 wide like the
  tutorial's GRU; ``--encoder_dim 128`` for 128 per direction), batch 32, trained by our real
  loop: ``Trainer.fit`` on ``TsvTextDataModule`` (BPE, length-bucketed batches), validation off;
* ``ours_tutorial_sizes_ddp2`` (``--ddp``): the same through ``captioning fit`` with
  ``strategy=ddp, devices=2`` on CPU: two processes of one thread, 16 pairs each per step
  (global batch 32), gradients averaged over gloo: how our training uses both cores;
* ``ours_default_sizes`` (``--default_sizes``): configs/text_tsv.yaml's sizes (256/256/512),
  batch 64.
* ``validation`` (``--validation``): seconds of one validation pass over the validation split
  at the default sizes (teacher-forced loss + decoding + BLEU), greedy (``val_beam_size: 1``,
  text_tsv.yaml's) and beam 4, next to the seconds of one training epoch at the measured
  ``ours_default_sizes`` rate: the share of an epoch that validation takes.

On a GPU (``--device cuda [--precision bf16]``) only our model runs (tutorial and default
sizes), through the same ``Trainer.fit`` as ``captioning fit`` there: padding masked on the
device and every training step one CUDA graph replay (``--no-graphs``: op by op).

Per system: ``pairs_per_s`` (training pairs per wall second over the timed steps, after
``--warmup`` steps), ``tokens_per_s`` (source + target tokens without padding: our subword
tokens, the tutorial's words; each system's own units), ``cpu_percent`` (process CPU time /
wall time over the timed steps, all threads; summed over both processes for DDP: 200% = both
cores busy), and ``step_ms``. Nothing is asserted. Thread settings, OMP policy, the load
average and the CPU are recorded; run it on an idle machine for figures worth comparing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch (as the CLI does)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from machine import cpu_name  # noqa: E402  (benchmarks/machine.py)

TUTORIAL_SIZES = dict(embed_dim=128, decoder_dim=128, attention_dim=128, encoder_layers=1)
DEFAULT_SIZES = dict(embed_dim=256, encoder_dim=256, decoder_dim=512, attention_dim=256, encoder_layers=1)


class StepTimer(pl.Callback):
    """Times training steps ``warmup`` .. end: wall, process CPU, pairs, real tokens.

    With ``out``: writes ``<out>.rank<R>.json`` per process (the DDP measurement)."""

    def __init__(self, warmup: int = 20, out: str | None = None) -> None:
        self.warmup, self.out = warmup, out
        self.pairs = self.tokens = self.steps = 0
        self.t0 = self.cpu0 = None
        self.wall = self.cpu = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.t0 is None:
            self.t0, self.cpu0 = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.t0 is None:
            return
        self.steps += 1
        self.pairs += int(batch["source"].shape[0])
        self.tokens += int(batch["source_lengths"].sum() + batch["target_lengths"].sum())
        self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.cpu0

    def on_train_end(self, trainer, pl_module) -> None:
        if self.out:
            Path(f"{self.out}.rank{trainer.global_rank}.json").write_text(json.dumps(self.result()))

    def result(self) -> dict:
        return {"steps": self.steps, "pairs": self.pairs, "tokens": self.tokens, "wall_s": self.wall, "cpu_s": self.cpu}


def figures(m: dict) -> dict:
    return {
        "pairs_per_s": m["pairs"] / m["wall_s"],
        "tokens_per_s": m["tokens"] / m["wall_s"],
        "cpu_percent": 100 * m["cpu_s"] / m["wall_s"],
        "step_ms": 1000 * m["wall_s"] / max(1, m["steps"]),
    }


def run_ours(dm, sizes: dict, args: argparse.Namespace) -> dict:
    from captioning.models.seq2seq import Seq2SeqModel

    model = Seq2SeqModel(vocab=dm.vocab_data, dropout=0.1, lr=1e-3, cuda_graphs=args.graphs, **sizes)
    timer = StepTimer(args.warmup)
    gpu = args.device == "cuda"
    trainer = pl.Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        gradient_clip_val=1.0,
        precision="bf16-mixed" if args.precision == "bf16" else "32-true",
    )
    trainer.fit(model, datamodule=dm)
    return dict(figures(timer.result()), params=sum(p.numel() for p in model.parameters()))


def run_tutorial(pairs: list[tuple[str, str]], args: argparse.Namespace) -> dict:
    from text_tutorial_model import EOS, Lang, TutorialModel, normalize, to_array

    src, tgt = [normalize(s) for s, _ in pairs], [normalize(t) for _, t in pairs]
    model = TutorialModel(Lang(src), Lang(tgt))
    x, y = to_array(model.input_lang, src), to_array(model.output_lang, tgt)
    real = lambda a: int(((a != 0) | (a == EOS)).sum())  # noqa: E731 - words + EOS, not the zero padding
    order = torch.randperm(len(x)).split(32)
    m = {"steps": 0, "pairs": 0, "tokens": 0}
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            t0, c0 = time.perf_counter(), time.process_time()
        idx = order[step % len(order)]
        model.train_step(x[idx], y[idx])
        if step >= args.warmup:
            m["steps"] += 1
            m["pairs"] += len(idx)
            m["tokens"] += real(x[idx]) + real(y[idx])
    m.update(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0)
    return dict(figures(m), params=model.parameters())


def run_ddp(tsv: dict, args: argparse.Namespace, workdir: Path, round_no: int) -> dict:
    """``captioning fit`` with two CPU processes (one thread each); CPU summed over both."""
    out = workdir / f"ddp{round_no}"
    callbacks = json.dumps(
        [{"class_path": "text_speed.StepTimer", "init_args": {"warmup": args.warmup, "out": str(out)}}]
    )
    cmd = [
        sys.executable,
        "-m",
        "captioning",
        "fit",
        "--config",
        str(ROOT / "configs" / "text_tsv.yaml"),
        "--data.init_args.train_path",
        tsv["train"],
        "--data.init_args.val_path",
        tsv["val"],
        "--data.init_args.batch_size",
        "16",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.max_steps",
        str(args.warmup + args.steps),
        "--trainer.limit_val_batches",
        "0",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.logger",
        "false",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.callbacks",
        callbacks,
        "--test_after_fit",
        "false",
        "--model.init_args.dropout",
        "0.1",
        "--model.init_args.lr",
        "0.001",
        "--model.init_args.scheduler",
        "none",
        "--model.init_args.label_smoothing",
        "0.0",
        *[a for k, v in TUTORIAL_SIZES.items() for a in (f"--model.init_args.{k}", str(v))],
        "--model.init_args.encoder_dim",
        str(args.encoder_dim),
    ]
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'benchmarks'}", WANDB_MODE="disabled"
    )
    proc = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"DDP run failed:\n{proc.stderr[-3000:]}")
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]
    m = {
        "steps": ranks[0]["steps"],
        "pairs": sum(r["pairs"] for r in ranks),
        "tokens": sum(r["tokens"] for r in ranks),
        "wall_s": max(r["wall_s"] for r in ranks),
        "cpu_s": sum(r["cpu_s"] for r in ranks),
    }
    return figures(m)


def run_validation(dm, beam: int) -> float:
    """Seconds of ``trainer.validate`` over the validation split (untrained weights: every
    sentence decodes to its length cap, the slowest case)."""
    from captioning.models.seq2seq import Seq2SeqModel

    model = Seq2SeqModel(vocab=dm.vocab_data, beam_size=beam, length_penalty=0.6, **DEFAULT_SIZES)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    t0 = time.perf_counter()
    trainer.validate(model, datamodule=dm, verbose=False)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tsv", help="training pairs (source<TAB>target); default: the generated stand-in corpus")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=150, help="timed training steps per system and round")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the in-process systems")
    p.add_argument("--encoder_dim", type=int, default=64, help="our BiLSTM size per direction at tutorial sizes")
    p.add_argument("--ddp", action="store_true", help="also ours with strategy=ddp on 2 CPU processes")
    p.add_argument("--default_sizes", action="store_true", help="also ours at configs/text_tsv.yaml's sizes")
    p.add_argument("--validation", action="store_true", help="also time a validation pass (greedy / beam 4)")
    p.add_argument(
        "--tutorial_active",
        action="store_true",
        help="also the tutorial with 2 threads and OMP_WAIT_POLICY=ACTIVE (child process)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: our model only, on one GPU")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: bf16-mixed (GPU)")
    p.add_argument("--no-graphs", dest="graphs", action="store_false", help="GPU: no CUDA graphs")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--_tutorial_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._tutorial_child:  # child of --tutorial_active: one tutorial run, JSON on stdout
        lines = Path(args._tutorial_child).read_text(encoding="utf-8").splitlines()
        print(json.dumps(run_tutorial([tuple(line.split("\t")[:2]) for line in lines], args)))
        return
    from text_corpus import prepare, synthetic_fra

    from captioning.data.text import TsvTextDataModule

    workdir = Path(tempfile.mkdtemp(prefix="text_speed_"))
    if args.tsv:
        tsv = {"train": args.tsv, "val": args.tsv}
    else:
        prepare(synthetic_fra(), workdir, 500, 1000, 0)
        tsv = {"train": str(workdir / "train.tsv"), "val": str(workdir / "val.tsv")}
    pairs = [tuple(line.split("\t")[:2]) for line in Path(tsv["train"]).read_text(encoding="utf-8").splitlines()]
    dm_small = TsvTextDataModule(tsv["train"], val_path=tsv["val"], tokenizer="bpe", batch_size=32)
    dm_small.setup("fit")
    dm_default = TsvTextDataModule(tsv["train"], val_path=tsv["val"], tokenizer="bpe", batch_size=64)
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {}
    small = dict(TUTORIAL_SIZES, encoder_dim=args.encoder_dim)
    gpu = args.device == "cuda"
    for r in range(args.rounds):  # interleaved: every system once per round
        if gpu:  # our model only, both sizes
            runs.setdefault("ours_tutorial_sizes_gpu", []).append(
                run_ours(dm_small, dict(TUTORIAL_SIZES, encoder_dim=args.encoder_dim), args)
            )
            runs.setdefault("ours_default_sizes_gpu", []).append(run_ours(dm_default, DEFAULT_SIZES, args))
            continue
        runs.setdefault("tutorial", []).append(run_tutorial(pairs, args))
        if args.tutorial_active:
            env = dict(os.environ, OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="2")
            cmd = [
                sys.executable,
                __file__,
                "--_tutorial_child",
                tsv["train"],
                "--threads",
                "2",
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
            ]
            child = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            runs.setdefault("tutorial_2threads_active", []).append(json.loads(child.stdout.splitlines()[-1]))
        runs.setdefault("ours_tutorial_sizes", []).append(run_ours(dm_small, small, args))
        if args.ddp:
            runs.setdefault("ours_tutorial_sizes_ddp2", []).append(run_ddp(tsv, args, workdir, r))
        if args.default_sizes:
            runs.setdefault("ours_default_sizes", []).append(run_ours(dm_default, DEFAULT_SIZES, args))
        if args.validation:
            runs.setdefault("validation", []).append({f"beam{k}_s": run_validation(dm_default, k) for k in (1, 4)})
    result = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu": cpu_name(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if gpu else "cpu",
            "precision": args.precision,
            "cuda_graphs": args.graphs if gpu else None,
            "torch_threads": args.threads,
            "torch_interop_threads": torch.get_num_interop_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "load_avg_1min_before": round(load_before, 2),
            "load_avg_1min_after": round(os.getloadavg()[0], 2),
        },
        "corpus": args.tsv or "generated stand-in (benchmarks/text_corpus.py --synthetic), train split",
        "train_pairs": len(pairs),
        "subword_vocab": {"source": len(dm_small.text_vocab.source), "target": len(dm_small.text_vocab.target)},
        "rounds": args.rounds,
        "timed_steps": args.steps,
        "warmup_steps": args.warmup,
        "ours_tutorial_sizes_config": small,
        "default_sizes_config": DEFAULT_SIZES,
        "systems": {
            name: {key: round(statistics.median(x[key] for x in rs), 1) for key in rs[0]}
            | ({"per_round_pairs_per_s": [round(x["pairs_per_s"], 1) for x in rs]} if "pairs_per_s" in rs[0] else {})
            for name, rs in runs.items()
        },
    }
    if args.validation and args.default_sizes:
        rate = result["systems"]["ours_default_sizes"]["pairs_per_s"]
        result["validation_vs_epoch"] = {
            "val_pairs": len(dm_default.dataset("val")),
            "train_epoch_s_at_default_sizes": round(len(pairs) / rate, 1),
            **{
                k: round(v / (len(pairs) / rate + v), 3)
                for k, v in (
                    ("greedy_share_of_epoch", result["systems"]["validation"]["beam1_s"]),
                    ("beam4_share_of_epoch", result["systems"]["validation"]["beam4_s"]),
                )
            },
        }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
