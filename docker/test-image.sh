#!/usr/bin/env bash
# Build the CPU image, start it with its default command (the headline command as typed), send
# it a request, and check what it chose. Needs root and podman (or a running docker daemon);
# not part of CI. Where no registry can be reached, BASE_IMAGE is built locally: debootstrap
# of Debian bookworm (python3.11) imported as an image.
#
#   bash docker/test-image.sh            # ENGINE=podman|docker, PORT=30000, BASE_IMAGE=...
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
engine="${ENGINE:-$(command -v podman || command -v docker)}"
port="${PORT:-30000}"
image="${IMAGE:-localhost/sglang-kvalloc:cpu}"
base="${BASE_IMAGE:-localhost/debian-bookworm-python:12}"
say() { echo "[test-image] $*"; }

if [ "$(basename "$engine")" = podman ]; then
  # Sandboxes often forbid podman's default ulimits above the host's hard limits, and crun
  # refuses hybrid cgroup v1/v2 hosts that runc accepts: a private config for both.
  conf="$(mktemp)"
  printf '[containers]\ndefault_ulimits = []\n' > "$conf"
  command -v runc > /dev/null && printf '[engine]\nruntime = "runc"\n' >> "$conf"
  export CONTAINERS_CONF="$conf"
fi

if ! "$engine" image inspect "$base" > /dev/null 2>&1; then
  rootfs="$(mktemp -d)"
  say "building base image $base with debootstrap into $rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" http://deb.debian.org/debian > "$rootfs.log"
  tar -C "$rootfs" -c . | "$engine" import - "$base"
  rm -rf "$rootfs" "$rootfs.log"
fi

say "building $image from $base"
start=$(date +%s)
build_args=(--build-arg "BASE_IMAGE=$base")
if [ "$(basename "$engine")" = podman ] && [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  # The host's CA bundle, for a host whose HTTPS goes through an intercepting proxy.
  build_args+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/host-ca.crt:ro)
  build_args+=(--build-arg PIP_CERT=/etc/host-ca.crt)
fi
"$engine" build --network host -f "$repo/docker/Dockerfile.cpu" "${build_args[@]}" \
  -t "$image" "$repo"
say "built in $(( $(date +%s) - start )) s; size $("$engine" image inspect "$image" \
  --format '{{.Size}}') bytes"

# Host networking: the port check needs nothing from the engine's network stack.
cid="$("$engine" run -d --network host "$image" python -m sglang.launch_server \
  --model-path /models/tiny-llama --device cpu --host 127.0.0.1 --port "$port" \
  --kv-alloc-mode auto --context-length 10000000)"
trap '"$engine" rm -f "$cid" > /dev/null' EXIT
say "container $cid started; waiting for /health"
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
  "$engine" inspect -f '{{.State.Running}}' "$cid" | grep -q true \
    || { "$engine" logs "$cid" | tail -30; say "FAILED: container exited"; exit 1; }
  sleep 1
done
out="$(curl -sf "http://127.0.0.1:$port/generate" -H 'Content-Type: application/json' \
  -d '{"text": "Hello world", "sampling_params": {"max_new_tokens": 8, "temperature": 0}}')"
info="$(curl -sf "http://127.0.0.1:$port/server_info")"
python3 - "$out" "$info" <<'PY'
import json, sys
out, info = json.loads(sys.argv[1]), json.loads(sys.argv[2])
kv = info["internal_states"][0]["kv_alloc"]
print(f"[test-image] generated {out['meta_info']['completion_tokens']} tokens: {out['text']!r}")
print(f"[test-image] mode {kv['mode']} (requested {kv['requested_mode']}), context "
      f"{kv['requested_context_length']} -> {kv['effective_context_length']}, capacity "
      f"{kv['token_capacity']} tokens")
assert out["meta_info"]["completion_tokens"] > 0
assert kv["requested_context_length"] == 10_000_000 and kv["effective_context_length"] < 10_000_000
PY
"$engine" logs "$cid" 2>&1 | grep -E "clamped to|KV allocation mode" | sed 's/^/[test-image] log: /'
say "OK"
