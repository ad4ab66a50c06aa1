"""What the kit sends each server, and the checks on what comes back.

Greedy requests (token ids, ``ignore_eos``) that span many segments and ``req_to_token``
rows, prefix-cache hits, a concurrent burst with memory sampled while it runs, and an abort.
Outputs are kept so segmented's and auto's tokens can be compared with static's.
"""

from __future__ import annotations

import random
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from kit_server import KitServer, Memory


@dataclass
class Workload:
    """Sizes of the requests; a GPU profile and a CPU profile fill it differently."""

    vocab: int
    sequential: list[int]
    new_tokens: int
    prefix_extra: int
    burst: list[int]
    burst_new_tokens: int
    abort_prompt: int
    abort_new_tokens: int
    abort_after_s: float
    seed: int = 7

    def prompts(self) -> dict[str, Any]:
        """Deterministic token ids (3.. avoids the special tokens)."""
        rng = random.Random(self.seed)

        def ids(n: int) -> list[int]:
            return [rng.randrange(3, self.vocab) for _ in range(n)]

        sequential = [ids(n) for n in self.sequential]
        return {
            "sequential": sequential,
            "prefix": [sequential[-1] + ids(self.prefix_extra), sequential[-2]],
            "burst": [ids(n) for n in self.burst],
            "abort": ids(self.abort_prompt),
        }


@dataclass
class Checks:
    """Named pass/fail results; ``strict`` ones decide the kit's exit status."""

    items: list[dict[str, Any]] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: Any = None, strict: bool = True) -> bool:
        self.items.append({"name": name, "ok": bool(ok), "strict": strict, "detail": detail})
        return bool(ok)

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.items if c["strict"])


def greedy(
    server: KitServer, ids: list[int], n: int, rid: str | None = None, timeout: float = 600
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True},
    }
    if rid:
        payload["rid"] = rid
    return server.generate(payload, timeout=timeout)


def _summary(resp: dict[str, Any]) -> dict[str, Any]:
    meta = resp.get("meta_info", {})
    return {
        "output_ids": resp.get("output_ids"),
        "prompt_tokens": meta.get("prompt_tokens"),
        "cached_tokens": meta.get("cached_tokens"),
        "finish_reason": meta.get("finish_reason"),
        "e2e_latency": meta.get("e2e_latency"),
    }


def committed(kv: dict[str, Any]) -> int | None:
    seg = kv.get("segments") or {}
    return seg.get("committed_bytes")


def run(server: KitServer, work: Workload, memory: Memory) -> dict[str, Any]:
    """Send the whole workload to ``server``; returns outputs, samples and timings."""
    prompts = work.prompts()
    out: dict[str, Any] = {}
    started = time.monotonic()
    out["sequential"] = [
        _summary(greedy(server, p, work.new_tokens)) for p in prompts["sequential"]
    ]
    out["sequential_seconds"] = round(time.monotonic() - started, 2)
    out["prefix"] = [_summary(greedy(server, p, work.new_tokens)) for p in prompts["prefix"]]

    # The burst, with memory and committed bytes sampled while it runs.
    results: list[dict[str, Any] | None] = [None] * len(prompts["burst"])
    errors: list[str] = []

    def one(i: int, ids: list[int]) -> None:
        try:
            results[i] = _summary(greedy(server, ids, work.burst_new_tokens))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [
        threading.Thread(target=one, args=(i, p), daemon=True)
        for i, p in enumerate(prompts["burst"])
    ]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    samples = []
    while any(t.is_alive() for t in threads):
        samples.append({"kv": server.kv(), "memory": memory.reading([server])})
        time.sleep(0.3)
    for t in threads:
        t.join()
    samples.append({"kv": server.kv(), "memory": memory.reading([server])})
    out["burst"] = results
    out["burst_errors"] = errors
    out["burst_seconds"] = round(time.monotonic() - t0, 2)
    out["busy_samples"] = samples
    out["abort"] = abort_one(server, prompts["abort"], work)
    out["after_abort"] = _summary(greedy(server, prompts["sequential"][0], 4))
    return out


