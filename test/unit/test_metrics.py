"""The `sglang:kv_alloc_*` gauges follow upstream's collector conventions: its labels, and its
gauge class where the collector names one (`_gauge_cls`, upstream's hook for a backend other
than prometheus_client); prometheus_client's own otherwise."""

from __future__ import annotations

import types
from typing import Any

import prometheus_client
import pytest
from sglang.srt.mem_cache.segmented import metrics


class RecordingGauge:
    """A gauge class of the prometheus_client shape that records what it was made with."""

    made: list[dict[str, Any]] = []

    def __init__(self, **kwargs: Any) -> None:
        RecordingGauge.made.append(kwargs)


def test_the_collectors_gauge_class_makes_the_gauges() -> None:
    RecordingGauge.made.clear()
    collector = types.SimpleNamespace(labels={"model_name": "m"}, _gauge_cls=RecordingGauge)
    metrics.after_collector_init(None, collector)
    names = [g["name"] for g in RecordingGauge.made]
    assert "sglang:kv_alloc_mode" in names and len(names) == len(collector._kvalloc_gauges) + 1
    assert all(g["labelnames"][0] == "model_name" for g in RecordingGauge.made)
    assert all(isinstance(g, RecordingGauge) for g in collector._kvalloc_gauges.values())


def test_prometheus_clients_gauge_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = prometheus_client.CollectorRegistry()
    made = []
    real_gauge = prometheus_client.Gauge

    def gauge(**kwargs: Any) -> prometheus_client.Gauge:
        made.append(real_gauge(registry=registry, **kwargs))
        return made[-1]

    monkeypatch.setattr(prometheus_client, "Gauge", gauge)
    collector = types.SimpleNamespace(labels={"model_name": "m"}, _gauge_cls=None)
    metrics.after_collector_init(None, collector)
    assert made and collector._kvalloc_mode_gauge is made[-1]
