#!/usr/bin/env bash
# Rehearse the GPU kit on this CPU machine before spending GPU time (not CI: the first run
# downloads about 3 GB). A Python 3.12 venv holds the GPU machine's versions (torch 2.11.0,
# triton 3.6.0, transformers 5.17.0, tokenizers 0.23.2 and the other packages upstream
# imports from its list); .gpu-kit is installed into it exactly as kit.sh does, the imports
# run with torch reporting an H100, then the kit's static and segmented servers run on the CPU
# engine under the GPU machine's closure. Run from the repository root after make_kit:
#   bash gpu_kit/rehearse_kit.sh [OUT]        (about 6 minutes on 2 cores once the venv exists)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-/tmp/sglang-kvalloc-kit-rehearsal}"
venv="${KIT_REHEARSAL_VENV:-$HOME/.cache/sglang-kvalloc/gpu-like-venv}"
py312="${PY312:-$(command -v python3.12 || echo "$HOME/.pyenv/versions/3.12.1/bin/python")}"
[ -f "$repo/.gpu-kit/manifest.json" ] || { echo "run python gpu_kit/make_kit.py first"; exit 2; }
if [ ! -x "$venv/bin/python" ]; then
  "$py312" -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.11.0 triton==3.6.0 transformers==5.17.0 \
    tokenizers==0.23.2 safetensors==0.8.0 torchvision==0.26.0 torchaudio==2.11.0 accelerate \
    aiohttp anyio attrs certifi click cuda-bindings cuda-pathfinder cython einops filelock \
    fsspec h11 httpx huggingface-hub jinja2 lxml ml-dtypes numpy nvidia-ml-py packaging \
    pillow psutil pygments pyyaml regex requests rich scipy sentencepiece setuptools sympy \
    tiktoken tqdm uvloop pathspec pluggy wheel
fi
# A snapshot of HEAD, so the editable install does not follow later edits of the tree.
snap="$(mktemp -d)"
trap 'rm -rf "$snap"' EXIT
git -C "$repo" archive HEAD | tar -x -C "$snap"
cp -r "$repo/.gpu-kit" "$snap/"
rm -rf "$out" && mkdir -p "$out"
cd "$snap"
KIT_PYTHON="$venv/bin/python" KIT_FAKE_CUDA=1 bash gpu_kit/kit.sh "$out/install" \
  --phases install,imports
"$venv/bin/python" -m sglang_kvalloc_harness.tiny_model --out "$snap/models/tiny" >/dev/null
"$venv/bin/python" gpu_kit/kit_run.py "$out/cpu" --profile cpu --model "$snap/models/tiny" \
  --phases imports,static,segmented,bench,stop --deadline-s 1500 | tee "$out/cpu.log"
echo "[rehearsal] results: $out/install/results.json and $out/cpu/results.json"
