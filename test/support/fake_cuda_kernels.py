"""Kernels on the fake driver's stream: every torch op run under `QueuedKernels` is a kernel
queued on the fake device, whose accesses to the fake's reservations stay in flight until the
test says the device finished it (`FakeDriver.finish`).

On the CPU an op runs to its end before the next line; on a GPU it is queued and runs later,
while the host goes on (the overlap scheduler prepares the next batch meanwhile). Recording
what each op touches lets a test run upstream's own metadata builders on CPU tensors and
still catch a remap that a GPU would make under a running kernel.

What an op touches is computed from its tensors' views, at the fake's mapping granularity:
for the selection ops (``index``, ``gather``, ``index_select``) exactly the elements selected
(the op itself, applied to a tensor of element offsets), for every other op the whole view.
"""

from __future__ import annotations

from typing import Any

import torch
from fake_cuda import FakeDriver
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_SELECTIONS = {
    torch.ops.aten.index.Tensor,
    torch.ops.aten.gather.default,
    torch.ops.aten.index_select.default,
}


class QueuedKernels(TorchDispatchMode):
    """Each op inside is one kernel queued on ``driver``'s stream (see the module docstring).
    ``launches`` lists the launch numbers of the kernels that touched a reservation."""

    def __init__(self, driver: FakeDriver) -> None:
        super().__init__()
        self.driver = driver
        self.launches: list[int] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view:
            return out
        ranges: list[tuple[int, int]] = []
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        for i, tensor in enumerate(tensors):
            if tensor.numel() == 0 or self.driver._reservation_of(tensor.data_ptr(), 1) is None:
                continue
            selected = func in _SELECTIONS and i == 0
            ranges += _granule_ranges(tensor, func, args, self.driver.min_granularity, selected)
        if ranges:
            self.launches.append(self.driver.queue_accesses(ranges))
        return out


def _element_offsets(tensor: torch.Tensor) -> torch.Tensor:
    """The offset (in elements, from its first) of every element of a view."""
    offsets = torch.zeros((), dtype=torch.int64)
    for dim, (size, stride) in enumerate(zip(tensor.shape, tensor.stride(), strict=True)):
        shape = [1] * tensor.dim()
        shape[dim] = size
        offsets = offsets + (torch.arange(size, dtype=torch.int64) * stride).view(shape)
    return offsets.expand(tensor.shape)


def _granule_ranges(
    tensor: torch.Tensor, func: Any, args: tuple, granularity: int, selected: bool
) -> list[tuple[int, int]]:
    offsets = _element_offsets(tensor)
    if selected:  # the same selection over the offsets: exactly the elements it reads
        offsets = func(offsets.contiguous(), *args[1:])
    addresses = tensor.data_ptr() + offsets.reshape(-1) * tensor.element_size()
    granules = torch.unique(addresses // granularity).tolist()
    ranges: list[tuple[int, int]] = []
    for granule in granules:
        start = granule * granularity
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], start + granularity)
        else:
            ranges.append((start, start + granularity))
    return ranges
