"""The test harness's CPU-engine PD hooks act on the CPU engine only and leave CUDA's path as
upstream wrote it."""

from __future__ import annotations

import types

import pytest

from sglang_kvalloc_harness import cpu_engine_pd


@pytest.mark.parametrize("on_cpu", [True, False])
def test_the_sender_takes_numpy_indices_on_the_cpu_engine_only(
    monkeypatch: pytest.MonkeyPatch, on_cpu: bool
) -> None:
    monkeypatch.setattr(cpu_engine_pd, "cpu_engine", lambda: on_cpu)
    sender = types.SimpleNamespace(supports_host_tensor_indices=True)
    cpu_engine_pd.before_send_kv_chunk(object(), types.SimpleNamespace(disagg_kv_sender=sender))
    assert sender.supports_host_tensor_indices is (not on_cpu)
    # A request without a sender (the fake backend's warm-up) is left alone.
    cpu_engine_pd.before_send_kv_chunk(object(), types.SimpleNamespace())


@pytest.mark.parametrize(
    ("on_cpu", "overlap", "sent"),
    [(True, True, False), (True, False, True), (False, True, True), (False, False, True)],
)
def test_the_early_cached_prefix_send_is_skipped_only_under_overlap_on_the_cpu_engine(
    monkeypatch: pytest.MonkeyPatch, on_cpu: bool, overlap: bool, sent: bool
) -> None:
    monkeypatch.setattr(cpu_engine_pd, "cpu_engine", lambda: on_cpu)
    calls: list[object] = []
    scheduler = types.SimpleNamespace(enable_overlap=overlap)
    cpu_engine_pd.around_maybe_send_cached_prefix_chunk(
        lambda s, *a: calls.append((s, a)), scheduler, "batch"
    )
    assert calls == ([(scheduler, ("batch",))] if sent else [])


def test_the_hooks_target_upstreams_functions() -> None:
    from sglang.srt.disaggregation.prefill import SchedulerDisaggregationPrefillMixin as Prefill

    assert callable(Prefill._send_kv_chunk) and callable(Prefill.maybe_send_cached_prefix_chunk)
    assert cpu_engine_pd.PREFILL.endswith(Prefill.__name__)
