"""The room segmented mode keeps for req_to_token rows where memory is committed explicitly
(a GPU), and what it costs the KV pool (issue 31, item 1).

Upstream pays for its whole `ReqToTokenPool` outside the KV budget; the room used to be
`max_running_requests x granule + 4 B x tokens`, uncapped and all taken from the KV budget,
so segmented at an ordinary context held far fewer tokens than static, and under auto the room
was taken after the clamp, leaving the context above the pool."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable

import pytest
from decisions import decide
from sglang.srt.mem_cache.segmented import auto_pools, modes, pool_config
from sglang.srt.mem_cache.segmented.runtime import RUNTIME

from sglang_kvalloc.core import planner
from sglang_kvalloc.upstream import plugin

MIB = 1 << 20
G = 2 * MIB


def test_the_room_never_exceeds_the_table_and_an_ordinary_table_costs_the_pool_nothing() -> None:
    # Llama-3.1-8B on one H100 at 131,072 context: 2,048 request slots, ~55 GB of KV.
    table = planner.req_to_token_allocation(2048, 131_072, 0).bytes  # 1.07 GB
    room = planner.req_to_token_room(
        max_running_requests=2048,
        token_capacity=450_000,
        table_bytes=table,
        granularity=G,
        kv_pool_bytes=55 * 10**9,
    )
    assert room.committed_at_most == -(-table // G) * G  # not 2,048 x 2 MiB = 4.3 GB
    assert room.in_kv_budget == 0  # 2% of the pool: static pays it from the slack, so do we


def test_past_autos_share_the_rest_of_the_room_comes_from_the_kv_budget() -> None:
    # 10M context: the table would be 82 GB; the room is what rows can commit.
    table = planner.req_to_token_allocation(2048, 10_000_000, 0).bytes
    pool = 60 * 10**9
    room = planner.req_to_token_room(
        max_running_requests=2048,
        token_capacity=470_000,
        table_bytes=table,
        granularity=G,
        kv_pool_bytes=pool,
    )
    assert room.committed_at_most == 2048 * G + 4 * 470_000
    outside = int(planner.AUTO_STATIC_MAX_SHARE * pool)
    assert room.in_kv_budget == room.committed_at_most - outside > 0


CELL = 1024  # KV bytes per token of the stand-in model


@dataclasses.dataclass(slots=True)
class _Configurator:
    """What the pool hook reads of upstream's KVCacheConfigurator, slotted as that class is (a
    mark of the hook's own cannot be set on it). Sized again through the hook, as the
    plugin's patched method (or the series' inline call) is: the hook passes that through."""

    model_config: types.SimpleNamespace
    server_args: types.SimpleNamespace
    resolve: Callable[..., types.SimpleNamespace]
    is_draft_worker: bool = False
    page_size: int = 1

    def _resolve_memory_pool_config(self, *args: object, **kwargs: object) -> object:
        return plugin.around_resolve_memory_pool_config(self.resolve, self, *args, **kwargs)


def _configurator(context: int, budget: int) -> tuple[_Configurator, Callable]:
    """A configurator whose upstream sizing is budget // cell over the (hooked) budget, and
    whose request slots follow upstream's `resolve_max_num_reqs` at the current context."""
    model_config = types.SimpleNamespace(context_len=context)
    server_args = types.SimpleNamespace(context_length=None, **{modes.SERVER_ARGS_ATTR: modes.AUTO})

    def resolve(c: _Configurator, *args: object, **kwargs: object) -> types.SimpleNamespace:
        available = plugin.around_profile_available_bytes(lambda c: budget, c)
        tokens = available // CELL
        reqs = planner.resolve_max_num_reqs(tokens, c.model_config.context_len)
        return types.SimpleNamespace(max_total_num_tokens=tokens, max_running_requests=reqs)

    return _Configurator(model_config, server_args, resolve), resolve


