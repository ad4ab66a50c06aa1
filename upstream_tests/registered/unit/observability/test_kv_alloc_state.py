"""What is reported once the KV allocation mode is decided and upstream's configure built
the pools: `kv_alloc` in the scheduler's internal state (/server_info) with the mode, why,
the capacity and what is committed, and sglang:kv_alloc_* gauges labelled as upstream's,
set from the same record when the collector logs stats. CPU only (a small segmented pool).

    python -m pytest test/registered/unit/observability/test_kv_alloc_state.py -v
"""

import json
import unittest
from functools import partial
from types import SimpleNamespace as NS
from unittest import mock

import prometheus_client
import torch

from sglang.srt.managers.scheduler_components import internal_state
from sglang.srt.mem_cache import kv_cache_configurator as kvc
from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.mem_cache.segmented import modes
from sglang.srt.mem_cache.segmented.kv_allocators import SegmentedTokenToKVPoolAllocator
from sglang.srt.mem_cache.segmented.kv_pools import SegmentedMHATokenToKVPool
from sglang.srt.mem_cache.segmented.lazy_req_to_token import SegmentedReqToTokenPool
from sglang.srt.mem_cache.segmented.runtime import RUNTIME
from sglang.srt.observability import metrics_collector
from sglang.srt.observability.metrics_collector import SchedulerStats
from sglang.srt.plugins import load_plugins
from sglang.test.ci.ci_register import register_cpu_ci
from sglang.test.test_utils import CustomTestCase

register_cpu_ci(est_time=15, suite="base-a-test-cpu")

CONTEXT, CAPACITY, SEGMENT, F32 = 100_000, 8192, 1024, torch.float32
REASON = "the context needs more KV than the device holds"
LABELS = dict(model_name="m", tp_rank=0, pp_rank=0, moe_ep_rank=0)
SCHEDULE = NS(
    prefill_delayer_max_delay_passes=8,
    prefill_delayer_forward_passes_buckets=None,
    prefill_delayer_wait_seconds_buckets=None,
)


