"""`--kv-alloc-mode segmented` on the CPU engine: footprint, parity, growth and shrink."""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REFERENCE_STATIC_ARGS, ReferenceStatic, hf_greedy
from sglang_kvalloc_harness.serving import (
    LocalServer,
    generate_concurrently,
    http_text,
    side_by_side,
)

OVERRIDE = {"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"}
# A leak found by upstream's idle check raises instead of warning.
STRICT = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}
MB = 1_000_000


def _kv(server: LocalServer) -> dict:
    return server.server_info()["internal_states"][0]["kv_alloc"]


MEMORY_TEST_RETAIN = 4096


@pytest.fixture(scope="class")
def solo_servers(tiny_model: Path, short_positions_model: Path) -> Iterator[dict[str, LocalServer]]:
    """The servers of the tests below that need one each, started side by side and paused
    until their test asks (each test's flags are next to its name here)."""
    f32 = ["--kv-alloc-mode", "segmented", "--dtype", "float32"]
    servers = {
        # 10M context, the shared static server's pool.
        "10m": LocalServer(
            tiny_model,
            args=[*f32, "--context-length", "10000000", "--max-total-tokens", "65536"],
            env={**OVERRIDE, **STRICT},
        ),
        # Memory rises under load and returns when idle.
        "memory": LocalServer(
            tiny_model,
            args=[*f32, "--max-total-tokens", "131072", "--kv-segment-tokens", "2048"]
            + ["--kv-segment-hold-off", "1", "--kv-idle-cache-tokens", str(MEMORY_TEST_RETAIN)]
            + ["--context-length", "32768"],
            env=STRICT,
        ),
        # Positions past the model's maximum.
        "positions": LocalServer(
            short_positions_model,
            args=[*f32, "--context-length", "16384", "--max-total-tokens", "16384"],
            env=OVERRIDE,
        ),
        # The cap reached.
        "cap": LocalServer(
            tiny_model,
            args=[*f32, "--max-total-tokens", "8192", "--kv-segment-tokens", "512"]
            + ["--enable-metrics"],
            env=STRICT,
        ),
    }
    with side_by_side(servers.values()):
        yield servers


LONG = 12_000  # 12 segments of 1,024 tokens


@pytest.fixture(scope="module")
def long_prompts() -> list[list[int]]:
    rng = random.Random(11)
    return [[rng.randrange(3, 2048) for _ in range(n)] for n in (17, 900, LONG)]


def _payload(prompt: list[int], n: int = 6) -> dict:
    return {
        "input_ids": prompt,
        "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True},
    }


def _greedy(server: LocalServer, prompt: list[int], n: int = 6) -> dict:
    return server.generate(_payload(prompt, n), timeout=900)


@pytest.fixture(scope="module")
def static_outputs(hf_model, long_prompts: list[list[int]]) -> list[list[int]]:
    """The reference: HF `generate` in-process (float32), which static's tokens equal
    (test_server_cpu.py) — no second server to launch."""
    return [hf_greedy(hf_model, p, 6) for p in long_prompts]


PAGE_SIZES = [1, 16]


def _one_server_per_page(
    model: Path, args: list[str], env: dict[str, str]
) -> Iterator[dict[int, LocalServer]]:
    """A server per page size with ``args``, started side by side and paused until asked."""
    servers = {
        page: LocalServer(model, args=[*args, "--page-size", str(page)], env=env)
        for page in PAGE_SIZES
    }
    with side_by_side(servers.values()):
        yield servers


@pytest.fixture(scope="class")
def servers_by_page(tiny_model: Path) -> Iterator[dict[int, LocalServer]]:
    """Segmented servers with segments of 1,024 tokens at page sizes 1 and 16, started side by
    side and paused until asked."""
    args = ["--kv-alloc-mode", "segmented", "--max-total-tokens", "40960", "--dtype", "float32"]
    args += ["--kv-segment-tokens", "1024"]
    yield from _one_server_per_page(tiny_model, args, STRICT)


SHORT_MAX_POSITIONS = 4096


