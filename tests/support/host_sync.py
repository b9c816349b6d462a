"""A guard that fails a test when code reads device data on the host (what would make a CUDA
host thread wait for the GPU): ``.item()``, ``bool(tensor)``, ``.tolist()``, ``.numpy()``,
``.cpu()``, ops whose output size depends on the data (``nonzero``, boolean indexing,
``masked_select``, ``unique``...). It runs on CPU tensors, so the code path used on CUDA can be
checked on machines without a GPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


class HostSync(AssertionError):
    pass


_READS = {
    aten._local_scalar_dense,
    aten.nonzero,
    aten.masked_select,
    aten.is_nonzero,
    aten.equal,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.allclose,
}
_BOOL_INDEXED = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


class _Guard(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in _READS:
            raise HostSync(f"host sync: {func}")
        if (
            packet is aten.repeat_interleave
            and "output_size" not in kwargs
            and isinstance(args[0], torch.Tensor)
            and len(args) == 1
        ):
            raise HostSync(f"host sync: {func} without output_size")
        if packet in _BOOL_INDEXED:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
                raise HostSync(f"host sync: {func} with a boolean index")
        return func(*args, **kwargs)


def _refuse(name: str):
    def refuse(self, *args, **kwargs):
        raise HostSync(f"host sync: Tensor.{name}()")

    return refuse


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Inside: any host read of tensor data raises :class:`HostSync` naming the op."""
    saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "cpu", "__array__")}
    try:
        for name in saved:
            setattr(torch.Tensor, name, _refuse(name))
        with _Guard():
            yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
