"""`--kv-alloc-mode auto` at server start: clamp, decide, report; upstream where it fits."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from conftest import REFERENCE_STATIC_ARGS, ReferenceStatic, parity_prompts
from sglang_kvalloc_harness.serving import LocalServer, side_by_side

OVERRIDE = {"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"}


@pytest.fixture(scope="module")
def auto_servers(tiny_model: Path) -> Iterator[dict[str, Any]]:
    """This file's servers, launched at once: two that serve (paused until asked) and two that
    stop during start-up (their exit codes and logs)."""
    serving = {
        "clamped": LocalServer(
            tiny_model,
            args=["--kv-alloc-mode", "auto", "--context-length", "10000000"]
            + ["--max-total-tokens", "8192", "--dtype", "float32"],
            env=OVERRIDE,
        ),
        # The shared static server's flags, but the mode.
        "like_reference": LocalServer(
            tiny_model, args=["--kv-alloc-mode", "auto", *REFERENCE_STATIC_ARGS[2:]]
        ),
    }
    stopping = {
        "static_above_max": LocalServer(
            tiny_model,
            args=["--kv-alloc-mode", "static", "--context-length", "10000000"]
            + ["--max-total-tokens", "8192"],
        ),
        "auto_with_hicache": LocalServer(
            tiny_model,
            args=["--kv-alloc-mode", "auto", "--context-length", "10000000"]
            + ["--max-total-tokens", "8192", "--enable-hierarchical-cache"],
            env=OVERRIDE,
        ),
    }
    with ThreadPoolExecutor(len(stopping)) as pool:
        exits = [pool.submit(server.wait_exit, 300) for server in stopping.values()]
        with side_by_side(serving.values()):
            codes = [future.result() for future in exits]
            stopped = {
                name: (code, server.log())
                for (name, server), code in zip(stopping.items(), codes, strict=True)
            }
            yield {**serving, "stopped": stopped}


def test_auto_clamps_10m_context_and_serves(auto_servers: dict[str, Any]) -> None:
    with auto_servers["clamped"].awake() as server:
        log = server.log()
        assert "WARNING" in log or "clamped" in log
        clamp_lines = [line for line in log.splitlines() if "clamped to 8192" in line]
        assert clamp_lines and "10000000" in clamp_lines[0]
        info = server.server_info()
        assert info["kv_alloc_mode"] == "auto"
        assert info["context_length"] == 8192
        kv = info["internal_states"][0]["kv_alloc"]
        assert kv["requested_mode"] == "auto"
        assert kv["mode"] == "segmented"
        assert kv["requested_context_length"] == 10_000_000
        assert kv["effective_context_length"] == 8192
        assert kv["token_capacity"] == 8192
        assert "% of the" in kv["reason"]
        # The scheduler clamped (the launcher knows no pool): its handshake brought the clamp
        # to the tokenizer, which /v1/models reports.
        assert "the tokenizer serves the context length the scheduler clamped to, 8192" in log
        with urllib.request.urlopen(f"{server.url}/v1/models", timeout=30) as response:
            assert json.load(response)["data"][0]["max_model_len"] == 8192
        out = server.generate(
            {
                "text": "Hello world",
                "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
            }
        )
        assert out["meta_info"]["completion_tokens"] == 6
        # A request longer than the clamped context is refused as upstream does; still up.
        try:
            refused = server.generate(
                {"input_ids": [5] * 9000, "sampling_params": {"max_new_tokens": 1}}
            )
            assert refused["meta_info"]["finish_reason"]["type"] == "abort", refused
        except urllib.error.HTTPError as err:
            assert err.code == 400
        again = server.generate(
            {
                "text": "Hello",
                "sampling_params": {"max_new_tokens": 2, "temperature": 0, "ignore_eos": True},
            }
        )
        assert again["meta_info"]["completion_tokens"] == 2


def _served(server: LocalServer, prompts: list[list[int]]) -> list[list[int]]:
    outs = []
    for prompt in prompts:
        out = server.generate(
            {
                "input_ids": prompt,
                "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True},
            }
        )
        outs.append(out["output_ids"])
    return outs


def test_auto_is_upstream_static_where_static_costs_nothing(
    auto_servers: dict[str, Any], reference_static: ReferenceStatic
) -> None:
    """Few request slots and a short context: context-scaled tables are tiny, auto = static
    (the shared static server has the same flags but the mode)."""
    assert REFERENCE_STATIC_ARGS[:2] == ["--kv-alloc-mode", "static"]
    prompts = parity_prompts(2048)[:3]
    static_server = reference_static.server
    static_kv = static_server.server_info()["internal_states"][0]["kv_alloc"]
    static_out = _served(static_server, prompts)
    static_server.pause()  # not to busy-poll a core while the auto server serves
    with auto_servers["like_reference"].awake() as auto_server:
        auto_kv = auto_server.server_info()["internal_states"][0]["kv_alloc"]
        auto_out = _served(auto_server, prompts)
        assert "clamped" not in auto_server.log()
    assert auto_kv["mode"] == "static"
    assert "segments" not in auto_kv
    for key in ("token_capacity", "max_running_requests", "req_to_token_bytes"):
        assert auto_kv[key] == static_kv[key], key
    assert auto_out == static_out


def test_explicit_mode_above_model_max_gets_upstreams_error(auto_servers: dict[str, Any]) -> None:
    """Only auto clamps; an explicit mode keeps upstream's refusal (auto's clamp is tested with
    the newcomer's commands)."""
    code, log = auto_servers["stopped"]["static_above_max"]
    assert code != 0
    assert "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN" in log


def test_auto_stays_static_where_a_feature_refuses_segmented(auto_servers: dict[str, Any]) -> None:
    """auto at 10M with a feature segmented mode refuses (here --enable-hierarchical-cache):
    its one decision line says static, and why. Upstream's HiCache then pins its host pool
    through CUDA, so on this CPU machine the server stops there, after the decision (upstream's
    own limit; on a GPU it serves)."""
    code, log = auto_servers["stopped"]["auto_with_hicache"]
    decisions = [line for line in log.splitlines() if "--kv-alloc-mode auto chose" in line]
    assert len(decisions) == 1, log[-3000:]
    assert "chose static" in decisions[0]
    assert "--enable-hierarchical-cache" in decisions[0]
    assert decisions[0].endswith("static fits, so static")
    assert "KV allocation mode: static (requested auto" in log
    assert code != 0 and "NVIDIA driver" in log  # upstream's HiCache host pool, on the CPU
