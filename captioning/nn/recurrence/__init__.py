"""The teacher-forced recurrence both attention-LSTM decoders run.

* :mod:`.plan`: what a call runs (query style, scorer, heads, gate, sentinel, GEMM dtype), the
  stacked weights, and which (step, row) cells are padding (:class:`Schedule`: rows shrink as
  sequences end on CPUs; every row runs and padding is masked on GPUs, with no host sync);
* :mod:`.reference`: the plain autograd LSTM step and loop, the reference the tests compare to;
* :mod:`.fused`: the loop as one autograd node with a hand-written backward (the speed path);
* :mod:`.attention_steps`, :mod:`.cell`: its attention and LSTM pieces (plain PyTorch, or the
  fused kernels of :mod:`captioning.nn.kernels` on CUDA).
"""

from captioning.nn.recurrence.fused import RecurrenceOutput, fused_recurrence
from captioning.nn.recurrence.plan import (
    PADDING_MODES,
    QUERY_STYLES,
    RecurrencePlan,
    RecurrenceWeights,
    Schedule,
    autocast_matmul_dtype,
    flat_rows,
    make_schedule,
    resolve_padding,
)
from captioning.nn.recurrence.reference import lstm_cell, plain_steps

__all__ = [
    "PADDING_MODES",
    "QUERY_STYLES",
    "RecurrenceOutput",
    "RecurrencePlan",
    "RecurrenceWeights",
    "Schedule",
    "autocast_matmul_dtype",
    "flat_rows",
    "fused_recurrence",
    "lstm_cell",
    "make_schedule",
    "plain_steps",
    "resolve_padding",
]
