"""Several segmented servers on one device share one KV budget (``--kv-budget NAME``).

Each server's KV pool is reserved at the budget's size (not at the free memory its start
finds, so servers started together all start), and every byte it commits is reserved
first in the device's ledger (`core.shared_budget`): a reservation refused is a failed
commit, so that server's requests queue as for a full pool (agreed across TP ranks, as
every failed commit) and it marks what it wants. A server another one waits on gives
back, at its next scheduler step and whatever its hold-off, the cached KV no request
holds above what it retains (``--kv-idle-cache-tokens``) and the segments that empties;
its floor stays.
"""

from __future__ import annotations

import atexit
import logging
import socket
from typing import TYPE_CHECKING

import torch

from sglang.srt.mem_cache.segmented import modes
from sglang.srt.mem_cache.segmented.runtime import RUNTIME
from sglang.srt.mem_cache.segmented.shared_budget import (
    BudgetError,
    SharedBudget,
    ledger_path,
)

if TYPE_CHECKING:
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator

logger = logging.getLogger(__name__)

# How often (scheduler iterations) a server asks the ledger whether another one waits.
GIVE_WAY_EVERY_ITERATIONS = 8
# How often each rank reads the ledger for that (an idle CPU-engine loop spins; the read takes
# no lock, so a server that waits is seen within this, plus an iteration).
WAITING_READ_EVERY_S = 0.05


def device_key(device: str, gpu_id: int) -> str:
    """The ledger's device: the GPU's UUID on CUDA (the same whatever
    CUDA_VISIBLE_DEVICES says), the host's name on the CPU engine."""
    if str(device).startswith("cuda"):
        return f"cuda-{torch.cuda.get_device_properties(gpu_id).uuid}"
    return f"cpu-{socket.gethostname()}"


def pool_bytes(configurator: KVCacheConfigurator) -> int | None:
    """The bytes this server's KV pool is reserved at under a budget: its limit, else
    the budget's total (from the flag, or the ledger that exists); None without a
    budget."""
    settings = modes.budget_settings(getattr(configurator, "server_args", None))
    if settings is None:
        return None
    total = settings.total_bytes or _ledger_total(configurator, settings.name)
    return min(settings.limit_bytes or total, total)


def _ledger_total(configurator: KVCacheConfigurator, name: str) -> int:
    path = ledger_path(device_key(str(configurator.device), configurator.gpu_id), name)
    total = SharedBudget.total_of(path)
    if total is None:
        raise modes.KvAllocModeError(
            f"--kv-budget {name}: no server has created this budget on this device yet; the "
            "first one gives its size with --kv-budget-bytes"
        )
    return total


def open_budget(configurator: KVCacheConfigurator) -> None:
    """Segmented mode with a budget: this server's slot in the ledger, and every backing
    made from now on reserving in it (`LedgeredBacking`). A ledger that cannot be used
    is one line."""
    settings = modes.budget_settings(configurator.server_args)
    if settings is None or RUNTIME.budget is not None or configurator.is_draft_worker:
        return
    from sglang.srt.runtime_context import get_parallel

    key = device_key(str(configurator.device), configurator.gpu_id)
    path = ledger_path(key, settings.name)
    server_args = configurator.server_args
    label = (
        f"{server_args.served_model_name or server_args.model_path}@{server_args.port}"
    )
    rank = int(getattr(get_parallel(), "tp_rank", 0) or 0)
    try:
        budget = SharedBudget(
            path,
            total=settings.total_bytes,
            name=f"{label} tp{rank}",
            floor=settings.floor_bytes,
            limit=settings.limit_bytes,
        )
    except BudgetError as exc:
        raise modes.KvAllocModeError(str(exc)) from None
    RUNTIME.budget = budget
    RUNTIME.backings.budget = budget
    atexit.register(budget.close)
    logger.info(
        "KV budget %r on %s: %d bytes shared (%s), this server's floor %d, limit %s.",
        settings.name,
        key,
        budget.total,
        path,
        settings.floor_bytes,
        settings.limit_bytes or "the total",
    )


def give_way(scheduler: Scheduler) -> None:
    """Every few iterations (every rank together): where another server waits on the
    budget, give back the cached KV no request holds above what this one retains, and
    the segments that empties, now (the floor stays)."""
    budget = RUNTIME.budget
    allocator = getattr(scheduler, "token_to_kv_pool_allocator", None)
    release = getattr(allocator, "release_cache_above_retained", None)
    if budget is None or release is None:
        return
    allocator_iteration = getattr(allocator, "_iteration", 0)
    if allocator_iteration % GIVE_WAY_EVERY_ITERATIONS:
        return
    waiting = budget.others_waiting(max_age_s=WAITING_READ_EVERY_S) > 0
    agree = RUNTIME.settings.agree
    if not -agree(-int(waiting)):  # any rank's device has a server waiting
        return
    release(scheduler.tree_cache, "another server waits on the KV budget")
