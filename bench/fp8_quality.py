"""How closely fp8 weights follow bf16 on a trained model, on this machine's CPU.

    PYTHONPATH=. python bench/fp8_quality.py --out $OUT

Random weights give nearly flat logits, so agreement measured on them says little (bench/gpu_fp8.py
says as much). This trains a small Llama with `transformers` (byte-level vocabulary, GQA) on this
Python's standard-library sources, saves it as a Hugging Face folder, converts it twice with
`nitsum-ckpt convert-hf` (`--dtype bf16` and `--dtype fp8`, the user's path), and on held-out
files compares the two checkpoints through the model code (and, with `--reference`, bf16 against
a float32 conversion, for scale): greedy continuations of `--tokens`
tokens from `--prompts` prompts of real text (the share of tokens equal before the first
difference, and of continuations equal throughout), teacher-forced argmax along the bf16
continuation, and the NLL of held-out text. The model, data and seeds are fixed, so a run is
repeatable. Writes `fp8_quality.json` to --out; `--hf` reuses a trained folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def corpus(held_out_every: int = 10) -> tuple[bytes, bytes]:
    """(training bytes, held-out bytes): the standard library's top-level .py files, sorted by
    name; every `held_out_every`-th file is held out."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train, held = [], []
    for i, f in enumerate(files):
        (held if i % held_out_every == 0 else train).append(f.read_bytes())
    return b"\n".join(train), b"\n".join(held)


