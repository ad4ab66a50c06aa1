"""``--kv-alloc-mode`` and its settings as ServerArgs fields; CPU only, no model.

python -m pytest test/registered/unit/server_args/test_kv_alloc_mode_flag.py -v
"""

import contextlib
import io
import unittest

from sglang.srt.arg_groups.fields.kv_alloc import KvAlloc
from sglang.srt.plugins import load_plugins
from sglang.srt.server_args import ServerArgs, prepare_server_args
from sglang.test.ci.ci_register import register_cpu_ci
from sglang.test.test_utils import CustomTestCase

register_cpu_ci(est_time=5, suite="base-a-test-cpu")


def _parse(*argv: str) -> ServerArgs:
    return prepare_server_args(["--model-path", "unused", *argv])


def _exit_code(*argv: str) -> tuple[int, str]:
    """The exit code and stderr of a command line the parser refuses."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            _parse(*argv)
        except SystemExit as exc:
            return int(exc.code), err.getvalue()
    raise AssertionError(f"accepted: {argv}")


class TestKvAllocModeFlag(CustomTestCase):
    @classmethod
    def setUpClass(cls):
        load_plugins()  # as launch_server does before it parses the command line

    def test_fields_are_published_with_memory(self):
        self.assertIn(KvAlloc, ServerArgs._NAMESPACES)
        self.assertEqual(ServerArgs._NS_BY_FIELD["kv_alloc_mode"], "memory")

    def test_unset_by_default(self):
        args = _parse()
        self.assertIsNone(args.kv_alloc_mode)
        self.assertIsNone(args.kv_segment_tokens)

    def test_server_info_shows_the_mode_asked_for(self):
        self.assertEqual(
            _parse().resolved_dict()["kv_alloc_mode"], "auto"
        )  # the default
        args = _parse("--kv-alloc-mode", "segmented", "--kv-segment-hold-off", "inf")
        info = args.resolved_dict()
        self.assertEqual(info["kv_alloc_mode"], "segmented")
        self.assertIsNone(info["kv_segment_hold_off"])  # JSON has no infinity

    def test_each_mode_parses(self):
        for mode in ("static", "segmented", "auto"):
            self.assertEqual(_parse("--kv-alloc-mode", mode).kv_alloc_mode, mode)

    def test_unknown_mode_is_an_argparse_error(self):
        code, err = _exit_code("--kv-alloc-mode", "bogus")
        self.assertEqual(code, 2)
        self.assertIn("--kv-alloc-mode", err)

    def test_segment_tokens_are_checked(self):
        # static: the segment is not sized against the model's KV (no config to read)
        args = _parse("--kv-alloc-mode", "static", "--kv-segment-tokens", "16384")
        self.assertEqual(args.kv_segment_tokens, 16384)
        code, err = _exit_code("--kv-segment-tokens", "0")
        self.assertEqual(code, 2)
        self.assertIn("--kv-segment-tokens", err)

    def test_a_context_that_is_not_positive_is_refused_where_the_mode_acts(self):
        code, err = _exit_code("--kv-alloc-mode", "segmented", "--context-length", "-5")
        self.assertEqual(code, 2)
        self.assertIn("--context-length", err)


if __name__ == "__main__":
    unittest.main()
