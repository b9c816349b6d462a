"""What a fused recurrence runs: its settings (:class:`RecurrencePlan`), the matrices it
multiplies (:class:`RecurrenceWeights`) and which (row, step) cells are real
(:class:`Schedule`). All immutable: one call's plan never leaks into the next."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from captioning.nn.attention import PreparedMemory
from captioning.nn.scores import Scorer

QUERY_STYLES = ("previous", "current")
PADDING_MODES = ("auto", "shrink", "mask")


@dataclass(frozen=True)
class RecurrencePlan:
    """The non-tensor settings of a fused recurrence.

    query: "previous" (attend with h_{t-1}, then the LSTM step) or "current" (LSTM step, then
    attend with h_t and feed the attentional vector back); scorer: the layer's scorer (its
    hooks); heads: H; gate: an f_beta gate row block in W_h; sentinel_rows: s (M, D) -> (keys
    (M*H, 1, A), values (M*H, 1, dv)) of the sentinel position, or None; matmul_dtype: the GEMM
    dtype (e.g. bf16 under autocast) or None for the states' dtype.
    """

    query: str
    scorer: Scorer
    heads: int = 1
    gate: bool = True
    sentinel_rows: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None
    matmul_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.query not in QUERY_STYLES:
            raise ValueError(f"query must be one of {QUERY_STYLES}, got {self.query!r}")


class RecurrenceWeights(NamedTuple):
    """w_h (R, D): every matrix that multiplies the state, stacked [recurrent (G); gate (C) if
    plan.gate; query map (H*Q); combine state part (D) if "current"]; b_h (R,): their biases
    (zeros for the recurrent rows) or None; w_x (G, Cx): LSTM weights of the context
    ("previous") or of the fed-back vector ("current"); w_u (D, C): combine weights of the
    context ("current"); out_w, out_b: the attention layer's output map (multi-head) or None."""

    w_h: Tensor
    b_h: Tensor | None
    w_x: Tensor
    w_u: Tensor | None = None
    out_w: Tensor | None = None
    out_b: Tensor | None = None


@dataclass(frozen=True)
class Schedule:
    """Which cells of the (step, row) grid are real (the rest is padding after a row's end).

    Two ways to skip padding:

    * ``shrink`` (host plan): rows sorted longest first (``order``), step t runs on its first
      ``active[t]`` rows only: ~35% less work for captions of 6-25 words, at the price of one
      host-device synchronisation to read the lengths. The fast plan on CPUs.
    * ``mask`` (device plan): every row runs every step and ``real`` (T, B) zeroes the padding
      cells' outputs and incoming gradients. No synchronisation and fixed shapes, so a whole
      training step can be captured as a CUDA graph; GPUs run the padding cells in parallel
      with the real ones.

    Either way a padding cell's output is 0 and contributes nothing to any gradient.
    """

    order: Tensor | None = None
    active: tuple[int, ...] | None = None
    real: Tensor | None = None

    @property
    def padded(self) -> bool:
        """True when rows sit out steps (shrink with padding): buffers must start at zero."""
        return self.active is not None


def resolve_padding(padding: str, device: torch.device) -> str:
    """``auto`` -> ``mask`` on accelerators (no host sync), ``shrink`` on CPUs (less work)."""
    if padding not in PADDING_MODES:
        raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
    if padding == "auto":
        return "shrink" if device.type == "cpu" else "mask"
    return padding


def make_schedule(steps: Tensor | None, rows: int, length: int, padding: str) -> Schedule:
    """steps (B,) real steps per row (or None: every cell is real) -> the :class:`Schedule`
    of ``padding`` ("shrink" or "mask", see :func:`resolve_padding`)."""
    if steps is None:
        return Schedule()
    if steps.shape != (rows,):
        raise ValueError(f"steps must be one count per row, shape ({rows},), got {tuple(steps.shape)}")
    if padding == "mask":
        real = torch.arange(length, device=steps.device).unsqueeze(1) < steps.unsqueeze(0)  # (T, B)
        return Schedule(real=real)
    counts = steps.detach().to("cpu", torch.long).clamp(0, length)  # one device sync, then host maths
    if bool((counts == length).all()):
        return Schedule()
    ordered, order = counts.sort(descending=True, stable=True)
    active = tuple((ordered.unsqueeze(0) > torch.arange(length).unsqueeze(1)).sum(1).tolist())
    if bool((order == torch.arange(rows)).all()):
        return Schedule(active=active)
    return Schedule(order=order.to(steps.device), active=active)


def real_cells(active: tuple[int, ...], rows: int, device: torch.device) -> Tensor:
    """Flat indices of the real cells of a time-major (len(active), rows) grid: step t's are its
    first ``active[t]`` rows (rows are sorted longest first)."""
    going = torch.arange(rows).unsqueeze(0) < torch.tensor(active).unsqueeze(1)  # (T, rows)
    return going.reshape(-1).nonzero().squeeze(1).to(device)


def autocast_matmul_dtype(device: torch.device) -> torch.dtype | None:
    """The GEMM dtype of the fused recurrence: the autocast dtype when autocast is on, else None."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def flat_rows(rows: PreparedMemory) -> tuple[Tensor, Tensor]:
    """(B, [H,] 1, .) per-item extra rows -> (B*H, 1, .) as the fused recurrence flattens heads."""
    n = rows.values.shape[:-1].numel()  # explicit: location keys are (..., 0) wide
    return rows.keys.reshape(n, 1, rows.keys.shape[-1]), rows.values.reshape(n, 1, rows.values.shape[-1])
