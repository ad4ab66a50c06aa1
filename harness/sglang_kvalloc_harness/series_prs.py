"""The upstream PR series' pull requests, in merge order: what each is about, the plugin's
hooks it turns into edits, the modules it carries besides their import closure, the lines it
writes inline elsewhere, and its tests in upstream's form (``upstream_tests/``).

`series.py` plans and applies them.
"""

from __future__ import annotations

from dataclasses import dataclass

from sglang_kvalloc_harness.series_edits import Insertion, Part

IN_TREE = "in_tree/sglang/"  # package-relative folder of the files at their upstream paths
# The decorator the functions whose AROUND hook has no inline form yet are decorated with.
DECORATOR_MODULE = IN_TREE + "srt/plugins/hook_decorator.py"
FIELDS = IN_TREE + "srt/arg_groups/fields/kv_alloc.py"  # the flags, declared as upstream's
POOL_CONFIG = IN_TREE + "srt/mem_cache/segmented/pool_config.py"  # the mode decided
ROW_ROOM = IN_TREE + "srt/mem_cache/segmented/row_room.py"
GRAPH_LAYOUTS = IN_TREE + "srt/mem_cache/segmented/graph_layouts.py"
AUTO_RULE = "# `auto`'s choice between static and segmented, by the same share."
AUTO_GRAPH_BYTES = (
    "# What static mode allocates of these buffers at the context, which `auto` weighs."
)
AFTER_AUTO = "    mode = modes.SEGMENTED if request.mode == modes.SEGMENTED else modes.STATIC"


@dataclass(frozen=True)
class PullRequest:
    number: int
    slug: str
    title: str
    summary: str
    # Hook functions of upstream/plugin.py this PR turns into edits: "module.function" or
    # "module.*", relative to sglang_kvalloc.upstream.
    hooks: tuple[str, ...]
    # Modules carried here even if no hook of this PR imports them (paths in the package).
    files: tuple[str, ...] = ()
    insertions: tuple[Insertion, ...] = ()
    # Its tests in upstream's form: paths under upstream_tests/ (upstream's test/).
    tests: tuple[str, ...] = ()
    # Its docs page in upstream's layout: paths under upstream_docs/ (upstream's docs/).
    docs: tuple[str, ...] = ()
    # Lines of files an earlier PR carries that come with this PR.
    parts: tuple[Part, ...] = ()


