"""The KV allocation modes: what was asked for, and what a process decided. Of
SGLang it imports only the segment rules and the settings' value rules (`geometry`,
`settings`).

The mode is chosen by `--kv-alloc-mode` (CLI), `kv_alloc_mode=` (`sglang.Engine`), or
the environment variable SGLANG_KV_ALLOC_MODE, in that order of precedence. Every KV
allocation setting is read here, from the ServerArgs record or the environment:
`read_request` gathers them into one `KvAllocRequest`. What a scheduler process then
runs is one frozen `ModeDecision`, made once where the KV pool is sized, and asked
wherever a mode acts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from sglang.srt.mem_cache.segmented import geometry, settings

MODES = settings.KV_ALLOC_MODES
STATIC, SEGMENTED, AUTO = MODES
DEFAULT_MODE = AUTO

MODE_ENV = "SGLANG_KV_ALLOC_MODE"
# Fields of ServerArgs (`KvAlloc`, arg_groups/fields/kv_alloc.py),
# pickled with the record to every spawned process. None: the environment, then the
# default.
SERVER_ARGS_ATTR = "kv_alloc_mode"
# The context the operator asked for, kept when auto clamps `context_length`:
# bookkeeping (not a field), kept in the record's __dict__, which ServerArgs.__reduce__
# pickles too.
REQUESTED_CONTEXT_ATTR = "_kv_alloc_requested_context_length"
SEGMENT_TOKENS_ATTR = "kv_segment_tokens"
SEGMENT_TOKENS_ENV = "SGLANG_KV_SEGMENT_TOKENS"
HOLD_OFF_ATTR = "kv_segment_hold_off"
HOLD_OFF_ENV = "SGLANG_KV_SEGMENT_HOLD_OFF"
DEFAULT_HOLD_OFF_S = 5.0
IDLE_CACHE_ATTR = "kv_idle_cache_tokens"
IDLE_CACHE_ENV = "SGLANG_KV_IDLE_CACHE_TOKENS"
DEFAULT_IDLE_CACHE_TOKENS = 8192

# A KV budget shared by the segmented servers of a device (--kv-budget and friends).
BUDGET_ATTR = "kv_budget"
BUDGET_BYTES_ATTR = "kv_budget_bytes"
BUDGET_FLOOR_ATTR = "kv_budget_floor"
BUDGET_LIMIT_ATTR = "kv_budget_limit"

# Modes whose start-up path exists. A mode outside this set fails at start-up with one
# line instead of silently running as static.
IMPLEMENTED_MODES: frozenset[str] = frozenset(MODES)


class KvAllocModeError(ValueError):
    """A mode that is unknown or not available in this build."""


def validate_mode(mode: str) -> str:
    if mode not in MODES:
        raise KvAllocModeError(
            f"unknown --kv-alloc-mode {mode!r}; choose from {', '.join(MODES)}"
        )
    if mode not in IMPLEMENTED_MODES:
        raise KvAllocModeError(
            f"--kv-alloc-mode {mode} is not available in this build "
            f"(available: {', '.join(sorted(IMPLEMENTED_MODES))})"
        )
    return mode


def mode_from_env() -> str | None:
    value = os.environ.get(MODE_ENV, "").strip()
    return value or None


def requested_mode(server_args: object | None) -> str:
    """The mode asked for: the record's value, else the environment, else the
    default."""
    value = (
        getattr(server_args, SERVER_ARGS_ATTR, None)
        if server_args is not None
        else None
    )
    return value or mode_from_env() or DEFAULT_MODE


def _whole_tokens(
    server_args: object | None, attr: str, env: str, flag: str
) -> int | None:
    """A token count from the record (a CLI value is an int already; an `sglang.Engine`
    keyword may be a string) or else the environment; KvAllocModeError names what is
    bad."""
    value = getattr(server_args, attr, None) if server_args is not None else None
    source = flag
    if value is None and os.environ.get(env, "").strip():
        value, source = os.environ[env], env
    if value is None:
        return None
    try:
        return settings.parse_whole_tokens(value)
    except ValueError as exc:
        raise KvAllocModeError(f"{source}: {exc}") from None


def segment_tokens(server_args: object | None) -> int | None:
    """Segment size in tokens if one was asked for (None: the default for the pool)."""
    value = _whole_tokens(
        server_args, SEGMENT_TOKENS_ATTR, SEGMENT_TOKENS_ENV, "--kv-segment-tokens"
    )
    problem = None if value is None else geometry.requested_segment_problem(value)
    if problem is not None:
        raise KvAllocModeError(f"--kv-segment-tokens: {problem}")
    return value


def segment_hold_off_s(server_args: object | None) -> float:
    """Seconds a trailing segment must stay empty before it is given back (inf:
    never)."""
    value = (
        getattr(server_args, HOLD_OFF_ATTR, None) if server_args is not None else None
    )
    if value is None and os.environ.get(HOLD_OFF_ENV, "").strip():
        value = parse_hold_off(os.environ[HOLD_OFF_ENV])
    if value is None:
        return DEFAULT_HOLD_OFF_S
    return parse_hold_off(str(value))


def parse_hold_off(text: str) -> float:
    """Seconds >= 0; 'inf' means memory is never given back; NaN and negatives are
    errors."""
    try:
        return settings.parse_hold_off_seconds(text)
    except ValueError as exc:
        raise KvAllocModeError(str(exc)) from None


def idle_cache_tokens(server_args: object | None) -> int:
    """Prefix-cache tokens the idle policy keeps committed."""
    value = _whole_tokens(
        server_args, IDLE_CACHE_ATTR, IDLE_CACHE_ENV, "--kv-idle-cache-tokens"
    )
    if value is None:
        return DEFAULT_IDLE_CACHE_TOKENS
    if value < 0:
        raise KvAllocModeError(f"--kv-idle-cache-tokens must be >= 0, got {value}")
    return value


@dataclass(frozen=True)
class BudgetSettings:
    """The KV budget a server joins: its name, its size where this server creates it
    (0: the ledger's), and this server's floor and limit (0: none, the total)."""

    name: str
    total_bytes: int
    floor_bytes: int
    limit_bytes: int


def budget_settings(server_args: object | None) -> BudgetSettings | None:
    """The shared KV budget asked for, None without one."""
    name = getattr(server_args, BUDGET_ATTR, None) if server_args is not None else None
    if not name:
        return None
    return BudgetSettings(
        name=str(name),
        total_bytes=_bytes(server_args, BUDGET_BYTES_ATTR, "--kv-budget-bytes"),
        floor_bytes=_bytes(server_args, BUDGET_FLOOR_ATTR, "--kv-budget-floor"),
        limit_bytes=_bytes(server_args, BUDGET_LIMIT_ATTR, "--kv-budget-limit"),
    )


def _bytes(server_args: object | None, attr: str, flag: str) -> int:
    """Bytes from the record: an int from the CLI, or an `sglang.Engine` keyword such as
    "40G" (the CLI's own rule); 0 where unset."""
    value = getattr(server_args, attr, None) if server_args is not None else None
    if value is None or isinstance(value, int):
        return int(value or 0)
    try:
        return settings.parse_bytes(str(value))
    except ValueError as exc:
        raise KvAllocModeError(f"{flag}: {exc}") from None


@dataclass(frozen=True)
class KvAllocRequest:
    """Every KV allocation setting asked for, read once per process (`read_request`)."""

    mode: str
    segment_tokens: int | None
    hold_off_s: float
    idle_cache_tokens: int
    budget: BudgetSettings | None


def read_request(server_args: object | None) -> KvAllocRequest:
    """The settings on ``server_args`` (else the environment, else the defaults),
    checked.

    Raises:
        KvAllocModeError: a value that is unknown or out of range (one line for the
            user).
    """
    return KvAllocRequest(
        mode=validate_mode(requested_mode(server_args)),
        segment_tokens=segment_tokens(server_args),
        hold_off_s=segment_hold_off_s(server_args),
        idle_cache_tokens=idle_cache_tokens(server_args),
        budget=budget_settings(server_args),
    )


# The backings a decision can name: none (static), an anonymous mmap whose pages a first
# write commits (the CPU), the CUDA driver's virtual memory API (commits made
# explicitly).
NO_BACKING = "none"
CPU_MMAP = "cpu-mmap"
CUDA_VMM = "cuda-vmm"


@dataclass(frozen=True)
class ModeDecision:
    """What a scheduler process runs, decided once where upstream sizes the KV pool.

    Segmented mode has two mechanisms: (a) context-scaled tables (req_to_token, RoPE
    caches, cuda-graph buffers) reserved and committed as used, for every pool kind; (b)
    the KV pool committed segment by segment, for the kinds that support it
    (`kv_pool_problem` says why not, otherwise None). `explicit_commits`: the backing
    maps memory before any use (a GPU), so tables, rows and graph buffers are committed
    explicitly, not by a first write.
    """

    requested: str
    mode: str
    reason: str
    kv_pool_kind: str = ""
    kv_pool_problem: str | None = None
    backing: str = NO_BACKING
    explicit_commits: bool = False

    @property
    def segmented(self) -> bool:
        return self.mode == SEGMENTED

    @property
    def lazy_tables(self) -> bool:
        """Mechanism (a): context-scaled tables are reserved, not allocated whole."""
        return self.segmented

    @property
    def kv_on_demand(self) -> bool:
        """Mechanism (b): the KV pool is committed segment by segment."""
        return self.segmented and self.kv_pool_problem is None

    @property
    def kv_pool_note(self) -> str:
        """One phrase on how the KV pool is held, for the start-up log and
        `/server_info`."""
        if not self.segmented:
            return ""
        if self.kv_pool_problem is not None:
            return self.kv_pool_problem
        return f"the {self.kv_pool_kind} KV pool is committed segment by segment"

    def report(self) -> dict[str, object]:
        """The decision as `/server_info` reports it (`internal_states[i].kv_alloc`)."""
        return {
            "requested_mode": self.requested,
            "mode": self.mode,
            "reason": self.reason,
            "kv_pool_kind": self.kv_pool_kind or None,
            "lazy_tables": self.lazy_tables,
            "kv_on_demand": self.kv_on_demand,
            "kv_on_demand_note": self.kv_pool_note,
            "backing": self.backing,
            "explicit_commits": self.explicit_commits,
        }


UNDECIDED = ModeDecision(requested="", mode=STATIC, reason="not decided yet")
"""Before the pools are sized (and in draft workers): every hook acts as upstream."""