class TestKvAllocState(CustomTestCase):
    @classmethod
    def setUpClass(cls):
        load_plugins()  # as launch_server does: the plugin's hooks, where it is one

    def setUp(self):
        RUNTIME.reset()
        self.addCleanup(RUNTIME.reset)

    def _configure(self, mode: str):
        """The decision, then upstream's `configure` over the pools built for it."""
        backing = modes.CPU_MMAP if mode == modes.SEGMENTED else modes.NO_BACKING
        RUNTIME.decide(modes.ModeDecision("auto", mode, REASON, "mha", backing=backing))
        allocator, rows = None, ReqToTokenPool(4, CONTEXT, "cpu", False)
        if mode == modes.SEGMENTED:
            RUNTIME.settings.segment_tokens = SEGMENT
            kv = SegmentedMHATokenToKVPool(CAPACITY, 1, F32, 2, 16, 2, "cpu", False)
            allocator = SegmentedTokenToKVPoolAllocator(CAPACITY, F32, "cpu", kv, False)
            rows = SegmentedReqToTokenPool(4, CONTEXT, "cpu", False)
        sizes = mock.Mock(max_total_num_tokens=CAPACITY, max_running_requests=4)
        pools = mock.Mock(req_to_token_pool=rows, token_to_kv_pool_allocator=allocator)
        conf = mock.Mock(is_draft_worker=False, model_config=NS(context_len=CONTEXT))
        conf._derive_pool_sizes.return_value = sizes
        conf._init_pools.return_value = pools
        with mock.patch.object(kvc, "get_available_gpu_memory", return_value=0.0):
            result = KVCacheConfigurator.configure(conf, pre_model_load_memory=0)
        self.assertIsInstance(result, kvc.KVCacheConfigResult)  # returned on
        return allocator

    def _server_info(self) -> dict:
        context = NS(resolved_server_args_dict=lambda: {"kv_alloc_mode": "auto"})
        with mock.patch.object(internal_state, "get_context", lambda: context):
            controller = internal_state.SchedulerInternalStateController
            state = controller.get_internal_state(mock.Mock(), None).internal_state
        json.dumps(state, allow_nan=False)  # as /server_info serialises it
        self.assertLessEqual({"kv_alloc_mode", "kv_alloc"}, set(state))
        return state["kv_alloc"]

    def _collector(self):
        reg = prometheus_client.CollectorRegistry()
        kinds = ("Counter", "Gauge", "Histogram", "Summary")
        bound = {k: partial(getattr(prometheus_client, k), registry=reg) for k in kinds}
        mock.patch.multiple(prometheus_client, **bound).start()
        mock.patch.object(metrics_collector, "get_schedule", lambda: SCHEDULE).start()
        balance = "exports_expert_balancedness_to_prometheus"
        mock.patch.object(metrics_collector, balance, lambda: False).start()
        self.addCleanup(mock.patch.stopall)
        collector = metrics_collector.SchedulerMetricsCollector(LABELS, NS())

        def samples() -> dict:
            collector.log_stats(SchedulerStats())
            found = [s for m in reg.collect() for s in m.samples]
            return {s.name: (s.labels, s.value) for s in found}

        return samples

    def test_server_info_says_the_mode_why_the_capacity_and_what_is_committed(self):
        allocator = self._configure(modes.SEGMENTED)
        info = self._server_info()
        self.assertEqual((info["mode"], info["reason"]), ("segmented", REASON))
        self.assertEqual(info["token_capacity"], CAPACITY)
        self.assertEqual(info["effective_context_length"], CONTEXT)
        self.assertEqual(info["req_to_token_bytes"], 5 * CONTEXT * 4)  # reserved
        one = info["segments"]["committed_bytes"]
        self.assertEqual(info["segments"]["committed_segments"], 1)
        self.assertLess(one * 8, info["segments"]["reserved_bytes"])
        self.assertIsNotNone(allocator.alloc(3000))  # slots 1..3000: three segments
        segments = self._server_info()["segments"]
        self.assertEqual(segments["committed_segments"], 3)
        self.assertEqual(segments["committed_bytes"], 3 * one)

    def test_static_reports_the_mode_and_capacity_without_segments(self):
        self._configure(modes.STATIC)
        info = self._server_info()
        self.assertEqual((info["mode"], info["requested_mode"]), ("static", "auto"))
        self.assertEqual(info["token_capacity"], CAPACITY)
        self.assertEqual(info["req_to_token_bytes"], 5 * CONTEXT * 4)  # allocated
        self.assertNotIn("segments", info)

    def test_gauges_carry_upstreams_labels_and_follow_the_state(self):
        samples = self._collector()
        self.assertFalse([n for n in samples() if "kv_alloc" in n])  # not decided yet
        allocator = self._configure(modes.SEGMENTED)
        got = samples()
        upstream_labels = got["sglang:token_usage"][0]
        for name, (labels, _) in got.items():
            if name.startswith("sglang:kv_alloc_") and name != "sglang:kv_alloc_mode":
                self.assertEqual(labels, upstream_labels, name)
        mode = {**upstream_labels, "mode": "segmented", "requested_mode": "auto"}
        self.assertEqual(got.get("sglang:kv_alloc_mode"), (mode, 1.0))
        one = allocator.segment_stats()["committed_bytes"]
        want = dict(token_capacity=CAPACITY, committed_segments=1, committed_bytes=one)
        self.assertEqual(self._values(got, want), want)
        allocator.alloc(3000)  # committed as the pool grows: the gauges follow
        want.update(committed_segments=3, committed_bytes=3 * one)
        self.assertEqual(self._values(samples(), want), want)

    @staticmethod
    def _values(samples: dict, names) -> dict:
        return {n: samples.get(f"sglang:kv_alloc_{n}", (0, None))[1] for n in names}


if __name__ == "__main__":
    unittest.main()