@pytest.fixture
def explicit_commits(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backing factory that commits explicitly at 2 MiB granules, nothing else hooked."""
    from sglang.srt.mem_cache import kv_cache_configurator

    monkeypatch.setattr(kv_cache_configurator, "get_req_to_token_extra_context_len", lambda: 0)
    factory = types.SimpleNamespace(faults_in=False, granularity=G)
    monkeypatch.setattr(RUNTIME, "backings", factory)
    for module in (pool_config, auto_pools):
        monkeypatch.setattr(
            module, "kv_pool_bytes", lambda c, config: config.max_total_num_tokens * CELL
        )


def _capacity(mode: str, context: int, budget: int) -> int:
    decide(mode, explicit_commits=True)
    RUNTIME.state.run_time_room_bytes = 0
    configurator, resolve = _configurator(context, budget)
    config = resolve(configurator)
    return pool_config.settle_run_time_memory(configurator, config, (), {}).max_total_num_tokens


@pytest.mark.parametrize("context", [8192, 32_768, 131_072])
def test_segmented_at_an_ordinary_context_holds_what_static_holds(
    explicit_commits: None, context: int
) -> None:
    budget = 60 * 10**9  # an 8B-sized pool on an H100 (60 GB at 1 KB a token)
    static = _capacity(modes.STATIC, context, budget)
    segmented = _capacity(modes.SEGMENTED, context, budget)
    assert segmented == static  # the old room kept 4.3 GB out: 4.2M tokens fewer


def test_the_issues_measurement_tiny_llama_at_131072_keeps_most_of_its_pool(
    explicit_commits: None,
) -> None:
    # Issue 31: static held 21,785,988 tokens, segmented 4,918,127 (23%) at 4,096 requests.
    budget = 21_785_988 * CELL
    static = _capacity(modes.STATIC, 131_072, budget)
    segmented = _capacity(modes.SEGMENTED, 131_072, budget)
    table = planner.req_to_token_allocation(4096, 131_072, 0).bytes  # 2.15 GB, 10% of the pool
    outside = int(planner.AUTO_STATIC_MAX_SHARE * static * CELL)
    assert segmented == static - -(-(-(-table // G) * G - outside) // CELL)
    assert segmented > 0.9 * static


@pytest.fixture
def auto_hook_stubbed(explicit_commits: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """auto's pool hook with the device and backings stubbed; static's
    context-sized bytes are one int32 table of (requests + 1) rows."""
    monkeypatch.setattr(pool_config, "_apply_segment_settings", lambda c, request: None)
    monkeypatch.setattr(pool_config, "open_backings", lambda c: None)
    monkeypatch.setattr(pool_config, "kv_pool_kind", lambda c: ("mha", None))
    monkeypatch.setattr(auto_pools, "context_scaled_static_bytes",
                        lambda c, config, n: (config.max_running_requests + 1) * n * 4)  # fmt: skip


def test_auto_keeps_its_context_within_the_pool_it_ends_with(auto_hook_stubbed: None) -> None:
    """auto at 10M over explicit commits: the clamp to the pool comes before the room is
    kept; the context must follow the pool once the room is settled."""
    configurator, resolve = _configurator(10_000_000, 4 * 10**9)  # a pool of 3.9M tokens
    config = plugin.around_resolve_memory_pool_config(resolve, configurator)
    assert RUNTIME.decision.segmented and RUNTIME.decision.explicit_commits
    assert RUNTIME.state.run_time_room_bytes > 0
    context = configurator.model_config.context_len
    assert context == config.max_total_num_tokens < 4 * 10**9 // CELL


def test_autos_share_is_computed_once_at_the_context_it_clamps_to(auto_hook_stubbed: None) -> None:
    """Where the scheduler clamps, `decide_auto` scales static's context-sized bytes from the
    context asked for to the clamped one; they were passed at the clamped context already and
    scaled twice: at 10M clamped to 3.9M the share was 39% of the real one, so static could
    be chosen where its tables take more than the 5% it allows."""
    import re

    target = 10_000_000
    configurator, resolve = _configurator(target, 4 * 10**9)
    RUNTIME.state.run_time_room_bytes = 0
    asked = resolve(configurator)  # upstream's sizing at the context asked for
    plugin.around_resolve_memory_pool_config(resolve, configurator)
    clamped_to = asked.max_total_num_tokens
    figure = re.search(r"allocations (?:are|would be) (\d+) B", RUNTIME.decision.reason)
    assert figure is not None, RUNTIME.decision.reason
    assert (
        int(figure.group(1)) == (asked.max_running_requests + 1) * target * 4 * clamped_to // target
    )
