"""What segmented mode covers on a GPU and what it refuses: every speculative runner that
overrides upstream's graph gate is gated; decode attention backends whose cuda-graph buffers
are not lazy, parallelism the ranks cannot agree across and features segmented mode does not
serve yet are refused at start in one line; the memory saver is served."""

from __future__ import annotations

import ast
import inspect
import textwrap
import types

import pytest
from sglang.srt.mem_cache.segmented import modes, pool_config, refusals
from sglang.srt.mem_cache.segmented.runtime import RUNTIME


def test_every_speculative_runner_that_overrides_the_gate_is_hooked() -> None:
    """A DecodeCudaGraphRunner subclass with its own can_run_graph would replay over the lazy
    buffers without committing them: every one of 0.5.23's CUDA runners must be listed."""
    import importlib
    import pkgutil

    import sglang.srt.speculative as speculative
    from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

    from sglang_kvalloc.upstream import plugin

    for module in pkgutil.iter_modules(speculative.__path__):
        if "cuda_graph" in module.name:
            importlib.import_module(f"{speculative.__name__}.{module.name}")

    def subclasses(cls: type) -> list[type]:
        return [s for c in cls.__subclasses__() for s in (c, *subclasses(c))]

    overriding = {
        f"{c.__module__}.{c.__qualname__}"
        for c in subclasses(DecodeCudaGraphRunner)
        if "can_run_graph" in c.__dict__ and c.__module__.startswith(speculative.__name__)
    }
    assert len(overriding) >= 5
    assert overriding == set(plugin.SPECULATIVE_GRAPHS) | set(plugin.GATED_BY_SUPER)
    hooked = {t for t, _, _ in plugin.hooks() if t.endswith(".can_run_graph")}
    assert {f"{r}.can_run_graph" for r in plugin.SPECULATIVE_GRAPHS} <= hooked
    # The others answer False or what the decode runner's (gated) can_run_graph answers.
    for name in plugin.GATED_BY_SUPER:
        module, _, cls = name.rpartition(".")
        source = textwrap.dedent(
            inspect.getsource(vars(importlib.import_module(module))[cls].can_run_graph)
        )
        returns = [n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Return)]
        assert returns and all(
            (isinstance(v, ast.Constant) and v.value is False)
            or ast.unparse(v) == "super().can_run_graph(forward_batch)"
            for v in returns
        ), name


def _gpu_configurator(model: str = "llama-3.1-8b", **flags) -> types.SimpleNamespace:
    import json
    from importlib import resources

    from sglang.srt.server_args import ServerArgs

    config = json.loads(
        resources.files("sglang_kvalloc.configs").joinpath(f"{model}.json").read_text()
    )
    from sglang_kvalloc.core import planner

    hf_config = types.SimpleNamespace(to_dict=lambda: config)
    return types.SimpleNamespace(
        device="cuda",
        server_args=ServerArgs(model_path="models/tiny-llama", device="cpu", **flags),
        model_config=types.SimpleNamespace(hf_config=hf_config),
        # upstream's: the model's attention is MLA (model_config.attention_arch)
        use_mla_backend=planner.model_spec_from_config(config).attention == "mla",
    )


@pytest.mark.parametrize(
    ("flags", "model", "uncovered"),
    [
        ({"attention_backend": "fa3"}, "llama-3.1-8b", None),
        ({"attention_backend": "triton"}, "llama-3.1-8b", None),
        ({"attention_backend": "flashinfer"}, "llama-4-scout-17b-16e", None),
        ({"attention_backend": "fa3"}, "deepseek-v3", None),  # fa3 serves MLA with page tables
        ({"attention_backend": "flashinfer"}, "deepseek-v3", "FlashInferMLAAttnBackend"),
        ({"attention_backend": "flashmla"}, "deepseek-v3", "'flashmla'"),
        ({"attention_backend": "trtllm_mha"}, "llama-3.1-8b", "'trtllm_mha'"),
        # The decode backend is what the decode graphs use.
        (
            {"prefill_attention_backend": "flashmla", "decode_attention_backend": "triton"},
            "llama-3.1-8b",
            None,
        ),  # fmt: skip
        (
            {"prefill_attention_backend": "triton", "decode_attention_backend": "flashmla"},
            "llama-3.1-8b",
            "'flashmla'",
        ),  # fmt: skip
        # No decode graphs, no graph buffers: any backend.
        ({"attention_backend": "flashmla", "disable_cuda_graph": True}, "deepseek-v3", None),
        (
            {"attention_backend": "flashmla", "cuda_graph_backend_decode": "disabled"},
            "deepseek-v3",
            None,
        ),  # fmt: skip
    ],
)
def test_backends_whose_graph_buffers_are_not_covered_are_named(flags, model, uncovered) -> None:

    found = refusals.uncovered_graph_backend(_gpu_configurator(model, **flags))
    if uncovered is None:
        assert found is None
    else:
        assert found is not None and uncovered in found


