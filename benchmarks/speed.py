"""Speed of the captioner at the standard Show-Attend-Tell workload; prints ONE JSON object.

    python benchmarks/speed.py                       # CPU, all cores, fp32
    python benchmarks/speed.py --threads 2 --out benchmarks/results/speed_cpu_2t.json
    python benchmarks/speed.py --device cuda --precision bf16 --channels-last

Workload (the sizes of the best-known public implementation): batch 32, a 14x14 grid of
2048-channel features, attention/embedding/decoder width 512, vocabulary 10,000, 21 decode
steps, Adam, doubly stochastic regularisation (alpha_c = 1), dropout 0.5.

Figures (each with the device and thread count it was measured on):
* ``gemm_gflops``: a 2048^3 fp32 matmul in the same run: the ceiling to compare against.
* ``train_step_ms``: forward + loss + backward + optimiser step from features (median).
* ``train_step_gflop``: matmul FLOPs of one step, counted by torch.utils.flop_counter
  (forward and backward, as executed) next to an analytic count from the matmul shapes;
  ``achieved_gflops`` = counted FLOPs / median step time.
* ``beam_captions_per_s`` (beam 3) and ``greedy_captions_per_s``: 64 images at once,
  untrained weights, so every hypothesis runs the full ``--max-length`` steps.
* ``e2e_images_per_s_frozen`` / ``_finetune``: encoder (ResNet-101, random weights, 256 px)
  + decoder training step, frozen backbone or fine-tuning layer2-4 as the reference does.
* ``peak_memory_<phase>``: CPU: peak resident memory of the process during the phase (sampled
  every 2 ms) and how much of it the phase added; CUDA: peak allocated memory in the phase.
* ``step_profile``: where a training step's time goes. CUDA: kernels executed per step, host
  launches per step (kernel launches + graph launches), GPU-busy time per step (sum of kernel
  times, torch.profiler) and its share of the step's wall time. CPU: operators dispatched per
  step (each would be at least one kernel launch on a GPU).

On CUDA the training step is what ``captioning fit`` runs there: padding masked on the device,
and the whole step (forward, loss, backward, Adam) replayed as one CUDA graph
(``--no-graphs``: launched op by op); ``--padding`` picks how padding is skipped
(auto: shrink on CPUs, mask on GPUs).
Timings are medians; nothing is asserted. Run it on an idle machine: ``load_avg`` records
the 1-minute load average before and after, since a shared machine skews every figure.

Attention variants (the decoder is the same otherwise):

    python benchmarks/speed.py --attention general --heads 8      # one score / head count
    python benchmarks/speed.py --attention all --skip greedy,e2e  # every score, 1 and --multi-heads heads
    python benchmarks/speed.py --query current --sentinel         # Luong query, visual sentinel

``--attention all`` reports ``per_attention``: for every score x {1, --multi-heads} heads, the
training step (ms, fused recurrence unless --plain) and beam captions/s, plus a text table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from machine import cpu_name  # noqa: E402  (benchmarks/machine.py)

from captioning.data.vocab import Vocabulary  # noqa: E402
from captioning.models.image_captioner import ImageCaptioner  # noqa: E402
from captioning.nn.attention import SCORERS  # noqa: E402
from captioning.nn.encoders import SmallCNN  # noqa: E402
from captioning.nn.image_decoder import ShowAttendTellDecoder  # noqa: E402
from captioning.nn.torchvision_encoder import ImageEncoder  # noqa: E402

REFERENCE = {
    "train_step_ms": 4500.0,
    "beam_seconds_per_caption": 1.1,
    "beam_captions_per_s": 0.9,
    "note": (
        "the best-known public Show-Attend-Tell implementation (fp32, its own training script) "
        "on a 2-core AMD EPYC CPU: docs/performance.md"
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast bfloat16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--grid", type=int, default=14, help="feature grid side (S = grid^2)")
    p.add_argument("--channels", type=int, default=2048, help="feature channels C")
    p.add_argument("--dim", type=int, default=512, help="attention = embedding = decoder width")
    p.add_argument("--vocab", type=int, default=10000)
    p.add_argument("--steps", type=int, default=21, help="decode steps of a training caption")
    p.add_argument(
        "--min-steps",
        type=int,
        default=None,
        help="captions of random lengths in [min-steps, steps], padded (default: all --steps long)",
    )
    p.add_argument("--repeats", type=int, default=7, help="timed training steps (median reported)")
    p.add_argument("--plain", action="store_true", help="use the plain autograd decoder loop (fused=False)")
    p.add_argument(
        "--padding",
        choices=["auto", "shrink", "mask"],
        default="auto",
        help="how teacher forcing skips padding (auto: shrink on CPUs, mask on GPUs)",
    )
    p.add_argument(
        "--no-graphs",
        dest="graphs",
        action="store_false",
        help="CUDA: launch the training step op by op instead of replaying it as a CUDA graph",
    )
    p.add_argument(
        "--attention",
        default="additive",
        help=f"score function ({', '.join(sorted(SCORERS))}) or 'all' (each, single- and multi-head)",
    )
    p.add_argument("--heads", type=int, default=1, help="attention heads (1 = single-head)")
    p.add_argument("--multi-heads", type=int, default=8, help="head count of the multi-head runs of --attention all")
    p.add_argument("--query", choices=["previous", "current"], default="previous", help="decoder query style")
    p.add_argument("--sentinel", action="store_true", help="adaptive attention with a visual sentinel")
    p.add_argument("--beam-images", type=int, default=64)
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--max-length", type=int, default=50)
    p.add_argument(
        "--no-repeat-ngram", type=int, default=0, help="repetition block of beam/greedy search (photo configs: 3)"
    )
    p.add_argument("--e2e-batch", type=int, default=8, help="images per end-to-end step (0 skips e2e)")
    p.add_argument("--e2e-repeats", type=int, default=3)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--backbone", default="resnet101")
    p.add_argument("--channels-last", action="store_true", help="encoder in channels_last (GPU)")
    p.add_argument("--skip", default="", help="comma list of phases to skip: train,beam,greedy,e2e")
    p.add_argument("--out", default=None, help="also write the JSON here")
    return p.parse_args(argv)


class Runner:
    """Device/precision helpers: synchronised timing, autocast, peak memory."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.device = args, torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.on = (
            f"{self.device.type}:{torch.cuda.get_device_name(self.device) if self.cuda else cpu_name()}"
            f", {torch.get_num_threads()} threads, {args.precision}"
        )

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.precision == "bf16")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn, repeats: int, warmup: int = 1) -> list[float]:
        """Seconds per call of fn, after warmup calls."""
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(repeats):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            out.append(time.perf_counter() - t)
        return out

    def reset_peak(self) -> None:
        """Start a phase: CUDA peak stats reset; on CPU a thread samples resident memory."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self._base, self._peak, self._stop = _rss_mb(), 0.0, threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self._peak = max(self._peak, _rss_mb())
                self._stop.wait(0.002)

        self._sampler = threading.Thread(target=sample, daemon=True)
        self._sampler.start()

    def peak_mb(self) -> dict:
        """Peak memory of the phase: CUDA allocated; CPU resident, also above the phase start."""
        if self.cuda:
            return {"peak_allocated_mb": round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)}
        self._stop.set()
        self._sampler.join()
        return {"peak_rss_mb": round(self._peak, 1), "phase_extra_mb": round(self._peak - self._base, 1)}


def _rss_mb() -> float:
    """Resident memory of this process (Linux /proc; falls back to the lifetime peak)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def figure(value: float, run: Runner, **extra) -> dict:
    return {"value": round(value, 3), "on": run.on, **extra}


