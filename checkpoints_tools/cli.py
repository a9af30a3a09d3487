"""`nitsum-ckpt`: convert Hugging Face Llama folders, make random checkpoints, inspect them."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from nitsum_jax.cli import HelpFormatter, setup_logging

log = logging.getLogger("checkpoints_tools")


def _convert(args) -> int:
    from checkpoints_tools.hf import convert_hf

    cfg = convert_hf(Path(args.src), Path(args.dst), dtype=args.dtype, progress=not args.quiet,
                     allow_unused=args.allow_unused)
    weights = ", linear weights fp8" if args.dtype == "fp8" else ""
    print(f"wrote {args.dst}: {cfg.num_layers} layers, dim {cfg.dim}, vocab {cfg.vocab_size}, {cfg.dtype}{weights}")
    return 0


def _init(args) -> int:
    import jax

    from checkpoints_tools.store import write_checkpoint
    from nitsum_jax.config import preset
    from nitsum_jax.model import init_params
    from nitsum_jax.tokenizer import TextTokenizer

    cfg = preset(args.preset)
    if args.dtype:
        cfg = cfg.replace(dtype={"bf16": "bfloat16", "fp32": "float32"}.get(args.dtype, args.dtype))
    t0 = time.monotonic()
    log.info("drawing random weights of preset %s (%s, seed %d)", args.preset, cfg.dtype, args.seed)
    params = jax.block_until_ready(init_params(cfg, jax.random.key(args.seed)))
    log.info("drew the weights in %.1fs", time.monotonic() - t0)
    tokenizer = TextTokenizer.byte_level() if args.preset == "tiny" else None
    write_checkpoint(Path(args.dst), cfg, params, tokenizer=tokenizer)
    print(f"wrote {args.dst}: preset {args.preset}, seed {args.seed}, {cfg.dtype}, random weights")
    return 0


def _inspect(args) -> int:
    from checkpoints_tools.store import describe

    info = describe(Path(args.dir))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cfg = info["config"]
    print(f"checkpoint  {info['path']}")
    for key in ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_dim",
                "max_seq_len", "rope_theta", "rope_scaling", "tie_embeddings", "dtype"):
        print(f"  {key:<16} {cfg[key]}")
    print(f"parameters  {info['parameters']:,}")
    print(f"bytes       {info['bytes']:,} ({info['bytes'] / 2**30:.2f} GiB)")
    print(f"dtypes      {', '.join(info['dtypes'])}")
    print(f"weights     {info['weights']}")
    print(f"tokenizer   {'yes' if info['tokenizer'] else 'none (token ids only)'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nitsum-ckpt", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="also show JAX and Orbax messages")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, help):
        return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    p = command("convert-hf", "Hugging Face Llama folder -> nitsum-jax (Orbax) checkpoint")
    p.add_argument("src", help="folder with config.json, *.safetensors (+ index) and tokenizer.json")
    p.add_argument("dst", help="new folder to write (must not exist or be empty)")
    p.add_argument("--dtype", choices=["bf16", "bfloat16", "fp32", "float32", "fp8"], default=None,
                   help="store weights in this dtype (None: the source config's); fp8: the linear "
                        "weights in float8_e4m3fn with per-output-channel scales, the rest bf16")
    p.add_argument("--allow-unused", action="store_true",
                   help="convert even if the source has tensors the model does not use (named in a warning)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_convert)
    p = command("init", "a checkpoint of random weights for a preset")
    p.add_argument("--preset", required=True, help="model shape (nitsum_jax.config presets, e.g. tiny, llama-3.2-1b)")
    p.add_argument("dst", help="new folder to write (must not exist or be empty)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--dtype", choices=["bf16", "bfloat16", "fp32", "float32"], default=None,
                   help="weights dtype (None: the preset's)")
    p.set_defaults(func=_init)
    p = command("inspect", "config, parameter count, bytes and dtypes of a checkpoint")
    p.add_argument("dir", help="a nitsum-jax checkpoint folder")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from checkpoints_tools.store import CheckpointError
    from nitsum_jax.config import ConfigError

    try:
        return args.func(args)
    except (CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"nitsum-ckpt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
