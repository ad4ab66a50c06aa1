"""The `sglang.srt.plugins` entry point. Every hook on upstream is listed here, in one place.

Each hook is small and lives in a module named after what it changes. Registration only
records targets; `HookRegistry.apply_hooks()` (run by upstream's `load_plugins()`) patches.
"""

from __future__ import annotations

import logging
import sys

from sglang.srt.arg_groups import kv_alloc_hook
from sglang.srt.mem_cache.segmented import (
    attention_graph_buffers,
    auto_context,
    cpu_attention,
    kv_pool_builders,
    memory_release,
    metrics,
    pd_transfer,
    pool_config,
    report,
    req_pool_builders,
    rope,
    scheduler_loop,
    scheduler_request,
    verify_mask_buffers,
)

from sglang_kvalloc.on_import import ON_IMPORT_MODULES
from sglang_kvalloc.upstream import cli
from sglang_kvalloc.upstream.inline import argument, done_instead, instead, then

# The plugin's form of the AROUND hooks the series writes as inline calls (upstream/inline.py):
# each wraps the very function the series calls in upstream's function.
around_reserve_rope_cache = done_instead(rope.rope_reserved_lazily)
around_build_default_req_pool = instead(req_pool_builders.segmented_default_req_pool)
around_build_decode_req_pool = instead(req_pool_builders.segmented_decode_req_pool)
around_sdpa_forward_extend = argument(cpu_attention.SDPA_ROWS, cpu_attention.swa_sub_pool_rows)
around_sdpa_forward_decode = argument(cpu_attention.SDPA_ROWS, cpu_attention.swa_sub_pool_rows)
around_release_memory_occupation = then(memory_release.kv_released)
around_resume_memory_occupation = then(memory_release.kv_resumed)
around_configure = then(report.record_configuration)
around_build_mha_kv_pool = argument("mha_pool_class", kv_pool_builders.segmented_mha_pool_class)
around_build_hybrid_swa_kv_pool = argument(
    "mha_pool_class", kv_pool_builders.segmented_swa_pool_class
)
around_build_mla_kv_pool = argument("mla_pool_class", kv_pool_builders.segmented_mla_pool_class)
around_build_allocator = then(kv_pool_builders.segment_aware_allocator)
around_add_one_req = instead(scheduler_loop.row_admission)
around_check_decode_mem = then(scheduler_loop.decode_rows_committed)
around_check_full_pool = argument("ps", scheduler_loop.withheld_counted_in_full_pool)
around_check_swa_pool = argument("ps", scheduler_loop.withheld_counted_in_swa_pool)
around_registerable_regions = then(pd_transfer.registerable_committed_regions)
around_allocatable_token_budgets = then(pd_transfer.committed_token_budgets)
around_from_cli_args = then(kv_alloc_hook.checked_cli_args)
around_get_init_info = then(auto_context.clamped_context_in_init_info)
around_profile_available_bytes = then(pool_config.kv_budget_bytes)
around_resolve_memory_pool_config = then(pool_config.mode_decided)
around_can_run_graph = then(attention_graph_buffers.graph_gate, passes_false=True)
around_local_attention_update_for_replay = argument(
    "buffers", attention_graph_buffers.committed_local_attention_rows
)

