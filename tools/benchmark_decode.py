"""Decode throughput of aepo_jax.engine vs Hugging Face transformers `generate`, same config, same run.

For each preset (random bf16 weights, nothing downloaded) and batch size: `batch` prompts of `--prompt`
random tokens, then `--new` new tokens for every prompt (no EOS, so every sequence gets all of them).

  ours:  Engine.prefill (all prompts, one call) + Engine.decode(new) (one compiled while loop), timed after a
         warm-up as the median of --runs runs, synchronised with block_until_ready.
  HF:    Qwen3ForCausalLM(config) in bf16 on the same device, generate(do_sample=False,
         max_new_tokens=new, min_new_tokens=new), timed with torch.cuda.synchronize.
  roofline: per decode step the weights are read once (the tied embedding once, as the LM head) and every
         slot's valid KV cache once; bytes / measured copy bandwidth (a large device-to-device copy in JAX,
         bytes read + written) = the fastest possible step; % of roofline = that / our measured step.

Tokens/s count generated tokens over prefill + decode for both (HF's generate includes its prefill);
"ms/step" of ours is decode only. Results print as one table at the end and go to $OUT/decode_bench.json
when OUT is set. Each measurement is in its own try/except, so one OOM does not lose the others.

  python tools/benchmark_decode.py --presets 0.6b,1.7b --batches 64,256 --prompt 256 --new 256
  python tools/benchmark_decode.py --presets tiny --batches 4 --prompt 16 --new 16        # CPU smoke run
  --profile DIR traces one decode and prints the kernels by time; --check_attention compares the xla and
  cudnn decode attention on a small model first.

Measured 2026-11-24 on one NVIDIA H100 80GB HBM3 (jax 0.11.2, torch 2.11.0, transformers 5.17.0), greedy,
prompt 256 + 256 new tokens, default engine (bshd cache, cuDNN decode attention), copy bandwidth 2.52 TB/s:
  preset batch | ours tok/s  ms/step  % roofline | HF tok/s  HF ms/step  x HF
  0.6b     64  |     23159    2.505        63.6  |    1452       44.09  16.0
  0.6b    256  |     37243    5.961        83.1  |    6664       38.42   5.6
  1.7b     64  |     16553    3.426        72.5  |    1918       33.37   8.6
  1.7b    256  |     27417    7.654        76.3  |    6575       38.94   4.2
(1.7b, 64: sampling at T=1 3.46 ms/step, T=0.6 + top-p 0.95 + top-k 20 3.93 ms/step; the xla attention
over the whole cache 3.78 ms/step with the bhsd layout.)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import statistics
import sys
import time
import traceback

import numpy as np


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="0.6b,1.7b", help="comma-separated qwen3 presets")
    p.add_argument("--batches", default="64,256", help="comma-separated batch sizes (slots)")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens per sequence")
    p.add_argument("--new", type=int, default=256, help="new tokens per sequence")
    p.add_argument("--runs", type=int, default=3, help="timed runs of ours (median)")
    p.add_argument("--hf_runs", type=int, default=2, help="timed runs of HF generate (median)")
    p.add_argument("--skip_hf", action="store_true", help="do not run transformers")
    p.add_argument("--layouts", default="auto", help="KV-cache layouts of ours to time (auto, bhsd, bshd)")
    p.add_argument("--sampling", default="greedy",
                   help="comma-separated modes of ours: greedy, sample (T=1), topp (T=0.6, top-p 0.95, top-k 20)")
    p.add_argument("--attention", default="auto",
                   help="comma-separated decode attentions of ours: auto, xla, cudnn, pallas (cudnn / pallas: bshd)")
    p.add_argument("--unroll", type=int, default=1, help="decode steps per while-loop iteration of ours")
    p.add_argument("--key_impl", default=None, help="jax.random implementation for sampling (e.g. rbg)")
    p.add_argument("--profile", default=None, help="directory: trace one decode of the first config and "
                   "print the device kernels by time")
    p.add_argument("--check_attention", action="store_true",
                   help="first compare the xla and cudnn decode attention on a small bf16 model (GPU)")
    p.add_argument("--hlo_check", action=argparse.BooleanOptionalAction, default=True,
                   help="count copies / transposes of cache buffers in the compiled decode")
    return p.parse_args(argv)


def _median_time(fn, runs):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


# ------------------------------------------------------------------------------------------------ HF


def run_hf(config, batch, prompt, new, runs, seed=0):
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_config = transformers.Qwen3Config(**config.to_hf_dict(dtype="bfloat16"), eos_token_id=None,
                                         pad_token_id=0, bos_token_id=None)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.Qwen3ForCausalLM(hf_config).to(torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (batch, prompt), device=device)
    mask = torch.ones_like(ids)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def gen(n):
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, pad_token_id=0)
        sync()
        return out

    try:
        gen(min(new, 8))  # warm-up
        out = gen(new)
        assert out.shape == (batch, prompt + new), out.shape
        seconds, all_times = _median_time(lambda: gen(new), runs)
        return {"seconds": seconds, "times": all_times, "tokens_per_s": batch * new / seconds,
                "ms_per_step": 1e3 * seconds / new, "device": torch.cuda.get_device_name() if device == "cuda"
                else "cpu", "torch": torch.__version__, "transformers": transformers.__version__}
    finally:
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- ours


def copy_bandwidth(num_bytes=2 * 2**30, runs=10):
    """Bytes read + written per second by a large device-to-device copy in JAX (best of a few kernels)."""
    import jax
    import jax.numpy as jnp

    best = 0.0
    for dtype, fn in ((jnp.float32, jnp.copy), (jnp.float32, lambda a: a + 1),
                      (jnp.uint32, lambda a: a ^ jnp.uint32(1)), (jnp.bfloat16, lambda a: a + jnp.bfloat16(1))):
        n = num_bytes // jnp.dtype(dtype).itemsize
        x = jnp.ones((n,), dtype)
        f = jax.jit(fn)
        f(x).block_until_ready()
        seconds, _ = _median_time(lambda: f(x).block_until_ready(), runs)
        best = max(best, 2 * num_bytes / seconds)
        del x
    return best


def profile_decode(engine, slots, prompts, params, new, log_dir, top=30):
    """Traces one prefill + decode with jax.profiler and prints the device kernels that take the most time."""
    import glob
    import gzip

    import jax

    engine.prefill(slots, prompts, sampling=params, ignore_eos=True)
    engine.state.lengths.block_until_ready()
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        res = engine.decode(new, wait_fraction=1.0)
        res.output.block_until_ready()
    engine.release(slots)
    path = sorted(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True))[-1]
    events = json.load(gzip.open(path))["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, n in names.items() if "device" in n.lower() and "cpu" not in n.lower()}
    per_kernel: dict[str, list[float]] = {}
    start, end = float("inf"), 0.0
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device_pids and "dur" in e:
            per_kernel.setdefault(e["name"], []).append(e["dur"])
            start, end = min(start, e["ts"]), max(end, e["ts"] + e["dur"])
    busy = sum(sum(v) for v in per_kernel.values())
    described = {}
    for line in engine.decode_hlo(new).splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s", line)
        if m:
            op = re.search(r'op_name="([^"]*)"', line)
            described[m.group(1).replace(".", "_").replace("-", "_")] = (
                m.group(2)[:40] + " " + (op.group(1)[-70:] if op else ""))
    print(f"[profile] processes {sorted(names.values())}")
    print(f"[profile] {path}: device processes {[names[p] for p in device_pids]}; span {(end - start) / 1e3:.1f} ms, "
          f"kernel time {busy / 1e3:.1f} ms over {new} steps ({busy / 1e3 / new:.3f} ms/step)")
    for name, durs in sorted(per_kernel.items(), key=lambda kv: -sum(kv[1]))[:top]:
        info = described.get(name.replace(".", "_").replace("-", "_"), "")
        print(f"[profile] {sum(durs) / 1e3 / new:8.4f} ms/step {len(durs) / new:6.1f}/step {name[:40]:40} {info}")


def weight_bytes(config, itemsize=2):
    from aepo_jax.models import qwen3
    total = qwen3.count_params(config)
    if not config.tie_word_embeddings:
        total -= config.vocab_size * config.hidden_size  # the embedding is only gathered (a few rows)
    return total * itemsize


def kv_bytes_per_step(config, batch, prompt, new, itemsize=2):
    """Average bytes of valid KV cache read per decode step (step i attends to prompt + i + 1 positions)."""
    per_token = config.num_layers * 2 * config.num_kv_heads * config.head_dim * itemsize
    return batch * per_token * (prompt + (new + 1) / 2)


SAMPLING = {
    "greedy": dict(temperature=0.0),
    "sample": dict(temperature=1.0),
    "topp": dict(temperature=0.6, top_p=0.95, top_k=20),
}


def build_model(config):
    import jax.numpy as jnp
    from flax import nnx

    from aepo_jax.models import qwen3
    return qwen3.Qwen3(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))


def run_ours(model, config, batch, prompt, new, runs, layout, mode, key_impl, hlo_check, profile=None,
             attention="auto", unroll=1):
    import jax

    from aepo_jax.engine import Engine, SamplingParams, hlo

    engine = Engine(model, num_slots=batch, max_len=prompt + new, layout=None if layout == "auto" else layout,
                    key_impl=key_impl, prefill_buckets=(prompt,),
                    attention=None if attention == "auto" else attention, unroll=unroll)
    result = {"layout": engine.layout, "attention": engine.attention}
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, config.vocab_size, (batch, prompt))
    slots = list(range(batch))
    params = SamplingParams(**SAMPLING[mode])
    try:
        def prefill():
            engine.prefill(slots, prompts, sampling=params, ignore_eos=True)
            engine.state.lengths.block_until_ready()

        def decode():
            res = engine.decode(new, wait_fraction=1.0)
            res.output.block_until_ready()
            return res

        t0 = time.perf_counter()
        prefill()
        t1 = time.perf_counter()
        res = decode()
        t2 = time.perf_counter()
        result["compile_prefill_s"], result["compile_decode_s"] = t1 - t0, t2 - t1
        assert int(res.steps) == new and (res.counts == new).all(), (res.steps, res.counts)
        if hlo_check:
            text = engine.decode_hlo(new)
            shape = engine.cache_buffer_shape()
            result["hlo_cache_copies"] = len(hlo.cache_copies(text, shape))
            result["hlo_cache_shaped_ops"] = hlo.cache_shaped(text, shape)
        engine.release(slots)
        if profile:
            try:
                profile_decode(engine, slots, prompts, params, new, profile)
            except Exception as e:  # noqa: BLE001
                print(f"[profile] failed: {type(e).__name__}: {e}", flush=True)
        prefill_times, decode_times = [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            prefill()
            t1 = time.perf_counter()
            res = decode()
            t2 = time.perf_counter()
            prefill_times.append(t1 - t0)
            decode_times.append(t2 - t1)
            engine.release(slots)
        total = [p + d for p, d in zip(prefill_times, decode_times)]
        seconds = statistics.median(total)
        decode_s = statistics.median(decode_times)
        result.update(seconds=seconds, prefill_s=statistics.median(prefill_times), decode_s=decode_s,
                      tokens_per_s=batch * new / seconds, decode_tokens_per_s=batch * new / decode_s,
                      ms_per_step=1e3 * decode_s / new, times=total,
                      mean_entropy=float(np.mean(res.entropies[:, :new])))
        return result
    finally:
        del engine
        gc.collect()
        jax.clear_caches()


def check_attention():
    """Greedy decoding of a small bf16 model (sharp logits) with the xla and the cudnn decode attention."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from aepo_jax.engine import Engine, SamplingParams
    from aepo_jax.models import qwen3

    config = qwen3.Qwen3Config(vocab_size=1000, hidden_size=256, intermediate_size=512, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=128)
    model = qwen3.Qwen3(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    nnx.update(model, jax.tree.map(lambda a: a * 8 if a.ndim == 2 else a, state))
    prompts = [np.random.default_rng(i).integers(0, 1000, n).tolist() for i, n in enumerate((5, 40, 77))]
    out = {}
    for attention, layout in (("xla", "bhsd"), ("cudnn", "bshd")):
        engine = Engine(model, num_slots=4, max_len=128, layout=layout, attention=attention,
                        prefill_buckets=(16, 128))
        out[attention] = engine.generate(prompts, max_new_tokens=24, sampling=SamplingParams.greedy(),
                                         ignore_eos=True)
    for a, b in zip(out["xla"], out["cudnn"]):
        n = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), len(a.tokens))
        print(f"[check] xla vs cudnn: {n} of {len(a.tokens)} greedy tokens agree; on those max |dlogp| "
              f"{np.abs(a.logprobs[:n] - b.logprobs[:n]).max():.4f}, max |dH| "
              f"{np.abs(a.entropies[:n] - b.entropies[:n]).max():.4f}", flush=True)


