#!/usr/bin/env bash
# Set everything up, then run the demo: build the tiny model, serve it on the CPU with
# --kv-alloc-mode auto, send a few requests, print answers and memory figures, stop.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SGLANG_KVALLOC_VENV:-$HOME/.cache/sglang-kvalloc/venv}"
bash "$repo/scripts/setup.sh"
cd "$repo"
exec "$venv/bin/python" -m sglang_kvalloc.demo "$@"
