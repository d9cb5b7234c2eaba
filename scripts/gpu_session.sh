#!/usr/bin/env bash
# The GPU proof session, cut into steps that each fit one 10-minute device call.
# On the GPU machine, from the repo root, after `bash .gpu/install.sh` (../shared/gpu/README.md):
#   bash scripts/gpu_session.sh a   # GPU tests + the app's first and second start (convert, AWQ, TurboMind)
#   bash scripts/gpu_session.sh b   # fp16 vs 4-bit engine figures, then the compare tab at 24 GB free and full
#   bash scripts/gpu_session.sh c   # python -m legal_eagle.bench (raw vs app, prefix caching, KV in 8 GB)
# Logs go to /tmp/L/<step> and come back as $OUT/logs_<step>.tgz (the device returns at most 8 files).
set -uo pipefail
step=${1:?step a, b or c}
. /opt/lmd/env.sh
export TM_COMM_NVLS_ENABLE=0 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
L=/tmp/L/$step; mkdir -p "$L"; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
trap 'tar czf "$OUT/logs_$step.tgz" -C "$L" .' EXIT
case $step in
a) timeout 230 python3 -m pytest -q -rs -m gpu tests/gpu -p no:cacheprovider -o timeout=220 2>&1 \
     | tee "$L/pytest_gpu.log" | tail -25
   timeout 320 python3 scripts/gpu_first_start.py --work /root/le --out "$L/first_start" --limit 280 2>&1 \
     | tee "$L/first_start.log" | tail -30 ;;
b) timeout 380 python3 scripts/gpu_proof.py --out "$L/proof" --work /tmp/gp --budget 360 2>&1 \
     | tee "$L/proof.log" | tail -45
   timeout 190 python3 scripts/gpu_compare.py --fp16 /tmp/gp/internlm2-7b-fp16 --awq /tmp/gp/llama-7b-awq \
     --out "$L/compare" --scenarios 24,full --timeout 90 2>&1 | tee "$L/compare.log" | tail -30 ;;
c) timeout 330 python3 -m legal_eagle.bench --model-dir /tmp/gp/internlm2-7b-fp16 --awq-dir /tmp/gp/llama-7b-awq \
     --work-dir /tmp/bench --parts serve,prefix,kv8g --quick --json "$L/bench.json" --out "$L/benchmarks.md" 2>&1 \
     | tee "$L/bench.log" | tail -60 ;;
*) echo "unknown step $step" >&2; exit 2 ;;
esac
