"""`nitsum-jax`: the command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Third-party loggers that talk at start-up without telling the user anything to act on: JAX's
# "Unable to initialize backend 'tpu'" and Orbax's INFO lines (through absl). --verbose shows them.
NOISY_LOGGERS = ("jax._src.xla_bridge", "absl", "orbax", "etils")
DEVICES_HELP = "on a CPU-only machine, the number of host devices to create (before or after the subcommand)"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default."""


def add_command(sub, name: str, help: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose help shows every default; it takes --devices too."""
    return sub.add_parser(name, help=help, description=kwargs.pop("description", help),
                          formatter_class=HelpFormatter, **kwargs)


def setup_logging(verbose: bool = False) -> None:
    """One log format for everything; third-party start-up noise only with `verbose`."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, force=True)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's C++ start-up lines


def _set_host_devices(n: int | None) -> None:
    """Give a CPU-only machine `n` host devices; must run before JAX is imported."""
    if n and "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", help="a nitsum-jax checkpoint folder (nitsum-ckpt convert-hf / init)")
    g.add_argument("--preset", default="tiny", help="random weights of a preset shape")
    p.add_argument("--seed-weights", type=int, default=0, help="seed of the random weights of --preset")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="dtype for --preset weights")
    p.add_argument("--weights", choices=["auto", "bf16", "fp8"], default="auto",
                   help="linear weights: fp8 (float8_e4m3fn, per-output-channel scales), bf16 (unquantized, "
                        "the model dtype) or auto (as the checkpoint stores them; a preset: bf16)")


def _generate(args) -> int:
    from nitsum_jax.generate import Generator
    from nitsum_jax.sampling import SamplingParams
    from nitsum_jax.source import load_model

    model = load_model(args.checkpoint, args.preset, args.seed_weights, args.dtype, weights=args.weights)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop or ()),
                            stop_token_ids=tuple(args.stop_token_ids or ()), ignore_eos=args.ignore_eos)
    prompt = args.token_ids if args.token_ids is not None else args.prompt
    generator = Generator(model.cfg, model.params, model.tokenizer, max_batch=1,
                          max_seq_len=args.max_seq_len, page_size=args.page_size)
    t0 = time.perf_counter()
    [out] = generator.generate([prompt], params)
    elapsed = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"model": model.name, "token_ids": out.token_ids, "text": out.text,
                          "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
                          "seconds": round(elapsed, 3)}))
    else:
        print(f"model: {model.name}  prompt tokens: {out.prompt_tokens}  finish: {out.finish_reason}  "
              f"({len(out.token_ids)} tokens in {elapsed:.2f}s, compile included)")
        print(f"token ids: {out.token_ids}")
        if out.text is not None:
            print(f"text: {out.text!r}")
    return 0


def _plans(args) -> int:
    from nitsum_jax import plan_memory
    from nitsum_jax.config import preset
    from nitsum_jax.plans.layout import assign_chunks
    from nitsum_jax.plans.memory import check_fits

    weights = "bf16" if args.weights == "auto" else args.weights
    if args.checkpoint:
        from checkpoints_tools.store import checkpoint_format, read_config

        cfg = read_config(args.checkpoint)
        weights = checkpoint_format(args.checkpoint) if args.weights == "auto" else args.weights
    else:
        cfg = preset(args.preset)
        if args.dtype:
            cfg = cfg.replace(dtype={"bf16": "bfloat16", "fp32": "float32"}[args.dtype])
    n = args.devices or _device_count()
    report = plan_memory(cfg, args.plans, n, num_pages=args.kv_pages, page_size=args.page_size,
                         max_batch=args.max_batch, max_prefill=args.max_prefill, weights=weights)
    plans = report.pop("plans")
    if args.json:
        # Per-plan weight bytes are under "plan_weights"; "plans" lists the plans in compact form.
        out = {**report, "plans": [str(p) for p in plans], "plan_weights": report.pop("per_plan")}
        print(json.dumps(out, indent=2, default=str))
    else:
        layouts = assign_chunks(plans, cfg)
        gib = 2**30
        print(f"model {args.checkpoint or args.preset} ({cfg.dtype}, {weights} weights), {n} devices, "
              f"{report['num_chunks']} weight "
              f"chunks of {report['chunk_bytes'] / gib:.3f} GiB")
        for p in plans:
            print(f"plan {p}")
            for lane in p.lanes:
                print(f"    lane tp{lane.tp} devices {list(lane.devices)} classes {'+'.join(lane.classes)}: "
                      f"chunks {[list(r) for r in layouts[lane.devices].assign]}")
        print(f"{'device':>6} {'weights GiB':>12} {'KV GiB':>8} {'workspace GiB':>14} {'total GiB':>10}")
        for d, use in report["devices"].items():
            print(f"{d:>6} {use['weights'] / gib:>12.2f} {use['kv'] / gib:>8.2f} {use['workspace'] / gib:>14.2f} "
                  f"{use['total'] / gib:>10.2f}")
        print(f"plan-set weights {report['plan_set_weights_total'] / gib:.2f} GiB over largest single plan "
              f"{report['largest_plan_weights_total'] / gib:.2f} GiB = {report['weight_overhead']:.3f}x")
    if args.device_memory_gib:
        _check_fits(check_fits, report, args)
        print(f"fits {args.device_memory_gib:g} GiB devices")
    return 0