def test_segmented_refuses_an_uncovered_backend_in_one_line(monkeypatch) -> None:
    """Explicit segmented: a one-line KvAllocModeError naming the backend and the flags (the
    launcher prints it and exits); auto meets the same error where it opens the backings and
    falls back to static if static fits."""
    from sglang.srt.mem_cache.segmented import backing_choice

    monkeypatch.setattr(backing_choice, "open_backings", lambda device: None)
    with pytest.raises(modes.KvAllocModeError) as refused:
        pool_config.open_backings(_gpu_configurator("deepseek-v3", attention_backend="flashmla"))
    message = str(refused.value)
    assert "\n" not in message and "'flashmla'" in message
    assert "--attention-backend fa3 or triton" in message
    assert "--cuda-graph-backend-decode=disabled" in message
    pool_config.open_backings(_gpu_configurator("deepseek-v3", attention_backend="fa3"))
    # Off the GPU there are no graph buffers to cover.
    cpu = _gpu_configurator("deepseek-v3", attention_backend="flashmla")
    cpu.device = "cpu"
    assert refusals.uncovered_graph_backend(cpu) is None


@pytest.mark.parametrize(
    ("flags", "refused"),
    [
        ({"enable_dp_attention": True, "tp_size": 2, "dp_size": 2}, "--enable-dp-attention"),
        (
            {
                "enable_dp_attention": True,
                "tp_size": 2,
                "dp_size": 2,
                "cuda_graph_backend_decode": "disabled",
            },
            None,
        ),  # fmt: skip
        ({"pp_size": 2}, "--pp-size"),
        ({}, None),
    ],
)
def test_parallelism_segmented_cannot_agree_across_is_refused_in_one_line(
    monkeypatch, flags, refused
) -> None:
    """DP attention ranks choose graph or eager together before each forward, pipeline stages
    schedule apart; segmented agrees within attention TP only, so it refuses (auto then keeps
    static where static fits, as for any refusal from `_open_backings`)."""
    from sglang.srt.mem_cache.segmented import backing_choice

    monkeypatch.setattr(backing_choice, "open_backings", lambda device: None)
    configurator = _gpu_configurator("llama-3.1-8b", attention_backend="triton", **flags)
    if refused is None:
        pool_config.open_backings(configurator)
        return
    with pytest.raises(modes.KvAllocModeError) as error:
        pool_config.open_backings(configurator)
    assert "\n" not in str(error.value) and refused in str(error.value)
    assert "--kv-alloc-mode static" in str(error.value)


def test_the_memory_saver_is_served(monkeypatch) -> None:
    """Segmented mode releases its own memory with /release_memory_occupation (issue 35);
    torch_memory_saver keeps the weights and graphs."""
    from sglang.srt.mem_cache.segmented import backing_choice

    monkeypatch.setattr(backing_choice, "open_backings", lambda device: None)
    configurator = _gpu_configurator("llama-3.1-8b", attention_backend="triton")
    configurator.server_args.enable_memory_saver = True
    assert refusals.unsupported_feature(configurator, explicit_commits=True) is None
    pool_config.open_backings(configurator)


@pytest.mark.parametrize(
    ("flags", "env", "refused"),
    [
        ({"disaggregation_mode": "prefill"}, {}, "--disaggregation-mode prefill"),
        ({"disaggregation_mode": "decode"}, {}, "--disaggregation-mode decode"),
        ({"enable_hierarchical_cache": True}, {}, "--enable-hierarchical-cache"),
        ({}, {"SGLANG_MOONCAKE_CUSTOM_MEM_POOL": "NVLINK"}, "SGLANG_MOONCAKE_CUSTOM_MEM_POOL"),
    ],
)
def test_features_segmented_does_not_serve_yet_are_refused_in_one_line(
    monkeypatch, flags, env, refused
) -> None:
    """Each of these would go wrong without a word on a GPU (see
    refusals.unsupported_feature); auto then keeps static where static fits, as for every
    refusal from `_open_backings`."""
    from sglang.srt.mem_cache.segmented import backing_choice

    monkeypatch.setattr(backing_choice, "open_backings", lambda device: None)
    monkeypatch.setattr(RUNTIME, "backings", types.SimpleNamespace(faults_in=False))
    configurator = _gpu_configurator("llama-3.1-8b", attention_backend="triton")
    assert refusals.unsupported_feature(configurator, explicit_commits=True) is None
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name, value in flags.items():
        setattr(configurator.server_args, name, value)
    with pytest.raises(modes.KvAllocModeError) as error:
        pool_config.open_backings(configurator)
    message = str(error.value)
    assert "\n" not in message and refused in message and "--kv-alloc-mode static" in message
