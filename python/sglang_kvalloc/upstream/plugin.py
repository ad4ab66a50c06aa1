"""The `sglang.srt.plugins` entry point. Every hook on upstream is listed here, in one place.

Each hook is small and lives in a module named after what it changes. Registration only
records targets; `HookRegistry.apply_hooks()` (run by upstream's `load_plugins()`) patches.
"""

from __future__ import annotations

SERVER_ARGS = "sglang.srt.server_args.ServerArgs"
ENGINE = "sglang.srt.entrypoints.engine.Engine"
CONFIGURATOR = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
INTERNAL_STATE = (
    "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController"
)


def hooks() -> list[tuple[str, object, str]]:
    """(target, hook, hook type name) for every hook this plugin installs."""
    from sglang_kvalloc.upstream import cli, pools

    return [
        # --kv-alloc-mode on upstream's parser, and its way into the ServerArgs record.
        (f"{SERVER_ARGS}.add_cli_args", cli.after_add_cli_args, "AFTER"),
        (f"{SERVER_ARGS}.from_cli_args", cli.around_from_cli_args, "AROUND"),
        (f"{ENGINE}.__init__", cli.around_engine_init, "AROUND"),
        (f"{SERVER_ARGS}.resolve_once", cli.before_resolve_once, "BEFORE"),
        (f"{SERVER_ARGS}.resolved_dict", cli.after_resolved_dict, "AFTER"),
        # Pools built for the chosen mode; the decision reported by the scheduler.
        (f"{CONFIGURATOR}.configure", pools.around_configure, "AROUND"),
        (f"{INTERNAL_STATE}.get_internal_state", pools.after_get_internal_state, "AFTER"),
    ]


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for target, hook, hook_type in hooks():
        HookRegistry.register(target, hook, HookType[hook_type])
