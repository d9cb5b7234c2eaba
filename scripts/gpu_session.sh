#!/usr/bin/env bash
# The GPU proof session, cut into steps that each fit one 10-minute device call.
# On the GPU machine, from the repo root, after `bash .gpu/install.sh` (../shared/gpu/README.md; stage every piece
# with `mkdir -p /root/gpu-stage && cp .gpu/pNN /root/gpu-stage/`: any call may be the one that starts a machine), staged with
#   ../shared/gpu/prepare.sh gradio==6.31.0 modelscope==1.40.2 openai openai_harmony
#   pip download --no-deps -d .gpu/extra sniffio      # and carry ".gpu/extra" with the last piece
#   (the PyTorch-engine tune variants need pyzmq, which the GPU venv lacks:
#    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .gpu/extra pyzmq
#    and xgrammar the same way: with pyzmq alone they stopped at "No module named 'xgrammar'")
# (`lmdeploy serve api_server` imports openai, a dependency of lmdeploy that the GPU image lacks; openai imports
# sniffio, which prepare.sh leaves out as "in the image" but the image's venv lacks; installed below if carried):
#   bash scripts/gpu_session.sh a    # GPU tests: TurboMind engine, InternLM2 reader == converted Llama, AWQ on CUDA
#   bash scripts/gpu_session.sh t    # greedy/seeded, GPU reliability suite, remote engine vs a real api_server (+ the
#                                    # app page); meanwhile the bench makes random 7B fp16 + data-free AWQ copies for b and c
#   bash scripts/gpu_session.sh f    # greedy determinism check, then f1 and f2 in one call (with the compare tab)
#   bash scripts/gpu_session.sh f1   # python app.py first start on a random 7B InternLM2 checkpoint (convert, AWQ, load, chat)
#   bash scripts/gpu_session.sh f2   # the second start (must reuse the 4-bit copy) and the table
#   bash scripts/gpu_session.sh b    # fp16 vs 4-bit: the compare tab at 24 GB free and on the full GPU
#   bash scripts/gpu_session.sh c    # python -m legal_eagle.bench (raw vs app, prefix caching, KV in 8 GB, warm start; fp16)
#   bash scripts/gpu_session.sh c2   # the bench's 4-bit decode experiments (target 6)
#   bash scripts/gpu_session.sh x    # on a fresh machine: t's checkpoints, then the compare tab at 23.7 GB free
#   bash scripts/gpu_session.sh r    # on a fresh machine: t's checkpoints meanwhile the GPU reliability suite (with
#                                    # its own time) and the remote engine vs a real api_server; then the prefix part
#   bash scripts/gpu_session.sh c3   # the bench's serve (consumers one process per user, HTTP timeline traced),
#                                    # kv8g (int8 and int4 KV x two prefill sizes) and fp16 parts
#   bash scripts/gpu_session.sh c4   # target 6: AWQ group 64, LMDeploy's PyTorch engine (AWQ, fp16); then the cold part
#   bash scripts/gpu_session.sh d    # the GPU Stop and KV-cache cases alone (thread stacks after a lost Stop)
#   bash scripts/gpu_session.sh s1   # on a fresh machine: t's checkpoints meanwhile d (each Stop timed: handler
#                                    # closed when and where, TurboMind let go when; the KV child's phases and stacks)
#   bash scripts/gpu_session.sh s2   # the bench's serve part (HTTP timeline traced), then the cold part
#   bash scripts/gpu_session.sh s3   # target 6 with LMDeploy's PyTorch engine (pyzmq carried), then the fp16 part
#   bash scripts/gpu_session.sh s5   # s4's new cases only (Stop three ways, first updates, KV refusal, KV load)
#   bash scripts/gpu_session.sh s6   # the proxy variables, the whole GPU reliability suite (Stop four ways with the
#                                    # live handler generators and who holds them, gradio_client's trace, KV refusal,
#                                    # KV load into ~12,000 tokens), then the TurboMind engine tests
#   bash scripts/gpu_session.sh s7   # random 7B checkpoints, KV exhaustion on the 7B, the bench's serve part (traced),
#                                    # then the PyTorch engine in the time left
#   bash scripts/gpu_session.sh s8   # random 7B checkpoints, the serve part (gradio_client with ssl_verify=False),
#                                    # then TM_GEMM_WEIGHT_PACK=0/1 against the default 4-bit plan (target 6)
#   bash scripts/gpu_session.sh s9   # random 7B checkpoints, then target 6: gemm_input_dtype float8_e4m3 (AWQ and
#                                    # fp16), blocked FP8 weights, TM_GEMM_WEIGHT_PACK=0/1, against AWQ and fp16
#   bash scripts/gpu_session.sh s10  # after s9 on the same machine: prefix (cache_generation all/auto/off), kv8g
#                                    # (int4 KV, prefill 1024/512/256, the CUDA context's share), then serve
#   bash scripts/gpu_session.sh s12  # python app.py --model-format fp8: first start (convert, FP8 copy, load, chat),
#                                    # second start (reuses the copy), on a random 7B InternLM2 "download"
#   bash scripts/gpu_session.sh s13  # random 7B checkpoints, then target 4's memory variants (GEMM tuning file
#                                    # exported / imported, default pool trimmed, 512-byte CUDA stack, all three)
#   bash scripts/gpu_session.sh s14  # the engine tests (lean_memory load), random 7B checkpoints, target 4's
#                                    # variants at prefill 256 and 1024 (plain, app-lean, export, lean), serve --quick
#   bash scripts/gpu_session.sh s15  # random 7B checkpoints meanwhile the engine tests (stream handed to TurboMind at
#                                    # once, GEMM tuning file written then read) and the GPU reliability suite
#   bash scripts/gpu_session.sh s16  # after s15: target 4 through TurbomindEngine.load (first and later start), serve --quick
#   bash scripts/gpu_session.sh s17  # random 7B checkpoints meanwhile the engine tests;
#                                    # then target 4's load peak: export, lean, lean-all, app, app-again (the tenth
#                                    # session ran it at c5ef7f0 with app-again-notrim too: the pool trimmed in the load)
#   bash scripts/gpu_session.sh s18  # random 7B if missing; the serve part, whole (not --quick): targets 1, 2; then in
#                                    # the time left target 4's export, lean, lean-nocache (torch's cache off), serve again
#                                    # (LE_SERVE_QUICK=1: the serve runs with --quick; LE_KV_VARIANTS: other kv8g variants;
#                                    # LE_SERVE_FIRST=0: no serve run before the kv8g variants)
#   bash scripts/gpu_session.sh s4   # the whole GPU reliability suite (Stop three ways with Gradio's cancel traced,
#                                    # gradio_client vs page first updates, KV refusal and KV load), then step a's tests
# b and c use the fp16 and 4-bit copies that t left in /root/le/bench (else those f1 left in /root/le/cache).
# LE_LIMIT: seconds this step may take in all (default 575; the device call is 600 s with the install).
# Logs go to /tmp/L/<step> and come back as $OUT/logs_<step>.tgz (the device returns at most 8 files).
set -uo pipefail
step=${1:?step a, t, f, f1, f2, b or c}
. /opt/lmd/env.sh
ls .gpu/extra/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --target /opt/lmd/site .gpu/extra/*.whl
export TM_COMM_NVLS_ENABLE=0 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
L=/tmp/L/$step; mkdir -p "$L"; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
trap 'tar czf "$OUT/logs_$step.tgz" -C "$L" .' EXIT
W=/root/le; FS=/tmp/L/first_start; mkdir -p "$FS"
B=$W/bench; R7=$W/random-internlm2-7b
if [ -f $B/awq/config.json ]; then fp16=$B/llama; awq=$B/awq
else fp16=$(ls -d $W/cache/*-llama 2>/dev/null | head -1); awq=$(ls -d $W/cache/*-awq* 2>/dev/null | head -1); fi
# The GPU reliability cases: reliability SECONDS [pytest args]; the whole log in $L, its key lines printed.
reliability() {
  local limit=$1; shift
  timeout "$limit" python3 -m pytest -q -s -rs -m gpu tests/gpu/test_reliability_gpu.py "$@" -p no:cacheprovider 2>&1 \
    | tee "$L/pytest_reliability.log" \
    | grep -E "RELIABILITY|LOST|GPU |STACKS|STOP |KV |^Thread 0x|File \"|^  [a-z_]+\.py|passed|failed" \
    | cut -c1-1500 | tail -90
}
# The random 7B (fp16 InternLM2, its Llama conversion, a data-free AWQ copy) in $B: random7b SECONDS; "make rc=" logged.
random7b() {
  timeout "$1" python3 -m legal_eagle.bench --make-random-7b $R7 --work-dir $B --awq-dir $B/awq --parts warm \
    --json "$L/bench_make.json" > "$L/bench_make.log" 2>&1; echo "make rc=$?" >> "$L/bench_make.log"
}
# The TurboMind engine tests (tiny checkpoints), their key lines printed.
engine_tests() {
  timeout 120 python3 -m pytest -q -s -rs -m gpu tests/gpu/test_turbomind_engine.py -p no:cacheprovider 2>&1 \
    | tee "$L/pytest_gpu.log" | grep -E "gemm tuning|passed|failed|Error" | tail -6
}
case $step in
a) timeout 330 python3 -m pytest -q -rs -m "gpu and not slow" tests/gpu -p no:cacheprovider -o timeout=300 2>&1 \
     | tee "$L/pytest_gpu.log" | tail -25 ;;
t) python3 -m legal_eagle.bench --make-random-7b $R7 --work-dir $B --awq-dir $B/awq --parts warm \
     --json "$L/bench_make.json" > "$L/bench_make.log" 2>&1 &   # random 7B, Llama conversion, data-free AWQ
   mk=$!
   timeout 60 python3 -m pytest -q -rs -m gpu tests/gpu/test_turbomind_engine.py -k "greedy or seeded" \
     -p no:cacheprovider 2>&1 | tee "$L/pytest_greedy.log" | tail -5
   reliability 200
   timeout 150 python3 -m pytest -q -s -rs -m gpu tests/test_remote_engine.py -k real_api_server \
     -p no:cacheprovider 2>&1 | tee "$L/pytest_remote.log" | grep -E '^\{|passed|failed|Error' | tail -10
   timeout 150 tail --pid=$mk -f /dev/null; kill $mk 2>/dev/null
   tail -5 "$L/bench_make.log"; ls $B $B/awq; du -sh $R7 $B/llama $B/awq
   left=$((${LE_LIMIT:-575} - SECONDS))   # then, in the time left, the compare tab with only 24 GB free (step b's hard case)
   [ -f $B/awq/config.json ] && [ $left -gt 90 ] && timeout $left python3 scripts/gpu_compare.py --fp16 $B/llama \
     --awq $B/awq --out "$L/compare" --scenarios 23.7 --timeout $((left - 10)) 2>&1 | tee "$L/compare.log" | tail -25 ;;
f) timeout 100 python3 -m pytest -q -rs -m gpu tests/gpu/test_turbomind_engine.py -k "greedy or seeded" \
     -p no:cacheprovider 2>&1 | tee "$L/pytest_greedy.log" | tail -5
   timeout 480 python3 scripts/gpu_first_start.py --work $W --out "$FS" --limit 300 2>&1 \
     | tee "$L/first_start.log" | tail -30; cp -r "$FS" "$L/" ;;
f1) timeout 570 python3 scripts/gpu_first_start.py --work $W --out "$FS" --runs first --limit 540 2>&1 \
     | tee "$L/first_start.log" | tail -30; cp -r "$FS" "$L/" ;;
f2) timeout 300 python3 scripts/gpu_first_start.py --work $W --out "$FS" --runs second --limit 240 2>&1 \
     | tee "$L/second_start.log" | tail -30; cp -r "$FS" "$L/" ;;
b) timeout 560 python3 scripts/gpu_compare.py --fp16 "$fp16" --awq "$awq" \
     --out "$L/compare" --scenarios 23.7,full --timeout 200 2>&1 | tee "$L/compare.log" | tail -40 ;;
c) timeout $((${LE_LIMIT:-580} - 100)) python3 -m legal_eagle.bench --model-dir "$R7" --awq-dir "$awq" \
     --work-dir $B --parts serve,prefix,kv8g,warm --quick --json "$L/bench.json" --out "$L/benchmarks.md" 2>&1 \
     | tee "$L/bench.log" | tail -60
   left=$((${LE_LIMIT:-580} - SECONDS))   # the fp16 engine's memory and speed in the time left
   [ $left -gt 60 ] && timeout $left python3 -m legal_eagle.bench --model-dir "$R7" --awq-dir "$awq" --work-dir $B \
     --parts fp16 --quick --json "$L/bench_fp16.json" 2>&1 | tee "$L/bench_fp16.log" | tail -30 ;;
x) [ -f $B/awq/config.json ] || timeout 300 python3 -m legal_eagle.bench --make-random-7b $R7 --work-dir $B \
     --awq-dir $B/awq --parts warm --json "$L/bench_make.json" > "$L/bench_make.log" 2>&1   # the checkpoints t makes
   tail -3 "$L/bench_make.log"; left=$((${LE_LIMIT:-575} - SECONDS))   # the compare tab at 23.7 GB free (in turns)
   timeout $left python3 scripts/gpu_compare.py --fp16 $B/llama --awq $B/awq --out "$L/compare" --scenarios 23.7 \
     --timeout $((left - 10)) 2>&1 | tee "$L/compare.log" | grep -E "^\[|^\|" | tail -40 ;;
c2) timeout 560 python3 -m legal_eagle.bench --model-dir "$R7" --awq-dir "$awq" --work-dir $B \
     --parts tune --tune-variants mbs1,tune-full --quick --json "$L/bench_tune.json" 2>&1 | tee "$L/bench_tune.log" | tail -40 ;;
r) python3 -m legal_eagle.bench --make-random-7b $R7 --work-dir $B --awq-dir $B/awq --parts warm \
     --json "$L/bench_make.json" > "$L/bench_make.log" 2>&1 &   # random 7B, Llama conversion, data-free AWQ
   mk=$!
   reliability 320
   timeout 150 python3 -m pytest -q -s -rs -m gpu tests/test_remote_engine.py -k real_api_server \
     -p no:cacheprovider 2>&1 | tee "$L/pytest_remote.log" | grep -E '^\{|passed|failed|Error|assert' | tail -10
   timeout 120 tail --pid=$mk -f /dev/null; kill $mk 2>/dev/null
   tail -3 "$L/bench_make.log"; ls $B; du -sh $B/llama $B/awq
   left=$((${LE_LIMIT:-575} - SECONDS))   # target 3 in the time left: a 10-turn chat, caching on (+ own answers) and off
   [ -f $B/awq/config.json ] && [ $left -gt 100 ] && timeout $left python3 -m legal_eagle.bench --model-dir $R7 \
     --awq-dir $B/awq --work-dir $B --parts prefix --quick --json "$L/bench_prefix.json" 2>&1 \
     | tee "$L/bench_prefix.log" | tail -40 ;;
c3) left=${LE_LIMIT:-575}
   LE_BENCH_TRACE_HTTP=1 timeout $((left - 20)) python3 -m legal_eagle.bench --model-dir "$R7" --awq-dir "$awq" \
     --work-dir $B --parts serve,fp16,kv8g --kv-policies 8,4 --kv-prefill 4096,1024 --quick --json "$L/bench.json" \
     --out "$L/benchmarks.md" 2>&1 | tee "$L/bench.log" | grep -v " trace " | tail -60 ;;
c4) left=${LE_LIMIT:-575}
   timeout $((left - 20)) python3 -m legal_eagle.bench --model-dir "$R7" --awq-dir "$awq" --work-dir $B \
     --parts tune --tune-variants app-default,g64,pytorch-awq,pytorch-fp16 --quick --json "$L/bench_tune.json" 2>&1 \
     | tee "$L/bench_tune.log" | tail -30
   left=$((${LE_LIMIT:-575} - SECONDS))
   [ $left -gt 200 ] && timeout $((left - 10)) python3 -m legal_eagle.bench --model-dir "$R7" --awq-dir "$awq" \
     --work-dir $B --parts cold --quick --json "$L/bench_cold.json" 2>&1 | tee "$L/bench_cold.log" | tail -20 ;;
d) reliability ${LE_LIMIT:-300} -k "stop or kv" ;;
s1) python3 -m legal_eagle.bench --make-random-7b $R7 --work-dir $B --awq-dir $B/awq --parts warm \
     --json "$L/bench_make.json" > "$L/bench_make.log" 2>&1 &   # random 7B, Llama conversion, data-free AWQ
   mk=$!
   reliability 330 -k "stop or kv"
   timeout $((${LE_LIMIT:-575} - SECONDS - 5)) tail --pid=$mk -f /dev/null; kill $mk 2>/dev/null
   tail -3 "$L/bench_make.log"; ls $B ;;
s2) LE_BENCH_TRACE_HTTP=1 timeout 300 python3 -m legal_eagle.bench --model-dir "$R7" --awq-dir "$awq" \
     --work-dir $B --parts serve --quick --json "$L/bench_serve.json" 2>&1 | tee "$L/bench_serve.log" \
     | grep -v " trace " | tail -40
   left=$((${LE_LIMIT:-575} - SECONDS))
   [ $left -gt 200 ] && timeout $((left - 10)) python3 -m legal_eagle.bench --model-dir "$R7" --awq-dir "$awq" \
     --work-dir $B --parts cold --quick --json "$L/bench_cold.json" 2>&1 | tee "$L/bench_cold.log" | tail -20 ;;
s3) timeout $((${LE_LIMIT:-575} - 150)) python3 -m legal_eagle.bench --model-dir "$R7" --awq-dir "$awq" \
     --work-dir $B --parts tune --tune-variants app-default,pytorch-awq,pytorch-fp16 --quick \
     --json "$L/bench_tune.json" 2>&1 | tee "$L/bench_tune.log" | tail -30
   left=$((${LE_LIMIT:-575} - SECONDS))
   [ $left -gt 60 ] && timeout $((left - 5)) python3 -m legal_eagle.bench --model-dir "$R7" --awq-dir "$awq" \
     --work-dir $B --parts fp16 --quick --json "$L/bench_fp16.json" 2>&1 | tee "$L/bench_fp16.log" | tail -20 ;;
s4) reliability $((${LE_LIMIT:-575} - 120))
   left=$((${LE_LIMIT:-575} - SECONDS - 5))
   [ $left -gt 60 ] && timeout $left python3 -m pytest -q -rs -m "gpu and not slow" tests/gpu/test_turbomind_engine.py \
     tests/gpu/test_convert_turbomind.py -p no:cacheprovider 2>&1 | tee "$L/pytest_gpu.log" | tail -8 ;;
s5) reliability $((${LE_LIMIT:-575} - 5)) -k "stop or kv or first_update" ;;
s6) env | grep -i proxy | sed 's/=.*/=(set)/'; echo "proxy variables above (none: nothing printed)"
   reliability $((${LE_LIMIT:-575} - 150))
   left=$((${LE_LIMIT:-575} - SECONDS - 5))
   [ $left -gt 60 ] && timeout $left python3 -m pytest -q -rs -m "gpu and not slow" tests/gpu/test_turbomind_engine.py \
     -p no:cacheprovider 2>&1 | tee "$L/pytest_gpu.log" | tail -8 ;;
