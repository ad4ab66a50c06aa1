#!/usr/bin/env bash
# Set everything up, then run the test suite. `.ci/run` calls exactly this.
# Three lanes, fail fast: the unit tests (seconds to minutes, no server), the end-to-end tests
# (real servers on 127.0.0.1; marked `e2e`), then the upstream series' proof: the series
# applied to a copy of the installed upstream, installed without the plugin, each PR importing
# and parsing in turn, and the server tests below against it. Arguments go to pytest as one run instead,
# e.g. `bash scripts/test.sh test/unit/test_segments.py -x` or `bash scripts/test.sh -m e2e`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SGLANG_KVALLOC_VENV:-$HOME/.cache/sglang-kvalloc/venv}"
bash "$repo/scripts/setup.sh"
cd "$repo"
# The real model the e2e tests serve is built once next to the venv (23 s from the wheel's
# GGUF) and rebuilt whenever that file changes, as the venv is set up once.
export SGLANG_KVALLOC_REAL_MODEL="${SGLANG_KVALLOC_REAL_MODEL:-$(dirname "$venv")/models/smollm2-135m-instruct}"

# A test that runs past SGLANG_KVALLOC_TEST_HANG_LIMIT_S (the slowest takes about 4 minutes on
# two cores) dumps every thread's stack and ends the run: a hang fails in minutes, not at CI's
# 90-minute limit.
hang_limit="${SGLANG_KVALLOC_TEST_HANG_LIMIT_S:-900}"

run_pytest() {
  set +e
  "$venv/bin/python" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
    -o faulthandler_timeout="$hang_limit" -o faulthandler_exit_on_timeout=true \
    --durations=15 "$@"
  local status=$?
  set -e
  # pytest exits 5 when it collected no tests: that is a broken suite, not a pass.
  if [ "$status" -eq 5 ]; then
    echo "[test] pytest collected no tests: $*" >&2
    return 1
  fi
  return "$status"
}

if [ "$#" -gt 0 ]; then
  run_pytest "$@"
  exit $?
fi
start=$SECONDS
echo "[test] lane 1/3: unit tests (test/unit, test/gpu: skipped without CUDA; upstream_tests: the series' own tests, run here with the plugin)"
run_pytest test/unit test/gpu upstream_tests
echo "[test] lane 1 passed in $((SECONDS - start)) s; lane 2/3: end-to-end tests (test/e2e)"
run_pytest test/e2e
echo "[test] lane 2 passed in $((SECONDS - start)) s; lane 3/3: the upstream series' proof"
# Static, segmented and auto at 10M, and the real model, served by the patched upstream alone.
SERIES_PROOF_TESTS="test/e2e/test_newcomer_commands.py::TestHeadlineCommand::test_as_typed \
test/e2e/test_segmented.py::TestOneServerEach::test_10m_context_costs_what_4k_static_costs \
test/e2e/test_real_model.py" \
  bash "$repo/scripts/prove-upstream-series.sh" "$repo/.series-proof" \
  -o faulthandler_timeout="$hang_limit" -o faulthandler_exit_on_timeout=true
echo "[test] all three lanes passed in $((SECONDS - start)) s"
