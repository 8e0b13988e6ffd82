"""Where the train step's GPU time goes: time one jitted RL step, trace a few, sum kernel time per HLO op.

  python tools/profile_train_step.py [--preset 1.7b --batch 8 --seq 1024 --attention cudnn] [--tag NAME]

Same step and synthetic batch as `tools/benchmark_train.py throughput` (AEPO loss, bf16 compute, float32
master weights and AdamW state). Compiles the step once, times --repeats steps (median, after 2 warm-ups),
traces --trace_steps more with jax.profiler, reads the trace's GPU kernels (their `hlo_op` stat) and maps
each to its instruction in the compiled HLO: opcode, fusion kind and the Python source line it came from.
Prints the kernel time per step by category and the top ops; with $OUT set, writes the per-op table
(JSON) and the compiled HLO (gzip) there, named by --tag.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark_train  # noqa: E402  (the same batch and FLOP count)

from aepo_jax.models import qwen3  # noqa: E402
from aepo_jax.train import step as step_lib  # noqa: E402

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")


def _stack_tables(text: str):
    """stack_frame_id -> [(file, line, function), ...] innermost first, from the module's frame tables."""
    sections: dict[str, dict[int, str]] = {}
    current = None
    for line in text.splitlines():
        if line.strip() in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = line.strip()
            sections[current] = {}
            continue
        m = re.match(r"^(\d+) (.*)$", line)
        if current and m:
            sections[current][int(m.group(1))] = m.group(2)
        elif current and line.strip():
            current = None
    files = {k: os.path.basename(v.strip('"')) for k, v in sections.get("FileNames", {}).items()}
    funcs = {k: v.strip('"') for k, v in sections.get("FunctionNames", {}).items()}
    locs = {}
    for k, v in sections.get("FileLocations", {}).items():
        g = dict(re.findall(r"(\w+)=(\d+)", v))
        locs[k] = (files.get(int(g.get("file_name_id", 0)), "?"), int(g.get("line", 0)),
                   funcs.get(int(g.get("function_name_id", 0)), "?"))
    frames = {}
    for k, v in sections.get("StackFrames", {}).items():
        g = dict(re.findall(r"(\w+)=(\d+)", v))
        frames[k] = (int(g.get("file_location_id", 0)), int(g.get("parent_frame_id", 0)))

    def chain(frame_id):
        out, seen = [], set()
        while frame_id in frames and frame_id not in seen:
            seen.add(frame_id)
            loc, parent = frames[frame_id]
            if loc in locs:
                out.append(locs[loc])
            frame_id = parent
        return out
    return chain


def hlo_index(text: str) -> dict[str, dict]:
    """Instruction name -> {opcode, shape, kind, target, source, op_name, fused_ops} of a compiled module."""
    comps: dict[str, list[str]] = {}
    current = None
    index = {}
    chain = _stack_tables(text)
    comp_frame: dict[str, int] = {}  # a computation's ROOT (else first) instruction's frame
    for line in text.splitlines():
        head = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and "=" not in line.split("{")[0]:
            current = head.group(1)
            comps[current] = []
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, opcode = m.group(1), m.group(2), m.group(3)
        if current is not None:
            comps[current].append(opcode)
            frame = re.search(r"stack_frame_id=(\d+)", line)
            if frame and (current not in comp_frame or line.lstrip().startswith("ROOT")):
                comp_frame[current] = int(frame.group(1))
        info = {"opcode": opcode, "shape": shape[:80]}
        for key, pat in (("kind", r"kind=(\w+)"), ("calls", r"calls=%?([\w.\-]+)"),
                         ("target", r'custom_call_target="([^"]+)"'), ("op_name", r'op_name="([^"]*)"'),
                         ("file", r'source_file="([^"]*)"'), ("line", r"source_line=(\d+)")):
            g = re.search(pat, line)
            if g:
                info[key] = g.group(1)
        frame = re.search(r"stack_frame_id=(\d+)", line)
        if frame:
            info["frame"] = int(frame.group(1))
        if "__triton_gemm" in line or '"kind":"__triton_nested_gemm' in line:
            info["triton"] = True
        index[name] = info
    for info in index.values():
        if "calls" in info:
            info["fused_ops"] = sorted(set(comps.get(info["calls"], [])))
            if "frame" not in info and info["calls"] in comp_frame:
                info["frame"] = comp_frame[info["calls"]]
        frames = chain(info.pop("frame")) if "frame" in info else []
        if frames:
            info["file"], info["line"] = frames[0][0], str(frames[0][1])
            info["stack"] = " < ".join(f"{f}:{n}({fn})" for f, n, fn in frames[:4])
    return index


