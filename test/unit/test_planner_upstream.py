"""The planner against upstream 0.5.23's own functions, in-process, and the planner's claim to
need no torch.

The planner re-types upstream's formulas (it runs without upstream); here each is compared with
the upstream function it mirrors, so a drift fails a test instead of a user: the defaults of
`arg_groups/memory_hook.py` (chunked prefill size, decode cuda-graph max batch,
mem_fraction_static, for a CUDA device of each size class), the request slots, the row
headroom of req_to_token, the context length, the prefill graph sizes and the PP layer split.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from sglang_kvalloc.core import planner

MIB_SIZES = (16 * 1024, 24 * 1024, 40 * 1024, 81559, 143771, 192 * 1024)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each built-in config as a model directory upstream's ModelConfig can read."""
    out = {}
    for name in planner.builtin_model_names():
        folder = tmp_path_factory.mktemp(name)
        (folder / "config.json").write_text(json.dumps(planner.load_model_config(name)))
        out[name] = folder
    return out


def _upstream_memory_defaults(
    monkeypatch: pytest.MonkeyPatch, model: Path, gpu_mem_mib: int, **server_args: object
) -> tuple[int, int, float]:
    """chunked_prefill_size, decode max_bs and mem_fraction_static as upstream's
    `handle_gpu_memory_settings` resolves them for a CUDA device of ``gpu_mem_mib``."""
    import sglang.srt.utils
    from sglang.srt.arg_groups import memory_hook
    from sglang.srt.arg_groups.cuda_graph_hook import handle_cuda_graph_config
    from sglang.srt.arg_groups.overrides import resolving_view
    from sglang.srt.arg_groups.pipeline import run_hook
    from sglang.srt.server_args import ServerArgs

    # The CUDA device's figures: its memory, and the prefill graph backend CUDA defaults to.
    monkeypatch.setattr(memory_hook, "get_device_memory_capacity", lambda device=None: gpu_mem_mib)
    monkeypatch.setattr(sglang.srt.utils, "is_cuda", lambda: True)
    record = ServerArgs(model_path=str(model), device="cuda", **server_args)
    run_hook(handle_cuda_graph_config, record)
    run_hook(memory_hook.handle_gpu_memory_settings, record)
    view = resolving_view(record)
    return (
        view.chunked_prefill_size,
        view.cuda_graph_config.decode.max_bs,
        view.mem_fraction_static,
    )


def _planner_memory_defaults(
    name: str,
    gpu_mem_mib: int,
    tp: int,
    max_running_requests: int | None,
    disabled: bool,
    enable_multimodal: bool | None,
) -> tuple[int, int, float]:
    spec = planner.model_spec_from_config(planner.load_model_config(name))
    multimodal = planner.serves_multimodal(spec, enable_multimodal)
    max_bs = planner.default_cuda_graph_max_bs(gpu_mem_mib, tp, max_running_requests)
    fraction = planner.auto_mem_fraction_static(
        gpu_mem_mib=gpu_mem_mib,
        tp=tp,
        pp=1,
        cuda_graph_max_bs=max_bs,
        use_mla=spec.attention == "mla",
        cuda_graph=not disabled,
        vision_layers=spec.vision_layers if multimodal else 0,
        vision_hidden=spec.vision_hidden,
        prefill_cuda_graph=planner.keeps_prefill_cuda_graphs(spec, enable_multimodal),
    )
    return planner.default_chunked_prefill_size(gpu_mem_mib), max_bs, fraction


@pytest.mark.parametrize(
    ("name", "enable_multimodal"),
    [
        ("llama-3.1-8b", None),
        ("deepseek-v3", None),
        ("llama-4-scout-17b-16e", None),  # upstream serves it text-only by default
        ("llama-4-scout-17b-16e", True),  # vision served: upstream's VLM reduction applies
    ],
)
def test_memory_defaults_equal_upstreams_handle_gpu_memory_settings(
    monkeypatch: pytest.MonkeyPatch,
    model_dirs: dict[str, Path],
    name: str,
    enable_multimodal: bool | None,
) -> None:
    differ = []
    for gpu_mem_mib in MIB_SIZES:
        for tp in (1, 8):
            for max_running_requests in (None, 64):
                for disabled in (False, True):
                    theirs = _upstream_memory_defaults(
                        monkeypatch,
                        model_dirs[name],
                        gpu_mem_mib,
                        tp_size=tp,
                        max_running_requests=max_running_requests,
                        disable_cuda_graph=disabled,
                        enable_multimodal=enable_multimodal,
                    )
                    ours = _planner_memory_defaults(
                        name, gpu_mem_mib, tp, max_running_requests, disabled, enable_multimodal
                    )
                    if ours != theirs:
                        case = (gpu_mem_mib, tp, max_running_requests, disabled)
                        differ.append((case, ours, theirs))
    assert differ == []


