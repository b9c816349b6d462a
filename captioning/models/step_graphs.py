"""The whole training step as one CUDA graph: zero the gradients, forward, loss, backward, clip,
optimiser step, captured once per input shape and replayed for every batch of that shape.

A training step of the attention LSTM is a few thousand small kernels; launched one by one, the
host cannot keep the GPU busy. Replaying a captured graph launches them all at once. What
capture needs, and what this module provides:

* static shapes: one graph per input-shape key (the models pad caption lengths to a bucket, so
  a handful of graphs serve a whole run); at most ``max_graphs``, later shapes run eagerly;
* no host synchronisation inside the step: the decoders mask padding on the device
  (:class:`captioning.nn.recurrence.Schedule`) and the losses never index by data;
* static memory: inputs are copied into buffers the graph reads; gradients live at fixed
  addresses (zeroed in place, never set to None) and the optimiser is made capturable, with its
  learning rate a device tensor that schedulers update in place (``fill_``);
* warm-up: the first ``warmup`` batches of a shape run eagerly on a side stream (real training
  steps: nothing is thrown away), as CUDA graph capture requires;
* autocast without its weight cache inside the graph (a cached cast would go stale).

Graphs of one runner share a memory pool: replays never overlap and every temporary is written
before it is read within a replay; gradients, optimiser state and inputs live outside the pool.

The same runner drives a CPU "backend" for tests (``backend="eager"``): capture records the step
and replay calls it on the static inputs, so everything but the CUDA graph itself is exercised
without a GPU.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

Inputs = dict[str, Tensor]
StepFn = Callable[[Inputs], dict[str, Tensor]]


@dataclass
class _Entry:
    """One input-shape key: its warm-up count, and once captured the graph, its static inputs and outputs."""

    warm: int = 0
    replay: Callable[[], Any] | None = None  # the captured step (a CUDA graph's replay)
    graph: Any = None  # the CUDA graph itself (kept alive)
    inputs: Inputs = field(default_factory=dict)
    outputs: dict[str, Tensor] = field(default_factory=dict)


def prepare_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Make an optimiser safe to capture: ``capturable`` groups, the learning rate a 0-dim tensor
    on the parameters' device (schedulers then ``fill_`` it, so a replay reads the current
    value), step counters on the device. Idempotent; keeps the optimiser's state."""
    for group in optimizer.param_groups:
        params = list(group["params"])
        if not params:
            continue
        device = params[0].device
        group["capturable"] = True
        lr = group["lr"]
        if not isinstance(lr, Tensor) or lr.device != device:
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
        for p in params:
            state = optimizer.state.get(p)
            if state and isinstance(state.get("step"), Tensor) and state["step"].device != p.device:
                state["step"] = state["step"].to(p.device, torch.float32)


def portable_optimizer_state(state: dict) -> dict:
    """An optimiser state dict as a checkpoint should hold it: learning rates as numbers and
    ``capturable`` off, so it resumes on any device with or without graphs (a graphed run makes
    it capturable again)."""
    for group in state.get("param_groups", []):
        if isinstance(group.get("lr"), Tensor):
            group["lr"] = float(group["lr"])
        if group.get("capturable"):
            group["capturable"] = False
    return state