def abort_one(server: KitServer, ids: list[int], work: Workload) -> dict[str, Any]:
    """A long request aborted through /abort_request while it decodes."""
    rid = f"kit-abort-{uuid.uuid4().hex[:8]}"
    box: dict[str, Any] = {}

    def send() -> None:
        try:
            box["response"] = _summary(greedy(server, ids, work.abort_new_tokens, rid=rid))
        except Exception as exc:  # noqa: BLE001 - an aborted request may answer with an error
            box["error"] = f"{type(exc).__name__}: {exc}"

    t = threading.Thread(target=send, daemon=True)
    started = time.monotonic()
    t.start()
    time.sleep(work.abort_after_s)
    server.abort(rid)
    t.join(timeout=120)
    box["seconds"] = round(time.monotonic() - started, 2)
    box["rid"] = rid
    resp = box.get("response") or {}
    box["completion_tokens"] = len(resp.get("output_ids") or [])
    reason = resp.get("finish_reason") or {}
    box["aborted"] = bool(box.get("error")) or reason.get("type") == "abort"
    if resp:
        resp.pop("output_ids", None)
    return box


def wait_idle(
    server: KitServer, limit_bytes: int, timeout: float, poll: float = 0.5
) -> dict[str, Any]:
    """Poll /server_info until the KV committed bytes are at most ``limit_bytes``."""
    started = time.monotonic()
    kv = server.kv()
    while time.monotonic() - started < timeout and (committed(kv) or 0) > limit_bytes:
        time.sleep(poll)
        kv = server.kv()
    return {"kv": kv, "seconds": round(time.monotonic() - started, 2)}


def compare(reference: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Token equality of two runs of the same workload, group by group."""

    def ids(run: dict[str, Any], group: str) -> list[Any]:
        return [(r or {}).get("output_ids") for r in run.get(group) or []]

    out: dict[str, Any] = {}
    for group in ("sequential", "prefix", "burst"):
        a, b = ids(reference, group), ids(other, group)
        same = [x == y and x is not None for x, y in zip(a, b, strict=False)]
        out[group] = {"equal": sum(same), "of": len(a), "all_equal": len(a) == len(b) and all(same)}
        if not out[group]["all_equal"]:
            out[group]["first_differences"] = [
                {"request": i, "reference": x[:16] if x else x, "other": y[:16] if y else y}
                for i, (x, y, s) in enumerate(zip(a, b, same, strict=False))
                if not s
            ][:3]
    return out


def log_committed_mb(log: str) -> float | None:
    """'committed now: X MB' from the segmented pool's start-up line (the first one)."""
    match = re.search(r"Segmented \w+ KV pool: .*? committed now: ([0-9.]+) MB", log)
    return float(match.group(1)) if match else None


def standard_checks(checks: Checks, mode: str, result: dict[str, Any], work: Workload) -> None:
    """What every mode must do: serve everything, hit the prefix cache, abort cleanly."""
    seq = result["sequential"]
    checks.add(
        f"{mode}: sequential requests answered in full",
        all(len(r["output_ids"] or []) == work.new_tokens for r in seq),
        [r["prompt_tokens"] for r in seq],
    )
    longest = len(work.prompts()["sequential"][-1])
    hit = result["prefix"][0]["cached_tokens"] or 0
    checks.add(f"{mode}: prefix hit on the longest prompt", hit >= longest, [hit, longest])
    checks.add(
        f"{mode}: burst answered",
        not result["burst_errors"] and all(r is not None for r in result["burst"]),
        result["burst_errors"][:3],
    )
    abort = result["abort"]
    checks.add(
        f"{mode}: abort ends the request early",
        abort["aborted"] and abort["completion_tokens"] < work.abort_new_tokens,
        {k: abort.get(k) for k in ("aborted", "completion_tokens", "seconds", "error")},
    )
    checks.add(
        f"{mode}: serves after the abort",
        len(result["after_abort"]["output_ids"] or []) == 4,
    )
