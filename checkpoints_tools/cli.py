"""`nitsum-ckpt`: convert Hugging Face Llama folders, make random checkpoints, inspect them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _convert(args) -> int:
    from checkpoints_tools.hf import convert_hf

    cfg = convert_hf(Path(args.src), Path(args.dst), dtype=args.dtype, progress=not args.quiet)
    print(f"wrote {args.dst}: {cfg.num_layers} layers, dim {cfg.dim}, vocab {cfg.vocab_size}, {cfg.dtype}")
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
    params = init_params(cfg, jax.random.key(args.seed))
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
    print(f"tokenizer   {'yes' if info['tokenizer'] else 'none (token ids only)'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nitsum-ckpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert-hf", help="Hugging Face Llama folder -> nitsum-jax (Orbax) checkpoint")
    p.add_argument("src", help="folder with config.json, *.safetensors (+ index) and tokenizer.json")
    p.add_argument("dst", help="new folder to write (must not exist or be empty)")
    p.add_argument("--dtype", choices=["bf16", "bfloat16", "fp32", "float32"], default=None,
                   help="store weights in this dtype (default: the source config's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_convert)
    p = sub.add_parser("init", help="a checkpoint of random weights for a preset")
    p.add_argument("--preset", required=True)
    p.add_argument("dst")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["bf16", "bfloat16", "fp32", "float32"], default=None)
    p.set_defaults(func=_init)
    p = sub.add_parser("inspect", help="config, parameter count, bytes and dtypes of a checkpoint")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from checkpoints_tools.store import CheckpointError
    from nitsum_jax.config import ConfigError

    try:
        return args.func(args)
    except (CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"nitsum-ckpt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
