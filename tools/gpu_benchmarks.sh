#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md for the trainer and agent issues, one device call each:
#   bash tools/gpu_benchmarks.sh rollout   # GPU attention tests, agentic rollout ratio (Pallas, cuDNN, XLA attention)
#   bash tools/gpu_benchmarks.sh rollout_policy  # rollout ratio at wait_fraction 0.125 (the old default), 4 waves
#   bash tools/gpu_benchmarks.sh lane      # in-loop appends: a lane step's device time, the chunk kernel's per tile
#                                          # setting, then the rollout ratio per lane shape (LANES="8x64 0x64")
#   bash tools/gpu_benchmarks.sh lane_ab   # GPU attention tests, a lane step's device time on this code and on .base/
#                                          # (an older copy of the code)
#   bash tools/gpu_benchmarks.sh seeds     # the issue's rollout ratio, mean over SEEDS (5) draws, Pallas attention
#   bash tools/gpu_benchmarks.sh overlap   # rollout ratio, the loop's sync and overlapped orders (RUNS="sync:0.25 ...")
#   bash tools/gpu_benchmarks.sh timeline  # device busy / idle per kind of engine call in a rollout
#   bash tools/gpu_benchmarks.sh prefill_compile  # compile time vs speed of a prefill shape under three GEMM settings
#   bash tools/gpu_benchmarks.sh rlstep    # the profiled 0.6B RL step alone
#   bash tools/gpu_benchmarks.sh train     # cuDNN test, profiled RL step, train-step MFU vs HF, peak memory
#   bash tools/gpu_benchmarks.sh trainprof # per-op GPU time of the 1.7B train step (before / after a change)
#   bash tools/gpu_benchmarks.sh extra     # 8 x 4096 without remat, decode with cuBLAS instead of Triton GEMMs
# Each measurement has its own time limit so one failure or hang does not lose the others. Packages the
# device image lacks (bm25s, tensorboardX) come as wheels in .whl/ (pip download them here, carry .whl).
set -u
if ls .whl/*.whl >/dev/null 2>&1; then pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl; fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
OUT=${OUT:-/tmp/gpu_bench}; mkdir -p "$OUT"
# the tests whose GPU path differs from the CPU's
GPU_TESTS="cudnn or bf16 or gpu_attention or pallas or decode_attention"
ENGINE_TESTS="tests/engine/test_engine.py tests/engine/test_forward.py tests/engine/test_decode_attention.py"
run() { local limit=$1; shift; echo "=== $*"; timeout "$limit" "$@" 2>&1 | grep -vE "^[IW][0-9]{4} " | tail -14; }
# One RL step of the 0.6B preset on the demo world (random weights), 3 steps, under cProfile.
RL_STEP=(python3 -m cProfile -o "$OUT/rl_step.prof" -m aepo_jax.train --flagfile=configs/cpu_demo.flags --mode=rl
  --model_preset=0.6b --compute_dtype=bfloat16 --param_dtype=float32 --remat --rl_steps=3
  --questions_per_step=16 --group_size=8 --initial_rollouts=4 --max_response_tokens=512 --eval_every=0
  --dump_every=0 --mini_batches=4 --checkpoint_every=1000 --workdir=/tmp/rl_step_0.6b)
rl_step_summary() {  # the RL step's timings per step, then the profile's top functions
  python3 - "$OUT" <<'PY'
import json, pstats, sys
for row in map(json.loads, open("/tmp/rl_step_0.6b/metrics/metrics.jsonl")):
    print({k: round(v, 3) for k, v in row.items() if k.startswith(("rl/time", "rl/rollout/seconds",
           "rl/rollout/sampled", "rl/rollout/decode_calls", "rl/compilations", "rl/rollout/response_length",
           "rl/rollout/tool_calls", "step"))})
pstats.Stats(f"{sys.argv[1]}/rl_step.prof").sort_stats("tottime").print_stats(20)
PY
}
case "${1:-rollout}" in
rollout)
  run 200 python3 -m pytest -q -p no:cacheprovider tests/models/test_qwen3.py $ENGINE_TESTS -k "$GPU_TESTS"
  for attention in pallas cudnn xla; do
    run 240 python3 tools/benchmark_rollout.py --preset 1.7b --batch 64 --prompt 256 --response 1024 \
      --tool_every 64 --breakdown --attention $attention --tag $attention
  done
  ;;
rollout_policy)  # the loop's wait policy and continuous refill (4 waves of 64 trajectories through 64 slots)
  run 240 python3 tools/benchmark_rollout.py --preset 1.7b --batch 64 --prompt 256 --response 1024 \
    --tool_every 64 --wait_fraction 0.125 --tag wait0125
  run 330 python3 tools/benchmark_rollout.py --preset 1.7b --batch 64 --prompt 256 --response 1024 \
    --tool_every 64 --waves 4 --warmups 2 --repeats 2 --tag waves4
  ;;
lane)  # tool results appended inside the decode loop (lane rows x width per step) against prefill calls (0)
  run 200 python3 -m pytest -q -p no:cacheprovider $ENGINE_TESTS -k "$GPU_TESTS"
  run 150 python3 tools/profile_engine.py --max_len 1344 --start 600 lane_calls --steps 4 --chunk 60 --repeats 20
  run 120 python3 tools/benchmark_chunk_attention.py  # the chunk kernel alone, per tile setting
  for lane in ${LANES:-8x64 0x64}; do
    run 280 python3 tools/benchmark_rollout.py --preset 1.7b --batch 64 --prompt 256 --response 1024 \
      --tool_every 64 --warmups 2 --repeats 2 --breakdown --lane_rows ${lane%x*} --lane_width ${lane#*x} --tag lane$lane
  done
  ;;
lane_ab)  # a lane step on this code against .base/ (`mkdir .base && git archive <commit> aepo_jax tools | tar -x -C
          # .base`, untracked so it travels): lane_calls, each in its own process
  run 150 python3 -m pytest -q -p no:cacheprovider $ENGINE_TESTS -k "$GPU_TESTS"
  for tag in base new; do
    if [ "$tag" = base ]; then [ -d .base/aepo_jax ] || continue; dir=.base; else dir=.; fi
    echo "=== lane_calls $tag"
    PYTHONPATH=/tmp/site:$PWD/$dir timeout 110 python3 $dir/tools/profile_engine.py --max_len 1344 --start 600 \
      lane_calls --steps 4 --chunk 60 --repeats 20 --counts 0,1,2,4,8 > "$OUT/lane_calls_$tag.log" 2>&1
    grep -E "lane calls|appended|Error" "$OUT/lane_calls_$tag.log" | tail -8
  done
  ;;
seeds)  # the issue-5 figure: the rollout ratio per seed and its mean (docs/benchmarks.md, session 22 on)
  run 540 python3 tools/benchmark_rollout.py --preset 1.7b --batch 64 --prompt 256 --response 1024 \
    --tool_every 64 --warmups 1 --repeats 1 --seeds "${SEEDS:-5}" --attention pallas --tag seeds
  ;;
overlap)  # the loop's two orders (sync: wait for the tools, then decode; overlap: the next decode call is queued
           # before the last one's result is read) per wait fraction, RUNS="sync:0.25 overlap:0.25 ..."; the default
           # RUNS are session 7's comparison (the defaults are now overlap at 0.0625, see the `rollout` case)
  [ -n "${TESTS-1}" ] && run 200 python3 -m pytest -q -p no:cacheprovider $ENGINE_TESTS -k "$GPU_TESTS"
  for r in ${RUNS:-sync:0.25 overlap:0.125}; do
    mode=${r%:*}; fraction=${r#*:}
    run 200 python3 tools/benchmark_rollout.py --preset 1.7b --batch 64 --prompt 256 --response 1024 \
      --tool_every 64 --warmups 2 --repeats 2 --wait_fraction $fraction --$([ $mode = sync ] && echo no-)tool_overlap \
      --tag $mode$fraction
  done
  ;;
timeline)  # where a rollout's wall time goes: device busy / idle inside each kind of engine call and host work
  run 330 python3 tools/benchmark_rollout.py --preset 1.7b --batch 64 --prompt 256 --response 1024 \
    --tool_every 64 --timeline --tag timeline
  ;;
prefill_compile)  # compile time and speed of one prefill shape: Triton GEMMs (default), cuBLAS, no autotuning
  for flags in "" --xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=0; do
    XLA_FLAGS=$flags run 150 python3 tools/profile_engine.py prefill --rows 16 --chunk 60 --top 0
  done
  ;;
rlstep)
  run 240 "${RL_STEP[@]}"
  cp /tmp/rl_step_0.6b/metrics/metrics.jsonl "$OUT/rl_step_metrics.jsonl" 2>/dev/null
  rl_step_summary
  ;;
train)
  run 100 python3 -m pytest -q -p no:cacheprovider tests/models/test_qwen3.py -k "cudnn"
  run 200 "${RL_STEP[@]}"
  cp /tmp/rl_step_0.6b/metrics/metrics.jsonl "$OUT/rl_step_metrics.jsonl" 2>/dev/null
  rl_step_summary
  run 260 python3 tools/benchmark_train.py throughput --preset 1.7b --batch 8 --seq 1024 --attention cudnn,xla
  run 150 python3 tools/benchmark_train.py memory --preset 1.7b --batch 8 --seq 4096 --remat --attention cudnn
  ;;
trainprof)  # per-op GPU time of the 1.7B train step; with .base/aepo_jax (a copy of the code before a change,
            # carried) the same profile of that code first, in its own process
  for tag in base new; do
    if [ "$tag" = base ]; then [ -d .base/aepo_jax ] || continue; pp=/tmp/site:$PWD/.base; else pp=/tmp/site:$PWD; fi
    echo "=== profile $tag"
    PYTHONPATH=$pp timeout "${PROFILE_LIMIT:-230}" python3 tools/profile_train_step.py --tag "$tag" --top 60 \
      > "$OUT/profile_$tag.log" 2>&1
    grep -vE "^[IW][0-9]{4} " "$OUT/profile_$tag.log" | grep -v "top ops" | grep -B30 "non-matmul" | tail -22
  done
  ;;
extra)
  run 150 python3 tools/benchmark_train.py memory --preset 1.7b --batch 8 --seq 4096 --attention cudnn
  XLA_FLAGS=--xla_gpu_enable_triton_gemm=false run 200 python3 tools/benchmark_decode.py --presets 1.7b \
    --batches 64 --runs 3 --hf_runs 1
  ;;
esac
