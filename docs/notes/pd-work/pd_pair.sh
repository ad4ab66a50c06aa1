# usage: pd_pair.sh TAG EXTRA_PYTHONPATH KVMODE
cd /tmp/pd_work && source common.sh
TAG=$1; EXTRA=$2; MODE=${3:-static}
export PYTHONPATH=/tmp/pd_site${EXTRA:+:$EXTRA}
export LD_LIBRARY_PATH=/tmp/pd_deb/root/usr/lib/x86_64-linux-gnu:/tmp/pd_deb/root/lib/x86_64-linux-gnu
export SGLANG_HOST_IP=127.0.0.1 MOONCAKE_PROTOCOL=tcp MC_FORCE_TCP=1
$PY -m sglang.launch_server $COMMON_ARGS --port 31101 --kv-alloc-mode $MODE --disaggregation-mode prefill --disaggregation-transfer-backend mooncake --disaggregation-bootstrap-port 31198 $PREFILL_EXTRA > prefill_$TAG.log 2>&1 &
echo $! > prefill_$TAG.pid
$PY -m sglang.launch_server $COMMON_ARGS --port 31102 --kv-alloc-mode $MODE --disaggregation-mode decode --disaggregation-transfer-backend mooncake --disaggregation-decode-retraction-backup cpu_tensor > decode_$TAG.log 2>&1 &
echo $! > decode_$TAG.pid
wait_health http://127.0.0.1:31101 $(cat prefill_$TAG.pid) 400; echo "prefill: $?"
wait_health http://127.0.0.1:31102 $(cat decode_$TAG.pid) 400; echo "decode: $?"
date -u
