"""Helpers of the GPU tests: the device's free memory and a call's time, synchronized."""

from __future__ import annotations

import time

import torch

MIB = 1 << 20
GIB = 1 << 30


def free_bytes() -> int:
    torch.cuda.synchronize()
    return int(torch.cuda.mem_get_info()[0])


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e6