# ---------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = _parse(argv)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    modes = [x.strip() for x in args.sampling.split(",") if x.strip()]
    attentions = [x.strip() for x in args.attention.split(",") if x.strip()]
    for m in modes:
        if m not in SAMPLING:
            raise SystemExit(f"--sampling: unknown mode {m!r}; expected {sorted(SAMPLING)}")

    from aepo_jax.models import qwen3
    configs = {name: qwen3.preset(name) for name in presets}
    records = []

    # HF first: JAX then takes its memory pool from a GPU that torch has emptied.
    hf = {}
    if not args.skip_hf:
        for name, config in configs.items():
            for batch in batches:
                try:
                    hf[name, batch] = run_hf(config, batch, args.prompt, args.new, args.hf_runs)
                    print(f"[hf] {name} batch {batch}: {hf[name, batch]['tokens_per_s']:.0f} tokens/s, "
                          f"{hf[name, batch]['ms_per_step']:.2f} ms/step", flush=True)
                except Exception as e:  # noqa: BLE001 - keep going (OOM, ...)
                    hf[name, batch] = {"error": f"{type(e).__name__}: {e}"}
                    print(f"[hf] {name} batch {batch} failed: {e}", flush=True)

    import jax
    device = jax.devices()[0]
    if args.check_attention:
        try:
            check_attention()
        except Exception as e:  # noqa: BLE001
            print(f"[check] failed: {type(e).__name__}: {e}", flush=True)
    try:
        bandwidth = copy_bandwidth(2 * 2**30 if device.platform == "gpu" else 64 * 2**20)
    except Exception as e:  # noqa: BLE001
        bandwidth = float("nan")
        print(f"[bw] failed: {e}", flush=True)
    print(f"[bw] copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write) on {device.device_kind}", flush=True)

    for name, config in configs.items():
        try:
            model = build_model(config)
        except Exception as e:  # noqa: BLE001
            print(f"[ours] {name}: building the model failed: {e}", flush=True)
            continue
        for batch in batches:
            bytes_step = weight_bytes(config) + kv_bytes_per_step(config, batch, args.prompt, args.new)
            roofline_step = bytes_step / bandwidth
            for layout, attention in [(lo, at) for lo in layouts for at in attentions]:
                for mode in modes:
                    rec = dict(preset=name, batch=batch, prompt=args.prompt, new=args.new, layout=layout,
                               sampling=mode, bytes_per_step=bytes_step, roofline_ms_per_step=1e3 * roofline_step,
                               roofline_tokens_per_s=batch / roofline_step, hf=hf.get((name, batch)))
                    try:
                        ours = run_ours(model, config, batch, args.prompt, args.new, args.runs, layout, mode,
                                        args.key_impl, args.hlo_check, profile=args.profile,
                                        attention=attention, unroll=args.unroll)
                        args.profile = None  # only the first configuration
                        rec["ours"] = ours
                        rec["layout"] = f"{ours['layout']}/{ours['attention']}"
                        rec["pct_roofline"] = 100 * roofline_step / (ours["ms_per_step"] / 1e3)
                        h = rec["hf"]
                        if h and "tokens_per_s" in h:
                            rec["speedup_vs_hf"] = ours["tokens_per_s"] / h["tokens_per_s"]
                        print(f"[ours] {name} b{batch} {rec['layout']} {mode}: {ours['tokens_per_s']:.0f} tokens/s, "
                              f"{ours['ms_per_step']:.3f} ms/step, {rec['pct_roofline']:.0f}% roofline, "
                              f"compile {ours['compile_decode_s']:.0f}s, "
                              f"cache copies in HLO: {ours.get('hlo_cache_copies')}", flush=True)
                    except Exception as e:  # noqa: BLE001
                        rec["ours"] = {"error": f"{type(e).__name__}: {e}"}
                        print(f"[ours] {name} b{batch} {layout} {mode} failed: {e}", flush=True)
                        traceback.print_exc()
                    records.append(rec)
        del model
        gc.collect()

    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=device.device_kind, platform=device.platform, jax=jax.__version__,
                copy_bandwidth_bytes_per_s=bandwidth, argv=sys.argv[1:] if argv is None else list(argv))
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "decode_bench.json"), "w") as f:
            json.dump({"meta": meta, "results": records}, f, indent=1, default=str)

    print(f"\n{meta['date']}  {meta['device']}  jax {meta['jax']}  copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    header = (f"{'preset':>6} {'batch':>5} {'kv/attention':>12} {'mode':>6} | {'ours tok/s':>10} {'ms/step':>8} "
              f"{'roofline tok/s':>14} {'% roof':>6} | {'HF tok/s':>8} {'HF ms/step':>10} {'x HF':>6}")
    print(header)
    print("-" * len(header))
    for r in records:
        o, h = r["ours"], r["hf"] or {}
        if "error" in o:
            ours_cols = f"{'error':>10} {'':>8} {r['roofline_tokens_per_s']:>14.0f} {'':>6}"
        else:
            ours_cols = (f"{o['tokens_per_s']:>10.0f} {o['ms_per_step']:>8.3f} "
                         f"{r['roofline_tokens_per_s']:>14.0f} {r['pct_roofline']:>6.1f}")
        if "tokens_per_s" in h:
            speedup = r.get("speedup_vs_hf", float("nan"))
            hf_cols = f"{h['tokens_per_s']:>8.0f} {h['ms_per_step']:>10.2f} {speedup:>6.1f}"
        else:
            hf_cols = f"{'-' if not h else 'error':>8} {'':>10} {'':>6}"
        print(f"{r['preset']:>6} {r['batch']:>5} {r['layout']:>12} {r['sampling']:>6} | {ours_cols} | {hf_cols}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