SERVER_ARGS = "sglang.srt.server_args.ServerArgs"
SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
ENGINE = "sglang.srt.entrypoints.engine.Engine"
SCHEDULE_BATCH = "sglang.srt.managers.schedule_batch.ScheduleBatch"
WEIGHT_UPDATER = (
    "sglang.srt.managers.scheduler_components.weight_updater.SchedulerWeightUpdaterManager"
)
ROPE = "sglang.srt.layers.rotary_embedding.base.RotaryEmbedding"
# RoPE subclasses with their own forwards and incremental growth (rope.OWN_GROWTH).
ROPE_OWN_GROWTH = (
    "sglang.srt.layers.rotary_embedding.rope_variant.DeepseekScalingRotaryEmbedding",
)
RESERVE_ROPE = "sglang.srt.utils.common.reserve_rope_cache_for_long_sequences"
COLLECTOR = "sglang.srt.observability.metrics_collector.SchedulerMetricsCollector"
CONFIGURATOR = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
CHECKER = "sglang.srt.managers.scheduler_components.invariant_checker.SchedulerInvariantChecker"
TRITON = "sglang.srt.layers.attention.triton_backend.TritonAttnBackend"
FA3 = "sglang.srt.layers.attention.flashattention_backend.FlashAttentionBackend"
FLASHINFER = "sglang.srt.layers.attention.flashinfer_backend.FlashInferAttnBackend"
DECODE_GRAPHS = "sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner"
# DecodeCudaGraphRunner subclasses of 0.5.23 that override can_run_graph without calling it.
SPECULATIVE_GRAPHS = tuple(
    f"sglang.srt.speculative.{name}"
    for name in (
        "eagle_draft_cuda_graph_runner.EAGLEDraftCudaGraphRunner",
        "eagle_draft_extend_cuda_graph_runner.EAGLEDraftExtendCudaGraphRunner",
        "multi_layer_eagle_draft_extend_cuda_graph_runner.MultiLayerEagleDraftExtendCudaGraphRunner",
        "frozen_kv_mtp_cuda_graph_runner.FrozenKVMTPCudaGraphRunner",
    )
)
# Those whose can_run_graph returns False or DecodeCudaGraphRunner's (super()): gated by it.
GATED_BY_SUPER = ("sglang.srt.speculative.uno_cuda_graph_runner.UnoDecodeCudaGraphRunner",)
TRITON_DRAFT = "sglang.srt.layers.attention.triton_backend.TritonMultiStepDraftBackend"
LOCAL_ATTENTION = "sglang.srt.layers.attention.local_attention.LocalAttentionMetadataBuilder"
FLASHINFER_DRAFT = "sglang.srt.layers.attention.flashinfer_backend.FlashInferMultiStepDraftBackend"
SPEC_COMMON = "sglang.srt.speculative.eagle_worker_common"
EAGLE_V2 = "sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2"
TORCH_NATIVE = "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend"
PREALLOC = "sglang.srt.disaggregation.decode.DecodePreallocQueue"
# The Scheduler's PD event-loop mixins (their methods are looked up on the mixins).
PD_PREFILL = "sglang.srt.disaggregation.prefill.SchedulerDisaggregationPrefillMixin"
PD_DECODE = "sglang.srt.disaggregation.decode.SchedulerDisaggregationDecodeMixin"
MOONCAKE = "sglang.srt.disaggregation.mooncake.conn.MooncakeKVManager"
_registered = False
INTERNAL_STATE = (
    "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController"
)


