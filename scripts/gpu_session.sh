#!/usr/bin/env bash
# The GPU proof session, cut into steps that each fit one 10-minute device call.
# On the GPU machine, from the repo root, after `bash .gpu/install.sh` (../shared/gpu/README.md):
#   bash scripts/gpu_session.sh a    # GPU tests: TurboMind engine, InternLM2 reader == converted Llama, AWQ on CUDA
#   bash scripts/gpu_session.sh f    # greedy determinism check, then f1 and f2 in one call (with the compare tab)
#   bash scripts/gpu_session.sh f1   # python app.py first start on a random 7B InternLM2 checkpoint (convert, AWQ, load, chat)
#   bash scripts/gpu_session.sh f2   # the second start (must reuse the 4-bit copy) and the table
#   bash scripts/gpu_session.sh b    # fp16 vs 4-bit: the compare tab at 24 GB free and on the full GPU
#   bash scripts/gpu_session.sh c    # python -m legal_eagle.bench (raw vs app, prefix caching, KV in 8 GB)
# b and c use the fp16 and 4-bit copies that f1 left in /root/le/cache.
# Logs go to /tmp/L/<step> and come back as $OUT/logs_<step>.tgz (the device returns at most 8 files).
set -uo pipefail
step=${1:?step a, f, f1, f2, b or c}
. /opt/lmd/env.sh
export TM_COMM_NVLS_ENABLE=0 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
L=/tmp/L/$step; mkdir -p "$L"; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
trap 'tar czf "$OUT/logs_$step.tgz" -C "$L" .' EXIT
W=/root/le; FS=/tmp/L/first_start; mkdir -p "$FS"
fp16=$(ls -d $W/cache/*-llama 2>/dev/null | head -1); awq=$(ls -d $W/cache/*-awq* 2>/dev/null | head -1)
case $step in
a) timeout 330 python3 -m pytest -q -rs -m "gpu and not slow" tests/gpu -p no:cacheprovider -o timeout=300 2>&1 \
     | tee "$L/pytest_gpu.log" | tail -25 ;;
f) timeout 100 python3 -m pytest -q -rs -m gpu tests/gpu/test_turbomind_engine.py -k "greedy or seeded" \
     -p no:cacheprovider 2>&1 | tee "$L/pytest_greedy.log" | tail -5
   timeout 480 python3 scripts/gpu_first_start.py --work $W --out "$FS" --limit 300 2>&1 \
     | tee "$L/first_start.log" | tail -30; cp -r "$FS" "$L/" ;;
f1) timeout 570 python3 scripts/gpu_first_start.py --work $W --out "$FS" --runs first --limit 540 2>&1 \
     | tee "$L/first_start.log" | tail -30; cp -r "$FS" "$L/" ;;
f2) timeout 300 python3 scripts/gpu_first_start.py --work $W --out "$FS" --runs second --limit 240 2>&1 \
     | tee "$L/second_start.log" | tail -30; cp -r "$FS" "$L/" ;;
b) timeout 560 python3 scripts/gpu_compare.py --fp16 "$fp16" --awq "$awq" \
     --out "$L/compare" --scenarios 24,full --timeout 120 2>&1 | tee "$L/compare.log" | tail -40 ;;
c) timeout 560 python3 -m legal_eagle.bench --model-dir "$fp16" --awq-dir "$awq" \
     --work-dir /tmp/bench --parts serve,prefix,kv8g --quick --json "$L/bench.json" --out "$L/benchmarks.md" 2>&1 \
     | tee "$L/bench.log" | tail -60 ;;
*) echo "unknown step $step" >&2; exit 2 ;;
esac
