"""`--kv-alloc-mode` on upstream's own command line and on the ServerArgs record."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
from sglang.srt.mem_cache.segmented import modes

LAUNCH = [sys.executable, "-m", "sglang.launch_server"]
TypedRuns = dict[str, subprocess.CompletedProcess[str]]
# The commands as a user types them, each in a fresh interpreter (the bootstrap, the plugin
# loading and upstream's argparse all take part). Each one spends ~12 s importing upstream,
# so they run side by side, once per module.
TYPED: dict[str, tuple[list[str], dict[str, str]]] = {
    "help": (["--help"], {}),
    "bogus_mode": (["--model-path", "unused", "--kv-alloc-mode", "bogus"], {}),
    "nan_hold_off": (["--model-path", "unused", "--kv-segment-hold-off", "nan"], {}),
    "bogus_env": (["--model-path", "unused"], {modes.MODE_ENV: "bogus"}),
    "negative_context": (
        ["--model-path", "unused", "--kv-alloc-mode", "auto", "--context-length", "-5"],
        {},
    ),
}
# A fresh interpreter that loads no plugin: the fields are there all the same, for the CLI,
# `sglang.Engine` keywords and the record (the bootstrap declares them at `server_args` import).
FIELDS_WITHOUT_PLUGINS = (
    "from sglang.srt.server_args import ServerArgs\n"
    "from sglang.srt.arg_groups.fields.kv_alloc import KvAlloc\n"
    "record = ServerArgs(model_path='m', kv_alloc_mode='segmented', kv_budget_bytes=1 << 30)\n"
    "print(KvAlloc in ServerArgs._NAMESPACES, ServerArgs._NS_BY_FIELD['kv_alloc_mode'],\n"
    "      record.kv_alloc_mode, record.kv_budget_bytes)\n"
)


@pytest.fixture(scope="module")
def typed() -> TypedRuns:
    """Every command of TYPED (and the engine import check) run concurrently."""
    commands = {name: (LAUNCH + argv, env) for name, (argv, env) in TYPED.items()}
    commands["fields"] = ([sys.executable, "-c", FIELDS_WITHOUT_PLUGINS], {})
    procs = {
        name: subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        for name, (cmd, env) in commands.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


def test_help_lists_every_mode_and_every_setting(typed: TypedRuns) -> None:
    result = typed["help"]
    assert result.returncode == 0, result.stderr
    assert "--kv-alloc-mode {static,segmented,auto}" in result.stdout
    words = " ".join(result.stdout.split())
    for mode in modes.MODES:
        assert f"{mode}: " in words
    for flag in ("--kv-segment-tokens", "--kv-segment-hold-off", "--kv-idle-cache-tokens"):
        assert flag in words
    for flag in ("--kv-budget", "--kv-budget-bytes", "--kv-budget-floor", "--kv-budget-limit"):
        assert flag in words


def test_unknown_mode_is_an_argparse_error(typed: TypedRuns) -> None:
    result = typed["bogus_mode"]
    assert result.returncode == 2
    assert "invalid choice: 'bogus'" in result.stderr
    assert "static" in result.stderr and "segmented" in result.stderr and "auto" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_mode_is_available() -> None:
    """No mode may silently run as another: all three have their start-up path."""
    assert modes.IMPLEMENTED_MODES == frozenset(modes.MODES)
    for mode in modes.MODES:
        assert modes.validate_mode(mode) == mode


def _load_plugins() -> None:
    from sglang.srt.plugins import load_plugins

    load_plugins()


def test_parsed_flag_lands_on_the_record_and_survives_pickling() -> None:
    _load_plugins()
    from sglang.srt.server_args import prepare_server_args

    server_args = prepare_server_args(["--model-path", "m", "--kv-alloc-mode", "static"])
    assert getattr(server_args, modes.SERVER_ARGS_ATTR) == "static"
    clone = pickle.loads(pickle.dumps(server_args))
    assert getattr(clone, modes.SERVER_ARGS_ATTR) == "static"
    assert modes.requested_mode(clone) == "static"


def test_the_settings_are_fields_of_upstreams_record_in_every_process(typed: TypedRuns) -> None:
    """Declared as upstream declares fields (a namespace Struct collected into `ServerArgs`),
    published in the `memory` namespace, whether or not a plugin was loaded."""
    result = typed["fields"]
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "memory", "segmented", str(1 << 30)]


def test_the_fields_are_collected_once_and_only_into_server_args() -> None:
    """Where the series is applied, upstream lists `KvAlloc` itself: not added twice (upstream
    raises on a field declared by two namespaces); other records are left as they are."""
    from sglang.srt.arg_groups.fields import collect_input_fields
    from sglang.srt.arg_groups.fields.kv_alloc import KvAlloc
    from sglang.srt.arg_groups.fields.memory import Memory
    from sglang.srt.arg_groups.fields.serving import Serving

    from sglang_kvalloc.upstream.fields import with_kv_alloc_fields

    collect = with_kv_alloc_fields(lambda sources: list(sources))
    assert collect([Memory]) == [Memory, KvAlloc]
    assert collect([Memory, KvAlloc]) == [Memory, KvAlloc]
    assert collect([Serving]) == [Serving]
    # The function server_args called is the one that adds the fields.
    assert collect_input_fields.__wrapped__ is not None


def test_environment_is_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(modes.MODE_ENV, "segmented")
    assert modes.requested_mode(object()) == "segmented"
    monkeypatch.delenv(modes.MODE_ENV)
    assert modes.requested_mode(object()) == modes.DEFAULT_MODE


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--kv-segment-tokens", "0"], "segment size must be positive"),
        (["--kv-segment-tokens", "-4"], "segment size must be positive"),
        (["--kv-segment-hold-off", "nan"], "must be >= 0 seconds"),
        (["--kv-segment-hold-off", "-1"], "must be >= 0 seconds"),
        (["--kv-idle-cache-tokens", "-1"], "must be >= 0 tokens"),
        (["--kv-segment-tokens", "1000000000000000"], "larger than any KV pool"),
        (["--page-size", "16", "--kv-segment-tokens", "100"], "not a multiple of --page-size"),
        (["--max-total-tokens", "8192", "--kv-segment-tokens", "10000"], "larger than the KV"),
    ],
)
def test_bad_segment_settings_are_argparse_errors(
    tiny_model, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rejected while the command line is parsed, before anything starts: exit 2, one line."""
    _load_plugins()
    from sglang.srt.server_args import prepare_server_args

    argv = ["--model-path", str(tiny_model), "--device", "cpu", "--kv-alloc-mode", "segmented"]
    with pytest.raises(SystemExit) as exit_info:
        prepare_server_args(argv + extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kv_alloc_mode": "segmented", "context_length": -5}, "must be a positive number"),
        ({"kv_alloc_mode": "static", "kv_budget": "gpu0"}, "--kv-budget shares KV memory"),
        ({"kv_alloc_mode": "segmented", "kv_segment_tokens": "0"}, "must be positive"),
    ],
)
def test_a_record_built_without_the_parser_is_checked_as_a_resolution_step(
    tiny_model, fields: dict[str, object], message: str
) -> None:
    """`sglang.Engine(...)` builds its record without the parser: upstream's resolution
    pipeline refuses it in its own step, `handle_kv_alloc`, right after the memory settings
    (the plugin wraps `handle_gpu_memory_settings`; the series adds the step), one line."""
    import traceback

    _load_plugins()
    from sglang.srt.server_args import ServerArgs

    record = ServerArgs(model_path=str(tiny_model), device="cpu", **fields)
    with pytest.raises(modes.KvAllocModeError, match=message) as refused:
        record.resolve_once()
    frames = [frame.name for frame in traceback.extract_tb(refused.value.__traceback__)]
    assert "run_resolution_pipeline" in frames and frames[-1] == "handle_kv_alloc", frames
    assert len(str(refused.value).splitlines()) == 1