s7) timeout 300 python3 -m legal_eagle.bench --make-random-7b $R7 --work-dir $B --awq-dir $B/awq --parts warm \
     --json "$L/bench_make.json" > "$L/bench_make.log" 2>&1; tail -3 "$L/bench_make.log"
   awq=$B/awq
   LE_KV_MODEL=$B/llama reliability 170 -k "too_small_for_the_load"   # KV exhaustion with the 7B's real KV size
   left=$((${LE_LIMIT:-575} - SECONDS))
   LE_BENCH_TRACE_HTTP=1 timeout $((left > 300 ? 280 : left - 20)) python3 -m legal_eagle.bench --model-dir "$R7" \
     --awq-dir "$awq" --work-dir $B --parts serve --quick --json "$L/bench_serve.json" 2>&1 \
     | tee "$L/bench_serve.log" | grep -v " trace " | tail -40
   left=$((${LE_LIMIT:-575} - SECONDS))
   [ $left -gt 60 ] && timeout $((left - 5)) python3 -m legal_eagle.bench --model-dir "$R7" --awq-dir "$awq" \
     --work-dir $B --parts tune --tune-variants pytorch-awq,pytorch-fp16 --quick --json "$L/bench_tune.json" 2>&1 \
     | tee "$L/bench_tune.log" | tail -30 ;;