SERIES: tuple[PullRequest, ...] = (
    PullRequest(
        1,
        "kv-alloc-mode-flag",
        "--kv-alloc-mode on ServerArgs and Engine",
        "The flag, its companions and their checks; static is upstream unchanged.",
        ("kv_alloc_hook.*",),
        (FIELDS,),
        (
            # The fields are declared as upstream declares fields: a namespace Struct listed
            # where ServerArgs is assembled (upstream/fields.py does this in the plugin).
            Insertion(
                "srt/server_args.py",
                "from sglang.srt.arg_groups.fields.lora import (",
                ("from sglang.srt.arg_groups.fields.kv_alloc import KvAlloc",),
            ),
            Insertion(
                "srt/server_args.py",
                "    Memory,",
                ("    KvAlloc,",),
                after=True,
                within="_INPUT_NAMESPACES = [",
            ),
            # The checks a field's type cannot make: a resolution step of their own, right
            # after the memory settings' (the plugin wraps that step: cli.RESOLUTION_STEP).
            Insertion(
                "srt/arg_groups/pipeline.py",
                "    run_hook(handle_gpu_memory_settings, server_args)",
                (
                    "",
                    "    from sglang.srt.arg_groups.kv_alloc_hook import handle_kv_alloc",
                    "",
                    "    run_hook(handle_kv_alloc, server_args)",
                ),
                after=True,
            ),
            Insertion(
                "srt/arg_groups/resolution_hooks.py",
                '        "handle_gpu_memory_settings",',
                ('        "handle_kv_alloc",',),
                after=True,
            ),
        ),
        ("registered/unit/server_args/test_kv_alloc_mode_flag.py",),
        docs=("advanced_features/kv_alloc_mode.md",),
    ),
    PullRequest(
        2,
        "segmented-kv-mode",
        "Segmented mode decided where the KV pool is sized",
        "Opens the device's backing where upstream sizes the KV pool, refuses in one line "
        "what segmented mode cannot serve, and keeps room for what it commits at run time.",
        (
            "pool_config.mode_decided",
            "scheduler_request.*",
            "pool_config.kv_budget_bytes",
        ),
        tests=("registered/unit/mem_cache/test_segmented_mode_decision.py",),
        docs=("advanced_features/segmented_kv_mode.md",),
    ),
    PullRequest(
        3,
        "lazy-req-to-token",
        "req_to_token reserved whole, its rows committed as requests use them",
        "Segmented mode's req_to_token (and a PD decode server's) over a reservation of "
        "the full shape: a row's used prefix is committed, a freed row given back.",
        ("req_pool_builders.*",),
        (
            IN_TREE + "srt/mem_cache/segmented/row_commits.py",
            IN_TREE + "srt/mem_cache/segmented/lazy_req_to_token.py",
            IN_TREE + "srt/mem_cache/segmented/lazy_decode_req_to_token.py",
        ),
        tests=("registered/unit/mem_cache/test_lazy_req_to_token.py",),
        docs=("advanced_features/lazy_context_tables.md",),
    ),
    PullRequest(
        4,
        "lazy-rope-cache",
        "RoPE caches grown with the positions in use in segmented mode",
        "The cos/sin caches keep the model's length and grow as positions reach past it "
        "(CPU), or sit at one address committed as positions reach it (CUDA).",
        ("rope.*",),
        tests=("registered/unit/layers/test_lazy_rope_cache.py",),
        docs=("advanced_features/lazy_rope_cache.md",),
    ),
    PullRequest(
        5,
        "segmented-page-allocator",
        "A page allocator that commits segments as pages are needed",
        "Pages handed out from committed segments, the next committed ahead, trailing "
        "ones given back once empty for a hold-off; no upstream file changes.",
        (),
        (
            IN_TREE + "srt/mem_cache/segmented/allocator.py",
            IN_TREE + "srt/mem_cache/segmented/buffers.py",
        ),
        tests=("registered/unit/mem_cache/test_segmented_page_allocator.py",),
        docs=("advanced_features/segmented_page_allocator.md",),
    ),
    PullRequest(
        6,
        "segmented-kv-pool",
        "Segment-aware allocators and the segmented MHA, hybrid SWA and MLA pools",
        "KV memory committed a segment at a time ahead of demand, given back when idle.",
        (
            "kv_pool_builders.*",
            "scheduler_loop.*",
            "cpu_attention.*",
        ),
        (
            IN_TREE + "srt/mem_cache/segmented/kv_allocators.py",
            IN_TREE + "srt/mem_cache/segmented/kv_pools.py",
            IN_TREE + "srt/mem_cache/segmented/swa_allocator.py",
            IN_TREE + "srt/mem_cache/segmented/idle_eviction.py",
        ),
        tests=("registered/unit/mem_cache/test_segmented_kv_pool.py",),
        docs=("advanced_features/segmented_kv_cache.md",),
    ),
    PullRequest(
        7,
        "cuda-vmm-backing",
        "The CUDA virtual-memory backing",
        "Segmented mode on NVIDIA GPUs: address space reserved, 2 MiB granules committed.",
        (),
        (
            IN_TREE + "srt/mem_cache/segmented/cuda_backing.py",
            IN_TREE + "srt/mem_cache/segmented/cuda_vmm.py",
        ),
        tests=("registered/unit/mem_cache/test_cuda_vmm_kv_backing.py",),
        docs=("advanced_features/cuda_vmm_kv_backing.md",),
    ),
    PullRequest(
        8,
        "lazy-cuda-graph-buffers",
        "Attention backends' cuda-graph buffers reserved, committed per replay",
        "triton, fa3 and flashinfer index buffers and the verify mask, committed per batch.",
        ("attention_graph_buffers.*", "verify_mask_buffers.*"),
        tests=("registered/unit/model_executor/test_lazy_cuda_graph_buffers.py",),
        docs=("advanced_features/lazy_cuda_graph_buffers.md",),
    ),
    PullRequest(
        9,
        "auto-mode",
        "auto: clamp the context to what the device holds and choose the mode",
        "Resolves auto once upstream has sized the pool; says what it chose and why.",
        ("auto_context.*",),
        (IN_TREE + "srt/mem_cache/segmented/auto_pools.py",),
        tests=("registered/unit/server_args/test_kv_alloc_auto_context.py",),
        docs=("advanced_features/kv_alloc_auto.md",),
        # Its branch where the mode is decided (segmented.pool_config.mode_decided), which
        # the earlier PRs write without it: there auto is upstream's static. Its rule (the
        # share, in row_room) and static's graph buffers (graph_layouts) come with it too.
        parts=(
            Part(POOL_CONFIG, "    if request.mode == modes.AUTO:", end=AFTER_AUTO),
            Part(ROW_ROOM, AUTO_RULE),
            Part(GRAPH_LAYOUTS, AUTO_GRAPH_BYTES),
        ),
    ),
    PullRequest(
        10,
        "kv-alloc-observability",
        "Start-up report, /server_info and sglang:kv_* gauges",
        "What mode is in force, why, the capacity and what is committed.",
        ("report.*", "metrics.*"),
        tests=("registered/unit/observability/test_kv_alloc_state.py",),
        docs=("advanced_features/kv_alloc_observability.md",),
    ),
    PullRequest(
        11,
        "rl-memory-release",
        "Release and resume of memory occupation in segmented mode (RL)",
        "kv_cache released gives back every segment, row, graph buffer and RoPE granule.",
        ("memory_release.*",),
        (IN_TREE + "srt/mem_cache/segmented/memory_release.py",),
        tests=("registered/unit/managers/test_segmented_memory_release.py",),
        docs=("advanced_features/segmented_kv_memory_release.md",),
    ),
    PullRequest(
        12,
        "pd-segmented-kv",
        "PD disaggregation with the KV pool committed on demand",
        "Both PD loops commit ahead; the transfer engine registers committed segments only.",
        ("pd_transfer.*",),
        (IN_TREE + "srt/mem_cache/segmented/pd_transfer.py",),
        tests=("registered/unit/disaggregation/test_segment_runs.py",),
        docs=("advanced_features/segmented_kv_pd_disaggregation.md",),
    ),
    PullRequest(
        13,
        "kv-shared-budget",
        "Several segmented servers share one KV budget on a device (--kv-budget)",
        "A ledger each server reserves in before it commits; a waiting server is given way.",
        (),
        (IN_TREE + "srt/mem_cache/segmented/kv_budget.py",),
        tests=("registered/unit/mem_cache/test_kv_shared_budget.py",),
        docs=("advanced_features/segmented_kv_shared_budget.md",),
        # Its flags: the last fields of PR 1's KvAlloc (unset there, every budget path of the
        # earlier PRs is dormant: `modes.budget_settings` reads them with getattr).
        parts=(
            Part(FIELDS, "    parse_bytes,", end="    parse_hold_off_seconds,"),
            Part(FIELDS, "    kv_budget: A["),
        ),
    ),
)