def _check_fits(check_fits, report: dict, args) -> None:
    """`check_fits`, its error naming the flag and value that would make the plan set fit."""
    from nitsum_jax.plans.spec import PlanError

    limit = int(args.device_memory_gib * 2**30)
    try:
        check_fits(report, limit)
    except PlanError as e:
        worst = max(report["devices"].values(), key=lambda use: use["total"])
        kv_per_page = worst["kv"] / args.kv_pages if args.kv_pages else 0
        room = limit - worst["weights"] - worst["workspace"]
        if kv_per_page and room >= kv_per_page:
            hint = f"--kv-pages {int(room // kv_per_page)} (now {args.kv_pages}) fits"
        else:
            hint = "the weights alone do not fit: more devices (--devices) or a plan set with more TP (--plans)"
        raise PlanError(f"{e}; {hint}") from None


def _device_count() -> int:
    import jax

    return jax.device_count()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nitsum-jax", description="Priority-lane LLM serving on JAX/XLA.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--devices", type=int, default=None, help=DEVICES_HELP)
    parser.add_argument("--verbose", action="store_true", help="also show JAX, XLA and Orbax start-up messages")
    sub = parser.add_subparsers(dest="command", required=True)
    p = add_command(sub, "generate", "generate from one prompt on a single device")
    p.add_argument("prompt", nargs="?", default="Priority lanes let urgent requests", help="prompt text")
    p.add_argument("--token-ids", type=_int_list, default=None, help="prompt as token ids, e.g. 256,72,105")
    _add_model_args(p)
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate at most (>= 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass kept, in (0, 1]; 1 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same tokens)")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--stop-token-ids", type=_int_list, default=None, help="token ids that end the output")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the model's EOS token")
    p.add_argument("--max-seq-len", type=int, default=1024,
                   help="context limit: longest prompt + max_tokens the cache is sized for")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV cache page")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=_generate)
    p = add_command(sub, "plans", "a plan set's lanes, weight chunks and per-device memory")
    _add_model_args(p)
    p.add_argument("--plans", default=None, help="compact form ('static: all=tp8@0-7; mixed: ...') or a .toml file; "
                                                 "default: derived from the device count")
    p.add_argument("--kv-pages", type=int, default=4096, help="KV pages per lane")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV cache page")
    p.add_argument("--max-batch", type=int, default=64, help="largest decode batch (sizes the workspace)")
    p.add_argument("--max-prefill", type=int, default=512, help="longest prefill chunk (sizes the workspace)")
    p.add_argument("--device-memory-gib", type=float, default=None, help="fail unless every device fits this")
    p.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    p.set_defaults(func=_plans)
    from nitsum_jax.server.cli import register as register_server  # serve, client, api-key (no JAX import)

    register_server(sub)
    from nitsum_jax.bench.cli import register as register_bench  # bench (no JAX import)

    register_bench(sub)
    from nitsum_jax.usage.cli import add_usage_parser  # usage (no JAX import)

    add_usage_parser(sub)
    from nitsum_jax.sim.cli import register as register_sim  # profile, simulate, plan (no JAX import)

    register_sim(sub)
    for command in sub.choices.values():  # `nitsum-jax plans --devices 8` as well as `nitsum-jax --devices 8 plans`
        if "--devices" not in command._option_string_actions:
            command.add_argument("--devices", type=int, default=argparse.SUPPRESS, help=DEVICES_HELP)
    return parser


# Errors that mean "bad input" (exit 2 with the message), by module; a module that was never
# imported cannot have raised, so none is imported just to be caught (`client` stays JAX-free).
USER_ERRORS = {"checkpoints_tools.store": "CheckpointError", "nitsum_jax.config": "ConfigError",
               "nitsum_jax.plans.spec": "PlanError", "nitsum_jax.sampling": "SamplingError",
               "nitsum_jax.sequence": "RequestError"}


def _is_user_error(error: Exception) -> bool:
    if isinstance(error, FileNotFoundError):
        return True
    return any(isinstance(error, getattr(sys.modules[m], name)) for m, name in USER_ERRORS.items()
               if m in sys.modules)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _set_host_devices(args.devices)
    setup_logging(args.verbose)
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader went away (`nitsum-jax plans --json | head`): stop quietly, as `cat` does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130  # 128 + SIGINT
    except Exception as e:
        if not _is_user_error(e):
            raise
        print(f"nitsum-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
