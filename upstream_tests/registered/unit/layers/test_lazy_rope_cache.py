"""Segmented mode's RoPE cache on the CPU: it grows with the positions in use instead of
being expanded to the context at start-up, and reads as upstream's does where it has grown.
Static mode keeps upstream's reservation. CPU only.

    python -m pytest test/registered/unit/layers/test_lazy_rope_cache.py -v
"""

import unittest
from types import SimpleNamespace as NS
from unittest import mock

import torch

from sglang.srt.layers.rotary_embedding import base
from sglang.srt.mem_cache.segmented import modes
from sglang.srt.mem_cache.segmented.runtime import RUNTIME
from sglang.srt.plugins import load_plugins
from sglang.srt.utils import common
from sglang.test.ci.ci_register import register_cpu_ci
from sglang.test.test_utils import CustomTestCase

register_cpu_ci(est_time=10, suite="base-a-test-cpu")


class TestLazyRopeCache(CustomTestCase):
    @classmethod
    def setUpClass(cls):
        load_plugins()  # as launch_server does: the plugin's hooks, where it is one

    def setUp(self):
        RUNTIME.reset()
        self.addCleanup(RUNTIME.reset)

    def _patch(self, owners, name: str, value) -> None:
        for owner in owners:
            patcher = mock.patch.object(owner, name, value)
            patcher.start()
            self.addCleanup(patcher.stop)

    def _mode(self, mode: str) -> None:
        """What the scheduler notes (the mode asked for), then the decision."""
        RUNTIME.device = "cpu"
        RUNTIME.request = modes.read_request(NS(kv_alloc_mode=mode))
        backing = modes.CPU_MMAP if mode == modes.SEGMENTED else modes.NO_BACKING
        RUNTIME.decide(modes.ModeDecision(mode, mode, "test", "mha", backing=backing))

    def test_the_rope_cache_grows_with_the_positions_in_use(self):
        spec = NS(speculative_num_steps=0, speculative_num_draft_tokens=0)
        self._patch([common], "get_model", lambda: NS(context_length=None))
        self._patch([common], "get_spec", lambda: spec)
        hf_config = NS(max_position_embeddings=4096)
        config = NS(context_len=100_000, hf_text_config=hf_config)
        ropes = {}
        for mode in (modes.STATIC, modes.SEGMENTED):
            RUNTIME.reset()
            self._mode(mode)
            with mock.patch.object(base, "_is_cpu", True):  # the CPU engine's module
                rope = base.RotaryEmbedding(64, 64, 4096, 1e4, True, torch.float32)
            model = torch.nn.Module()
            model.rotary_emb = ropes[mode] = rope
            common.reserve_rope_cache_for_long_sequences(model, config)
        upstream, lazy = ropes[modes.STATIC], ropes[modes.SEGMENTED]
        self.assertGreaterEqual(upstream.cos_sin_cache.shape[0], 100_000)
        self.assertEqual(lazy.cos_sin_cache.shape[0], 4096)  # the model's own length
        positions, (q, k) = torch.tensor([5, 20_000]), torch.randn(2, 2, 64)
        got = lazy.forward_native(positions, q.clone(), k.clone())
        rows = lazy.cos_sin_cache.shape[0]
        self.assertTrue(20_000 < rows < 100_000, rows)
        self.assertTrue(torch.equal(lazy.cos_sin_cache, upstream.cos_sin_cache[:rows]))
        want = upstream.forward_native(positions, q.clone(), k.clone())
        self.assertTrue(all(map(torch.equal, got, want)))


if __name__ == "__main__":
    unittest.main()