def gemm_gflops(run: Runner, n: int = 2048, dtype: torch.dtype = torch.float32) -> dict:
    a = torch.randn(n, n, device=run.device, dtype=dtype)
    b = torch.randn(n, n, device=run.device, dtype=dtype)
    times = run.time(lambda: a @ b, repeats=10, warmup=3)
    return figure(
        2 * n**3 / statistics.median(times) / 1e9,
        run,
        shape=f"{n}x{n}x{n} {str(dtype)[6:]}",
        best=round(2 * n**3 / min(times) / 1e9, 1),
    )


def analytic_step_gflop(a: argparse.Namespace) -> float:
    """Matmul FLOPs of one training step (forward + backward), from the shapes.

    Forward per token (B*T of them): embedding part of the LSTM input (E x 4D), context part
    (C x 4D), recurrent (D x 4D), gate f_beta (D x C), query (D x A), output (D x V), and the
    context sum over S cells (S x C); per image: key projection (S x C x A). Backward costs
    twice the forward (input and weight gradients), except where no input gradient is
    needed: the features (key projection, context sum over the values) and the embedding
    lookup input.
    """
    b, t, s, c, d, v = a.batch, a.steps, a.grid**2, a.channels, a.dim, a.vocab
    e = att = d
    tokens = b * t
    per_token = e * 4 * d + c * 4 * d + d * 4 * d + d * c + d * att + d * v
    fwd = 2 * (tokens * per_token + tokens * s * c + b * s * c * att)
    bwd = 2 * 2 * tokens * per_token + 2 * tokens * s * c + 2 * b * s * c * att
    return (fwd + bwd) / 1e9


