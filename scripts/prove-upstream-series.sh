#!/usr/bin/env bash
# The proof of the upstream PR series (issue 12): apply it to a copy of the installed upstream
# package in a scratch environment that has no plugin, then run this project's server tests
# against that patched upstream.
#
#   bash scripts/prove-upstream-series.sh [OUT_DIR] [extra pytest args]
#   SERIES_PROOF_TESTS="test/e2e/test_real_model.py ..." bash scripts/prove-upstream-series.sh
#
# SERIES_PROOF_TESTS picks the server tests of step 6 (default: all of test/e2e but the two
# files named below); CI's third lane runs the short list in scripts/test.sh.
#
# The scratch environment is a venv whose site-packages links every package of the project's
# venv except sglang (a patched copy, a git repository with one commit per PR) and
# sglang-kvalloc (absent: no entry point, no hooks). Only the test harness travels: the
# stdlib-only helpers `sglang_kvalloc_harness.serving` / `tiny_model` and the CPU-kernel shim
# `sglang_kvalloc_harness.kernels` (it makes sgl_kernel importable on a machine without CUDA; static
# upstream needs it here as much as the series does). The script checks that the plugin is
# not there before running anything.
#
# Tests run: test/e2e except the file that imports the plugin's own modules
# (test_planner_matches_upstream.py, the planner) and test_gpu_kit.py (the kit packs and
# checks the plugin itself). All of them take about 30 minutes on 2 cores; CI runs a short
# list (scripts/test.sh), about 11 minutes.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SGLANG_KVALLOC_VENV:-$HOME/.cache/sglang-kvalloc/venv}"
out="${1:-$repo/.series-proof}"
shift || true
py="$venv/bin/python"
site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
base_py="$("$py" -c 'import sys; print(sys._base_executable)')"

rm -rf "$out"
mkdir -p "$out"
scratch="$out/venv"
"$base_py" -m venv --without-pip "$scratch"
ssite="$("$scratch/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