class StepGraphs:
    """Runs a training step, captured as a CUDA graph per input-shape key (module docstring).

    Args:
        step: inputs -> losses; computes the forward pass and calls ``backward`` on ``"loss"``.
        optimizer: the torch optimiser it steps (made capturable on first use).
        params: every parameter the optimiser updates.
        clip: (value, "norm" | "value") gradient clipping inside the step, or None.
        warmup: eager steps per key before capture (at least 1).
        max_graphs: keys captured at most; later keys run eagerly.
        backend: "cuda" (real graphs) or "eager" (tests: capture records, replay calls).
    """

    def __init__(
        self,
        step: StepFn,
        optimizer: torch.optim.Optimizer,
        params: list[Tensor],
        clip: tuple[float, str] | None = None,
        warmup: int = 2,
        max_graphs: int = 16,
        backend: str = "cuda",
    ) -> None:
        if backend not in ("cuda", "eager"):
            raise ValueError(f"backend must be 'cuda' or 'eager', got {backend!r}")
        self.step, self.optimizer, self.params = step, optimizer, params
        self.clip, self.warmup, self.max_graphs, self.backend = clip, max(1, warmup), max_graphs, backend
        self.entries: dict[tuple, _Entry] = {}
        self.trained: list[Tensor] | None = None  # parameters that get a gradient (known after one step)
        self.grads: list[Tensor] = []  # their gradient buffers
        self.captures = self.eager_steps = self.replays = 0
        self._pool = torch.cuda.graph_pool_handle() if backend == "cuda" else None
        self._side = torch.cuda.Stream() if backend == "cuda" else None
        prepare_capturable(optimizer)

    @staticmethod
    def key(inputs: Inputs) -> tuple:
        return tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in sorted(inputs.items()))

    def __call__(self, inputs: Inputs) -> dict[str, Tensor]:
        """One training step on ``inputs``; returns the step's outputs (detached copies)."""
        key = self.key(inputs)
        entry = self.entries.get(key)
        if entry is None:
            if len(self.entries) >= self.max_graphs:
                return self._eager(inputs)
            entry = self.entries[key] = _Entry()
        if entry.replay is None:
            if entry.warm < self.warmup or self.trained is None:
                entry.warm += 1
                return self._eager(inputs)
            self._capture(entry, inputs)
        for name, t in inputs.items():
            entry.inputs[name].copy_(t, non_blocking=True)
        self._replay(entry)
        self.replays += 1
        return {k: v.detach().clone() for k, v in entry.outputs.items()}

    # ------------------------------------------------------------------ the step itself
    def _full_step(self, inputs: Inputs) -> dict[str, Tensor]:
        """Zero the gradients in place, forward + backward, clip, optimiser step."""
        if self.trained is None:  # the very first step: which parameters get a gradient at all
            for p in self.params:
                p.grad = None
            out = self.step(inputs)
            self.trained = [p for p in self.params if p.grad is not None]  # their buffers stay fixed from now on
            self.grads = [p.grad for p in self.trained if p.grad is not None]
        else:
            for grad in self.grads:
                grad.zero_()
            out = self.step(inputs)
        if self.clip is not None:
            value, algorithm = self.clip
            if algorithm == "value":
                torch.nn.utils.clip_grad_value_(self.trained, value)
            else:
                torch.nn.utils.clip_grad_norm_(self.trained, value, foreach=True)
        with warnings.catch_warnings():  # "capturable=True but step() runs without capture": the warm-up
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            self.optimizer.step()
        return {k: v.detach() for k, v in out.items()}

    def _eager(self, inputs: Inputs) -> dict[str, Tensor]:
        self.eager_steps += 1
        with self._side_stream(), _uncached_autocast():
            out = self._full_step(inputs)
        return {k: v.clone() for k, v in out.items()}

    # ------------------------------------------------------------------ capture / replay
    def _capture(self, entry: _Entry, inputs: Inputs) -> None:
        entry.inputs = {name: t.detach().clone() for name, t in inputs.items()}
        if self.backend == "eager":
            entry.replay = lambda: entry.outputs.update(self._full_step(entry.inputs))
        else:
            graph = torch.cuda.CUDAGraph()
            with _uncached_autocast(), torch.cuda.graph(graph, pool=self._pool):
                entry.outputs = self._full_step(entry.inputs)
            entry.graph, entry.replay = graph, graph.replay
        self.captures += 1

    def _replay(self, entry: _Entry) -> None:
        assert entry.replay is not None
        if self.backend == "eager":
            with _uncached_autocast():
                entry.replay()
        else:
            entry.replay()

    @contextlib.contextmanager
    def _side_stream(self) -> Iterator[None]:
        """Warm-up steps run on a side stream (what capture expects); no-op for the eager backend."""
        if self._side is None:
            yield
            return
        self._side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side):
            yield
        torch.cuda.current_stream().wait_stream(self._side)


@contextlib.contextmanager
def _uncached_autocast() -> Iterator[None]:
    """The surrounding autocast state, without its cache of cast weights (stale inside a graph)."""
    device = "cuda" if torch.is_autocast_enabled("cuda") else "cpu"
    if not torch.is_autocast_enabled(device):
        yield
        return
    with torch.autocast(device, dtype=torch.get_autocast_dtype(device), cache_enabled=False):
        yield
