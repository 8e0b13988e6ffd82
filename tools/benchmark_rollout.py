"""Agentic rollout throughput as a fraction of plain decode throughput (same engine, model and batch).

  python tools/benchmark_rollout.py [--preset 1.7b --batch 64 --prompt 256 --response 1024 --tool_every 64]

A random model writes no tool tags, so the stop string `</search>` is registered with V / tool_every
single-token alternatives: every sampled token ends a segment with probability ~1 / tool_every. The call
that follows has no opening tag, so the loop's tool step answers at once with a malformed-call result (a
zero-latency tool); its ` <result>..</result>` tokens are appended to the slot (by the next decode call,
inside its loop; with --lane_rows 0 by a prefill call before it) and decoding resumes, exactly as with a real
tool. Plain decode: the same slots sample `response` tokens with no stops.
Throughput counts sampled tokens only, per second of the whole job on both sides: the prompts' prefill and
the decode (the rollout's clock includes its prefills; so does tools/benchmark_decode.py's). Until session 22
the plain decode's clock started after its prefill (~0.09 s of ~4.3 s, H100, 1.7B); that ratio is still
reported (`ratio_vs_plain_decode_only`). Writes JSON to $OUT when set.

The response budget counts tool-result tokens too, so trajectories sample different numbers of tokens and
the last few run alone at the end (the tail). Two more figures separate that from the loop's own cost:
  plain decode, matched lengths   each slot samples exactly as many tokens as its trajectory did in the
                                  timed agentic run, with no stops (the same tail, no tools)
  --waves N                       N x batch trajectories through the batch slots: a slot whose trajectory
                                  ends starts the next one, so the tail is paid once per N waves
The best of --repeats timed runs is reported, and every run with the sampled length of its longest trajectory:
a run lasts about that many decode steps, so that draw moves the ratio most (H100, 1.7B: ~3.4 points per 100
tokens, docs/benchmarks.md session 12). Every timed run repeats seed 0, so one code meets one draw; --seeds N
times seeds 0..N-1 too (each after its own --warmups runs) and reports each seed's ratio, its matched-length
figure, compilations in its timed run (expected 0) and the mean ratio (`ratio_mean`).
"""

