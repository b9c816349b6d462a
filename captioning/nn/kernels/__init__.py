"""Fused GPU kernels (Triton) for the per-step maths of the teacher-forced recurrence.

A training step of the attention LSTM is 21 small steps, each of which is, in plain PyTorch, a
few dozen tiny kernels (sigmoid, tanh, mul, add, copies, casts): on a GPU the host cannot launch
them as fast as the GPU runs them. These kernels do each step's pointwise work in one launch:

* :mod:`.lstm`: the LSTM update (gates -> i, f, g, o[, sentinel gate], c, h) and its backward;
* :mod:`.attention`: masked softmax + weighted sum of the values (+ the f_beta gate), and the
  softmax's backward;
* :mod:`.additive`: the additive (Bahdanau) score of one query per item against its prepared
  keys, and its backward, without the (N, S, A) intermediate.

They are used for CUDA tensors when Triton is installed (it comes with PyTorch's CUDA builds),
by the code that owns the maths (:mod:`captioning.nn.recurrence`, the additive scorer); CPU
tensors keep the plain PyTorch path. Tests run the kernels on the CPU through Triton's
interpreter (``TRITON_INTERPRET=1`` set before this package's kernels are first used, then
:func:`forced`), against the plain path.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch

_FORCED = False


@functools.cache
def triton_available() -> bool:
    """True when Triton can be imported (PyTorch's CUDA builds ship it)."""
    return importlib.util.find_spec("triton") is not None


def usable(t: torch.Tensor) -> bool:
    """Whether the fused kernels run for tensors like ``t``: CUDA tensors with Triton present,
    or any tensor inside :func:`forced` (tests, through Triton's interpreter)."""
    if _FORCED:
        return True
    return t.is_cuda and triton_available() and os.environ.get("CAPTIONING_FUSED_KERNELS", "1") != "0"


@contextlib.contextmanager
def forced(on: bool = True) -> Iterator[None]:
    """Run the kernels for every tensor (CPU ones through Triton's interpreter: set
    ``TRITON_INTERPRET=1`` before the first kernel is used). For tests."""
    global _FORCED
    if on and not interpreting() and not torch.cuda.is_available():
        raise RuntimeError(
            "the kernels run on CPU tensors only through Triton's interpreter: "
            "set TRITON_INTERPRET=1 before they are first used"
        )
    before, _FORCED = _FORCED, on
    try:
        yield
    finally:
        _FORCED = before


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compute_dtype(t: torch.Tensor):
    """The Triton dtype the kernels compute in for states of dtype ``t.dtype`` (float32, or float64)."""
    import triton.language as tl

    return tl.float64 if t.dtype == torch.float64 else tl.float32


def block(n: int, cap: int = 1024) -> int:
    """A power-of-two block size >= n (at least 16), at most ``cap``."""
    size = 16
    while size < n and size < cap:
        size *= 2
    return size