s8) timeout 300 python3 -m legal_eagle.bench --make-random-7b $R7 --work-dir $B --awq-dir $B/awq --parts warm \
     --json "$L/bench_make.json" > "$L/bench_make.log" 2>&1; tail -3 "$L/bench_make.log"
   awq=$B/awq   # the serve part with gradio_client users made with ssl_verify=False, then TM_GEMM_WEIGHT_PACK
   timeout 200 python3 -m legal_eagle.bench --model-dir "$R7" --awq-dir "$awq" --work-dir $B --parts serve --quick \
     --json "$L/bench_serve.json" 2>&1 | tee "$L/bench_serve.log" | tail -40
   left=$((${LE_LIMIT:-575} - SECONDS))
   [ $left -gt 60 ] && timeout $((left - 5)) python3 -m legal_eagle.bench --model-dir "$R7" --awq-dir "$awq" \
     --work-dir $B --parts tune --tune-variants app-default,pack-plain,pack-forced --quick \
     --json "$L/bench_tune.json" 2>&1 | tee "$L/bench_tune.log" | tail -30 ;;
s9) timeout 300 python3 -m legal_eagle.bench --make-random-7b $R7 --work-dir $B --awq-dir $B/awq --parts warm \
     --json "$L/bench_make.json" > "$L/bench_make.log" 2>&1; tail -3 "$L/bench_make.log"
   left=$((${LE_LIMIT:-575} - SECONDS))   # target 6: FP8 GEMM inputs, blocked FP8 weights, the weight-pack knob
   [ $left -gt 60 ] && timeout $((left - 5)) python3 -m legal_eagle.bench --model-dir "$R7" --awq-dir $B/awq \
     --work-dir $B --parts tune --quick --json "$L/bench_tune.json" \
     --tune-variants app-default,fp8-input,fp16,fp8,fp16-fp8-input,pack-plain,pack-forced 2>&1 \
     | tee "$L/bench_tune.log" | tail -30 ;;
