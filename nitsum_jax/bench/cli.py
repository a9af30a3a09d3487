"""`nitsum-jax bench`: static TP against adaptive lanes on the same workload, side by side.

`register(subparsers)` adds the subcommand; nothing here imports JAX until the command runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from nitsum_jax.bench.api import CONFIGS, DEFAULTS
from nitsum_jax.settings import settings as _settings

HOST_DEVICES = 8  # on a machine without an accelerator and without --devices


def _floats(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"rates must be > 0 requests/s, got {text!r}")
    return values


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _budget(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--token-budget {text!r}: expected a whole number >= 1 or 'auto'")
    return value


def _tiers(args) -> tuple[dict, dict | None]:
    """The engine's keyword arguments (token budget, weights, prefix cache, tiers) and the
    workload's class mix."""
    from nitsum_jax.bench.workload import parse_class_mix
    from nitsum_jax.scheduler import load_classes

    engine_kwargs: dict = {"token_budget": args.token_budget, "weights": args.weights,
                           "prefix_cache": not args.no_prefix_cache}
    mix = parse_class_mix(args.class_mix) if args.class_mix else None
    if args.classes:
        classes = load_classes(args.classes)
        engine_kwargs["classes"] = classes
        mix = mix or {name: 1.0 / len(classes) for name in classes}
    if mix and "classes" in engine_kwargs and set(mix) - set(engine_kwargs["classes"]):
        raise ValueError(f"--class-mix names {sorted(set(mix) - set(engine_kwargs['classes']))}, not in "
                         f"--classes {sorted(engine_kwargs['classes'])}")
    return engine_kwargs, mix


