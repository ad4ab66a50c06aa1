"""``--kv-alloc-mode auto`` clamps ``--context-length`` to the model when ServerArgs is
resolved; the clamp to the pool the scheduler sizes reaches the tokenizer.

CPU only: a local config.json, nothing downloaded, no weights loaded.

python -m pytest test/registered/unit/server_args/test_kv_alloc_auto_context.py -v
"""

import json
import os
import tempfile
import unittest
from types import SimpleNamespace
from unittest import mock

from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.mem_cache.segmented import auto_context
from sglang.srt.mem_cache.segmented.runtime import RUNTIME
from sglang.srt.plugins import load_plugins
from sglang.srt.server_args import ServerArgs, prepare_server_args
from sglang.test.ci.ci_register import register_cpu_ci
from sglang.test.test_utils import CustomTestCase

register_cpu_ci(est_time=10, suite="base-a-test-cpu")

MODEL_MAX = 4096
HUGE = 10_000_000
OVERRIDE = "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 2048,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 16,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "head_dim": 256,
    "max_position_embeddings": MODEL_MAX,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "torch_dtype": "bfloat16",
}


class TestKvAllocAutoContext(CustomTestCase):
    @classmethod
    def setUpClass(cls):
        load_plugins()  # as launch_server does before it parses the command line
        cls._dir = tempfile.TemporaryDirectory()
        with open(os.path.join(cls._dir.name, "config.json"), "w") as f:
            json.dump(TINY_LLAMA, f)

    @classmethod
    def tearDownClass(cls):
        cls._dir.cleanup()

    def _args(self, *argv: str) -> ServerArgs:
        # prepare_server_args reconfigures logging: call it before assertLogs.
        return prepare_server_args(
            ["--model-path", self._dir.name, "--device", "cpu", *argv]
        )

    def _resolve_logged(self, *argv: str) -> tuple[ServerArgs, list[str]]:
        args = self._args(*argv)
        with self.assertLogs(level="WARNING") as logs:
            args.resolve_once()
        return args, [r.getMessage() for r in logs.records]

    def _no_override(self):
        env = mock.patch.dict(os.environ)
        env.start()
        self.addCleanup(env.stop)
        for name in (OVERRIDE, "SGLANG_IS_IN_CI"):  # upstream reads both
            os.environ.pop(name, None)

    def test_auto_clamps_to_the_model_maximum(self):
        self._no_override()
        args, lines = self._resolve_logged(
            "--kv-alloc-mode", "auto", "--context-length", str(HUGE)
        )
        self.assertEqual(args.context_length, MODEL_MAX)
        self.assertEqual(ModelConfig.from_server_args(args).context_len, MODEL_MAX)
        self.assertTrue(any(f"clamped to {MODEL_MAX}" in x for x in lines), lines)

    def test_auto_with_the_override_leaves_the_pool_to_the_scheduler(self):
        with mock.patch.dict(os.environ, {OVERRIDE: "1"}):
            args = self._args("--kv-alloc-mode", "auto", "--context-length", str(HUGE))
            args.resolve_once()
            # What the device holds is known once the scheduler sized the pool.
            self.assertEqual(args.context_length, HUGE)
            self.assertEqual(ModelConfig.from_server_args(args).context_len, HUGE)

    def test_the_schedulers_clamp_reaches_the_tokenizer(self):
        """The scheduler's handshake carries auto's clamp; the tokenizer, /v1/models and
        /server_info then report the clamped context."""
        RUNTIME.state.clamped_context_length = 12_345
        self.addCleanup(setattr, RUNTIME.state, "clamped_context_length", None)
        info = auto_context.clamped_context_in_init_info({"status": "ready"}, None)
        self.assertEqual(info[auto_context.CLAMPED_CONTEXT_KEY], 12_345)
        # /server_info lays the handshake over the resolved arguments.
        self.assertEqual(info["context_length"], 12_345)
        tokenizer = SimpleNamespace(
            context_len=HUGE, model_config=SimpleNamespace(context_len=HUGE)
        )
        started = SimpleNamespace(scheduler_infos=[info, dict(info)])
        auto_context.context_from_scheduler(None, tokenizer, started, 0.0)
        self.assertEqual(tokenizer.context_len, 12_345)
        self.assertEqual(tokenizer.model_config.context_len, 12_345)
        # Without a clamp in the handshake, upstream's context stays.
        RUNTIME.state.clamped_context_length = None
        info = auto_context.clamped_context_in_init_info({"status": "ready"}, None)
        self.assertNotIn(auto_context.CLAMPED_CONTEXT_KEY, info)
        tokenizer.context_len = HUGE
        auto_context.context_from_scheduler(
            None, tokenizer, SimpleNamespace(scheduler_infos=[info]), 0.0
        )
        self.assertEqual(tokenizer.context_len, HUGE)

    def test_a_draft_model_and_the_schedulers_config_follow_the_clamp(self):
        """The draft model was built with the target's context before the target's pool
        was sized; its configurator (and the scheduler's own config) take the clamp."""

        def configurator(draft):
            return SimpleNamespace(
                is_draft_worker=draft, model_config=SimpleNamespace(context_len=HUGE)
            )

        scheduler = SimpleNamespace(model_config=SimpleNamespace(context_len=HUGE))
        draft, target = configurator(True), configurator(False)
        for follower in (draft, target):
            auto_context.draft_follows_clamp(follower, pre_model_load_memory=0)
        auto_context.scheduler_follows_clamp(None, scheduler)
        self.assertEqual(draft.model_config.context_len, HUGE)  # no clamp: upstream's
        self.assertEqual(scheduler.model_config.context_len, HUGE)
        RUNTIME.state.clamped_context_length = 12_345
        self.addCleanup(setattr, RUNTIME.state, "clamped_context_length", None)
        for follower in (draft, target):
            auto_context.draft_follows_clamp(follower, pre_model_load_memory=0)
        auto_context.scheduler_follows_clamp(None, scheduler)
        self.assertEqual(draft.model_config.context_len, 12_345)
        self.assertEqual(
            target.model_config.context_len, HUGE
        )  # its own, clamped by auto
        self.assertEqual(scheduler.model_config.context_len, 12_345)

    def test_an_ordinary_context_is_left_as_upstream_resolves_it(self):
        self._no_override()
        for mode in ("static", "auto"):
            args = self._args("--kv-alloc-mode", mode, "--context-length", "2048")
            args.resolve_once()
            self.assertEqual(args.context_length, 2048, mode)
            self.assertEqual(ModelConfig.from_server_args(args).context_len, 2048)
            args = self._args("--kv-alloc-mode", mode)
            args.resolve_once()
            self.assertIsNone(args.context_length, mode)
            self.assertEqual(ModelConfig.from_server_args(args).context_len, MODEL_MAX)

    def test_static_keeps_upstreams_refusal_above_the_model_maximum(self):
        self._no_override()
        args = self._args("--kv-alloc-mode", "static", "--context-length", str(HUGE))
        with self.assertRaisesRegex(ValueError, OVERRIDE):
            args.resolve_once()


if __name__ == "__main__":
    unittest.main()
