"""`nitsum-jax serve`, `nitsum-jax client` and `nitsum-jax api-key`, registered into the main parser.

Nothing here imports JAX at parser-build time: the top-level `--devices` flag must be applied
before JAX is first imported.
"""

from __future__ import annotations

import argparse
import json
import sys

from nitsum_jax.cli import add_command


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def register(sub) -> None:
    """Add the server subcommands to the `nitsum-jax` subparsers."""
    p = add_command(sub, "serve", "serve the model over gRPC with priority classes (nitsum.v1.Serving)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", help="a nitsum-jax checkpoint folder")
    g.add_argument("--preset", default="tiny", help="random weights of a preset shape")
    p.add_argument("--seed-weights", type=int, default=0, help="seed of the random weights of --preset")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="dtype for --preset weights")
    p.add_argument("--weights", choices=["auto", "bf16", "fp8"], default="auto",
                   help="linear weights: fp8 (float8_e4m3fn, per-output-channel scales), bf16 (unquantized, "
                        "the model dtype) or auto (as the checkpoint stores them; a preset: bf16)")
    p.add_argument("--plans", default=None, help="plan set, compact form or .toml (None: derived from --devices)")
    p.add_argument("--initial-plan", default=None, help="plan to start on (None: the first)")
    p.add_argument("--static", action="store_true",
                   help="stay on the initial plan (default: the plan controller switches plans by load)")
    p.add_argument("--host", default="[::]", help="address to listen on ([::]: all)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0: a free one)")
    p.add_argument("--api-keys", default=None, help="tenants TOML ([[tenant]] name, key_sha256, classes, "
                                                    "tokens_per_minute, max_concurrent_calls); None: the server "
                                                    "is open")
    p.add_argument("--classes", default=None, metavar="FILE",
                   help="priority tiers, a TOML file of [[class]] tables (name, rank, ttft_s, tpot_s, max_queue, "
                        "aging_s; README: Priority tiers) (default: high and low)")
    p.add_argument("--default-class", default=None,
                   help="class of requests that name none (default: the least urgent class, 'low' by default)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    p.add_argument("--metrics-host", default=None, help="address of /metrics (None: --host)")
    p.add_argument("--metrics-tenants", action="store_true",
                   help="label token counters with tenant names (anyone reading /metrics then sees them)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain (with --tls-key: TLS)")
    p.add_argument("--tls-key", default=None, help="PEM private key")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="recompute every prompt: no reuse of cached KV pages of a shared prefix (default: reuse, "
                        "within each tenant or the keys file's cache_group)")
    p.add_argument("--usage-db", default=None, help="usage ledger (SQLite): one row per request, for billing and "
                                                    "SLA reports (`nitsum-jax usage`); created 0600")
    p.add_argument("--grace-s", type=float, default=30.0, help="on SIGTERM, how long calls in flight may finish")
    p.add_argument("--message-timeout-s", type=float, default=10.0,
                   help="a call that sends no request message this long after its headers is cancelled")
    p.add_argument("--num-pages", type=int, default=256, help="KV pages per lane")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV cache page")
    p.add_argument("--max-seq-len", type=int, default=256,
                   help="context limit: longest prompt + max_tokens served")
    p.add_argument("--decode-batch", type=_int_tuple, default=(1, 2, 4, 8), help="compiled decode batch sizes")
    p.add_argument("--prefill-len", type=_int_tuple, default=(16, 64), help="compiled prefill chunk lengths")
    p.add_argument("--max-workers", type=int, default=None,
                   help="gRPC threads, the most calls served at once (None: enough for every class queue's "
                        "bound plus 64 running; calls beyond it are refused RESOURCE_EXHAUSTED)")
    from nitsum_jax.server.http.flags import add_http_args

    add_http_args(p)
    p.set_defaults(func=_serve)

    p = add_command(sub, "client", "call a nitsum-jax server (Generate, or --info / --health)")
    p.add_argument("prompt", nargs="?", default=None, help="prompt text (or --token-ids)")
    p.add_argument("--target", default="localhost:50051", help="host:port of the server")
    p.add_argument("--api-key", default=None, help="bearer key (None: $NITSUM_API_KEY)")
    p.add_argument("--priority", default=None, help="priority class (x-nitsum-priority); None: the server's")
    p.add_argument("--token-ids", type=_int_tuple, default=None, help="prompt as token ids, e.g. 256,72,105")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate at most (>= 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass kept, in (0, 1]; 1 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same tokens)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--timeout", type=float, default=None, help="deadline of the call in seconds")
    p.add_argument("--tls-ca", default=None, help="CA certificate (PEM) of a TLS server")
    p.add_argument("--info", action="store_true", help="print GetServerInfo instead of generating")
    p.add_argument("--health", action="store_true",
                   help="print the grpc.health.v1 status instead (exit 0 SERVING, 1 otherwise or unreachable)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of streamed text")
    p.set_defaults(func=_client)

    p = add_command(sub, "api-key", "make a random API key and its [[tenant]] table for --api-keys")
    p.add_argument("--name", required=True, help="the tenant's name (in logs; in /metrics with --metrics-tenants)")
    p.add_argument("--classes", default="low", help="comma-separated classes the tenant may claim")
    p.add_argument("--tokens-per-minute", type=int, default=None,
                   help="the tenant's rate of prompt + max_tokens + stop-rule tokens (None: unlimited)")
    p.add_argument("--max-concurrent-calls", type=int, default=None,
                   help="the tenant's calls in flight at most (None: half the server's)")
    p.set_defaults(func=_api_key)