s10) python3 -m legal_eagle.bench --model-dir "$R7" --awq-dir $B/awq --work-dir $B --parts prefix --quick \
     --json "$L/bench_prefix.json" 2>&1 | tee "$L/bench_prefix.log" | grep -E "^\| 3 |prefix|error" | tail -8
   timeout 150 python3 -m legal_eagle.bench --model-dir "$R7" --awq-dir $B/awq --work-dir $B --parts kv8g --quick \
     --kv-policies 4 --kv-prefill 1024,512,256 --json "$L/bench_kv8g.json" 2>&1 | tee "$L/bench_kv8g.log" \
     | grep -E "^\| 4 |kv8g|error" | tail -8
   left=$((${LE_LIMIT:-575} - SECONDS))   # the app under load with cache_generation "all" (its new default)
   [ $left -gt 60 ] && timeout $((left - 5)) python3 -m legal_eagle.bench --model-dir "$R7" --awq-dir $B/awq \
     --work-dir $B --parts serve --quick --json "$L/bench_serve.json" 2>&1 | tee "$L/bench_serve.log" | tail -40 ;;
s12) timeout $((${LE_LIMIT:-575} - 10)) python3 scripts/gpu_first_start.py --work /root/le-fp8 --out "$FS" \
     --extra "--model-format fp8" --no-compare --limit 280 2>&1 | tee "$L/first_start_fp8.log" | tail -12
   cp -r "$FS" "$L/"; tail -5 "$FS"/app_first.log ;;