def _configs(text: str) -> list[str]:
    names = [t for t in text.replace(",", " ").split() if t]
    bad = [n for n in names if n not in CONFIGS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown configuration(s) {bad or text!r}; known: {', '.join(CONFIGS)}")
    return names


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="static TP against adaptive lanes on one workload: throughput, latency, SLO goodput",
        description="Runs each configuration in turn on the same seeded workload and writes results.json, "
                    "requests.jsonl, report.md and PNG plots to --out. Without an accelerator and without "
                    f"--devices it uses {HOST_DEVICES} host CPU devices.")
    w = p.add_argument_group("workload")
    w.add_argument("--rates", type=_floats, default=list(DEFAULTS["rates"]),
                   help="Poisson arrival rates, requests/s; several make a sweep, the first is the headline "
                        f"(default: {','.join(f'{r:g}' for r in DEFAULTS['rates'])})")
    w.add_argument("--duration", type=float, default=DEFAULTS["duration_s"],
                   help="seconds of arrivals per rate (default: %(default)s)")
    w.add_argument("--num-requests", type=int, default=None, help="exactly this many requests instead of --duration")
    w.add_argument("--classes", default=None, metavar="FILE",
                   help="priority tiers, a TOML file of [[class]] tables (README: Priority tiers); requests are "
                        "spread over them by --class-mix, else evenly (default: high and low by --high-fraction)")
    w.add_argument("--class-mix", default=None, metavar="CLASS=SHARE,...",
                   help="share of the requests per class, e.g. realtime=0.1,standard=0.3,batch=0.6 "
                        "(default: --high-fraction of high, the rest low)")
    w.add_argument("--high-fraction", type=float, default=DEFAULTS["high_fraction"],
                   help="share of requests in class high (default: %(default)s)")
    w.add_argument("--prompt-len", default=DEFAULTS["prompt_len"],
                   help="prompt tokens: N, LO-HI (uniform) or lognormal:MEDIAN:SIGMA (default: %(default)s)")
    w.add_argument("--output-len", default=DEFAULTS["output_len"], help="output tokens, same forms "
                                                                         "(default: %(default)s)")
    w.add_argument("--sampled-fraction", type=float, default=0.0,
                   help="share of requests that sample (temperature --temperature, top_p 0.95, a seed each); "
                        "the rest are greedy (default: %(default)s)")
    w.add_argument("--temperature", type=float, default=0.8, help="temperature of sampled requests (default: %(default)s)")
    w.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="workload seed (default: %(default)s)")
    w.add_argument("--trace", default=None, help="CSV or JSONL trace (arrival, prompt and output tokens, optional "
                                                 "class; the Splitwise column names as they are) instead of "
                                                 "Poisson arrivals")
    w.add_argument("--time-scale", type=float, default=1.0, help="multiply trace arrival times (default: 1)")
    w.add_argument("--target-rates", type=_floats, default=None, help="replay the trace once per rate, scaled to it")
    w.add_argument("--burstiness", type=float, default=1.0, help="gamma arrivals: squared CV of the gaps (1: Poisson)")
    w.add_argument("--agent", default=None, metavar="N:S:R",
                   help="multi-turn agent conversations instead of single requests: N calls each, a shared "
                        "system prompt of S tokens, a tool result of R tokens added per call; --rates are then "
                        "conversations/s, --num-requests counts conversations, --high-fraction is the share of "
                        "high conversations (docs/prefix-cache.md)")
    w.add_argument("--think-time", type=float, default=1.0,
                   help="with --agent: mean seconds between a conversation's calls (default: %(default)s)")
    e = p.add_argument_group("what is measured")
    e.add_argument("--configs", type=_configs, default=list(CONFIGS),
                   help="comma-separated, run in this order (default: static,adaptive)")
    m = e.add_mutually_exclusive_group()
    m.add_argument("--checkpoint", help="a nitsum-jax checkpoint folder")
    m.add_argument("--preset", default="tiny", help="random weights of a preset shape (default: tiny)")
    e.add_argument("--weights", choices=["auto", "bf16", "fp8"], default="auto",
                   help="linear weights: fp8 (float8_e4m3fn, per-output-channel scales), bf16 (unquantized, "
                        "the model dtype) or auto (as the checkpoint stores them; a preset: bf16)")
    e.add_argument("--plans", default=None, help="plan set (compact form or .toml); static uses its 'static' plan "
                                                 "(default: derived from the device count)")
    e.add_argument("--static-plan", default=None, help="the static configuration's plan, compact form, when the "
                                                       "adaptive plan set has no 'static' plan (e.g. 'static: "
                                                       "all=tp4@0-3')")
    e.add_argument("--num-pages", type=int, default=DEFAULTS["num_pages"], help="KV pages per lane")
    e.add_argument("--page-size", type=int, default=DEFAULTS["page_size"])
    e.add_argument("--decode-batch", type=_ints, default=(8,), help="decode batch buckets (default: 8)")
    e.add_argument("--prefill-len", type=_ints, default=(32,), help="prefill chunk buckets (default: 32)")
    e.add_argument("--max-seq-len", type=int, default=128, help="longest prompt + output (default: 128)")
    e.add_argument("--token-budget", type=_budget, default=512,
                   help="new tokens a lane's step may carry: a number, or 'auto' (512, and lanes serving "
                        "urgent tiers limit their prefill tokens from measured step costs to keep the tier's "
                        "TPOT target) (default: %(default)s)")
    e.add_argument("--baselines", choices=["best-static"], default=None,
                   help="also every static partition of the devices (shared and dedicated), each its own engine")
    e.add_argument("--no-prefix-cache", action="store_true",
                   help="recompute every prompt: no reuse of cached K/V pages of a shared prefix")
    e.add_argument("--no-switch-probe", action="store_true",
                   help="skip timing plan switches and KV moves on each idle engine after its runs")
    e.add_argument("--target", default=None, help="host:port of a running nitsum-jax gRPC server, or http://host:port "
                                                  "of an OpenAI-compatible one (nitsum-jax, vLLM, ...), instead of "
                                                  "in-process engines")
    e.add_argument("--api-key", default=None, help="API key for --target (default: $NITSUM_API_KEY)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="bench-out", help="folder for results.json, report.md, plots "
                                                      "(default: %(default)s)")
    o.add_argument("--drain-timeout", type=float, default=120.0,
                   help="seconds to wait for requests after the last arrival (default: %(default)s)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_bench)


def _default_host_devices(devices: int | None) -> None:
    """Without --devices, give JAX HOST_DEVICES host devices (it matters only where there is no
    accelerator); the CPU backend must not have started yet."""
    if devices or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", HOST_DEVICES)
    except RuntimeError:  # backends already initialized: keep what there is
        pass


def _bench(args) -> int:
    from rich.console import Console

    from nitsum_jax.bench.api import run_bench
    from nitsum_jax.bench.report import print_tables

    console = Console(width=None if sys.stdout.isatty() else 150)
    if args.target is None:
        _default_host_devices(args.devices)
    from nitsum_jax.plans import BucketGrid

    grid = BucketGrid(decode_batch=args.decode_batch, prefill_len=args.prefill_len, max_seq_len=args.max_seq_len,
                      min_move_pages=max(1, -(-args.max_seq_len // args.page_size)))  # one KV-move size
    try:
        engine_kwargs, class_mix = _tiers(args)
        workloads = _agent_workloads(args) if args.agent else None
        results = run_bench(workloads=workloads, configs=args.configs, rates=args.rates, duration_s=args.duration,
                            num_requests=args.num_requests, high_fraction=args.high_fraction,
                            prompt_len=args.prompt_len, output_len=args.output_len, seed=args.seed,
                            trace=args.trace, time_scale=args.time_scale, target_rates=args.target_rates,
                            burstiness=args.burstiness, baselines=args.baselines, preset=args.preset,
                            checkpoint=args.checkpoint, plans=args.plans, static_plan=args.static_plan,
                            num_devices=args.devices, grid=grid,
                            num_pages=args.num_pages, page_size=args.page_size, target=args.target,
                            api_key=args.api_key or _settings().api_key, drain_timeout_s=args.drain_timeout, out_dir=args.out,
                            console=console, progress=not args.no_progress,
                            sampled_fraction=args.sampled_fraction, temperature=args.temperature,
                            switch_probe=not args.no_switch_probe,
                            class_mix=class_mix, engine_kwargs=engine_kwargs)
    except (ValueError, RuntimeError) as error:
        print(f"nitsum-jax: error: {error}", file=sys.stderr)
        return 2
    print_tables(results, console)
    for name, config in results["configs"].items():  # the prefix cache's figures (results.json: prefix_cache)
        if config.get("prefix_cache"):
            total = config["prefix_cache"]["total"]
            state = "on" if config["prefix_cache"]["enabled"] else "off"
            console.print(f"{name}: prefix cache {state}, {total['cached_tokens']} of {total['prompt_tokens']} prompt "
                          f"tokens cached (hit rate {total['hit_rate'] or 0:.1%})")
    console.print(f"wrote {args.out}/results.json, report.md, requests.jsonl, {', '.join(results['plots'])}")
    return 0


def _agent_workloads(args) -> list:
    from nitsum_jax.bench.workload import agent_workload

    return [agent_workload(rate, args.agent, duration_s=args.duration, num_conversations=args.num_requests,
                           high_fraction=args.high_fraction, output_len=args.output_len, think_s=args.think_time,
                           seed=args.seed, id_prefix="a" if len(args.rates) == 1 else f"rate{k}-a",
                           max_seq_len=args.max_seq_len)
            for k, rate in enumerate(args.rates)]
