"""The KV budget ledgers of this user on this machine (``--kv-budget``): list them, set a
server's limit, reap the slots of servers that are gone, remove a ledger.

    python -m sglang_kvalloc.budget list
    python -m sglang_kvalloc.budget limit LEDGER PID BYTES
    python -m sglang_kvalloc.budget reap [LEDGER]
    python -m sglang_kvalloc.budget remove LEDGER

LEDGER is a file name from ``list`` (or its path). Bytes take K/M/G/T suffixes (powers of
1024: 8G is 8 GiB).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sglang_kvalloc.in_tree_finder import standalone

# The ledger and the rule of --kv-budget-bytes (in_tree/, standard library only), loaded
# without SGLang where it is not loaded (`import sglang` loads torch and most of SGLang).
_ledger = standalone("sglang.srt.mem_cache.segmented.shared_budget")
DEFAULT_DIR = _ledger.DEFAULT_DIR
BudgetError = _ledger.BudgetError
list_ledgers = _ledger.list_ledgers
read_ledger = _ledger.read_ledger
update_ledger = _ledger.update_ledger
parse_bytes = standalone("sglang.srt.mem_cache.segmented.settings").parse_bytes


def _path(name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() or path.exists() else DEFAULT_DIR / name


def _list() -> int:
    ledgers = list_ledgers()
    if not ledgers:
        print(f"no KV budget ledger of this user in {DEFAULT_DIR}")
    for path in ledgers:
        try:
            ledger, dead = read_ledger(path)
        except BudgetError as exc:
            print(f"{path.name}: {exc}")
            continue
        print(f"{path.name}: {ledger.committed():,} of {ledger.total:,} bytes committed")
        for slot in ledger.slots:
            state = "gone" if slot.pid in dead else "alive"
            limit = f"{slot.limit:,}" if slot.limit else "the total"
            print(
                f"  pid {slot.pid} ({state}) {slot.name}: committed {slot.committed:,}, "
                f"floor {slot.floor:,}, limit {limit}, wanted {slot.wanted:,}"
            )
    return 0


def _limit(name: str, pid: int, nbytes: int) -> int:
    def change(ledger):  # noqa: ANN001, ANN202
        for slot in ledger.slots:
            if slot.pid == pid:
                slot.limit = nbytes
                return f"pid {pid}: limit {nbytes:,} bytes"
        raise BudgetError(f"no server with pid {pid} in {name}")

    print(update_ledger(_path(name), change))
    return 0


def _reap(name: str | None) -> int:
    for path in [_path(name)] if name else list_ledgers():
        print(f"{path.name}: " + update_ledger(path, lambda ledger: "dead slots reaped"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sglang_kvalloc.budget",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    sub = parser.add_subparsers(dest="verb", required=True)
    sub.add_parser("list", help="every ledger of this user, with its servers")
    limit = sub.add_parser("limit", help="set one server's limit (0: the total)")
    limit.add_argument("ledger")
    limit.add_argument("pid", type=int)
    limit.add_argument("bytes", type=_bytes_arg)
    reap = sub.add_parser("reap", help="remove the slots of servers that are gone")
    reap.add_argument("ledger", nargs="?")
    remove = sub.add_parser("remove", help="delete a ledger (no server may be using it)")
    remove.add_argument("ledger")
    args = parser.parse_args(argv)
    try:
        if args.verb == "list":
            return _list()
        if args.verb == "limit":
            return _limit(args.ledger, args.pid, args.bytes)
        if args.verb == "reap":
            return _reap(args.ledger)
        os.unlink(_path(args.ledger))
        print(f"removed {args.ledger}")
        return 0
    except (BudgetError, OSError) as exc:
        parser.exit(1, f"{parser.prog}: {exc}\n")


def _bytes_arg(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