s13) timeout 240 python3 -m legal_eagle.bench --make-random-7b $R7 --work-dir $B --awq-dir $B/awq --parts warm \
     --json "$L/bench_make.json" > "$L/bench_make.log" 2>&1; tail -3 "$L/bench_make.log"
   left=$((${LE_LIMIT:-575} - SECONDS))   # target 4: GEMM tuning file (no warm-up), pool trim, CUDA stack
   [ $left -gt 60 ] && timeout $((left - 5)) python3 -m legal_eagle.bench --model-dir "$R7" --awq-dir $B/awq \
     --work-dir $B --parts kv8g --quick --kv-policies 4 --kv-prefill 256 --kv-variants export,import,trim,stack512,lean \
     --json "$L/bench_kv8g.json" 2>&1 | tee "$L/bench_kv8g.log" | grep -E "^\| 4 |kv8g|error|budget|Warm" | tail -20 ;;
s14) timeout 90 python3 -m pytest -q -rs -m gpu tests/gpu/test_turbomind_engine.py -p no:cacheprovider 2>&1 \
     | tee "$L/pytest_gpu.log" | tail -4   # the engine's lean_memory load on the GPU (stack limit, pool trim)
   timeout 240 python3 -m legal_eagle.bench --make-random-7b $R7 --work-dir $B --awq-dir $B/awq --parts warm \
     --json "$L/bench_make.json" > "$L/bench_make.log" 2>&1; tail -3 "$L/bench_make.log"
   timeout 200 python3 -m legal_eagle.bench --model-dir "$R7" --awq-dir $B/awq --work-dir $B --parts kv8g --quick \
     --kv-policies 4 --kv-prefill 256,1024 --kv-variants plain,app-lean,export,lean --json "$L/bench_kv8g.json" 2>&1 \
     | tee "$L/bench_kv8g.log" | grep -E "^\| 4 |error" | tail -4
   left=$((${LE_LIMIT:-575} - SECONDS))   # the app under load with the lean-memory engine
   [ $left -gt 60 ] && timeout $((left - 5)) python3 -m legal_eagle.bench --model-dir "$R7" --awq-dir $B/awq \
     --work-dir $B --parts serve --quick --json "$L/bench_serve.json" 2>&1 | tee "$L/bench_serve.log" \
     | grep -E "^\| [12] " ;;
