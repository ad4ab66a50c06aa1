#!/usr/bin/env bash
# The GPU kit's one command, from the repository root, on a GPU machine with torch and no
# SGLang (the device tool's nvidia-h100-x1 / nvidia-h200):
#   bash gpu_kit/kit.sh OUT [kit_run.py options]
# It needs .gpu-kit/ beside the working tree (made here with: python gpu_kit/make_kit.py).
# Installs the kit into this machine's python3, checks the imports, probes upstream's default
# GPU path (fa3, JIT rope, breakable prefill graphs, CUDA fused ops), builds a random-weight
# 1B-class Llama on the GPU, then runs real servers on that path (static, segmented, a
# benchmark between them, auto at 10M); everything lands in OUT: results.json (rewritten after every phase),
# kit.log and one log per server. Stops itself after KIT_TIMEOUT_S (default 500 s).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:?usage: bash gpu_kit/kit.sh OUT [options]}"
shift
mkdir -p "$out"
py="${KIT_PYTHON:-python3}"
if [ ! -f .gpu-kit/manifest.json ]; then
  echo "[kit] no .gpu-kit/manifest.json: run python gpu_kit/make_kit.py first (and carry .gpu-kit)" \
    | tee "$out/kit.log"
  exit 2
fi
export PYTHONUNBUFFERED=1
timeout --signal=TERM --kill-after=20 "${KIT_TIMEOUT_S:-500}" \
  "$py" gpu_kit/kit_run.py "$out" "$@" 2>&1 | tee "$out/kit.log"
status=${PIPESTATUS[0]}
echo "[kit] exit $status; results in $out/results.json" | tee -a "$out/kit.log"
exit "$status"