def category(info: dict | None, kernel: str) -> str:
    k = kernel.lower()
    if info is None or "nvjet" in k or "cudnn" in k:  # library kernels (cuBLAS, cuDNN) inside CUDA graphs
        if "fmha" in k or "cudnn" in k or "flash" in k or "sdpa" in k:
            return "attention (cuDNN kernels)"
        if any(s in k for s in ("gemm", "xmma", "cutlass", "nvjet")):
            return "matmul (cuBLAS kernels)"
        if "memcpy" in k or "memset" in k:
            return "memcpy/memset"
        return "other (unmapped)"
    target = info.get("target", "")
    ops = info.get("fused_ops", [])
    if "cudnn" in target or "fmha" in target:
        return "attention (cuDNN)"
    if "cublas" in target or "gemm" in target.lower() or info.get("triton") or "dot" in ops \
            or "nvjet" in k or info["opcode"] == "dot":
        return "matmul"
    src = (info.get("stack", "") + " " + info.get("op_name", "")).lower()
    if "optax" in src or "adam" in src or "clip" in src or ("sqrt" in ops and "select" in ops):
        return "optimizer"
    if "logprobs.py" in src:
        return "log-prob / entropy loop"
    if info["opcode"] in ("copy", "transpose") or (ops and set(ops) <= {"copy", "transpose", "parameter",
                                                                          "bitcast"}):
        return "copy / transpose"
    if ops and set(ops) <= {"convert", "parameter", "bitcast", "copy", "transpose"}:
        return "dtype casts"
    if "qwen3.py" in src:
        return "model elementwise (norm, rope, silu, residual)"
    if "step.py" in src:
        return "step glue (accumulate, metrics)"
    return "other"


def kernel_times(trace_dir: str, module_filter: str | None):
    from jax._src.profiler import ProfileData

    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    data = ProfileData.from_file(path)
    per_op: dict[str, list] = collections.defaultdict(lambda: [0.0, 0, set()])
    gpu = any(plane.name.startswith("/device:GPU") for plane in data.planes)
    for plane in data.planes:
        if gpu and not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if gpu and "stream" not in line.name.lower():
                continue
            for e in line.events:
                stats = {k: v for k, v in e.stats}
                if not gpu and "hlo_op" not in stats:  # CPU smoke run: the thunks that ran HLO ops
                    continue
                if module_filter and module_filter not in str(stats.get("hlo_module", module_filter)):
                    continue
                op = str(stats.get("hlo_op", "") or e.name)
                if op.startswith("command_buffer") or not op:  # kernels replayed from a CUDA graph
                    op = e.name
                rec = per_op[op]
                rec[0] += e.duration_ns
                rec[1] += 1
                rec[2].add(e.name[:60])
    return per_op


