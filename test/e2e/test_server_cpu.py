"""The CPU server on the tiny model (the session's shared static server): answers, matches HF
greedy tokens, reports the mode."""

from __future__ import annotations

import pytest

from conftest import ReferenceStatic, hf_greedy, parity_prompts
from sglang_kvalloc_harness.serving import LocalServer, http_json

MAX_NEW_TOKENS = 12


@pytest.fixture
def static_server(reference_static: ReferenceStatic) -> LocalServer:
    return reference_static.server


def test_generate_and_completions_answer(static_server: LocalServer) -> None:
    out = static_server.generate(
        {
            "text": "Hello world",
            "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True},
        }
    )
    assert out["meta_info"]["completion_tokens"] == 8
    assert isinstance(out["text"], str) and out["text"]
    completion = http_json(
        static_server.url + "/v1/completions",
        {"model": "default", "prompt": "Hello world", "max_tokens": 6, "temperature": 0},
    )
    assert completion["choices"][0]["text"]
    assert completion["usage"]["completion_tokens"] == 6


def test_greedy_tokens_equal_hf(static_server: LocalServer, hf_model) -> None:
    prompts = parity_prompts(hf_model.config.vocab_size)
    assert max(len(p) for p in prompts) > 2000
    for prompt in prompts:
        out = static_server.generate(
            {
                "input_ids": prompt,
                "sampling_params": {
                    "max_new_tokens": MAX_NEW_TOKENS,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            }
        )
        assert out["output_ids"] == hf_greedy(hf_model, prompt, MAX_NEW_TOKENS), len(prompt)


def test_mode_reaches_the_scheduler(static_server: LocalServer) -> None:
    info = static_server.server_info()
    assert info["kv_alloc_mode"] == "static"
    scheduler_view = info["internal_states"][0]["kv_alloc"]
    assert scheduler_view["requested_mode"] == "static"
    assert scheduler_view["mode"] == "static"
    assert scheduler_view["token_capacity"] == 65536
    assert scheduler_view["max_running_requests"] == 4
    assert "KV allocation mode: static" in static_server.log()