import argparse
import bisect
import concurrent.futures
import contextlib
import glob
import gzip
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aepo_jax.agent import rollout as rollout_lib
from aepo_jax.agent.tools import PythonTool, SearchTool  # noqa: F401  (tools are never reached here)
from aepo_jax.engine import Engine, SamplingParams
from aepo_jax.engine.engine import DecodeResult
from aepo_jax.models import qwen3


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 (the tool-result text); ids past 255 decode to nothing."""

    eos_id, pad_id, vocab_size = 0, 0, 256

    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=False):
        return bytes(i for i in ids if 0 < i < 256).decode("utf-8", "replace")

    def token_ids_of(self, text):
        return self.encode(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--preset", default="1.7b")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--response", type=int, default=1024)
    parser.add_argument("--tool_every", type=int, default=64)
    parser.add_argument("--decode_chunk", type=int, default=64)
    parser.add_argument("--wait_fraction", type=float, default=rollout_lib.RolloutConfig.wait_fraction)
    parser.add_argument("--tool_overlap", action=argparse.BooleanOptionalAction,
                        default=rollout_lib.RolloutConfig.tool_overlap,
                        help="the loop's order (see agent/rollout.py); --no-tool_overlap: read, wait, then decode")
    parser.add_argument("--overlap_min_running", type=int, default=rollout_lib.RolloutConfig.overlap_min_running,
                        help="with --tool_overlap, queue ahead only while at least this many slots run")
    parser.add_argument("--defer_appends", action=argparse.BooleanOptionalAction,
                        default=rollout_lib.RolloutConfig.defer_appends,
                        help="tool results in whole lane steps per decode call, the rest in the next "
                             "(agent/rollout.py)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmups", type=int, default=1,
                        help="untimed runs first; every run repeats seed 0, but on a GPU the sampled tokens (hence the "
                             "prefill shapes) can still differ between runs, and a new 1.7B prefill shape compiles "
                             "for ~10 s: more warm-ups, fewer timed runs that compile (each reports its count)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="rollout seeds 0..N-1, each its own draw of trajectories (best of --repeats each); "
                             "reports every seed's ratio and their mean")
    parser.add_argument("--waves", type=int, default=1, help="trajectories = waves x batch (slots stay batch)")
    parser.add_argument("--tag", default="", help="names the JSON file: rollout_bench_TAG.json")
    parser.add_argument("--attention", default=None, help="engine attention: pallas, cudnn or xla (default: engine's)")
    parser.add_argument("--lane_rows", type=int,
                        help="engine: slots whose appended tokens ride along per decode step (0: prefill them; "
                             "default: the engine's)")
    parser.add_argument("--lane_width", type=int, help="engine: appended tokens per lane row and step (default: the "
                                                       "engine's)")
    parser.add_argument("--timeline", action="store_true",
                        help="one more agentic run under the profiler: wall time and device-busy time inside each "
                             "kind of engine call and in the loop's host work between them")
    parser.add_argument("--breakdown", action="store_true",
                        help="one more agentic run with every engine call synchronised and timed: device time "
                             "of decode and prefill calls, host time between them, slot use inside decode")
    args = parser.parse_args(argv)

    config = qwen3.preset(args.preset)
    dtype = jnp.bfloat16 if jax.devices()[0].platform == "gpu" else jnp.float32
    model = qwen3.Qwen3(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    stops = {"</search>": [[t] for t in range(256, config.vocab_size, args.tool_every)],
             "</python>": [[1, 2, 3]]}
    max_len = args.prompt + args.response + 64
    lane = {k: v for k, v in dict(lane_rows=args.lane_rows, lane_width=args.lane_width).items() if v is not None}
    engine = Engine(model, num_slots=args.batch, max_len=max_len, stop_strings=stops, cache_dtype=dtype, seed=0,
                    attention=args.attention, **lane)
    prompts = np.random.default_rng(0).integers(256, config.vocab_size,
                                                (args.waves * args.batch, args.prompt)).tolist()
    sampling = SamplingParams(temperature=1.0)

    def plain(new_tokens=None):
        """Every slot samples `response` tokens, or new_tokens[i] for slot i. Timed as the agentic run is: the
        prompts' prefill and the decode (sampled tokens / both); the decode alone is recorded too."""
        new_tokens = [args.response] * args.batch if new_tokens is None else new_tokens
        start = time.perf_counter()
        engine.prefill(list(range(args.batch)), prompts[:args.batch], sampling=sampling, stops=[],
                       ignore_eos=True, max_length=[args.prompt + n for n in new_tokens])
        jax.block_until_ready(engine.state.lengths)  # for the decode-only figure; costs the end-to-end one a dispatch
        decode_start = time.perf_counter()
        res = engine.decode(max(new_tokens), wait_fraction=1.0)
        sampled = int(res.counts.sum())
        end = time.perf_counter()
        engine.release(list(range(args.batch)))
        return sampled / (end - start), dict(decode_only_tokens_per_s=sampled / (end - decode_start),
                                             prefill_s=decode_start - start)

    def agentic(seed):
        config_r = rollout_lib.RolloutConfig(scheduler="grpo", group_size=1, max_tool_calls=10_000,
                                             max_response_tokens=args.response, sampling=sampling,
                                             decode_chunk=args.decode_chunk, wait_fraction=args.wait_fraction,
                                             tool_overlap=args.tool_overlap,
                                             overlap_min_running=args.overlap_min_running,
                                             defer_appends=args.defer_appends)
        compiles, host = [], dict(decode_dispatch_s=0.0, fetch_wait_s=0.0)
        listener = lambda name, *a, **k: compiles.append(name) if name.endswith("backend_compile_duration") else None

        def timed(name, fn):  # host time inside each call, no synchronisation added
            key = "decode_dispatch_s" if name == "decode" else "fetch_wait_s"

            def call(*a, **k):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    host[key] += time.perf_counter() - t0
            return call

        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            with concurrent.futures.ThreadPoolExecutor(16) as pool, _wrapped(engine, ("decode",), timed), \
                    _wrapped(DecodeResult, ("fetch",), timed):
                result = rollout_lib.rollout(engine, ByteTokenizer(), {}, prompts, config_r, executor=pool,
                                             seed=seed)
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)
        sampled = [sum(g[0].mask) for g in result.groups]
        return result.metrics["rollout/sampled_tokens_per_s"], dict(result.metrics, sampled_per_traj=sampled,
                                                                    compilations=len(compiles), **host)

    rows = {}
    for name, fn in (("plain_decode", lambda i: plain()), ("agentic_rollout", agentic)):
        for _ in range(args.warmups):  # compile the shapes the timed runs meet (they repeat the seed)
            fn(0)
        runs = [fn(0) for _ in range(args.repeats)]
        best = max(runs, key=lambda r: r[0])
        rows[name] = dict(tokens_per_s=best[0], metrics=best[1], runs=[r[0] for r in runs])
        if name == "agentic_rollout":
            rows[name]["longest"] = [max(r[1]["sampled_per_traj"]) for r in runs]

    def matched_plain(lengths):
        plain(lengths)  # warm-up at the new budget
        return max(plain(lengths)[0] for _ in range(args.repeats))

    if args.waves == 1:
        matched = matched_plain(rows["agentic_rollout"]["metrics"]["sampled_per_traj"])
        rows["plain_decode_matched"] = dict(tokens_per_s=matched)
    if args.seeds > 1:
        def seed_row(seed, tokens_per_s, metrics, matched):
            return dict(seed=seed, tokens_per_s=tokens_per_s, longest=max(metrics["sampled_per_traj"]),
                        matched_tokens_per_s=matched, ratio=tokens_per_s / rows["plain_decode"]["tokens_per_s"],
                        compilations=metrics["compilations"])

        seed0 = rows["agentic_rollout"]
        seeds = [seed_row(0, seed0["tokens_per_s"], seed0["metrics"],
                          rows.get("plain_decode_matched", {}).get("tokens_per_s"))]
        for seed in range(1, args.seeds):
            for _ in range(args.warmups):  # a new draw meets new prefill shapes: compile them before timing
                agentic(seed)
            tokens_per_s, metrics = max((agentic(seed) for _ in range(args.repeats)), key=lambda r: r[0])
            matched = matched_plain(metrics["sampled_per_traj"]) if args.waves == 1 else None
            seeds.append(seed_row(seed, tokens_per_s, metrics, matched))
        rows["seeds"] = seeds
    if args.breakdown:
        rows["breakdown"] = breakdown(engine, lambda: agentic(0), args.batch)
    if args.timeline:
        rows["timeline"] = timeline(engine, lambda: agentic(0))
    ratio = rows["agentic_rollout"]["tokens_per_s"] / rows["plain_decode"]["tokens_per_s"]
    ratio_mean = float(np.mean([r["ratio"] for r in rows["seeds"]])) if "seeds" in rows else ratio
    decode_only = rows["plain_decode"]["metrics"]["decode_only_tokens_per_s"]
    ratio_vs_plain_decode_only = ratio_mean * rows["plain_decode"]["tokens_per_s"] / decode_only
    summary = dict(device=jax.devices()[0].device_kind, preset=args.preset, batch=args.batch, waves=args.waves,
                   attention=engine.attention, lane=(engine.lane_rows, engine.lane_width), prompt=args.prompt,
                   response=args.response, tool_every=args.tool_every, wait_fraction=args.wait_fraction,
                   tool_overlap=args.tool_overlap, overlap_min_running=args.overlap_min_running,
                   defer_appends=args.defer_appends, ratio=ratio, ratio_mean=ratio_mean,
                   ratio_vs_plain_decode_only=ratio_vs_plain_decode_only, **rows)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"rollout_bench{'_' * bool(args.tag)}{args.tag}.json"), "w") as f:
            json.dump(summary, f, indent=2)
    m = rows["agentic_rollout"]["metrics"]
    print(f"device {summary['device']}  preset {args.preset}  batch {args.batch}  waves {args.waves}  "
          f"attention {engine.attention}  lane {engine.lane_rows}x{engine.lane_width}  "
          f"wait_fraction {args.wait_fraction}  tool_overlap {args.tool_overlap} "
          f"(min running {args.overlap_min_running})  defer_appends {args.defer_appends}")
    print(f"plain decode      {rows['plain_decode']['tokens_per_s']:10.0f} sampled tokens/s  (its decode alone "
          f"{decode_only:.0f}: mean ratio against that {ratio_vs_plain_decode_only:.1%})")
    print(f"agentic rollout   {rows['agentic_rollout']['tokens_per_s']:10.0f} sampled tokens/s  "
          f"({m.get('rollout/tool_calls_per_traj', 0):.1f} tool calls/trajectory, "
          f"{m.get('rollout/decode_calls', 0):.0f} decode calls, {m.get('rollout/lane_steps', 0):.0f} lane steps, "
          f"{m.get('compilations', 0)} compilations)")
    print(f"ratio             {ratio:10.1%}  (best of {args.repeats}; every run against the best plain decode: "
          + ", ".join(f"{tps / rows['plain_decode']['tokens_per_s']:.1%} (longest trajectory {n} sampled tokens)"
                      for tps, n in zip(rows["agentic_rollout"]["runs"], rows["agentic_rollout"]["longest"])) + ")")
    print(f"agentic run: {m['rollout/seconds']:.2f} s, {m['rollout/decode_steps']:.0f} decode steps, slot use "
          f"{m['rollout/slot_use']:.1%}; host time dispatching decode calls {m['decode_dispatch_s']:.2f} s, "
          f"waiting for their results {m['fetch_wait_s']:.2f} s")
    if "plain_decode_matched" in rows:
        matched = rows["plain_decode_matched"]["tokens_per_s"]
        print(f"plain decode, matched lengths {matched:10.0f} sampled tokens/s; agentic / matched "
              f"{rows['agentic_rollout']['tokens_per_s'] / matched:.1%}")
    if "seeds" in rows:
        print(f"seeds 0..{args.seeds - 1}: mean ratio {ratio_mean:.1%}; " + ", ".join(
            f"seed {r['seed']} {r['ratio']:.1%} (longest {r['longest']}"
            + (f", {r['compilations']} compilations in the timed run" if r["compilations"] else "")
            + (f", agentic / matched {r['tokens_per_s'] / r['matched_tokens_per_s']:.1%}"
               if r["matched_tokens_per_s"] else "") + ")" for r in rows["seeds"]))
    if args.breakdown:
        b = rows["breakdown"]
        print(f"breakdown (synchronised run, {b['seconds']:.2f} s, {b['tokens_per_s']:.0f} sampled tokens/s): "
              f"decode {b['decode_s']:.2f} s in {b['decode_calls']} calls ({b['decode_steps']} steps, "
              f"{b['decode_ms_per_step']:.2f} ms/step, slot use {b['slot_use']:.1%}), prefill {b['prefill_s']:.2f} s "
              f"in {b['prefill_calls']} calls ({b['prefill_slow_calls']} over 1 s), host {b['host_s']:.2f} s; "
              f"per round: decode {b['decode_ms_per_call']:.1f} ms, prefill {b['prefill_ms_per_call']:.1f} ms, "
              f"host {b['host_ms_per_round']:.1f} ms; fit per decode call: {b['fit_ms_per_step']:.2f} ms per step "
              f"+ {b['fit_ms_per_lane_step']:.2f} ms per lane step ({b['lane_steps']} in all) + "
              f"{b['fit_ms_per_sampled_token']:.3f} ms per sampled token + {b['fit_ms_per_call']:.2f} ms")
    if args.timeline:
        t = rows["timeline"]
        print(f"timeline (profiled run, {t['wall_ms']:.0f} ms, device busy {t['busy_ms']:.0f} ms = "
              f"{t['busy_ms'] / t['wall_ms']:.1%}):")
        for name, r in t["parts"].items():
            per_call = r["wall_ms"] / max(r["calls"], 1)
            print(f"  {name:16} {r['calls']:5d} calls  {r['wall_ms']:8.1f} ms wall ({per_call:6.2f} per call), "
                  f"device busy {r['busy_ms']:8.1f} ms, idle {r['wall_ms'] - r['busy_ms']:7.1f} ms")
        for module, ms in list(t["kernel_ms_by_module"].items())[:6]:
            print(f"  kernels of {module[:40]:40} {ms:8.1f} ms")
    return summary