def op_table(trace_dir: str, hlo_text: str, calls: int, module_filter: str | None = None):
    """Kernel time per HLO op of a trace of `calls` runs of one compiled module, per run: rows (op, ms, calls,
    category, kernels and the op's HLO facts) sorted by time, ms per category, total kernel ms."""
    index = hlo_index(hlo_text)
    by_kernel_name = {re.sub(r"[.\-]", "_", name): info for name, info in index.items()}
    rows = []
    for op, (ns, count, kernels) in kernel_times(trace_dir, module_filter).items():
        info = index.get(op) or by_kernel_name.get(re.sub(r"[.\-]", "_", op))
        rows.append(dict(op=op, ms=ns / 1e6 / calls, calls=count / calls, category=category(info, " ".join(kernels)),
                         kernels=sorted(kernels)[:3], **{k: v for k, v in (info or {}).items()
                                                         if k in ("opcode", "shape", "kind", "target", "file",
                                                                  "line", "stack", "op_name", "fused_ops")}))
    rows.sort(key=lambda r: -r["ms"])
    by_cat = collections.Counter()
    for r in rows:
        by_cat[r["category"]] += r["ms"]
    return rows, by_cat, sum(r["ms"] for r in rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="1.7b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--attention", default="cudnn")
    p.add_argument("--remat", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--trace_steps", type=int, default=2)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--tag", default="step")
    p.add_argument("--save_trace", action="store_true", help="copy the trace (.xplane.pb) to $OUT")
    p.add_argument("--peak_tflops", type=float, default=989.0)
    args = p.parse_args(argv)

    config = qwen3.preset(args.preset)
    model = qwen3.Qwen3(config, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=args.remat, rngs=nnx.Rngs(0))
    model.attention = args.attention
    optimizer = step_lib.make_optimizer(1e-6)
    graphdef, state = step_lib.init_train_state(model, optimizer)
    del model
    data = benchmark_train._batch(config, args.batch, args.seq)
    t0 = time.perf_counter()
    compiled = step_lib.jit_train_step(graphdef, optimizer, step_lib.LossConfig(policy_loss="aepo")) \
        .lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    text = compiled.as_text()
    times = []
    for i in range(args.repeats + 2):
        t0 = time.perf_counter()
        state, metrics = compiled(state, data)
        jax.block_until_ready(metrics["loss"])
        if i >= 2:
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    flops = benchmark_train.step_flops(config, args.batch, args.seq)
    trace_dir = tempfile.mkdtemp(prefix="trace_")
    with jax.profiler.trace(trace_dir):
        for _ in range(args.trace_steps):
            state, metrics = compiled(state, data)
        jax.block_until_ready(metrics["loss"])
    rows, by_cat, busy = op_table(trace_dir, text, args.trace_steps)
    by_line = collections.Counter()
    for r in rows:
        if r["category"] not in ("matmul", "attention (cuDNN)"):
            by_line[f"{os.path.basename(r.get('file', '?'))}:{r.get('line', '?')}"] += r["ms"]
    summary = dict(tag=args.tag, device=jax.devices()[0].device_kind, jax=jax.__version__, ms=seconds * 1e3,
                   times_ms=[t * 1e3 for t in times], mfu=flops / seconds / 1e12 / args.peak_tflops,
                   compile_s=compile_s, kernel_ms_per_step=busy, by_category=dict(by_cat.most_common()),
                   non_matmul_by_source_line=dict(by_line.most_common(30)),
                   loss=float(metrics["loss"]))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"profile_{args.tag}.json"), "w") as f:
            json.dump(dict(summary=summary, ops=rows), f, indent=1, default=list)
        with gzip.open(os.path.join(out, f"hlo_{args.tag}.txt.gz"), "wt") as f:
            f.write(text)
        if args.save_trace:
            import shutil
            shutil.copy(sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1],
                        os.path.join(out, f"trace_{args.tag}.xplane.pb"))
    print(f"[{args.tag}] {summary['device']} jax {summary['jax']}: {seconds * 1e3:.1f} ms/step "
          f"(runs {', '.join(f'{t * 1e3:.1f}' for t in times)}), MFU {summary['mfu']:.1%}, "
          f"compile {compile_s:.0f}s, kernel time {busy:.1f} ms/step")
    for cat, ms in by_cat.most_common():
        print(f"[{args.tag}]   {ms:8.2f} ms  {cat}")
    print(f"[{args.tag}] non-matmul time by source line:")
    for where, ms in by_line.most_common(12):
        print(f"[{args.tag}]   {ms:8.2f} ms  {where}")
    print(f"[{args.tag}] top ops:")
    for r in rows[:args.top]:
        print(f"[{args.tag}] {r['ms']:7.2f} ms {r['calls']:5.0f}x {r['category'][:22]:22} {r['op'][:34]:34} "
              f"{r.get('shape', '')[:34]:34} {r.get('stack', '')[:70]} {r.get('op_name', '')[-40:]} | "
              f"{','.join(o for o in r.get('fused_ops', []) if o not in ('parameter', 'bitcast', 'constant'))[:50]}")
    return summary


if __name__ == "__main__":
    main()