def train(dst: Path, data: bytes, args) -> dict:
    """A small Llama trained on `data` (next-byte prediction), saved with `save_pretrained`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nitsum_jax.tokenizer import TextTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = LlamaConfig(vocab_size=264, hidden_size=args.dim, intermediate_size=args.ffn,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=2,
                         head_dim=args.dim // args.heads, max_position_embeddings=1024, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=256, eos_token_id=257, rope_theta=10000.0,
                         torch_dtype="float32")
    model = LlamaForCausalLM(config)
    tokens = torch.tensor(np.frombuffer(data, np.uint8).astype(np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    rng = np.random.default_rng(0)
    losses, t0 = [], time.perf_counter()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / max(1, args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = rng.integers(0, len(tokens) - args.seq - 1, args.batch)
        batch = torch.stack([tokens[s:s + args.seq + 1] for s in starts])
        out = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone())
        # labels = inputs: transformers shifts them by one inside
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(out.loss))
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {out.loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval().save_pretrained(dst, safe_serialization=True)
    TextTokenizer.byte_level().save(dst)
    return {"steps": args.steps, "batch": args.batch, "seq": args.seq, "final_loss": float(np.mean(losses[-20:])),
            "train_s": time.perf_counter() - t0, "params": sum(p.numel() for p in model.parameters()),
            "config": {"dim": args.dim, "layers": args.layers, "heads": args.heads, "kv_heads": 2, "ffn": args.ffn}}


def convert(src: Path, dst: Path, dtype: str) -> None:
    subprocess.run([sys.executable, "-m", "checkpoints_tools.cli", "convert-hf", str(src), str(dst), "--dtype", dtype,
                    "--quiet"], check=True, cwd=ROOT)


def compare(base_dir: Path, other_dir: Path, held: bytes, args) -> dict:
    """The checkpoint in `other_dir` against the one in `base_dir`, on the same held-out prompts."""
    from checkpoints_tools.store import load_params, read_config
    from gpu_fp8 import nll, sequence_logits  # bench/ is on sys.path when run as a script
    from nitsum_jax.generate import Generator
    from nitsum_jax.quant import weights_format
    from nitsum_jax.sampling import SamplingParams

    cfg, other_cfg = read_config(base_dir), read_config(other_dir)
    dense, fp8 = load_params(base_dir, cfg), load_params(other_dir, other_cfg)
    formats = [c.dtype + (" + fp8 weights" if weights_format(p) == "fp8" else "")
               for c, p in ((cfg, dense), (other_cfg, fp8))]
    rng = np.random.default_rng(1)
    text = np.frombuffer(held, np.uint8)
    starts = rng.integers(0, len(text) - args.prompt_len - args.nll_len, args.prompts)
    prompts = [[int(t) for t in text[s:s + args.prompt_len]] for s in starts]
    greedy = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    max_len = 16 * -(-(args.prompt_len + args.tokens) // 16)
    outs = {}
    for name, c, params in (("base", cfg, dense), ("other", other_cfg, fp8)):
        gen = Generator(c, params, page_size=16, max_batch=len(prompts), prefill_chunk=64, max_seq_len=max_len)
        outs[name] = [o.token_ids for o in gen.generate(prompts, greedy)]
    rows = []
    for s, prompt, want, got in zip(starts, prompts, outs["base"], outs["other"]):
        ids = prompt + want
        fp8_logits = sequence_logits(other_cfg, fp8, ids)
        same = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), len(want))
        real = [int(t) for t in text[s:s + args.prompt_len + args.nll_len]]  # held-out text itself
        rows.append({"equal": want == got, "tokens_before_divergence": same,
                     "tokens_equal": float(np.mean(np.asarray(want) == np.asarray(got))),
                     "argmax_equal_teacher_forced": float(np.mean(
                         fp8_logits[len(prompt) - 1:-1].argmax(-1) == np.asarray(want))),
                     "nll_text_base": nll(sequence_logits(cfg, dense, real), real, args.prompt_len),
                     "nll_text_other": nll(sequence_logits(other_cfg, fp8, real), real, args.prompt_len),
                     "continuation": bytes(t for t in want if t < 256).decode("utf-8", "replace")[:120]})
    nll_b, nll_f = np.mean([r["nll_text_base"] for r in rows]), np.mean([r["nll_text_other"] for r in rows])
    return {"formats": formats, "prompts": len(rows), "prompt_len": args.prompt_len, "tokens": args.tokens,
            "continuations_equal": float(np.mean([r["equal"] for r in rows])),
            "tokens_before_divergence_mean": float(np.mean([r["tokens_before_divergence"] for r in rows])),
            "greedy_prefix_equal": float(np.mean([r["tokens_before_divergence"] for r in rows]) / args.tokens),
            "tokens_equal": float(np.mean([r["tokens_equal"] for r in rows])),
            "argmax_equal_teacher_forced": float(np.mean([r["argmax_equal_teacher_forced"] for r in rows])),
            "nll_text_base": float(nll_b), "nll_text_other": float(nll_f),
            "nll_relative_diff": float((nll_f - nll_b) / nll_b), "per_prompt": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=704)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256, help="greedy tokens per continuation")
    ap.add_argument("--nll-len", type=int, default=256, help="held-out tokens scored after each prompt")
    ap.add_argument("--hf", default=None, help="a trained Hugging Face folder to reuse (skips training)")
    ap.add_argument("--reference", action="store_true",
                    help="also bf16 against float32 on the same prompts: how far the precision alone moves them")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_bytes, held = corpus()
    result = {"corpus": {"train_bytes": len(train_bytes), "held_out_bytes": len(held),
                         "source": f"python {sys.version.split()[0]} stdlib *.py, every 10th file held out"}}
    hf = Path(args.hf) if args.hf else out / "hf"
    if not args.hf:
        result["training"] = train(hf, train_bytes, args)
    work = out / "ckpt"
    for dtype in ("fp32", "bf16", "fp8") if args.reference else ("bf16", "fp8"):
        convert(hf, work / dtype, dtype)
    pairs = [("agreement", "bf16", "fp8")] + ([("reference", "fp32", "bf16")] if args.reference else [])
    for key, base, other in pairs:
        a = result[key] = compare(work / base, work / other, held, args)
        print(f"{other} against {base} on {a['prompts']} held-out prompts: continuations equal "
              f"{a['continuations_equal']:.0%}, greedy tokens equal {a['tokens_equal']:.1%} (before the first "
              f"difference {a['greedy_prefix_equal']:.1%}), teacher-forced argmax "
              f"{a['argmax_equal_teacher_forced']:.1%}, held-out NLL {a['nll_text_base']:.4f} -> "
              f"{a['nll_text_other']:.4f} ({a['nll_relative_diff']:+.2%})", flush=True)
    (out / "fp8_quality.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