def test_inf_hold_off_is_accepted_and_means_never() -> None:
    assert modes.parse_hold_off("inf") == float("inf")
    with pytest.raises(modes.KvAllocModeError, match="never give memory back"):
        modes.parse_hold_off("nan")


def test_nan_hold_off_exits_2_as_typed(typed: TypedRuns) -> None:
    result = typed["nan_hold_off"]
    assert result.returncode == 2
    assert "--kv-segment-hold-off must be >= 0 seconds" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_mode_in_the_environment_is_an_argparse_error(typed: TypedRuns) -> None:
    """One line, exit 2, no traceback, before anything loads (it used to end in a traceback
    from the scheduler process)."""
    result = typed["bogus_env"]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "SGLANG_KV_ALLOC_MODE='bogus' is not a --kv-alloc-mode" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_context_length_that_is_not_positive_is_an_argparse_error(typed: TypedRuns) -> None:
    result = typed["negative_context"]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--context-length must be a positive number of tokens, got -5" in result.stderr
    assert "Traceback" not in result.stderr


def test_values_given_as_engine_keywords_or_environment_follow_the_clis_rules(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`sglang.Engine(...)` keywords skip argparse: strings such as "40G" or "8192" mean what
    they mean on the command line, and a bad environment value is one line naming it."""
    import types

    record = types.SimpleNamespace(
        kv_segment_tokens="8192", kv_idle_cache_tokens="16", kv_budget="b", kv_budget_bytes="40G"
    )
    assert modes.segment_tokens(record) == 8192
    assert modes.idle_cache_tokens(record) == 16
    budget = modes.budget_settings(record)
    assert budget is not None and budget.total_bytes == 40 << 30
    monkeypatch.setenv(modes.SEGMENT_TOKENS_ENV, "eight")
    with pytest.raises(modes.KvAllocModeError, match=modes.SEGMENT_TOKENS_ENV):
        modes.segment_tokens(object())
    with pytest.raises(modes.KvAllocModeError, match="--kv-budget-bytes"):
        modes.budget_settings(types.SimpleNamespace(kv_budget="b", kv_budget_bytes="lots"))


def test_server_info_carries_a_hold_off_of_inf_as_json_can() -> None:
    """`--kv-segment-hold-off inf` (never give memory back) is a field now; upstream's
    `/server_info` serialises `resolved_dict()` with allow_nan=False and answered 500."""
    import json

    _load_plugins()
    from sglang.srt.server_args import prepare_server_args

    server_args = prepare_server_args(["--model-path", "m", "--kv-segment-hold-off", "inf"])
    assert server_args.kv_segment_hold_off == float("inf")
    shown = json.loads(json.dumps(server_args.resolved_dict(), allow_nan=False, default=str))
    assert shown["kv_segment_hold_off"] is None and shown["kv_alloc_mode"] == modes.DEFAULT_MODE
