"""Prometheus gauges for the KV allocation layer, next to upstream's scheduler metrics.

Created with upstream's `SchedulerMetricsCollector` (so only with `--enable-metrics`,
with its labels and multiprocess mode) and refreshed whenever it logs its own stats.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sglang.srt.mem_cache.segmented.runtime import RUNTIME

if TYPE_CHECKING:
    from sglang.srt.observability.metrics_collector import SchedulerMetricsCollector

# name suffix -> (documentation, how to read it from the runtime's record / the segment stats)
_GAUGES: dict[str, str] = {
    "token_capacity": "KV tokens the pool can hold (static: allocated; segmented: the cap).",
    "effective_context_length": "Context length in force after auto's clamp.",
    "req_to_token_bytes": "Size of the req_to_token table (segmented: reserved, not committed).",
    "committed_bytes": "KV pool bytes physically committed (segmented mode).",
    "reserved_bytes": "KV pool address space reserved (segmented mode).",
    "committed_segments": "KV segments committed (segmented mode).",
    "total_segments": "KV segments the reservation is divided into (segmented mode).",
    "used_tokens": "KV slots in use in committed segments, prefix cache included (segmented).",
    "segment_commits": "Segments committed since start (segmented mode).",
    "segment_releases": "Segments given back since start (segmented mode).",
}
# The shared KV budget (--kv-budget), from its ledger.
_BUDGET_GAUGES: dict[str, str] = {
    "budget_total_bytes": "Bytes of the KV budget this server shares (--kv-budget).",
    "budget_committed_bytes": "KV bytes committed by every server on the budget.",
    "budget_server_committed_bytes": "KV bytes this server has reserved in the budget.",
    "budget_others_wanted_bytes": "Bytes other servers on the budget asked for and wait on.",
}
_FROM_SEGMENTS = {
    "committed_bytes": "committed_bytes",
    "reserved_bytes": "reserved_bytes",
    "committed_segments": "committed_segments",
    "total_segments": "total_segments",
    "used_tokens": "used_tokens",
    "segment_commits": "commits",
    "segment_releases": "releases",
}


def after_collector_init(
    result: None, self: SchedulerMetricsCollector, *args: Any, **kwargs: Any
) -> None:
    """Called last in `SchedulerMetricsCollector.__init__`: register the gauges, with
    the collector's gauge class where it names one (upstream's hook for a backend other
    than prometheus_client), as upstream's own gauges are."""
    from prometheus_client import Gauge as PromGauge

    Gauge = getattr(self, "_gauge_cls", None) or PromGauge  # noqa: N806 - upstream's spelling

    labels = dict(getattr(self, "labels", {}) or {})
    self._kvalloc_labels = labels
    self._kvalloc_gauges = {
        name: Gauge(
            name=f"sglang:kv_alloc_{name}",
            documentation=doc,
            labelnames=list(labels.keys()),
            multiprocess_mode="mostrecent",
        )
        for name, doc in {**_GAUGES, **_BUDGET_GAUGES}.items()
    }
    self._kvalloc_mode_gauge = Gauge(
        name="sglang:kv_alloc_mode",
        documentation="1 for the KV allocation mode in force (label mode), requested in label "
        "requested_mode.",
        labelnames=[*labels.keys(), "mode", "requested_mode"],
        multiprocess_mode="mostrecent",
    )
    return None


def after_log_stats(
    result: None, self: SchedulerMetricsCollector, *args: Any, **kwargs: Any
) -> None:
    """Called last in `SchedulerMetricsCollector.log_stats`: refresh the gauges from the
    live state."""
    gauges = getattr(self, "_kvalloc_gauges", None)
    state, decision = RUNTIME.state, RUNTIME.decision
    if gauges is None or not RUNTIME.decided:
        return None
    labels = self._kvalloc_labels
    values: dict[str, int | None] = {
        "token_capacity": state.token_capacity,
        "effective_context_length": state.effective_context_length,
        "req_to_token_bytes": state.req_to_token_bytes,
    }
    segments = RUNTIME.segment_stats() or {}
    for name, key in _FROM_SEGMENTS.items():
        values[name] = segments.get(key)
    if RUNTIME.budget is not None:
        ledger = RUNTIME.budget.snapshot()
        mine = [s for s in ledger["slots"] if s["pid"] == ledger["this_pid"]]
        values["budget_total_bytes"] = ledger["total_bytes"]
        values["budget_committed_bytes"] = ledger["committed_bytes"]
        values["budget_server_committed_bytes"] = mine[0]["committed"] if mine else 0
        values["budget_others_wanted_bytes"] = sum(
            s["wanted"] for s in ledger["slots"] if s["pid"] != ledger["this_pid"]
        )
    for name, value in values.items():
        if value is not None:
            gauges[name].labels(**labels).set(value)
    self._kvalloc_mode_gauge.labels(
        **labels, mode=decision.mode, requested_mode=decision.requested
    ).set(1)
    return None
