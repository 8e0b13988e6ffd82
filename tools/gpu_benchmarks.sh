#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md that the train and agent issues need, in one device call.
# Each measurement has its own time limit so one failure or hang does not lose the others.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
OUT=${OUT:-/tmp/gpu_bench}; mkdir -p "$OUT"
run() { local limit=$1; shift; echo "=== $*"; timeout "$limit" "$@" 2>&1 | grep -vE "^[IW][0-9]{4} " | tail -12; }
run 200 python3 tools/benchmark_train.py throughput --preset 1.7b --batch 8 --seq 1024
run 150 python3 tools/benchmark_train.py memory --preset 1.7b --batch 8 --seq 4096 --remat
run 150 python3 tools/benchmark_rollout.py --preset 1.7b --batch 64 --prompt 256 --response 1024 --tool_every 64
run 200 python3 -m aepo_jax.train --flagfile=configs/cpu_demo.flags --mode=rl --model_preset=0.6b \
  --compute_dtype=bfloat16 --param_dtype=float32 --remat --rl_steps=2 --questions_per_step=16 --group_size=8 \
  --initial_rollouts=4 --max_response_tokens=512 --eval_every=0 --dump_every=0 --mini_batches=4 \
  --checkpoint_every=1000 --workdir=/tmp/rl_step_0.6b
cp /tmp/rl_step_0.6b/metrics/metrics.jsonl "$OUT/rl_step_metrics.jsonl" 2>/dev/null
python3 - <<'PY'
import json
for row in map(json.loads, open("/tmp/rl_step_0.6b/metrics/metrics.jsonl")):
    print({k: round(v, 3) for k, v in row.items() if k.startswith(("rl/time", "rl/rollout/seconds",
           "rl/rollout/sampled", "rl/tokens_per_s", "rl/rollout/response_length", "step"))})
PY
