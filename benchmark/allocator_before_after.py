"""The allocator's cost before and after a change, side by side (not a CI test).

Runs `allocator_micro.py` from two checkouts in turn (base, head, head, base, ...), each with
its own package on PYTHONPATH, and compares the segmented allocator's steady cost per
scheduler step: head / base per round and row, median [min, max]. Each run's own ratio to
upstream's allocator (measured in the same process) is kept too, as a drift-free check.

    python benchmark/allocator_before_after.py --base 3f36f7b^ --rounds 3 \
        --out docs/runs/allocator_before_after.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import provenance  # benchmark/, the script's own folder

HERE = Path(__file__).resolve().parent.parent


def checkout(rev: str, into: Path) -> Path:
    """A detached worktree of ``rev`` (the package as it was there)."""
    subprocess.run(["git", "-C", str(HERE), "worktree", "add", "--detach", str(into), rev],
                   check=True, capture_output=True)  # fmt: skip
    return into


def run_micro(tree: Path, args: argparse.Namespace, out: Path) -> list[dict]:
    env = dict(os.environ)
    paths = [tree / "python"] + ([tree / "harness"] if (tree / "harness").is_dir() else [])
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths)
    command = [sys.executable, str(tree / "benchmark" / "allocator_micro.py"), "--out", str(out)]
    command += ["--steps", str(args.steps), "--repeats", str(args.repeats), "--pool-tokens"]
    command += [str(p) for p in args.pool_tokens]
    # The JSON comes first; the plot after it needs matplotlib, which may be missing.
    done = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True)
    figures = out / "allocator_micro.json"
    if not figures.exists():
        raise RuntimeError(f"{tree.name}: allocator_micro.py failed:\n{done.stderr[-2000:]}")
    return json.loads(figures.read_text())["rows"]


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def compare(runs: dict[str, list[list[dict]]], i: int, rounds: int) -> dict:
    """Row ``i`` of every run: the segmented cost per step on each side, head / base per
    round, and each side's own segmented / upstream ratio."""
    first = runs["base"][0][i]

    def step(side: str, r: int) -> float:
        return runs[side][r][i]["segmented"]["ns_per_step"]["median"]

    def own(side: str) -> list[float]:
        return [runs[side][r][i]["ratio_segmented_over_upstream"]["median"] for r in range(rounds)]

    return {
        **{k: first[k] for k in ("pool_tokens", "page_size", "trace")},
        "segmented_ns_per_step": {s: _spread([step(s, r) for r in range(rounds)]) for s in runs},
        "head_over_base": _spread([step("head", r) / step("base", r) for r in range(rounds)]),
        "segmented_over_upstream": {s: _spread(own(s)) for s in runs},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision before the change")
    parser.add_argument("--head", default="HEAD")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pool-tokens", type=int, nargs="+", default=[65_536, 1_048_576])
    parser.add_argument("--out", type=Path, default=Path("docs/runs/allocator_before_after.json"))
    args = parser.parse_args(argv)
    runs: dict[str, list[list[dict]]] = {"base": [], "head": []}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {side: checkout(getattr(args, side), Path(tmp) / side) for side in runs}
        try:
            for round_ in range(args.rounds):
                order = ("base", "head") if round_ % 2 == 0 else ("head", "base")
                for side in order:
                    out = Path(tmp) / f"{side}-{round_}"
                    out.mkdir()
                    runs[side].append(run_micro(trees[side], args, out))
                    print(f"round {round_ + 1}/{args.rounds}: {side} done", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(HERE), "worktree", "remove", "--force",
                                str(tree)], capture_output=True)  # fmt: skip
    rows = [compare(runs, i, args.rounds) for i in range(len(runs["base"][0]))]
    result = {
        "provenance": provenance.record("benchmark/allocator_before_after.py", argv),
        "base": args.base,
        "head": args.head,
        "rounds": args.rounds,
        "steps": args.steps,
        "repeats": args.repeats,
        "rows": rows,
        "head_over_base_all_rows": _spread([r["head_over_base"]["median"] for r in rows]),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        h = r["head_over_base"]
        print(f"{r['pool_tokens']:>9} page {r['page_size']:>2} {r['trace']:<8} head/base "
              f"{h['median']:.3f} [{h['min']:.3f}, {h['max']:.3f}]")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