def test_request_slots_equal_upstreams_resolve_max_num_reqs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sglang.srt.mem_cache import kv_cache_configurator

    resolve = kv_cache_configurator.KVCacheConfigurator.resolve_max_num_reqs
    for capacity in (1_000, 65_536, 800_000, 10_000_000):
        for context in (2_048, 131_072, 10_000_000):
            for requested in (None, 1, 64, 5_000):
                for dp in (1, 4):
                    schedule = types.SimpleNamespace(max_running_requests=requested)
                    monkeypatch.setattr(kv_cache_configurator, "get_schedule", lambda s=schedule: s)
                    configurator = types.SimpleNamespace(
                        model_config=types.SimpleNamespace(context_len=context),
                        attn_dp_size=dp,
                        mambaish_config=None,
                    )
                    ours = planner.resolve_max_num_reqs(
                        capacity, context, max_running_requests=requested, attn_dp=dp
                    )
                    assert ours == resolve(configurator, capacity), (capacity, context, requested)


@pytest.mark.parametrize("draft_tokens", [0, 4])
def test_row_headroom_equals_upstreams_req_to_token_extra(
    monkeypatch: pytest.MonkeyPatch, draft_tokens: int
) -> None:
    from sglang.srt.mem_cache import allocation_sizing

    monkeypatch.setattr(
        allocation_sizing, "max_speculative_num_draft_tokens", lambda: draft_tokens or None
    )
    monkeypatch.setattr(allocation_sizing, "get_alloc_page_size", lambda: 1)
    spec = types.SimpleNamespace(speculative_algorithm="EAGLE" if draft_tokens else None)
    monkeypatch.setattr(allocation_sizing, "get_spec", lambda: spec)
    upstream = allocation_sizing.get_req_to_token_extra_context_len()
    assert planner.req_to_token_extra(draft_tokens) == upstream


def test_context_length_equals_upstreams_get_context_length() -> None:
    from sglang.srt.utils.hf_transformers.common import get_context_length

    configs = [planner.load_model_config(name) for name in planner.builtin_model_names()]
    configs += [
        {"max_position_embeddings": 4096, "rope_scaling": {"factor": 4.0}},
        {"max_position_embeddings": 4096, "rope_scaling": {"factor": 8.0, "rope_type": "llama3"}},
        {
            "max_position_embeddings": 4096,
            "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 1024},
        },
        {"seq_length": 8192, "max_position_embeddings": 4096},
        {},
    ]
    for cfg in configs:
        text = cfg.get("text_config") or cfg
        attrs = types.SimpleNamespace(**{k: text.get(k) for k in text})
        assert planner.derive_context_length(text) == get_context_length(attrs), cfg


def test_prefill_graph_sizes_and_pp_layers_equal_upstreams() -> None:
    from sglang.srt.arg_groups.cuda_graph_hook import generate_prefill_cuda_graph_batch_sizes
    from sglang.srt.distributed.utils import get_pp_indices

    for max_bs in (0, 4, 100, 2048, 8192, 16384, 20000):
        assert planner.prefill_cuda_graph_sizes(max_bs) == generate_prefill_cuda_graph_batch_sizes(
            max_bs
        )
    for layers in (1, 32, 61, 80):
        for pp in (1, 2, 3, 8):
            if pp <= layers:
                for rank in range(pp):
                    assert planner.pp_layer_range(layers, rank, pp) == tuple(
                        get_pp_indices(layers, rank, pp)
                    )


TORCH_BLOCKED = """
import sys
for name in ("torch", "numpy", "sglang"):
    sys.modules[name] = None  # any import of them raises ImportError
from sglang_kvalloc.core.planner import GIB, PlanInputs, builtin_model_names, plan
from sglang_kvalloc.plan import main
for name in builtin_model_names():
    result = plan(PlanInputs(model=name, device_memory_bytes=141 * GIB, tp=8, pp=2,
                             context_length=10_000_000, allow_longer_context=True))
    assert result.max_total_num_tokens > 0, name
main(["--model-config", "llama-3.1-8b", "--gpu", "h100", "--json"])
"""


def test_the_planner_runs_with_torch_blocked() -> None:
    """`core/planner` and the CLI import and plan with torch, numpy and sglang unavailable."""
    done = subprocess.run(
        [sys.executable, "-c", TORCH_BLOCKED], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model"] == "llama-3.1-8b"


def test_text_only_architectures_are_upstreams_list() -> None:
    """`MM_DISABLED_ARCHS` restates the list `ModelConfig.__init__` keeps inline (no name to
    import), read here from upstream's own source."""
    import inspect
    import re

    from sglang.srt.configs.model_config import ModelConfig

    source = inspect.getsource(ModelConfig.__init__)
    listed = re.search(r"mm_disabled_models = \[(.*?)\]", source, re.S)
    assert listed, "upstream's mm_disabled_models list moved"
    assert set(re.findall(r'"(\w+)"', listed.group(1))) == planner.MM_DISABLED_ARCHS