def _engine_builder(args, classes):
    """The `build_engine` of `NitsumServer` for `serve`'s arguments: logs what it loads and
    compiles, and that it is still at it (compiling every plan can take minutes)."""
    import logging

    log = logging.getLogger("nitsum_jax.serve")

    def build_engine():
        from nitsum_jax.engine import Engine
        from nitsum_jax.plans import BucketGrid

        grid = BucketGrid(decode_batch=args.decode_batch, prefill_len=args.prefill_len, max_seq_len=args.max_seq_len)
        log.info("building the engine: %s, then compiling and running every plan's steps once",
                 f"loading checkpoint {args.checkpoint}" if args.checkpoint else f"random weights of {args.preset}")
        with _Heartbeat(log, "still building the engine (loading weights, compiling plans)"):
            engine = Engine.build(preset=args.preset, checkpoint=args.checkpoint, plans=args.plans,
                                  num_devices=args.devices, seed=args.seed_weights, classes=classes, grid=grid,
                                  num_pages=args.num_pages, page_size=args.page_size,
                                  initial_plan=args.initial_plan, adaptive=not args.static,
                                  prefix_cache=not args.no_prefix_cache, weights=args.weights,
                                  **({"dtype": args.dtype} if args.dtype else {}))
        plans = engine.plan_names
        log.info("engine warm: plans %s, %s", ", ".join(plans),
                 "static" if args.static or len(plans) == 1 else "adaptive (the plan controller switches by load)")
        return engine

    return build_engine


def _serve(args) -> int:
    import signal
    import threading

    from nitsum_jax.scheduler import by_rank, default_classes, load_classes
    from nitsum_jax.scheduler.classes import ClassesError
    from nitsum_jax.server.app import NitsumServer, workers_for
    from nitsum_jax.server.http.flags import check_http_args
    from nitsum_jax.server.tenants import Tenants, TenantsFileError
    from nitsum_jax.usage import LedgerError

    try:
        classes = load_classes(args.classes) if args.classes else default_classes()
        if args.default_class is None:
            args.default_class = by_rank(classes)[-1].name
        if args.default_class not in classes:
            raise TenantsFileError(f"--default-class {args.default_class!r} is not a class; known: {sorted(classes)}")
        tenants = Tenants.load(args.api_keys, known_classes=classes) if args.api_keys else None
        check_http_args(args, classes)
        if (args.tls_cert is None) != (args.tls_key is None):
            raise TenantsFileError("--tls-cert and --tls-key go together")
        tls = None
        if args.tls_cert:
            with open(args.tls_cert, "rb") as cert, open(args.tls_key, "rb") as key:
                tls = (cert.read(), key.read())
    except (TenantsFileError, ClassesError, OSError, ValueError) as e:
        print(f"nitsum-jax: error: {e}", file=sys.stderr)
        return 2

    model_name = args.checkpoint or f"preset:{args.preset}"
    try:
        server = NitsumServer(_engine_builder(args, classes), host=args.host,
                              port=None if args.no_grpc else args.port, tenants=tenants,
                              default_class=args.default_class, model_name=model_name, metrics_port=args.metrics_port,
                              metrics_host=args.metrics_host, tenant_labels=args.metrics_tenants, tls=tls,
                              message_timeout_s=args.message_timeout_s,
                              max_workers=args.max_workers or workers_for(classes), usage_db=args.usage_db)
    except LedgerError as e:
        print(f"nitsum-jax: error: {e}", file=sys.stderr)
        return 2
    try:
        from nitsum_jax.server.http.server import start_http

        http = start_http(server, args, classes, model_name)  # before the engine builds: bind errors first
    except (OSError, ValueError) as e:
        print(f"nitsum-jax: error: {e}", file=sys.stderr)
        return 2
    server.start()
    if http is not None:
        print(f"nitsum-jax serve: OpenAI-compatible HTTP on {args.http_host or args.host}:{http.port}", flush=True)
    print(f"nitsum-jax serve: {'gRPC off' if server.port is None else f'listening on {args.host}:{server.port}'}"
          f"{' (TLS)' if tls else ''}, health NOT_SERVING until the engine is warm"
          + (f"; metrics on :{server.metrics_port}/metrics" if server.metrics_port else ""), flush=True)

    def on_signal(signum, _frame):
        print(f"nitsum-jax serve: signal {signum}, draining (grace {args.grace_s:g}s)", flush=True)
        threading.Thread(target=server.drain, args=(args.grace_s,), name="nitsum-drain").start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    announced = False
    while not server.stopped.wait(0.2):
        if server.ready.is_set() and not announced:
            announced = True
            if server.start_error is not None:
                server.stop()
                print(f"nitsum-jax: error: engine start-up failed: {server.start_error}", file=sys.stderr)
                return 1
            print("nitsum-jax serve: SERVING", flush=True)
    print("nitsum-jax serve: stopped", flush=True)
    return 0