s15) random7b 300 &
   engine_tests   # eager stream, tuning file
   reliability $((${LE_LIMIT:-575} - SECONDS - 20))   # Stop four ways through the app (the stream starts eagerly)
   wait; tail -3 "$L/bench_make.log" ;;
s16) timeout 200 python3 -m legal_eagle.bench --model-dir "$R7" --awq-dir $B/awq --work-dir $B --parts kv8g --quick \
     --kv-policies 4 --kv-prefill 256 --kv-variants app,app-again --json "$L/bench_kv8g.json" 2>&1 \
     | tee "$L/bench_kv8g.log" | grep -E "^\| 4 |error" | tail -4   # target 4 through the app's own load
   left=$((${LE_LIMIT:-575} - SECONDS))   # the app under load: eager stream, joined chunks, tuning file
   [ $left -gt 60 ] && timeout $((left - 5)) python3 -m legal_eagle.bench --model-dir "$R7" --awq-dir $B/awq \
     --work-dir $B --parts serve --quick --json "$L/bench_serve.json" 2>&1 | tee "$L/bench_serve.log" \
     | grep -E "^\| [12] " ;;
s17) random7b 300 &
   engine_tests
   wait; tail -3 "$L/bench_make.log"
   left=$((${LE_LIMIT:-575} - SECONDS))   # target 4: who holds the load's peak
   [ $left -gt 60 ] && timeout $((left - 5)) python3 -m legal_eagle.bench --model-dir "$R7" --awq-dir $B/awq \
     --work-dir $B --parts kv8g --quick --kv-policies 4 --kv-prefill 256 \
     --kv-variants export,lean,lean-all,app,app-again --json "$L/bench_kv8g.json" \
     --out "$L/benchmarks.md" 2>&1 | tee "$L/bench_kv8g.log" | grep -E "^\| 4 |error" | tail -8
   [ -f "$L/benchmarks.md" ] && grep -A12 "### GPU memory" "$L/benchmarks.md" | cut -c1-400 ;;