def build_model(a: argparse.Namespace, encoder: torch.nn.Module | None = None) -> ImageCaptioner:
    if encoder is None:  # decoder-only workload: the encoder is never called (features are given)
        encoder = SmallCNN(channels=a.channels, grid_size=a.grid, width=4)
    vocab = Vocabulary([f"w{i}" for i in range(a.vocab - 4)]).to_dict()
    model = ImageCaptioner(
        encoder,
        vocab,
        embed_dim=a.dim,
        decoder_dim=a.dim,
        attention_dim=a.dim,
        dropout=0.5,
        alpha_c=1.0,
        attention=a.attention,
        num_heads=a.heads,
        no_repeat_ngram=a.no_repeat_ngram,
    )
    if a.query != "previous" or a.sentinel:  # decoder options the captioner does not take (yet)
        model.decoder = ShowAttendTellDecoder(
            a.vocab,
            a.channels,
            a.dim,
            a.dim,
            a.dim,
            attention=a.attention,
            num_heads=a.heads,
            dropout=0.5,
            max_positions=a.grid**2,
            query=a.query,
            sentinel=a.sentinel,
        )
    model.decoder.fused = not a.plain
    model.decoder.padding = a.padding
    return model


def train_phase(a: argparse.Namespace, run: Runner, light: bool = False) -> dict:
    """Training-step figures; ``light``: the step time only (no FLOP count, forward time, bf16 check)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build_model(a).to(run.device).train()
    params = [p for p in model.decoder.parameters() if p.requires_grad]
    # fused Adam: one pass over each parameter instead of ~10 elementwise kernels per tensor.
    opt = torch.optim.Adam(params, lr=4e-4, fused=True)
    feats = torch.randn(a.batch, a.grid**2, a.channels, device=run.device)
    caps = torch.randint(4, a.vocab, (a.batch, a.steps + 1), device=run.device)
    caps[:, 0], caps[:, -1] = 1, 2  # BOS ... EOS: 21 decode steps, no padding
    if a.min_steps is not None:  # BOS w.. EOS PAD..: a row of n decode steps ends at position n
        gen = torch.Generator().manual_seed(0)
        ends = torch.randint(a.min_steps, a.steps + 1, (a.batch,), generator=gen).to(run.device)
        pos = torch.arange(a.steps + 1, device=run.device)
        caps = torch.where(pos[None] < ends[:, None], caps, torch.where(pos[None] == ends[:, None], 2, 0))

    def eager_step() -> None:
        with run.autocast():
            total, _, _ = model.loss(feats, caps)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    graphed = run.cuda and a.graphs
    step = eager_step
    if graphed:  # what `captioning fit` runs on a GPU: the whole step replayed as a CUDA graph
        from captioning.models.step_graphs import StepGraphs

        def losses(inputs: dict) -> dict:
            total, _, _ = model.loss(inputs["features"], inputs["captions"])
            total.backward()
            return {"loss": total}

        graphs = StepGraphs(losses, opt, params, warmup=2)

        def step() -> None:
            with run.autocast():
                graphs({"features": feats, "captions": caps})

    run.reset_peak()
    times = run.time(step, a.repeats, warmup=4 if graphed else 2)
    peak = run.peak_mb()
    profile = step_profile(step, run)
    if light:
        return {
            "train_step_ms": figure(statistics.median(times) * 1e3, run, samples_ms=[round(x * 1e3, 1) for x in times]),
            "step_profile": profile,
        }
    with torch.no_grad(), run.autocast():
        fwd = run.time(lambda: model.loss(feats, caps), 3, warmup=0)
    with FlopCounterMode(display=False) as counter:
        eager_step()
    agreement = bf16_agreement(model, feats, caps, run) if a.precision == "bf16" else None
    counted = counter.get_total_flops() / 1e9
    ms = statistics.median(times) * 1e3
    out = {
        "train_step_ms": figure(
            ms,
            run,
            samples_ms=[round(x * 1e3, 1) for x in times],
            median_of=len(times),
            optimizer="Adam(fused=True)",
            path="plain autograd loop" if a.plain else "fused recurrence",
            padding=model.decoder.padding_mode(run.device),
            cuda_graph=graphed,
        ),
        "step_profile": profile,
        "train_step_gflop": {
            "value": round(counted, 2),
            "counted_with": "torch.utils.flop_counter.FlopCounterMode",
            "analytic": round(analytic_step_gflop(a), 2),
        },
        "achieved_gflops": figure(counted / (ms / 1e3), run),
        "peak_memory_train": peak,
    }
    out["train_forward_ms"] = figure(statistics.median(fwd) * 1e3, run, note="forward + loss only, no_grad")
    if agreement:
        out["bf16_vs_fp32"] = agreement
    return out


def step_profile(step, run: Runner, steps: int = 3) -> dict:
    """Where a step's time goes: CUDA kernels and host launches per step, GPU-busy time and its
    share of the wall time (torch.profiler); CPU: operators dispatched per step."""
    if not run.cuda:
        from torch.utils._python_dispatch import TorchDispatchMode

        class Count(TorchDispatchMode):
            ops = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                Count.ops += 1
                return func(*args, **(kwargs or {}))

        with Count():
            step()
        return {"ops_per_step": Count.ops, "note": "aten operators dispatched (each >= 1 kernel launch on a GPU)"}
    from torch.profiler import ProfilerActivity, profile

    step()
    run.sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        run.sync()
        wall = (time.perf_counter() - t0) / steps
    kernels = busy = launches = 0
    for e in prof.events():
        if e.device_type.name == "CUDA":
            kernels += 1
            busy += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        elif e.name in (
            "cudaLaunchKernel",
            "cuLaunchKernel",
            "cudaLaunchKernelExC",
            "cudaGraphLaunch",
            "cuLaunchKernelEx",
        ):
            launches += 1
    busy_ms = busy / 1e3 / steps
    return {
        "kernels_per_step": round(kernels / steps),
        "launches_per_step": round(launches / steps),
        "gpu_busy_ms_per_step": round(busy_ms, 3),
        "wall_ms_per_step": round(wall * 1e3, 3),
        "gpu_busy_share": round(busy_ms / (wall * 1e3), 3),
        "measured_with": "torch.profiler, 3 steps",
    }


def bf16_agreement(model: ImageCaptioner, feats: torch.Tensor, caps: torch.Tensor, run: Runner) -> dict:
    """Same batch, same weights, dropout off: loss and gradients with bf16 autocast vs fp32."""
    model.eval()  # no dropout, so both passes compute the same function
    grads, losses = [], []
    for enabled in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=enabled):
            total, _, _ = model.loss(feats, caps)
        total.backward()
        losses.append(float(total))
        grads.append(torch.cat([p.grad.flatten().double() for p in model.decoder.parameters() if p.grad is not None]))
    model.train()
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    return {
        "loss_fp32": round(losses[0], 5),
        "loss_bf16": round(losses[1], 5),
        "gradient_cosine": round(float(cos), 5),
        "gradient_rel_error": round(float((grads[1] - grads[0]).norm() / grads[0].norm()), 5),
    }


def decode_phase(a: argparse.Namespace, run: Runner, beam: int) -> dict:
    torch.manual_seed(0)
    model = build_model(a).to(run.device).eval()
    feats = torch.randn(a.beam_images, a.grid**2, a.channels, device=run.device)
    results = []

    def decode() -> None:
        with torch.no_grad(), run.autocast():
            results.append(model.generate(feats, beam_size=beam, max_length=a.max_length))

    run.reset_peak()
    times = run.time(decode, repeats=2 if beam > 1 else 3, warmup=1)
    steps = int(results[-1].tokens.shape[1])
    name = "beam" if beam > 1 else "greedy"
    return {
        f"{name}_captions_per_s": figure(
            a.beam_images / statistics.median(times),
            run,
            images=a.beam_images,
            beam_size=beam,
            steps_run=steps,
            max_length=a.max_length,
            no_repeat_ngram=a.no_repeat_ngram,
            seconds=[round(x, 2) for x in times],
        ),
        f"peak_memory_{name}": run.peak_mb(),
    }


def e2e_phase(a: argparse.Namespace, run: Runner, trainable_from: str | None) -> dict:
    torch.manual_seed(0)
    encoder = ImageEncoder(
        a.backbone, weights=None, grid_size=a.grid, trainable_from=trainable_from, channels_last=a.channels_last
    )
    model = build_model(a, encoder).to(run.device).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    images = torch.randn(a.e2e_batch, 3, a.image_size, a.image_size, device=run.device)
    caps = torch.randint(4, a.vocab, (a.e2e_batch, a.steps + 1), device=run.device)
    caps[:, 0], caps[:, -1] = 1, 2

    def step() -> None:
        with run.autocast():
            total, _, _ = model.loss(model.encode({"images": images}), caps)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    run.reset_peak()
    times = run.time(step, a.e2e_repeats, warmup=1)
    key = "frozen" if trainable_from is None else "finetune"
    return {
        f"e2e_images_per_s_{key}": figure(
            a.e2e_batch / statistics.median(times),
            run,
            batch=a.e2e_batch,
            backbone=a.backbone,
            image_size=a.image_size,
            trainable_from=trainable_from,
            seconds_per_step=[round(x, 2) for x in times],
        ),
        f"peak_memory_e2e_{key}": run.peak_mb(),
    }


def attention_table(a: argparse.Namespace, run: Runner, skip: set[str]) -> dict:
    """Training step and beam search for every score x {1, multi} heads (``--attention all``)."""
    table = {}
    for score in sorted(SCORERS):
        for heads in (1, a.multi_heads):
            cfg = argparse.Namespace(**{**vars(a), "attention": score, "heads": heads})
            row = {}
            if "train" not in skip:
                row["train_step_ms"] = round(train_phase(cfg, run, light=True)["train_step_ms"]["value"], 1)
            if "beam" not in skip:
                beam = decode_phase(cfg, run, a.beam_size)["beam_captions_per_s"]
                row["beam_captions_per_s"] = round(beam["value"], 2)
            table[f"{score}/h{heads}"] = row
            print(f"{score:>10} heads {heads}: " + ", ".join(f"{k} {v}" for k, v in row.items()), file=sys.stderr)
    return table


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    run = Runner(a)
    report = {
        "device": run.on,
        "threads": torch.get_num_threads(),
        "precision": a.precision,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (library default)"),
        "load_avg_1min_before": round(os.getloadavg()[0], 2),
        "workload": {
            "batch": a.batch,
            "grid": f"{a.grid}x{a.grid}",
            "channels": a.channels,
            "attention_embed_decoder_dim": a.dim,
            "vocab": a.vocab,
            "decode_steps": a.steps,
            "min_decode_steps": a.min_steps,
            "optimizer": "Adam",
            "alpha_c": 1.0,
            "dropout": 0.5,
        },
        "gemm_gflops": gemm_gflops(run),
    }
    if a.precision == "bf16":
        report["gemm_gflops_bf16"] = gemm_gflops(run, dtype=torch.bfloat16)
    report["decoder"] = {
        "attention": a.attention,
        "heads": a.heads,
        "query": a.query,
        "sentinel": a.sentinel,
        "path": "plain autograd loop" if a.plain else "fused recurrence",
    }
    if a.attention == "all":
        report["decoder"]["heads"] = [1, a.multi_heads]
        report["per_attention"] = attention_table(a, run, skip)
        skip = skip | {"train", "beam", "greedy", "e2e"}  # the table has the attention figures
    if "train" not in skip:
        report.update(train_phase(a, run))
        achieved = report["achieved_gflops"]["value"]
        report["achieved_fraction_of_gemm"] = round(achieved / report["gemm_gflops"]["value"], 3)
        if a.precision == "bf16":  # the bf16 step against the bf16 ceiling too
            report["achieved_fraction_of_gemm_bf16"] = round(achieved / report["gemm_gflops_bf16"]["value"], 3)
    if "beam" not in skip:
        report.update(decode_phase(a, run, a.beam_size))
    if "greedy" not in skip:
        report.update(decode_phase(a, run, 1))
    if "e2e" not in skip and a.e2e_batch > 0:
        report.update(e2e_phase(a, run, None))
        report.update(e2e_phase(a, run, "layer2"))
    report["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
    report["reference"] = REFERENCE
    if "train_step_ms" in report:
        report["train_speedup_vs_reference"] = round(REFERENCE["train_step_ms"] / report["train_step_ms"]["value"], 2)
    if "beam_captions_per_s" in report:
        report["beam_speedup_vs_reference"] = round(
            report["beam_captions_per_s"]["value"] / REFERENCE["beam_captions_per_s"], 1
        )
    text = json.dumps(report, indent=1)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
