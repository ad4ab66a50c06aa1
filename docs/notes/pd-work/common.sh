PY=/root/.cache/sglang-kvalloc/venv/bin/python
export SGLANG_USE_CPU_ENGINE=1 PYTHONFAULTHANDLER=1
MODEL=/tmp/pd_tiny
COMMON_ARGS="--model-path $MODEL --device cpu --host 127.0.0.1 --dtype float32 --context-length 4096 --max-running-requests 4 --max-total-tokens 65536"
wait_health() {  # url pid timeout
  local url=$1 pid=$2 t=${3:-300} i=0
  while [ $i -lt $t ]; do
    if ! kill -0 $pid 2>/dev/null; then echo "process $pid exited"; return 1; fi
    if curl -s -m 5 -o /dev/null -w "%{http_code}" $url/health 2>/dev/null | grep -q 200; then echo "healthy after ${i}s"; return 0; fi
    sleep 2; i=$((i+2))
  done
  echo "timeout"; return 2
}
