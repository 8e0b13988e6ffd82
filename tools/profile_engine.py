"""Where one engine call's GPU time goes: time it, trace a few, sum kernel time per HLO op.

  python tools/profile_engine.py [--preset 1.7b --slots 64 --max_len 1344 --start 600] prefill [--rows 16 --chunk 60]
  python tools/profile_engine.py [...] decode [--steps 16 --appends 0 --chunk 60]
  python tools/profile_engine.py [...] decode_calls   # wall time of one decode call vs its step count
  python tools/profile_engine.py [...] lane_calls [--steps 4 --chunk 60]   # device time of the lane's appends

`decode_calls` times whole decode calls of 1, 2, 4, ..., 64 steps (the rollout's call width, 64) without the
profiler and fits wall = fixed + per_step x steps: the fixed part is what each return to the host costs.
`lane_calls` queues decode calls of `steps` steps back to back, each appending n chunks of `chunk`
tokens through the lane, without the profiler: the host dispatches each call while the device runs the one
before (as the rollout loop does), so wall time per call is the device's, and the lane's cost is the difference
to no appends.

Random bf16 weights. Every slot first holds `start` tokens. `prefill` appends a chunk of `chunk` tokens to
`rows` slots (a round of tool results in the rollout loop), then rewinds them, so every timed call sees the
same shapes; `decode` runs `steps` decode steps of all slots, then rewinds them (with --appends N, N of them
first idle and get a chunk appended through the call's lane: the lane's cost is the difference to N = 0).
Kernel time per category and
the top ops as in tools/profile_train_step.py (same trace reading and HLO mapping); with $OUT set, the
per-op table goes to $OUT/profile_engine_<call>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_train_step import op_table  # noqa: E402

from aepo_jax.engine import Engine, SamplingParams  # noqa: E402
from aepo_jax.engine.engine import DecodeResult  # noqa: E402
from aepo_jax.models import qwen3  # noqa: E402


def _shapes(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype) if hasattr(a, "shape") else a, tree)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("call", choices=("prefill", "decode", "decode_calls", "lane_calls"))
    p.add_argument("--preset", default="1.7b")
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--max_len", type=int, default=1344)
    p.add_argument("--start", type=int, default=600)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--chunk", type=int, default=60)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--appends", type=int, default=0,
                   help="decode: this many slots (idle first) get a chunk of --chunk tokens appended in the call")
    p.add_argument("--attention", default=None)
    p.add_argument("--lane_rows", type=int, help="engine: the decode lane's rows (appended chunks per step; default: "
                                                 "the engine's)")
    p.add_argument("--lane_width", type=int, help="engine: the decode lane's tokens per row and step (default: the "
                                                  "engine's)")
    p.add_argument("--counts", default="0,1,2,4,8", help="lane_calls: the numbers of chunks appended per call")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--trace_calls", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)

    config = qwen3.preset(args.preset)
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    model = qwen3.Qwen3(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    lane = {k: v for k, v in dict(lane_rows=args.lane_rows, lane_width=args.lane_width).items() if v is not None}
    engine = Engine(model, num_slots=args.slots, max_len=args.max_len, cache_dtype=dtype, attention=args.attention,
                    **lane)
    del model
    rng = np.random.default_rng(0)
    slots = list(range(args.slots))
    engine.prefill(slots, rng.integers(0, config.vocab_size, (args.slots, args.start)).tolist(),
                   sampling=SamplingParams(temperature=1.0), stops=[], ignore_eos=True)
    if args.call == "decode_calls":
        return decode_calls(engine, slots, args.start, args.repeats)
    if args.call == "lane_calls":
        return lane_calls(engine, slots, args.start, args.repeats, args.steps, args.chunk, rng,
                          tuple(int(n) for n in args.counts.split(",")))
    rows = slots[:args.rows]
    chunks = rng.integers(0, config.vocab_size, (max(args.rows, args.appends), args.chunk)).tolist()
    recorded = {}
    jitted = engine._prefill if args.call == "prefill" else engine._decode
    name = "_prefill" if args.call == "prefill" else "_decode"

    def recording(*a, **k):  # keeps the argument shapes, to compile the same executable for its HLO
        recorded.setdefault("specs", (_shapes(a), k))
        return jitted(*a, **k)

    setattr(engine, name, recording)

    def call():
        if args.call == "prefill":
            engine.prefill(rows, chunks)
            engine.rewind(rows, args.start, seed=0)
        else:
            idle = slots[:args.appends]
            if idle:
                engine.rewind(idle, args.start, seed=0)
            engine.decode(args.steps, wait_fraction=1.0, appends={s: c for s, c in zip(idle, chunks)})
            engine.rewind(slots, args.start, seed=0)
            engine.prefill(slots, [[1]] * args.slots)  # the slots run again from position start
        jax.block_until_ready(engine.state.lengths)

    times = []
    for i in range(args.repeats + 2):
        t0 = time.perf_counter()
        call()
        if i == 0:
            first_call_s = time.perf_counter() - t0  # compiles the call's executable (and the rewind's)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    specs, kwargs = recorded["specs"]
    text = jitted.lower(*specs, **kwargs).compile().as_text()
    trace_dir = tempfile.mkdtemp(prefix="trace_")
    with jax.profiler.trace(trace_dir):
        for _ in range(args.trace_calls):
            call()
    rows_out, by_cat, busy = op_table(trace_dir, text, args.trace_calls, module_filter=args.call)
    what = (f"prefill {args.rows} rows x {args.chunk} tokens" if args.call == "prefill"
            else f"decode {args.steps} steps x {args.slots} slots, {args.appends} x {args.chunk} appended")
    summary = dict(device=jax.devices()[0].device_kind, call=what, attention=engine.attention, start=args.start,
                   ms_call_incl_rewind=statistics.median(times) * 1e3, kernel_ms_per_call=busy,
                   first_call_s=first_call_s,
                   by_category=dict(by_cat.most_common()))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"profile_engine_{args.call}.json"), "w") as f:
            json.dump(dict(summary=summary, ops=rows_out), f, indent=1, default=list)
    print(f"{summary['device']} {what} at length {args.start}, attention {engine.attention}: "
          f"{summary['ms_call_incl_rewind']:.2f} ms per call (median, with the rewind), kernel time {busy:.2f} ms, "
          f"first call (compiles) {first_call_s:.1f} s")
    for cat, ms in by_cat.most_common():
        print(f"  {ms:8.3f} ms  {cat}")
    for r in rows_out[:args.top]:
        print(f"  {r['ms']:7.3f} ms {r['calls']:5.0f}x {r['category'][:20]:20} {r.get('opcode', '')[:12]:12} "
              f"{r.get('shape', '')[:40]:40} {r.get('stack', '')[:60]} | "
              f"{','.join(o for o in r.get('fused_ops', []) if o not in ('parameter', 'bitcast', 'constant'))[:40]}")
    return summary


def _restart(engine, slots, start):
    """Every slot back at `start` and running again (one token appended), the device done with it."""
    engine.rewind(slots, start, seed=0)
    engine.prefill(slots, [[1]] * len(slots))
    jax.block_until_ready(engine.state.lengths)


def decode_calls(engine, slots, start, repeats):
    """Median wall time of a decode call (all slots running, no stop) per step count, and the linear fit."""
    static, no_appends = engine._decode_static(64, lane_loop=False), engine._pack_appends({})
    steps_list = (1, 2, 4, 8, 16, 32, 64)
    wall = {}
    for steps in steps_list:
        times = []
        for i in range(repeats + 1):
            _restart(engine, slots, start)
            t0 = time.perf_counter()
            engine.state, out = engine._decode(engine._weights, engine.state, np.int32(steps), np.int32(1),
                                               np.float32(1.0), no_appends, **static)
            jax.block_until_ready(out)
            if i:
                times.append(time.perf_counter() - t0)
        wall[steps] = statistics.median(times) * 1e3
    per_step, fixed = np.polyfit(np.array(steps_list, float), np.array([wall[s] for s in steps_list]), 1)
    summary = dict(device=jax.devices()[0].device_kind, slots=len(slots), start=start, ms_per_call=wall,
                   fit_fixed_ms=float(fixed), fit_ms_per_step=float(per_step))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "profile_engine_decode_calls.json"), "w") as f:
            json.dump(summary, f, indent=1)
    print(f"{summary['device']} decode calls, {len(slots)} slots at length {start}: "
          + ", ".join(f"{s} steps {ms:.2f} ms" for s, ms in wall.items()))
    print(f"fit: {fixed:.2f} ms per call + {per_step:.3f} ms per step")
    return summary


def lane_calls(engine, slots, start, repeats, steps, chunk, rng, counts):
    """Device time of a decode call of `steps` steps (every slot running) that appends n chunks of `chunk` tokens
    through the lane, per n in counts (up to the slot count): `repeats` calls queued back to back, in two
    interleaved rounds (their mean; `spread_ms` is the largest difference between a count's two rounds). The
    appended slots rotate so that none grows far; every round starts from all slots at `start`."""
    if not 1 <= chunk <= engine.lane_capacity:
        raise ValueError(f"lane_calls: --chunk {chunk} must be in [1, the engine's lane capacity "
                         f"{engine.lane_capacity}] (a longer append is prefilled, not laned)")
    counts = tuple(sorted({0} | {n for n in counts if n <= len(slots)}))
    chunks = rng.integers(0, engine.config.vocab_size, (len(slots), chunk))
    static = {lane: engine._decode_static(steps, lane_loop=lane) for lane in (False, True)}

    def appends(n, i):  # packed as Engine._pack_appends does (called directly: no host length check per call)
        packed = np.zeros((len(slots), 1 + engine.lane_capacity), np.int32)
        for s in ((n * i + j) % len(slots) for j in range(n)):
            packed[s, 0], packed[s, 1:1 + chunk] = chunk, chunks[s]
        return packed

    def queued(n):
        _restart(engine, slots, start)
        t0 = time.perf_counter()
        for i in range(repeats):
            engine.state, out = engine._decode(engine._weights, engine.state, np.int32(steps), np.int32(1),
                                               np.float32(1.0), appends(n, i), **static[n > 0])
        jax.block_until_ready(out)
        wall = (time.perf_counter() - t0) / repeats * 1e3
        return wall, int(DecodeResult(engine, out, static[n > 0]["width"], engine._version).lane_steps)

    for n in counts:  # compile both executables and warm up
        queued(n)
    rounds = [{n: queued(n) for n in counts} for _ in range(2)]
    ms = {n: float(np.mean([r[n][0] for r in rounds])) for n in counts}
    summary = dict(device=jax.devices()[0].device_kind, slots=len(slots), start=start, steps=steps, chunk=chunk,
                   lane=(engine.lane_rows, engine.lane_width), ms_per_call=ms,
                   lane_ms={n: ms[n] - ms[0] for n in counts},
                   lane_steps={n: rounds[-1][n][1] for n in counts},
                   spread_ms=max(abs(rounds[0][n][0] - rounds[1][n][0]) for n in counts))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "profile_engine_lane_calls.json"), "w") as f:
            json.dump(summary, f, indent=1)
    print(f"{summary['device']} lane calls, {len(slots)} slots at length {start}, {steps} steps each, lane "
          f"{summary['lane'][0]} x {summary['lane'][1]}, {repeats} calls queued "
          f"(spread {summary['spread_ms']:.2f} ms):")
    for n in counts:
        print(f"  {n} x {chunk} appended: {ms[n]:.2f} ms per call, lane +{summary['lane_ms'][n]:.2f} ms "
              f"({summary['lane_steps'][n]} lane steps)")
    return summary


if __name__ == "__main__":
    main()