# 1. Every installed package but sglang and this project, linked.
for entry in "$site"/*; do
  name="$(basename "$entry")"
  case "$name" in
    sglang | sglang_kvalloc* | _editable_impl_sglang_kvalloc* | __editable__*kvalloc* | __pycache__) ;;
    *) ln -s "$entry" "$ssite/$name" ;;
  esac
done

# 2. A copy of the installed upstream package, as a git repository, and the series on it.
"$py" - "$site/sglang" "$ssite/sglang" <<'EOF'
import shutil, sys
shutil.copytree(sys.argv[1], sys.argv[2], ignore=shutil.ignore_patterns("__pycache__"))
EOF
git -C "$ssite/sglang" init -q
git -C "$ssite/sglang" -c user.name=proof -c user.email=proof@localhost add -A
git -C "$ssite/sglang" -c user.name=proof -c user.email=proof@localhost \
  commit -q -m "sglang 0.5.23 as installed"
"$py" -m sglang_kvalloc_harness.series apply "$ssite/sglang" | tee "$out/apply.log"
prs="$("$py" -c 'from sglang_kvalloc_harness.series import SERIES; print(len(SERIES))')"
git -C "$ssite/sglang" log --stat --format='%n%h %s' "HEAD~$prs..HEAD" > "$out/series-log.txt"

# 3. The test harness only: helpers and the CPU-kernel shim, no plugin.
# The harness package, and of the product only the package marker and its import-hook helpers
# (the harness's kernel fallback uses `in_tree_finder.real_spec`); not the plugin.
mkdir -p "$out/harness/sglang_kvalloc"
cp -r "$repo/harness/sglang_kvalloc_harness" "$out/harness/"
# (the package marker installs in_tree_finder, which finds nothing there: no in_tree/ copied).
cp "$repo/python/sglang_kvalloc/__init__.py" "$repo/python/sglang_kvalloc/in_tree_finder.py" \
  "$out/harness/sglang_kvalloc/"
printf '%s\nimport sglang_kvalloc_harness.kernels.bootstrap\n' "$out/harness" > "$ssite/kvalloc_harness.pth"

# 4. The plugin is not there; the series is.
"$scratch/bin/python" - <<'EOF'
import importlib.metadata as md, importlib.util, sglang.srt.mem_cache.segmented as k
ours = [e for e in md.entry_points(group="sglang.srt.plugins") if "kvalloc" in e.value]
assert not ours, f"the plugin's entry point is installed: {ours}"
assert importlib.util.find_spec("sglang_kvalloc.upstream") is None, "the plugin is importable"
assert importlib.util.find_spec("sglang.srt.kvalloc") is None, "a srt/kvalloc/ in the tree"
from sglang.srt.server_args import ServerArgs
from sglang.srt.arg_groups.fields.kv_alloc import KvAlloc
assert KvAlloc in ServerArgs._NAMESPACES, "KvAlloc not listed in _INPUT_NAMESPACES"
import inspect
assert "checked_cli_args(" in inspect.getsource(ServerArgs.from_cli_args), "no inline call"
print("[proof] no sglang-kvalloc entry point, no sglang_kvalloc.upstream; series at", k.__file__)
EOF

# 5. Each PR leaves upstream importable and parsing its command line (static is the default),
# and passes its own tests.
branch="$(git -C "$ssite/sglang" branch --show-current)"
for n in $(seq "$prs" -1 0); do
  git -C "$ssite/sglang" checkout -q "HEAD~$n"
  flag=""
  [ "$n" -lt "$prs" ] && flag="--kv-alloc-mode static"
  "$scratch/bin/python" -c "
import argparse, sys
from sglang.srt.server_args import ServerArgs
import sglang.srt.managers.scheduler, sglang.srt.mem_cache.kv_cache_configurator
p = argparse.ArgumentParser(); ServerArgs.add_cli_args(p)
a = p.parse_args(['--model-path', 'm'] + sys.argv[1:])
print('[proof] upstream + PRs 1..%d: imports, parses %r' % ($prs - $n, getattr(a, 'kv_alloc_mode', 'no flag')))
" $flag 2>&1 | grep '^\[proof\]' | tee -a "$out/per-pr.log"
  # ... and the PR just applied passes its own tests, in upstream's form (upstream_tests/).
  k=$((prs - n))
  own="$([ "$k" -gt 0 ] && "$py" -m sglang_kvalloc_harness.series tests "$k" || true)"
  if [ -n "$own" ]; then
    set +e
    # shellcheck disable=SC2086  # one path per word
    result="$(cd "$repo/upstream_tests" && SGLANG_TEST_MAX_RETRY=0 "$scratch/bin/python" -m pytest \
      -q -p no:cacheprovider -W ignore::DeprecationWarning $own 2>&1)"
    own_status=$?
    set -e
    echo "[proof] PR $k's own tests: $(echo "$result" | tail -1)" | tee -a "$out/per-pr.log"
    if [ "$own_status" -ne 0 ]; then
      echo "$result" | tail -40
      exit "$own_status"
    fi
  fi
  git -C "$ssite/sglang" checkout -q "$branch"
done

# 6. The server tests against the patched upstream.
cd "$repo"
set +e
tests="${SERIES_PROOF_TESTS:-test/e2e --ignore=test/e2e/test_planner_matches_upstream.py --ignore=test/e2e/test_gpu_kit.py}"
# shellcheck disable=SC2086  # the list is words: paths, node ids and --ignore options
"$scratch/bin/python" -m pytest $tests -q -p no:cacheprovider -W ignore::DeprecationWarning \
  --durations=10 --junitxml="$out/series-e2e.xml" "$@" 2>&1 | tee "$out/series-e2e.log"
status=${PIPESTATUS[0]}
set -e
echo "[proof] pytest exit $status; results in $out/series-e2e.xml"
exit "$status"
