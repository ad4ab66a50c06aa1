#!/usr/bin/env bash
# Set everything up, then run the test suite. `.ci/run` calls exactly this.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SGLANG_KVALLOC_VENV:-$HOME/.cache/sglang-kvalloc/venv}"
bash "$repo/scripts/setup.sh"
cd "$repo"
set +e
"$venv/bin/python" -m pytest test -q -p no:cacheprovider -W ignore::DeprecationWarning \
  --durations=15 "$@"
status=$?
set -e
# pytest exits 5 when it collected no tests: that is a broken suite, not a pass.
if [ "$status" -eq 5 ]; then
  echo "[test] pytest collected no tests" >&2
  exit 1
fi
exit "$status"