class _Heartbeat:
    """Logs `message` with the seconds elapsed every `every_s` until the block ends: a long silent
    step (compiling every plan takes minutes) says it is still going."""

    def __init__(self, log, message: str, every_s: float = 15.0):
        import threading

        self.log, self.message, self.every_s = log, message, every_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nitsum-heartbeat", daemon=True)

    def _run(self) -> None:
        import time

        t0 = time.monotonic()
        while not self._done.wait(self.every_s):
            self.log.info("%s: %.0fs", self.message, time.monotonic() - t0)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()


def _client(args) -> int:
    import os

    if args.max_tokens < 1:
        print(f"nitsum-jax: error: --max-tokens must be >= 1, got {args.max_tokens}", file=sys.stderr)
        return 2
    if not (args.health or args.info) and args.prompt is None and args.token_ids is None:
        print("nitsum-jax: error: give a prompt (text) or --token-ids", file=sys.stderr)
        return 2
    from nitsum_jax.server.client import GenerateError, NitsumClient

    with NitsumClient(args.target, api_key=args.api_key or _api_key_from_settings(),
                      tls_ca=args.tls_ca) as client:
        try:
            if args.health:
                status = client.health(timeout=args.timeout or 5.0)
                print(status)
                return 0 if status == "SERVING" else 1
            if args.info:
                print(json.dumps(client.server_info(), indent=2))
                return 0
            return _generate_call(client, args)
        except GenerateError as e:
            print(f"nitsum-jax: error: {e.code.name}: {e.details}", file=sys.stderr)
            return 1


def _generate_call(client, args) -> int:
    """Stream (or, with --json, collect) one Generate call; Ctrl-C cancels it on the server."""
    kwargs = dict(priority=args.priority, max_tokens=args.max_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop, timeout=args.timeout)
    prompt = None if args.token_ids else args.prompt
    call = client.stream(prompt, prompt_token_ids=args.token_ids, **kwargs)
    try:
        if args.json:
            r = client.collect(call)
            print(json.dumps({"token_ids": r.token_ids, "text": r.text, "finish_reason": r.finish_reason,
                              "prompt_tokens": r.prompt_tokens, "served_by": _served_by_dict(r.served_by),
                              "ttft_s": r.ttft_s}))
            return 0
        for event in call:
            sys.stdout.write(event.text)
            sys.stdout.flush()
            if event.finish_reason:
                print(f"\n[finish: {event.finish_reason}, prompt tokens {event.usage[0]}, completion tokens "
                      f"{event.usage[1]}, served by {_served_by_text(event.served_by)}]")
        return 0
    except KeyboardInterrupt:
        call.cancel()
        print("\n[cancelled]", file=sys.stderr)
        return 130


def _served_by_dict(served_by) -> dict | None:
    return None if served_by is None else dict(zip(("plan", "lane", "tp"), served_by))


def _served_by_text(served_by) -> str:
    if served_by is None:
        return "unknown"
    plan, lane, tp = served_by
    return f"lane {lane} (tp{tp}) of plan {plan}"


def _api_key(args) -> int:
    import secrets

    from nitsum_jax.server.tenants import key_sha256

    key = secrets.token_urlsafe(32)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    print(f"# API key of tenant {args.name!r} (give it to the client; it is not stored): {key}", file=sys.stderr)
    print(f'[[tenant]]\nname = "{args.name}"\nkey_sha256 = "{key_sha256(key)}"\nclasses = {json.dumps(classes)}')
    if args.tokens_per_minute:
        print(f"tokens_per_minute = {args.tokens_per_minute}")
    if args.max_concurrent_calls:
        print(f"max_concurrent_calls = {args.max_concurrent_calls}")
    return 0


def _api_key_from_settings() -> str | None:
    from nitsum_jax.settings import settings

    return settings().api_key