@contextlib.contextmanager
def _wrapped(owner, names, wrap):
    """Replaces owner.<name> by wrap(name, original) for each name while the block runs (measurement only)."""
    originals = {n: getattr(owner, n) for n in names}
    for n in names:
        setattr(owner, n, wrap(n, originals[n]))
    try:
        yield
    finally:
        for n in names:
            setattr(owner, n, originals[n])


def _merge(intervals):
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def _overlap(merged, starts, lo, hi):
    """Length of [lo, hi) covered by the disjoint sorted intervals `merged`."""
    i = max(bisect.bisect_right(starts, lo) - 1, 0)
    total = 0.0
    while i < len(merged) and merged[i][0] < hi:
        total += max(0.0, min(hi, merged[i][1]) - max(lo, merged[i][0]))
        i += 1
    return total


def timeline(engine, run):
    """Runs `run` under jax.profiler with each engine call annotated; returns, per kind of call (and for the
    loop's host work between calls), its count, wall time and the time the device was busy meanwhile.

    Device busy = the union of GPU kernel intervals (on CPU: of the XLA thunks). On a GPU a decode call
    returns once launched, so its wall time is the dispatch and 'fetch' is the wait for its result; idle time
    in 'host' is the loop's Python work with nothing queued on the device. The profiler stretches each
    dispatch (~10 ms instead of ~6 on an H100), so this run looks idler than an unprofiled one."""
    from jax._src.profiler import ProfileData

    names = ("decode", "prefill", "release", "fork", "rewind")

    def annotated(name, fn):
        def call(*a, **k):
            with jax.profiler.TraceAnnotation(f"engine.{name}"):
                return fn(*a, **k)
        return call

    trace_dir = tempfile.mkdtemp(prefix="rollout_trace_")
    with _wrapped(engine, names, annotated), _wrapped(DecodeResult, ("fetch",), annotated):
        with jax.profiler.trace(trace_dir), jax.profiler.TraceAnnotation("rollout.run"):
            run()
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    data = ProfileData.from_file(path)
    gpu = any(p.name.startswith("/device:GPU") for p in data.planes)
    kernels, marks, by_module, events = [], [], {}, []
    for plane in data.planes:
        for line in plane.lines:
            for e in line.events:
                if plane.name.startswith("/device:GPU"):
                    if "stream" in line.name.lower():
                        kernels.append((e.start_ns, e.end_ns))
                        stats = {k: v for k, v in e.stats}
                        module = str(stats.get("hlo_module", "?"))
                        by_module[module] = by_module.get(module, 0.0) + e.duration_ns / 1e6
                        events.append(("gpu " + line.name, e.name[:80], e.start_ns, e.duration_ns,
                                       str(stats.get("hlo_op", ""))))
                    continue
                if plane.name == "/host:CPU":
                    events.append(("host " + line.name, e.name[:80], e.start_ns, e.duration_ns, ""))
                if e.name.startswith(("engine.", "rollout.run")):
                    marks.append((e.start_ns, e.end_ns, e.name))
                elif not gpu and "hlo_op" in {k for k, _ in e.stats}:
                    kernels.append((e.start_ns, e.end_ns))
    span = next((s, t) for s, t, n in marks if n == "rollout.run")
    calls = []
    for s, t, n in sorted((s, t, n.split(".", 1)[1]) for s, t, n in marks if n.startswith("engine.")):
        if not calls or s >= calls[-1][1]:  # a call made inside another (decode prefilling a long append)
            calls.append((s, t, n))         # counts as part of the outer one
    merged = _merge([k for k in kernels if k[1] > span[0] and k[0] < span[1]])
    starts = [m[0] for m in merged]
    parts = {n: dict(calls=0, wall_ms=0.0, busy_ms=0.0) for n in names + ("fetch", "host")}

    def add(name, lo, hi, count):
        if hi > lo:
            parts[name]["wall_ms"] += (hi - lo) / 1e6
            parts[name]["busy_ms"] += _overlap(merged, starts, lo, hi) / 1e6
        parts[name]["calls"] += count

    cursor = span[0]
    for s, t, n in calls:
        add("host", cursor, s, 0)
        add(n, s, t, 1)
        cursor = max(cursor, t)
    add("host", cursor, span[1], 0)
    parts["host"]["calls"] = parts["decode"]["calls"]
    wall = (span[1] - span[0]) / 1e6
    decodes = [c for c in calls if c[2] == "decode"]
    if os.environ.get("OUT") and len(decodes) >= 4:  # three rounds from the middle, every event, for reading
        lo, hi = decodes[len(decodes) // 2][0], decodes[len(decodes) // 2 + 3][0]
        with gzip.open(os.path.join(os.environ["OUT"], "rollout_trace_rounds.json.gz"), "wt") as f:
            json.dump(sorted(e for e in events if e[2] + e[3] >= lo and e[2] <= hi), f)
    return dict(wall_ms=wall, busy_ms=_overlap(merged, starts, *span) / 1e6,
                parts={k: v for k, v in parts.items() if v["calls"] or v["wall_ms"]},
                kernel_ms_by_module=dict(sorted(by_module.items(), key=lambda kv: -kv[1])))


def breakdown(engine, run, batch):
    """Runs `run` with the engine's decode and prefill synchronised and timed (measurement only), and fits
    each decode call's time (least squares) as ms_per_step x steps + ms_per_lane_step x lane steps +
    ms_per_sampled_token x sampled tokens (the running slots' cache reads) + ms_per_call."""
    calls = []
    prefill_s = [0.0]  # running total, so that a decode call's own prefill (a long append) counts once

    def timed(name, fn):
        def decode(*a, **k):
            t0, before = time.perf_counter(), prefill_s[0]
            res = fn(*a, **k)
            jax.block_until_ready(res.output)
            seconds = time.perf_counter() - t0 - (prefill_s[0] - before)
            calls.append(("decode", seconds, int(res.steps), int(res.counts.sum()), int(res.lane_steps)))
            return res

        def prefill(slots, chunks, **k):
            t0 = time.perf_counter()
            out = fn(slots, chunks, **k)
            jax.block_until_ready(engine.state.lengths)
            n = 1 if isinstance(slots, (int, np.integer)) else len(slots)
            calls.append(("prefill", time.perf_counter() - t0, n, sum(len(c) for c in chunks)))
            prefill_s[0] += calls[-1][1]
            return out
        return decode if name == "decode" else prefill

    with _wrapped(engine, ("decode", "prefill"), timed):
        tokens_per_s, metrics = run()
    seconds = metrics["rollout/seconds"]
    dec = [c for c in calls if c[0] == "decode"]
    pre = [c for c in calls if c[0] == "prefill"]
    decode_s, prefill_s = sum(c[1] for c in dec), sum(c[1] for c in pre)
    steps, sampled = sum(c[2] for c in dec), sum(c[3] for c in dec)
    terms = np.array([[c[2], c[4], c[3], 1.0] for c in dec]).reshape(-1, 4)
    fit = np.linalg.lstsq(terms, 1e3 * np.array([c[1] for c in dec]), rcond=None)[0] if len(dec) >= 4 else [0.0] * 4
    return dict(fit_ms_per_step=float(fit[0]), fit_ms_per_lane_step=float(fit[1]),
                fit_ms_per_sampled_token=float(fit[2]), fit_ms_per_call=float(fit[3]),
                lane_steps=int(terms[:, 1].sum()),
                seconds=seconds, tokens_per_s=tokens_per_s, decode_calls=len(dec), decode_s=decode_s,
                decode_steps=steps, decode_ms_per_step=1e3 * decode_s / max(steps, 1),
                slot_use=sampled / max(steps * batch, 1), prefill_calls=len(pre), prefill_s=prefill_s,
                prefill_slow_calls=sum(c[1] > 1.0 for c in pre), prefill_tokens=sum(c[3] for c in pre),
                host_s=seconds - decode_s - prefill_s, decode_ms_per_call=1e3 * decode_s / max(len(dec), 1),
                prefill_ms_per_call=1e3 * prefill_s / max(len(pre), 1),
                host_ms_per_round=1e3 * (seconds - decode_s - prefill_s) / max(len(dec), 1),
                calls=[list(c) for c in calls])


if __name__ == "__main__":
    main()
