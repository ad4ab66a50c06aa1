#!/usr/bin/env bash
# The GPU suite in one command, from the repository root, on a machine with a CUDA GPU:
#   bash test/gpu/run.sh [results.json]
# Needs torch, triton and cuda-bindings (and pytest). Where upstream SGLang is not installed,
# the few upstream modules it needs come from .gpu-upstream/, made beforehand where upstream
# is installed with: python test/gpu/collect_upstream.py
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
results="${1:-gpu-results.json}"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
KVALLOC_GPU_RESULTS="$results" PYTHONPATH="python${PYTHONPATH:+:$PYTHONPATH}" \
  python3 -m pytest test/gpu -q -p no:cacheprovider -rs "${@:2}"
echo "[gpu] figures in $results"