@pytest.fixture(scope="module")
def short_positions_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with max_position_embeddings 4,096 (the weights do not depend on it), so
    a prompt past the model maximum prefills in seconds on the CPU rather than minutes."""
    out = tmp_path_factory.mktemp("models") / "tiny-llama-4k-positions"
    out.mkdir()
    for item in tiny_model.iterdir():
        (out / item.name).symlink_to(item)
    config = json.loads((tiny_model / "config.json").read_text())
    config["max_position_embeddings"] = SHORT_MAX_POSITIONS
    (out / "config.json").unlink()
    (out / "config.json").write_text(json.dumps(config))
    return out


def _kv_gauges(server: LocalServer) -> tuple[dict[str, float], str]:
    """The plugin's gauges on upstream's /metrics (exported once the scheduler logs stats)."""
    deadline = time.monotonic() + 30
    text = ""
    while time.monotonic() < deadline:
        text = http_text(server.url + "/metrics")
        if "sglang:kv_alloc_committed_bytes" in text:
            break
        time.sleep(1)
    values = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("sglang:kv_alloc_")
    }
    return values, text


def test_bfloat16_tokens_equal_static(tiny_model: Path) -> None:
    rng = random.Random(31)
    prompts = [[rng.randrange(3, 2048) for _ in range(n)] for n in (40, 2500)]
    common = ["--max-total-tokens", "16384", "--dtype", "bfloat16", "--page-size", "16"]
    mode_args = {"static": [], "segmented": ["--kv-segment-tokens", "512"]}
    servers = {
        mode: LocalServer(tiny_model, args=["--kv-alloc-mode", mode, *common, *extra], env=STRICT)
        for mode, extra in mode_args.items()
    }
    outs = {}
    with side_by_side(servers.values()):
        for mode, server in servers.items():
            with server.awake():
                outs[mode] = [_greedy(server, p, n=8)["output_ids"] for p in prompts]
    assert outs["segmented"] == outs["static"]


@pytest.fixture(scope="class")
def checked_servers(tiny_model: Path) -> Iterator[dict[int, LocalServer]]:
    """Upstream's own checks all on (its busy-loop leak identity, its KV page census, its
    allocator debug checks), at page sizes 1 and 16; started side by side, paused until asked."""
    env = {
        **STRICT,
        "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1",
        "SGLANG_CHECK_KV_PAGE_INVARIANTS": "1",
        "SGLANG_DEBUG_MEMORY_POOL": "1",
    }
    args = ["--kv-alloc-mode", "segmented", "--max-total-tokens", "16384", "--dtype", "float32"]
    args += ["--kv-segment-tokens", "512", "--kv-segment-hold-off", "0.5"]
    args += ["--kv-idle-cache-tokens", "1024"]
    yield from _one_server_per_page(tiny_model, args, env)


class TestOneServerEach:
    """Tests with a server each, all started side by side (`solo_servers`)."""

    def test_10m_context_costs_what_4k_static_costs(
        self, reference_static: ReferenceStatic, solo_servers: dict[str, LocalServer]
    ) -> None:
        """A segmented server at a 10M context starts at the resident memory of the shared static
        server at 4K (same pool, same dtype); static at 10M cannot start at all."""
        reference_static.server.pause()  # its RSS was taken at its start; now it would busy-poll
        static_rss = reference_static.start_rss_bytes
        seg = solo_servers["10m"]
        common = ["--max-total-tokens", "65536", "--dtype", "float32"]
        assert all(flag in REFERENCE_STATIC_ARGS and flag in seg.args for flag in common)
        with seg.awake():
            time.sleep(3)
            seg_rss = seg.rss_bytes()
            kv = _kv(seg)
            assert kv["mode"] == "segmented"
            assert kv["effective_context_length"] == 10_000_000  # explicit segmented: no clamp
            assert kv["req_to_token_bytes"] > 80e9  # reserved, not committed
            assert kv["segments"]["req_to_token_resident_bytes"] < 1 * MB
            assert kv["segments"]["committed_segments"] == 1
            assert _greedy(seg, [5, 6, 7], n=2)["meta_info"]["completion_tokens"] == 2
        print(f"RSS static@4K {static_rss / MB:.1f} MB, segmented@10M {seg_rss / MB:.1f} MB")
        # Upstream would also pre-expand the RoPE cache to 10M positions (640 MB here); segmented
        # mode grows it with the positions in use instead.
        assert "RoPE cache(s) grow with the positions in use" in seg.log()
        assert abs(seg_rss - static_rss) < 100 * MB

        # Static at 10M dies at start-up on its req_to_token table: the table as upstream's own
        # ReqToTokenPool builds it for the request slots upstream resolves at this pool (on the
        # meta device: its shape and bytes, nothing allocated) is 82 GB, more than this machine
        # has, and the planner says the same.
        import psutil
        from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

        # Upstream's request slots at this pool, and its table's headroom without speculative
        # decoding (`get_req_to_token_extra_context_len`, which needs a server's config).
        reqs, extra = 2048, 4
        table = ReqToTokenPool(
            size=reqs, max_context_len=10_000_000 + extra, device="meta", enable_memory_saver=False
        ).req_to_token
        try:
            from sglang_kvalloc.core import planner
        except ImportError:  # the upstream-series proof: the planner is not part of the series
            pass
        else:
            assert reqs == planner.resolve_max_num_reqs(
                65536, 10_000_000, max_running_requests=None
            )
            assert extra == planner.req_to_token_extra()
            assert table.nbytes == planner.req_to_token_allocation(reqs, 10_000_000, extra).bytes
        assert table.nbytes == 81_960_032_784 == kv["req_to_token_bytes"]  # 2,049 x 10M int32
        assert table.nbytes > psutil.virtual_memory().total

    def test_memory_rises_under_load_and_returns_when_idle(
        self,
        solo_servers: dict[str, LocalServer],
    ) -> None:
        """A burst grows committed memory; once idle for the hold-off, the idle policy evicts the
        prefix cache in trailing segments (keeping --kv-idle-cache-tokens) and gives the segments
        back, without a /flush_cache. What was retained still serves cache hits."""
        retain = MEMORY_TEST_RETAIN
        PROMPT = 12_000  # noqa: N806 - four of them span 24 segments of 2,048 tokens
        with solo_servers["memory"].awake() as server:
            time.sleep(2)
            start = _kv(server)["segments"]
            start_rss = server.rss_bytes()
            rng = random.Random(5)
            prompts = [[rng.randrange(3, 2048) for _ in range(PROMPT)] for _ in range(4)]
            peak = {"committed": 0, "rss": 0}
            errors: list[BaseException] = []

            def run(prompt: list[int]) -> None:
                try:
                    _greedy(server, prompt, n=48)
                except BaseException as exc:  # surfaced below
                    errors.append(exc)

            threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                seg = _kv(server)["segments"]
                peak["committed"] = max(peak["committed"], seg["committed_bytes"])
                peak["rss"] = max(peak["rss"], server.rss_bytes())
                time.sleep(0.3)
            for t in threads:
                t.join()
            assert not errors, errors
            seg = _kv(server)["segments"]
            peak["committed"] = max(peak["committed"], seg["committed_bytes"])
            grown = peak["committed"] - start["committed_bytes"]
            assert grown >= 4 * PROMPT * 512 * 0.9, (start, peak)  # 512 B/token on this model
            assert peak["rss"] - start_rss > grown * 0.5
            # No flush: the finished requests' KV sits in the prefix cache until the idle policy.
            segment_bytes = seg["committed_bytes"] // seg["committed_segments"]
            limit = start["committed_bytes"] + segment_bytes + retain * 512
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and seg["committed_bytes"] > limit:
                time.sleep(0.5)
                seg = _kv(server)["segments"]
            assert seg["committed_bytes"] <= limit, (seg, limit)
            assert seg["releases"] >= 1
            assert "Idle for 1.0 s: evicted" in server.log()
            # RSS also carries the Python heaps of three processes; what must show is the drop.
            assert peak["rss"] - server.rss_bytes() > grown * 0.5
            # The retained cache still serves: the prefix of a retained request hits.
            kept = _kv(server)["segments"]["used_tokens"]
            assert 0 < kept <= retain + 2048
            assert "memory leak detected" not in server.log()

    def test_positions_past_the_model_maximum_grow_the_rope_cache(
        self, hf_model, solo_servers: dict[str, LocalServer]
    ) -> None:
        """A prompt past the model's maximum positions: the lazily grown RoPE cache must give the
        tokens HF computes (its rotary embedding has no length limit; the weights are the same)."""
        rng = random.Random(23)
        prompt = [rng.randrange(3, 2048) for _ in range(SHORT_MAX_POSITIONS + 1000)]
        with solo_servers["positions"].awake() as s:
            out = _greedy(s, prompt, n=4)["output_ids"]
            assert "RoPE cache(s) grow with the positions in use" in s.log()
        assert out == hf_greedy(hf_model, prompt, 4)

    def test_cap_reached_queues_requests_and_stays_up(
        self, solo_servers: dict[str, LocalServer]
    ) -> None:
        """More concurrent work than the cap holds: upstream queues or retracts; all finish. The
        gauges on /metrics say what was committed (the idle policy keeps up to 8,192 tokens of
        prefix cache, the whole pool, so the finished requests' segments stay)."""
        with solo_servers["cap"].awake() as server:
            rng = random.Random(9)
            prompts = [[rng.randrange(3, 2048) for _ in range(3000)] for _ in range(6)]
            results, errors = generate_concurrently(server, [_payload(p, 64) for p in prompts])
            assert not errors, errors
            assert [r["meta_info"]["completion_tokens"] for r in results] == [64] * 6
            seg = _kv(server)["segments"]
            # 6 x 3,064 tokens do not fit in 8,192: upstream queued some while the pool was full.
            assert re.search(r"#queue-req: [1-9]", server.log())
            assert seg["peak_committed_segments"] >= seg["total_segments"] - 3  # pool nearly full
            assert seg["committed_bytes"] <= seg["reserved_bytes"]
            assert server.generate({"text": "still up", "sampling_params": {"max_new_tokens": 2}})
            assert "memory leak detected" not in server.log()
            gauges, text = _kv_gauges(server)
        assert gauges["sglang:kv_alloc_committed_bytes"] > 0
        assert (
            gauges["sglang:kv_alloc_committed_segments"] >= 3
        )  # the finished requests stay cached
        assert gauges["sglang:kv_alloc_token_capacity"] == 8192
        assert 'mode="segmented"' in text


class TestPageSizes:
    """Page sizes 1 and 16, started side by side (`servers_by_page`)."""

    @pytest.mark.parametrize("page_size", PAGE_SIZES)
    def test_tokens_equal_static_and_hf_across_segments(
        self,
        static_outputs: list[list[int]],
        long_prompts: list[list[int]],
        servers_by_page: dict[int, LocalServer],
        page_size: int,
    ) -> None:
        with servers_by_page[page_size].awake() as server:
            first = [_greedy(server, p) for p in long_prompts]
            assert [o["output_ids"] for o in first] == static_outputs
            kv = _kv(server)
            assert kv["segments"]["segment_tokens"] == 1024
            assert kv["segments"]["peak_committed_segments"] >= LONG // 1024  # many segments
            # Again: now from the prefix cache.
            second = [_greedy(server, p) for p in long_prompts]
            assert [o["output_ids"] for o in second] == static_outputs
            assert second[-1]["meta_info"]["cached_tokens"] > LONG // 2
            assert server.generate({"text": "ok", "sampling_params": {"max_new_tokens": 1}})


class TestUpstreamChecks:
    """Upstream's own checks on, page sizes 1 and 16 (`checked_servers`)."""

    @pytest.mark.parametrize("page_size", PAGE_SIZES)
    def test_upstreams_own_checks_hold_under_shared_prefix_load(
        self, checked_servers: dict[int, LocalServer], page_size: int
    ) -> None:
        """Upstream's busy-loop leak identity, its KV page census (double free, use-after-free)
        and its allocator debug checks, all on, while concurrent requests share prefixes, grow
        and shrink the pool."""
        rng = random.Random(17)
        prefixes = [[rng.randrange(3, 2048) for _ in range(600)] for _ in range(4)]
        with checked_servers[page_size].awake() as server:
            for round_ in range(2):
                prompts = [
                    prefixes[i % 4]
                    + [rng.randrange(3, 2048) for _ in range(rng.randrange(100, 400))]
                    for i in range(12)
                ]
                results, errors = generate_concurrently(server, [_payload(p, 16) for p in prompts])
                assert not errors, errors
                assert len(results) == 12
                if round_ == 1:
                    assert sum(r["meta_info"]["cached_tokens"] for r in results) > 0
                time.sleep(2)  # idle: the policy evicts and releases between the rounds
            seg = _kv(server)["segments"]
            assert seg["commits"] > 1 and seg["releases"] >= 1
            log = server.log()
            for bad in ("Leak", "leak detected", "double free", "use-after-free", "Traceback"):
                assert bad not in log, bad
