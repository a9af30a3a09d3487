"""`nitsum-jax profile`, `simulate` and `plan`: `register(subparsers)` adds them; nothing here
imports JAX until `profile` runs (the simulator needs none)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nitsum_jax.bench.cli import _budget, _floats, _ints


def _workload_args(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workload (as `bench`)")
    w.add_argument("--trace", default=None, help="CSV or JSONL trace (arrival, prompt and output tokens, optional "
                                                 "class); the Splitwise column names are accepted as they are")
    w.add_argument("--target-rates", type=_floats, default=None,
                   help="replay the trace once per rate, its arrivals scaled to that mean rate (requests/s)")
    w.add_argument("--time-scale", type=float, default=1.0, help="multiply trace arrival times (default: 1)")
    w.add_argument("--trace-limit", type=int, default=None, help="replay only the trace's first N requests")
    w.add_argument("--rates", type=_floats, default=[16.0], help="synthetic arrival rates, requests/s (default: 16)")
    w.add_argument("--duration", type=float, default=60.0, help="seconds of synthetic arrivals per rate")
    w.add_argument("--num-requests", type=int, default=None, help="exactly this many synthetic requests per rate")
    w.add_argument("--burstiness", type=float, default=1.0, help="gamma arrivals: squared CV of the gaps (1: Poisson)")
    w.add_argument("--prompt-len", default="lognormal:1000:0.8", help="N, LO-HI or lognormal:MEDIAN:SIGMA")
    w.add_argument("--output-len", default="lognormal:130:0.8", help="same forms")
    w.add_argument("--high-fraction", type=float, default=0.3, help="share of class high (two default tiers)")
    w.add_argument("--class-mix", default=None, help="CLASS=SHARE,... for other tiers (e.g. high=0.2,low=0.8); "
                                                           "with --classes and no mix, its classes evenly (as bench)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--classes", default=None, help="tiers TOML ([[class]] tables); default: high and low")


def _engine_args(p: argparse.ArgumentParser) -> None:
    e = p.add_argument_group("engine settings (as the engine's)")
    e.add_argument("--profile", required=True, help="profile JSON (`nitsum-jax profile`)")
    e.add_argument("--num-devices", type=int, default=None, help="devices to deploy over (default: the plans' or 4)")
    e.add_argument("--decode-batch", type=_ints, default=None, help="decode buckets (default: the profile's)")
    e.add_argument("--prefill-len", type=_ints, default=None, help="prefill chunk buckets (default: the profile's)")
    e.add_argument("--max-seq-len", type=int, default=8192, help="longest prompt + output (longer: rejected)")
    e.add_argument("--num-pages", type=int, default=None,
                   help="KV pages per lane (default: what fits the profile's device memory, else 4096)")
    e.add_argument("--page-size", type=int, default=16)
    e.add_argument("--token-budget", type=_budget, default=512,
                   help="new tokens per lane step, or auto: lanes of urgent tiers limit their prefill work to keep "
                        "the tier's TPOT target, from the simulated step costs they measure (as the engine's)")
    e.add_argument("--tick-ms", type=float, default=5.0, help="control loop period of virtual time (the runtime's: 5)")


def register(subparsers) -> None:
    p = subparsers.add_parser("profile", help="measure step, move and switch costs on this machine for the simulator",
                              description="`profile --out P.json` measures; `profile merge A.json B.json --out C.json` "
                                          "merges (figures of a lane shape come from the first file that has them); "
                                          "`profile host P.json BENCH/results.json ... --out Q.json` fits the engine's "
                                          "host time between unchained steps to real one-lane bench runs.")
    p.add_argument("inputs", nargs="*", help="`merge` followed by profile files, or `host`, a profile and bench results")
    p.add_argument("--out", required=True)
    p.add_argument("--commit", default=None,
                   help="the commit measured, where the checkout's git says another (a copied tree); `host`: the "
                        "commit the bench ran (default: the git of this checkout, or of the bench's results)")
    p.add_argument("--fit-rates", type=_floats, default=None,
                   help="`host`: fit only the runs at these rates; the others are held out (default: fit all)")
    p.add_argument("--preset", default="tiny", help="model shape, random weights (default: tiny)")
    p.add_argument("--num-devices", type=int, default=None, help="devices to use (default: all)")
    p.add_argument("--batches", type=_ints, default=(1, 4, 8), help="decode batch buckets")
    p.add_argument("--contexts", type=_ints, default=(16, 96), help="decode contexts (cached tokens)")
    p.add_argument("--prefill-lens", type=_ints, default=(16, 32), help="prefill chunk sizes")
    p.add_argument("--prefill-contexts", type=_ints, default=(0, 64), help="prefill start positions")
    p.add_argument("--move-tokens", type=_ints, default=(64,), help="sizes of the timed KV moves")
    p.add_argument("--repeats", type=int, default=5)
    p.set_defaults(func=_profile)
    p = subparsers.add_parser("simulate", help="the engine core on a virtual clock, step times from a profile",
                              description="Same workloads, results.json schema, report and plots as `bench`.")
    _workload_args(p)
    _engine_args(p)
    p.add_argument("--plans", default=None, help="the adaptive plan set (compact form or TOML; default: derived)")
    p.add_argument("--configs", default="adaptive,static", help="adaptive and/or static (the set's 'static' plan)")
    p.add_argument("--baselines", choices=["best-static"], default=None,
                   help="also every static partition, shared and dedicated, and adaptive against the best of each")
    p.add_argument("--hold", type=float, default=None, help="controller hold_s (default: the plan TOML's "
                                                             "[controller], else 0.5)")
    p.add_argument("--dwell", type=float, default=None, help="controller min_dwell_s (same; else 1.0)")
    p.add_argument("--slo-floor", type=float, default=None, help="controller slo_floor (same; else 0.9)")
    p.add_argument("--out", default="sim-out", help="folder for results.json, report.md, plots")
    p.set_defaults(func=_simulate)
    p = subparsers.add_parser("plan", help="search plan sets and controller settings by simulation; write plans.toml")
    _workload_args(p)
    _engine_args(p)
    p.add_argument("--out", required=True, help="the plan TOML to write")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_plan)


def _profile(args) -> int:
    from nitsum_jax.sim import profile as P

    if args.inputs and args.inputs[0] == "host":
        return _host_fit(args)
    if args.inputs:
        if args.inputs[0] != "merge" or len(args.inputs) < 3:
            print("nitsum-jax: error: expected `profile merge A.json B.json ... --out C.json` or "
                  "`profile host P.json RESULTS.json ... --out Q.json`", file=sys.stderr)
            return 2
        P.save(P.merge([P.load(path) for path in args.inputs[1:]]), args.out)
        print(f"wrote {args.out}")
        return 0
    import jax

    from nitsum_jax.config import preset
    from nitsum_jax.sim.measure import measure_profile
    from nitsum_jax.source import load_model

    cfg = preset(args.preset)
    params = load_model(None, args.preset, 0, None).params if args.preset == "tiny" else None
    devices = jax.devices()[:args.num_devices] if args.num_devices else jax.devices()
    profile = measure_profile(cfg, params, devices, batches=args.batches, contexts=args.contexts,
                              prefill_lens=args.prefill_lens, prefill_contexts=args.prefill_contexts,
                              repeats=args.repeats, move_tokens=args.move_tokens, log=print)
    if args.commit:
        for source in profile["sources"].values():
            source["commit"] = args.commit
    P.save(profile, args.out)
    print(f"wrote {args.out}: {len(profile['lanes'])} lane shapes, {len(profile['moves'])} moves")
    return 0


def _host_fit(args) -> int:
    import json

    from nitsum_jax.sim import profile as P

    if len(args.inputs) < 3:
        print("nitsum-jax: error: expected `profile host P.json RESULTS.json ... --out Q.json`", file=sys.stderr)
        return 2
    base = P.load(args.inputs[1])
    runs = []
    for path in args.inputs[2:]:
        try:
            runs.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise P.ProfileError(f"{path}: cannot read bench results ({e})") from None
    first = runs[0]
    machine = first.get("machine", {})
    commit = args.commit or (first.get("git") or {}).get("commit")
    source = {"card": machine.get("device_kind", "?"), "devices": machine.get("device_count", 0),
              "date": str(first.get("date", ""))[:10], "commit": commit,
              "how": "fit of the host time between unchained steps to bench runs: " + ", ".join(args.inputs[2:])}
    sid = f"host-{source['date']}-{(commit or 'unknown')[:7]}"
    fitted = P.host_fit(base, runs, sid, source, args.fit_rates)
    P.save(fitted, args.out)
    host = fitted["host"]
    print(f"host time per unchained step = {host['per_step_ms']:.3f} ms + {host['per_row_ms']:.4f} ms x rows")
    for p in host["points"]:
        print(f"  {p['config']} {p['rate_rps']:g} req/s: {p['rows']:.1f} rows a step, measured {p['gap_ms']:.3f} ms, "
              f"fit {p['fit_ms']:.3f}{' (held out)' if p['held_out'] else ''}")
    print(f"wrote {args.out}")
    return 0


def _simulate(args) -> int:
    from nitsum_jax.sim.setup import run_simulate

    return run_simulate(args)


def _plan(args) -> int:
    from nitsum_jax.sim.setup import run_plan

    return run_plan(args)


def out_path(path: str) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out
