"""The RL loop as rollout frameworks (verl, slime, OpenRLHF) run it, on the CPU engine with the
real model in segmented mode (issue 35): generate; release the memory occupation (kv_cache,
then weights); update the weights from disk and from tensors; resume; generate again. Twenty
cycles, alternating two sets of weights: tokens equal HF transformers' for the weights in
force, committed KV goes to 0 at every release and rises again only with use, and nothing
grows from cycle to cycle (resident memory, open files, segments). A request sent while the
memory is released waits and completes after resume."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sglang_kvalloc_harness.serving import LocalServer, http_json

CYCLES = 20
NEW_TOKENS = 8
QUESTIONS = ["What is the capital of France?", "Name three primary colors."]
ARGS = ["--kv-alloc-mode", "segmented", "--kv-segment-tokens", "128", "--dtype", "float32",
        "--max-total-tokens", "16384"]  # fmt: skip
STRICT = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}
PERTURBED = "model.layers.29.mlp.down_proj.weight"  # the last layer's MLP output


@pytest.fixture(scope="module")
def weights(real_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two sets of weights (the model, and a copy with its last MLP output scaled), the
    prompts, and HF's greedy tokens for each set."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(real_model))
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )  # fmt: skip
        for q in QUESTIONS
    ]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    model = AutoModelForCausalLM.from_pretrained(str(real_model), dtype=torch.float32).eval()
    expected: dict[str, list[list[int]]] = {"a": _greedy_hf(model, prompts)}
    other = tmp_path_factory.mktemp("weights") / "b"
    shutil.copytree(real_model, other)
    with torch.no_grad():
        model.get_parameter(PERTURBED).mul_(1.5)
    model.save_pretrained(other)
    expected["b"] = _greedy_hf(model, prompts)
    assert expected["a"] != expected["b"]  # the update is visible in the tokens
    tensor = model.get_parameter(PERTURBED).detach().clone()
    return {"paths": {"a": real_model, "b": other}, "prompts": prompts, "expected": expected,
            "tensor_b": tensor}  # fmt: skip


def _greedy_hf(model: Any, prompts: list[list[int]]) -> list[list[int]]:
    import torch

    out = []
    with torch.no_grad():
        for ids in prompts:
            full = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
            out.append(full[0, len(ids) :].tolist())
    return out


@pytest.fixture(scope="module")
def server(real_model: Path) -> Any:
    with LocalServer(real_model, args=ARGS, env=STRICT) as running:
        yield running


def _generate(server: LocalServer, prompts: list[list[int]]) -> list[list[int]]:
    params = {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    return [
        server.generate({"input_ids": p, "sampling_params": params})["output_ids"] for p in prompts
    ]


def _segments(server: LocalServer) -> dict[str, Any]:
    return server.server_info()["internal_states"][0]["kv_alloc"]["segments"]


def _scheduler(server: LocalServer) -> Any:
    """The scheduler process: the server's process that holds the most memory."""
    import psutil

    processes = [psutil.Process(pid) for pid in server.pids()]
    return max(processes, key=lambda p: p.memory_info().rss)


def _post(server: LocalServer, path: str, payload: dict[str, Any]) -> Any:
    return http_json(server.url + path, payload, timeout=600)


def _update_from_tensor(server: LocalServer, name: str, tensor: Any) -> Any:
    import torch.multiprocessing
    from sglang.srt.utils.common import MultiprocessingSerializer

    torch.multiprocessing.set_sharing_strategy("file_system")  # by name, across processes
    import requests

    payload = MultiprocessingSerializer.serialize([(name, tensor)], output_str=True)
    response = requests.post(server.url + "/update_weights_from_tensor",
                             json={"serialized_named_tensors": [payload]}, timeout=600)  # fmt: skip
    return response.json()


def test_the_rl_loop_gives_the_kv_memory_back_and_serves_the_new_weights(
    server: LocalServer, weights: dict[str, Any]
) -> None:
    prompts, expected = weights["prompts"], weights["expected"]
    current = "a"
    assert _generate(server, prompts) == expected[current]
    scheduler = _scheduler(server)
    at_release: list[dict[str, int]] = []
    waited: dict[str, Any] = {}
    for cycle in range(CYCLES):
        busy = _segments(server)["committed_bytes"]
        assert busy > 0
        rss_busy = scheduler.memory_info().rss
        _post(server, "/release_memory_occupation", {"tags": ["kv_cache"]})
        released = _segments(server)
        assert released["committed_bytes"] == 0 and released["committed_segments"] == 0
        at_release.append({"rss": scheduler.memory_info().rss, "fds": scheduler.num_fds(),
                           "freed": rss_busy - scheduler.memory_info().rss})  # fmt: skip
        _post(server, "/release_memory_occupation", {"tags": ["weights"]})
        current = "b" if current == "a" else "a"
        update = _post(server, "/update_weights_from_disk",
                       {"model_path": str(weights["paths"][current])})  # fmt: skip
        assert update["success"], update
        if current == "b":  # the perturbed tensor again, from the trainer's memory
            assert _post(server, "/begin_weight_update", {})["success"]
            update = _update_from_tensor(server, PERTURBED, weights["tensor_b"])
            assert update["success"], update
            assert _post(server, "/end_weight_update", {})["success"]
        late = None
        if cycle == 1:  # a request while released waits, and completes after resume
            late = threading.Thread(target=lambda: waited.update(out=_generate(server, prompts)))
            late.start()
            time.sleep(3)
            assert "out" not in waited and _segments(server)["committed_bytes"] == 0
        _post(server, "/resume_memory_occupation", {"tags": ["weights"]})
        _post(server, "/resume_memory_occupation", {"tags": ["kv_cache"]})
        if late is not None:
            late.join(timeout=300)
            assert waited["out"] == expected[current]
        assert _generate(server, prompts) == expected[current], f"cycle {cycle}, {current}"
    first, last = at_release[1], at_release[-1]
    assert last["rss"] - first["rss"] < 64 << 20, at_release  # nothing grows
    assert last["fds"] <= first["fds"] + 4, at_release
    assert min(r["freed"] for r in at_release) > 0  # the memory really went back each time
    assert "Memory occupation released (kv_cache)" in server.log()
    assert _segments(server)["commit_failures"] == 0
