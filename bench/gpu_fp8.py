"""fp8 weights against bf16 on one device: the TP1 decode step time by batch, and how closely the
fp8 model follows the bf16 one (greedy continuations, teacher-forced NLL).

    PYTHONPATH=. python bench/gpu_fp8.py --out $OUT
    PYTHONPATH=. python bench/gpu_fp8.py --agree-checkpoint CKPT --out $OUT   # a converted HF model

Step: `--preset` (default llama-3.1-8b) with random weights drawn on the device, a lane of
`--tp` devices (default 1) per format, decode at `--context` (each row its own pages): the
median of `--repeats` steps each waited for, and steps enqueued back to back (`b2b_ms`, as the engine's chained decode runs them);
floor = (weight bytes + KV bytes) / the best device-to-device copy measured in the same run
(copy_bandwidth.py). `speedup_at_floor` is bf16's floor over fp8's: the most fp8 weights can give
while the KV cache stays bf16.
fp8 steps compile with Triton gemms (`nitsum_jax.quant.step_options`): the profile of each format
(`--profile` batch) shows whether the fp8 gemms ran as Triton fusions reading fp8 or as a convert
writing bf16 weights followed by a cuBLAS gemm.
Agreement: `--agree-checkpoint` (bf16 weights, quantized here) or random weights of
`--agree-preset`; `--agree-prompts` prompts of 16 random tokens, `--agree-tokens` greedy tokens.
On random weights the logits are nearly flat and continuations part on near-ties: the figure that
means something there is `argmax_equal_teacher_forced`; on a real model, `continuations_equal`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from nitsum_jax.config import preset
from nitsum_jax.generate import Generator
from nitsum_jax.kv import allocate_kv_cache, kv_bytes_per_page
from nitsum_jax.model import StepInput, abstract_params, init_params
from nitsum_jax.plans import BucketGrid, PlanSet, parse_plans
from nitsum_jax.plans.spec import LaneSpec
from nitsum_jax.plans.probe import fill_random
from nitsum_jax.quant import quantize_params
from nitsum_jax.sampling import SamplingParams
from nitsum_jax.steps import step_logits

import copy_bandwidth  # bench/ is on sys.path when run as a script
from gpu_step import decode_inputs, profile_step, time_pipelined, time_step


def lane_weight_bytes(lane) -> int:
    """Bytes of weights the lane's first device reads per step: all but the embedding table
    (a step reads B rows of it), fp8 values and scales included."""
    dev = lane.devices[0]
    skip = {id(slot.embed) for slot in lane.params.chunks if slot.lm_head is not None}
    arrays = [a for a in jax.tree.leaves(lane.params) if id(a) not in skip]
    return sum(s.data.nbytes for a in arrays for s in a.addressable_shards if s.device == dev)


def time_format(cfg, weights: str, args, bandwidth: float) -> dict:
    """Decode step rows of one weight format on a TP1 lane (random weights drawn on the device)."""
    batches = [int(b) for b in args.batches.split(",")]
    grid = BucketGrid(decode_batch=tuple(batches), prefill_len=(), max_seq_len=args.max_seq_len,
                      min_move_pages=args.max_seq_len // 16)
    t0 = time.perf_counter()
    params = abstract_params(cfg, weights="fp8") if weights == "fp8" else None
    spec = LaneSpec(("all",), args.tp, tuple(range(args.tp)))
    ps = PlanSet(cfg, params, parse_plans(f"t: {spec}"), num_pages=max(batches) * -(-args.context // 16) + 64,
                 page_size=16, grid=grid)
    startup = time.perf_counter() - t0
    lane = next(iter(ps.lanes.values()))
    fill_random(lane, 0)
    wbytes = lane_weight_bytes(lane)
    out = {"startup_s": startup, "weight_GB": wbytes / 1e9,
           "memory_report_weights_GB": ps.memory_report()["devices"][0]["weights"] / 1e9, "rows": []}
    for b in batches:
        inputs = decode_inputs(lane, b, args.context, np.random.default_rng(b))
        t, spread = time_step(lane, inputs, args.repeats)
        b2b = time_pipelined(lane, inputs, 3 * args.repeats)
        tokens, _ = jax.device_get(lane.dispatch(*inputs))
        kv = b * args.context * kv_bytes_per_page(cfg, 1) / args.tp  # a device's kv heads
        floor = (wbytes + kv) / bandwidth
        out["rows"].append({"batch": b, "step_ms": t * 1e3, "spread_ms": spread * 1e3, "b2b_ms": b2b * 1e3,
                            "floor_ms": floor * 1e3,
                            "mbu": floor / t, "kv_GB": kv / 1e9, "tokens": tokens.tolist()})
        print(f"{weights:4s} b{b:3d}: {t * 1e3:7.2f} ms (spread {spread * 1e3:.2f}), back to back {b2b * 1e3:7.2f} ms  "
              f"floor {floor * 1e3:6.2f} ms  "
              f"MBU {floor / t:5.1%}", flush=True)
    if args.profile in batches:
        out["profile"], out["timeline"] = profile_step(lane, decode_inputs(lane, args.profile, args.context,
                                                                         np.random.default_rng(0)))
        for p in out["profile"]:
            print(f"  {p['ms_per_step']:8.3f}  {p['kernel']}")
    del ps
    return out


def sequence_logits(cfg, params, ids: list[int]) -> np.ndarray:
    """[len(ids), V] float64 logits of one sequence, prefilled in one step."""
    pages = -(-len(ids) // 16)
    kv = allocate_kv_cache(cfg, pages, 16)
    step = StepInput(tokens=np.asarray(ids, np.int32)[None], start_pos=np.array([0], np.int32),
                     num_new=np.array([len(ids)], np.int32), page_table=np.arange(pages, dtype=np.int32)[None])
    return np.asarray(step_logits(params, kv, step, cfg)[0][0], np.float64)


def nll(logits: np.ndarray, ids: list[int], start: int) -> float:
    """Mean NLL of ids[start:] given what precedes each."""
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(-logp[np.arange(start - 1, len(ids) - 1), np.asarray(ids[start:])].mean())


def agreement(args) -> dict:
    """fp8 against bf16 greedy continuations of the same model and prompts."""
    if args.agree_checkpoint:
        from checkpoints_tools.store import load_params, read_config

        cfg = read_config(args.agree_checkpoint)
        dense = quantize_params(load_params(args.agree_checkpoint, cfg), "bf16")
        source = args.agree_checkpoint
    else:
        cfg = preset(args.agree_preset)
        dense, source = init_params(cfg, jax.random.key(0)), f"preset:{args.agree_preset} (random weights)"
    fp8 = quantize_params(dense)
    rng = np.random.default_rng(7)
    prompts = [[int(t) for t in rng.integers(0, min(cfg.vocab_size, 32000), 16)] for _ in range(args.agree_prompts)]
    greedy = SamplingParams(max_tokens=args.agree_tokens, ignore_eos=True)
    max_len = 16 * -(-(16 + args.agree_tokens) // 16)
    outs = {}
    for name, params in (("bf16", dense), ("fp8", fp8)):
        gen = Generator(cfg, params, page_size=16, max_batch=len(prompts), prefill_chunk=16, max_seq_len=max_len)
        outs[name] = [o.token_ids for o in gen.generate(prompts, greedy)]
    rows = []
    for prompt, want, got in zip(prompts, outs["bf16"], outs["fp8"]):
        ids = prompt + want  # teacher-forced along the bf16 continuation
        dense_logits, fp8_logits = sequence_logits(cfg, dense, ids), sequence_logits(cfg, fp8, ids)
        diverge = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), len(want))
        rows.append({"equal": want == got, "tokens_before_divergence": diverge,
                     "argmax_equal_teacher_forced": float(np.mean(
                         fp8_logits[len(prompt) - 1:-1].argmax(-1) == np.asarray(want))),
                     "nll_bf16": nll(dense_logits, ids, len(prompt)), "nll_fp8": nll(fp8_logits, ids, len(prompt))})
    nll_bf16, nll_fp8 = np.mean([r["nll_bf16"] for r in rows]), np.mean([r["nll_fp8"] for r in rows])
    summary = {"source": source, "prompts": len(prompts), "tokens": args.agree_tokens,
               "continuations_equal": float(np.mean([r["equal"] for r in rows])),
               "argmax_equal_teacher_forced": float(np.mean([r["argmax_equal_teacher_forced"] for r in rows])),
               "nll_bf16": float(nll_bf16), "nll_fp8": float(nll_fp8),
               # none where bf16's NLL is 0: random weights whose logits put all mass on one token
               "nll_relative_diff": float((nll_fp8 - nll_bf16) / nll_bf16) if nll_bf16 > 0 else None,
               "per_prompt": rows}
    rel = summary["nll_relative_diff"]
    print(f"agreement on {source}: continuations equal {summary['continuations_equal']:.0%}, teacher-forced argmax "
          f"equal {summary['argmax_equal_teacher_forced']:.1%}, NLL bf16 {nll_bf16:.4f} fp8 {nll_fp8:.4f} "
          f"({f'{rel:+.2%}' if rel is not None else 'no relative change: the bf16 NLL is 0'})", flush=True)
    return summary


def kernel_check(cfg, rows=(1, 8, 64)) -> list[dict]:
    """The decode kernel (`kernels.fp8_gemm`, which fp8 decode steps run on a GPU) against the
    same product through XLA in float32, on the preset's four layer gemm shapes: the largest
    difference relative to the largest |y|."""
    from nitsum_jax.kernels import fp8_gemm

    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    shapes = {"qkv": (qkv, cfg.dim), "gate_up": (2 * cfg.ffn_dim, cfg.dim), "o": (cfg.dim, cfg.num_heads * cfg.head_dim),
              "down": (cfg.dim, cfg.ffn_dim)}
    out = []
    for name, (n, k) in shapes.items():
        kw, kx = jax.random.split(jax.random.key(n + k))
        w = (jax.random.normal(kw, (2, 1, n, k), jnp.float32) * 64).astype(jnp.float8_e4m3fn)
        for m in rows:
            x = jax.random.normal(kx, (m, k), jnp.bfloat16)
            y = fp8_gemm.matmul(x, w, jnp.int32(1))
            ref = x.astype(jnp.float32) @ w[1, 0].astype(jnp.float32).T
            err = float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))
            out.append({"gemm": name, "n": n, "k": k, "rows": m, "max_rel_err": err})
            print(f"kernel check {name} n={n} k={k} rows={m}: max relative error {err:.2e}", flush=True)
        # a row past float16's range, cast as w_down's input is (scaled by 2^-DOWN_EXPONENT)
        x = jax.random.normal(kx, (8, k), jnp.float32).at[0].multiply(1e5).astype(jnp.bfloat16)
        y = fp8_gemm.matmul(x, w, jnp.int32(1), exponent=fp8_gemm.DOWN_EXPONENT)
        ref = x.astype(jnp.float32) @ w[1, 0].astype(jnp.float32).T
        err = float(jnp.max(jnp.abs(y - ref) / jnp.max(jnp.abs(ref), axis=1, keepdims=True)))
        out.append({"gemm": name, "n": n, "k": k, "rows": 8, "large_row": 1e5, "exponent": fp8_gemm.DOWN_EXPONENT,
                    "max_rel_err_by_row": err,
                    "finite": bool(jnp.all(jnp.isfinite(y)))})
        print(f"kernel check {name}, a row of activations x 1e5: finite {out[-1]['finite']}, max relative error "
              f"(by row) {err:.2e}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.1-8b", help="shape of the timed model (random weights)")
    ap.add_argument("--tp", type=int, default=1, help="devices of the timed lane (a power of two)")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--profile", type=int, default=8, help="profile the step of this batch for each format")
    ap.add_argument("--agree-preset", default="llama-3.2-1b")
    ap.add_argument("--agree-checkpoint", default=None, help="a checkpoint for the agreement figures instead")
    ap.add_argument("--agree-prompts", type=int, default=16)
    ap.add_argument("--agree-tokens", type=int, default=256)
    ap.add_argument("--copy-gib", type=float, default=None)
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = preset(args.preset)
    copies = copy_bandwidth.measure(jax.devices()[0], args.copy_gib)
    print(f"MBU denominator: {copies['GBps']:.0f} GB/s ({copies['best']})", flush=True)
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "preset": args.preset,
               "context": args.context, "tp": args.tp, "hbm_GBps": copies["GBps"], "copy_bandwidth": copies,
               "xla_flags": os.environ.get("XLA_FLAGS", ""), "formats": {}}
    try:  # the kernel runs on a GPU only
        results["kernel_check"] = kernel_check(cfg) if jax.default_backend() == "gpu" else None
    except Exception as e:  # report and go on
        print(f"kernel check failed: {type(e).__name__}: {str(e)[:2000]}", flush=True)
        results["kernel_check"] = {"error": f"{type(e).__name__}: {str(e)[:4000]}"}
    for weights in ("bf16", "fp8"):
        try:
            results["formats"][weights] = time_format(cfg, weights, args, copies["GBps"] * 1e9)
        except Exception as e:  # report and go on: the agreement figures still come
            print(f"{weights}: failed: {type(e).__name__}: {str(e)[:2000]}", flush=True)
            results["formats"][weights] = {"error": f"{type(e).__name__}: {str(e)[:4000]}"}
    dense, fp8 = results["formats"]["bf16"], results["formats"]["fp8"]
    if "rows" in dense and "rows" in fp8:
        results["speedup"] = {r["batch"]: d["step_ms"] / r["step_ms"] for d, r in zip(dense["rows"], fp8["rows"])}
        results["speedup_b2b"] = {r["batch"]: d["b2b_ms"] / r["b2b_ms"] for d, r in zip(dense["rows"], fp8["rows"])}
        # the most the bytes allow: bf16's floor over fp8's (the KV cache stays bf16 in both)
        results["speedup_at_floor"] = {r["batch"]: d["floor_ms"] / r["floor_ms"] for d, r in zip(dense["rows"], fp8["rows"])}
        results["weight_bytes_ratio"] = fp8["weight_GB"] / dense["weight_GB"]
        print("fp8 speed-up by batch (waited steps; back to back; at the floor): " + ", ".join(
            f"b{b} {s:.2f}x; {results['speedup_b2b'][b]:.2f}x; {results['speedup_at_floor'][b]:.2f}x"
            for b, s in results["speedup"].items())
              + f"; weight bytes {results['weight_bytes_ratio']:.3f}x", flush=True)
    results["agreement"] = agreement(args)
    if args.out:
        with open(f"{args.out}/gpu_fp8{args.tag}.json", "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