def hooks() -> list[tuple[str, object, str]]:
    """(target, hook, hook type name) for every hook this plugin installs."""
    return [
        # --kv-alloc-mode (a ServerArgs field, upstream/fields.py): checks, /server_info.
        (f"{SERVER_ARGS}.from_cli_args", around_from_cli_args, "AROUND"),
        # auto: the context clamped to the model's maximum in the launcher; where the
        # scheduler clamps it to the pool, a draft model and the scheduler's own config
        # follow, and its handshake brings the clamp to the tokenizer.
        (f"{SERVER_ARGS}.resolve_once", auto_context.clamp_context_to_model, "BEFORE"),
        (f"{CONFIGURATOR}.configure", auto_context.draft_follows_clamp, "BEFORE"),
        (f"{SCHEDULER}.init_memory_pools", auto_context.scheduler_follows_clamp, "AFTER"),
        (f"{SCHEDULER}.get_init_info", around_get_init_info, "AROUND"),
        (f"{ENGINE}._set_startup_time", auto_context.context_from_scheduler, "AFTER"),
        (f"{SERVER_ARGS}.resolved_dict", kv_alloc_hook.after_resolved_dict, "AFTER"),
        # Segmented on the CPU: RoPE caches grow with the positions in use, not the context.
        (f"{SCHEDULER}.__init__", scheduler_request.before_scheduler_init, "BEFORE"),
        (RESERVE_ROPE, around_reserve_rope_cache, "AROUND"),
        (f"{ROPE}.forward_native", rope.before_rope_forward, "BEFORE"),
        (f"{ROPE}.forward_cpu", rope.before_rope_forward, "BEFORE"),
        *[
            (f"{rope_class}.{forward}", rope.before_rope_forward, "BEFORE")
            for rope_class in ROPE_OWN_GROWTH
            for forward in ("forward_native", "forward_cpu")
        ],
        # The mode in force (auto: decided, context clamped) once upstream sized the pool.
        (
            f"{CONFIGURATOR}._resolve_memory_pool_config",
            around_resolve_memory_pool_config,
            "AROUND",
        ),
        # Segmented mode: reserved, segment-committed pools and segment-aware allocators.
        (
            f"{CONFIGURATOR}._profile_available_bytes",
            around_profile_available_bytes,
            "AROUND",
        ),
        (
            f"{CONFIGURATOR}._build_default_req_pool",
            around_build_default_req_pool,
            "AROUND",
        ),
        (
            f"{CONFIGURATOR}._build_decode_req_pool",
            around_build_decode_req_pool,
            "AROUND",
        ),
        (f"{CONFIGURATOR}._build_mha_kv_pool", around_build_mha_kv_pool, "AROUND"),
        (
            f"{CONFIGURATOR}._build_hybrid_swa_kv_pool",
            around_build_hybrid_swa_kv_pool,
            "AROUND",
        ),
        (f"{CONFIGURATOR}._build_mla_kv_pool", around_build_mla_kv_pool, "AROUND"),
        # ... and the CPU engine's attention reading a segmented SWA sub-pool through upstream's
        # full-to-SWA mapping (0.5.23 reads it with full-pool ids).
        (
            f"{TORCH_NATIVE}._run_sdpa_forward_extend",
            around_sdpa_forward_extend,
            "AROUND",
        ),
        (
            f"{TORCH_NATIVE}._run_sdpa_forward_decode",
            around_sdpa_forward_decode,
            "AROUND",
        ),
        (
            f"{CONFIGURATOR}._build_token_to_kv_pool_allocator",
            around_build_allocator,
            "AROUND",
        ),
        # ... grown ahead of each iteration, given back when idle, withheld after a failed
        # commit without tripping upstream's leak identity.
        (
            f"{SCHEDULER}.get_next_batch_to_run",
            scheduler_loop.before_get_next_batch_to_run,
            "BEFORE",
        ),
        # ... and the same in both PD event loops, which bypass get_next_batch_to_run; the
        # decode side commits ahead for its pre-allocation queue and admits by committed
        # memory; every transfer's pages lie in committed memory, registered with the
        # transfer engine segment by segment.
        (
            f"{PD_PREFILL}.get_next_disagg_prefill_batch_to_run",
            pd_transfer.before_next_disagg_prefill_batch,
            "BEFORE",
        ),
        (
            f"{PD_DECODE}.get_next_disagg_decode_batch_to_run",
            pd_transfer.before_next_disagg_decode_batch,
            "BEFORE",
        ),
        (f"{PREALLOC}.pop_preallocated", pd_transfer.before_pop_preallocated, "BEFORE"),
        (f"{PREALLOC}.pop_preallocated", pd_transfer.after_pop_preallocated, "AFTER"),
        (
            f"{PREALLOC}._allocatable_token_budgets",
            around_allocatable_token_budgets,
            "AROUND",
        ),
        (f"{PD_PREFILL}.send_kv_chunk", pd_transfer.before_send_kv_chunk, "BEFORE"),
        (
            f"{MOONCAKE}._registerable_regions",
            around_registerable_regions,
            "AROUND",
        ),
        (
            f"{MOONCAKE}.register_buffer_to_engine",
            pd_transfer.after_register_buffer_to_engine,
            "AFTER",
        ),
        (
            f"{MOONCAKE}.deregister_buffer_to_engine",
            pd_transfer.before_deregister_buffer_to_engine,
            "BEFORE",
        ),
        (f"{SCHEDULER}.on_idle", scheduler_loop.before_on_idle, "BEFORE"),
        (f"{SCHEDULER}.flush_cache", scheduler_loop.after_flush_cache, "AFTER"),
        # ... and RL's release of memory occupation gives back everything, resume reopens.
        (
            f"{WEIGHT_UPDATER}.release_memory_occupation",
            around_release_memory_occupation,
            "AROUND",
        ),
        (
            f"{WEIGHT_UPDATER}.resume_memory_occupation",
            around_resume_memory_occupation,
            "AROUND",
        ),
        # ... and (explicit commits: a GPU) each decode step's req_to_token rows committed
        # inside upstream's own decode-memory check, so a row that cannot grow retracts.
        (f"{SCHEDULE_BATCH}.check_decode_mem", around_check_decode_mem, "AROUND"),
        # ... and how far each batch's kernels read the rows, noted before it is queued, so
        # no remap lands under a read the overlap scheduler still has in flight.
        (f"{SCHEDULER}.run_batch", scheduler_loop.before_run_batch, "BEFORE"),
        # ... and admission takes no new row the device could not back (upstream raises).
        (
            "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req",
            around_add_one_req,
            "AROUND",
        ),
        (f"{CHECKER}._check_full_pool", around_check_full_pool, "AROUND"),
        (f"{CHECKER}._check_swa_pool", around_check_swa_pool, "AROUND"),
        # Segmented on a GPU: the attention backends' context-sized cuda-graph buffers
        # reserved, committed before each replay as far as the batch writes (else eager).
        (
            f"{TRITON}.init_cuda_graph_state",
            attention_graph_buffers.around_triton_init_cuda_graph_state,
            "AROUND",
        ),
        (
            "sglang.srt.distributed.parallel_state.graph_capture",
            attention_graph_buffers.around_graph_capture,
            "AROUND",
        ),
        (
            f"{FA3}.init_cuda_graph_state",
            attention_graph_buffers.around_fa3_init_cuda_graph_state,
            "AROUND",
        ),
        (
            f"{FLASHINFER}.init_cuda_graph_state",
            attention_graph_buffers.around_flashinfer_init_cuda_graph_state,
            "AROUND",
        ),
        (f"{DECODE_GRAPHS}.can_run_graph", around_can_run_graph, "AROUND"),
        # Its ragged-verify path returns this method's answer: gated here, so that every other
        # return of can_run_graph is False and its gate is one call at its final return.
        (
            f"{DECODE_GRAPHS}._can_run_ragged_verify_graph",
            around_can_run_graph,
            "AROUND",
        ),
        (f"{DECODE_GRAPHS}.capture", attention_graph_buffers.around_capture, "AROUND"),
        # The speculative runners override can_run_graph (capture is inherited): each is gated
        # the same way; triton's multi-step draft backend allocates the steps' shared buffer.
        *[
            (f"{runner}.can_run_graph", around_can_run_graph, "AROUND")
            for runner in SPECULATIVE_GRAPHS
        ],
        (
            f"{TRITON_DRAFT}.init_cuda_graph_state",
            attention_graph_buffers.around_triton_draft_init_cuda_graph_state,
            "AROUND",
        ),
        (
            f"{FLASHINFER_DRAFT}.init_cuda_graph_state",
            attention_graph_buffers.around_flashinfer_draft_init_cuda_graph_state,
            "AROUND",
        ),
        # Upstream zeroes the whole (reserved) local-attention table every decode replay; it
        # is handed the committed rows only, past which the table reads zeros already.
        (
            f"{LOCAL_ATTENTION}.update_for_replay",
            around_local_attention_update_for_replay,
            "AROUND",
        ),
        # ... and the speculative verify mask, written by the draft stage before the verify
        # step reaches can_run_graph: committed where the draft writes it.
        (
            f"{SPEC_COMMON}.build_eagle_verify_input",
            verify_mask_buffers.around_build_eagle_verify_input,
            "AROUND",
        ),
        (
            f"{EAGLE_V2}._build_trivial_verify_input",
            verify_mask_buffers.around_build_trivial_verify_input,
            "AROUND",
        ),
        # What was built: start-up log, then /server_info through the scheduler's state.
        (f"{CONFIGURATOR}.configure", around_configure, "AROUND"),
        (f"{INTERNAL_STATE}.get_internal_state", report.after_get_internal_state, "AFTER"),
        # Gauges on /metrics (with upstream's --enable-metrics).
        (f"{COLLECTOR}.__init__", metrics.after_collector_init, "AFTER"),
        (f"{COLLECTOR}.log_stats", metrics.after_log_stats, "AFTER"),
    ]


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.server_args import ServerArgs

    if cli.DEST not in ServerArgs.__struct_fields__:
        # The fields are declared by the bootstrap .pth before ServerArgs is assembled; a .pth
        # runs from site directories only (not PYTHONPATH or `pip --target` folders).
        logging.getLogger(__name__).error(
            "sglang-kvalloc: ServerArgs has no --kv-alloc-mode field: "
            "sglang_kvalloc_bootstrap.pth did not run in this process (install the package "
            "into a site directory); the --kv-* flags and keywords are unavailable"
        )
    global _registered
    if not _registered:
        from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook

        register_resolution_hook(cli.RESOLUTION_STEP)(cli.after_gpu_memory_settings)
    for target, hook, hook_type in hooks():
        module = imported_by_upstream_only(target)
        if module is None or module in sys.modules:
            HookRegistry.register(target, hook, HookType[hook_type])
    _registered = True


def imported_by_upstream_only(target: str) -> str | None:
    """The module of ``target`` where this plugin must not import it, else None."""
    return next((m for m in ON_IMPORT_MODULES if target.startswith(m + ".")), None)


def apply_on_import(module_name: str) -> None:
    """Upstream imported ``module_name`` (one of `ON_IMPORT_MODULES`): its hooks now."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if not _registered:  # register() will find the module imported
        return
    for target, hook, hook_type in hooks():
        if imported_by_upstream_only(target) == module_name:
            HookRegistry.register(target, hook, HookType[hook_type])
    HookRegistry.apply_hooks()  # the targets patched already are skipped