s18) [ -f $B/awq/config.json ] || random7b 240
   tail -2 "$L/bench_make.log" 2>/dev/null
   serve() {   # one whole serve run (targets 1 and 2), when the time left allows it
     left=$((${LE_LIMIT:-575} - SECONDS)); [ $left -gt 150 ] || return 0
     timeout $((left - 5)) python3 -m legal_eagle.bench --model-dir "$R7" --awq-dir $B/awq --work-dir $B \
       --parts serve ${LE_SERVE_QUICK:+--quick} --json "$L/bench_serve$1.json" --out "$L/benchmarks_serve$1.md" 2>&1 \
       | tee "$L/bench_serve$1.log" | grep -E "^\| [12] |error"; echo "serve run $1 done at ${SECONDS}s"
   }
   [ "${LE_SERVE_FIRST:-1}" = 1 ] && serve 1   # LE_SERVE_FIRST=0: the kv8g variants first, one serve run after
   left=$((${LE_LIMIT:-575} - SECONDS))
   [ $left -gt 110 ] && timeout $((left - 5)) python3 -m legal_eagle.bench --model-dir "$R7" --awq-dir $B/awq \
     --work-dir $B --parts kv8g --quick --kv-policies 4 --kv-prefill 256 --kv-variants ${LE_KV_VARIANTS:-export,lean,lean-nocache} \
     --json "$L/bench_kv8g.json" --out "$L/benchmarks_kv8g.md" 2>&1 | tee "$L/bench_kv8g.log" | grep -E "error" | tail -4
   [ -f "$L/benchmarks_kv8g.md" ] && grep -A6 "### GPU memory" "$L/benchmarks_kv8g.md" | cut -c1-330
   serve 2 ;;
*) echo "unknown step $step" >&2; exit 2 ;;
esac
