"""`nitsum-jax serve`, `nitsum-jax client` and `nitsum-jax api-key`, registered into the main parser.

Nothing here imports JAX at parser-build time: the top-level `--devices` flag must be applied
before JAX is first imported.
"""

from __future__ import annotations

import argparse
import json
import sys


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def register(sub) -> None:
    """Add the server subcommands to the `nitsum-jax` subparsers."""
    p = sub.add_parser("serve", help="serve the model over gRPC with priority classes (nitsum.v1.Serving)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", help="a nitsum-jax checkpoint folder")
    g.add_argument("--preset", default="tiny", help="random weights of a preset shape (default: tiny)")
    p.add_argument("--seed-weights", type=int, default=0, help="seed of the random weights of --preset")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="dtype for --preset weights")
    p.add_argument("--plans", default=None, help="plan set, compact form or .toml (default: derived from --devices)")
    p.add_argument("--initial-plan", default=None, help="plan to start on (default: the first)")
    p.add_argument("--adaptive", action="store_true", help="let the plan controller switch plans by load")
    p.add_argument("--host", default="[::]", help="address to listen on (default: all)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0: a free one)")
    p.add_argument("--api-keys", default=None, help="tenants TOML ([[tenant]] name, key_sha256, classes, "
                                                    "tokens_per_minute); without it the server is open")
    p.add_argument("--default-class", default="low", help="class of requests without x-nitsum-priority")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain (with --tls-key: TLS)")
    p.add_argument("--tls-key", default=None, help="PEM private key")
    p.add_argument("--grace-s", type=float, default=30.0, help="on SIGTERM, how long calls in flight may finish")
    p.add_argument("--num-pages", type=int, default=256, help="KV pages per lane")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=256, help="longest prompt + max_tokens served")
    p.add_argument("--decode-batch", type=_int_tuple, default=(1, 2, 4, 8), help="compiled decode batch sizes")
    p.add_argument("--prefill-len", type=_int_tuple, default=(16, 64), help="compiled prefill chunk lengths")
    p.add_argument("--max-workers", type=int, default=None,
                   help="gRPC threads, the most calls served at once (default: enough for every class queue's "
                        "bound plus 64 running; calls beyond it are refused RESOURCE_EXHAUSTED)")
    from nitsum_jax.server.http.flags import add_http_args

    add_http_args(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser("client", help="call a nitsum-jax server (Generate, or --info / --health)")
    p.add_argument("prompt", nargs="?", default="Priority lanes let urgent requests")
    p.add_argument("--target", default="localhost:50051", help="host:port of the server")
    p.add_argument("--api-key", default=None, help="bearer key (default: $NITSUM_API_KEY)")
    p.add_argument("--priority", default=None, help="priority class (x-nitsum-priority); default: the server's")
    p.add_argument("--token-ids", type=_int_tuple, default=None, help="prompt as token ids")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--timeout", type=float, default=None, help="deadline of the call in seconds")
    p.add_argument("--tls-ca", default=None, help="CA certificate (PEM) of a TLS server")
    p.add_argument("--info", action="store_true", help="print GetServerInfo instead of generating")
    p.add_argument("--health", action="store_true", help="print the grpc.health.v1 status instead")
    p.add_argument("--json", action="store_true", help="one JSON object instead of streamed text")
    p.set_defaults(func=_client)

    p = sub.add_parser("api-key", help="make a random API key and its [[tenant]] table for --api-keys")
    p.add_argument("--name", required=True)
    p.add_argument("--classes", default="low", help="comma-separated classes the tenant may claim")
    p.add_argument("--tokens-per-minute", type=int, default=None)
    p.set_defaults(func=_api_key)


def _serve(args) -> int:
    import logging
    import signal
    import threading

    from nitsum_jax.scheduler import default_classes
    from nitsum_jax.server.app import NitsumServer, workers_for
    from nitsum_jax.server.http.flags import check_http_args
    from nitsum_jax.server.tenants import Tenants, TenantsFileError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    classes = default_classes()
    try:
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
    except (TenantsFileError, OSError, ValueError) as e:
        print(f"nitsum-jax: error: {e}", file=sys.stderr)
        return 2

    def build_engine():
        from nitsum_jax.engine import Engine
        from nitsum_jax.plans import BucketGrid

        grid = BucketGrid(decode_batch=args.decode_batch, prefill_len=args.prefill_len, max_seq_len=args.max_seq_len)
        extra = {"adaptive": True} if args.adaptive else {}
        return Engine.build(preset=args.preset, checkpoint=args.checkpoint, plans=args.plans,
                            num_devices=args.devices, seed=args.seed_weights, classes=classes, grid=grid,
                            num_pages=args.num_pages, page_size=args.page_size, initial_plan=args.initial_plan,
                            **({"dtype": args.dtype} if args.dtype else {}), **extra)

    model_name = args.checkpoint or f"preset:{args.preset}"
    server = NitsumServer(build_engine, host=args.host, port=None if args.no_grpc else args.port, tenants=tenants,
                          default_class=args.default_class, model_name=model_name,
                          metrics_port=args.metrics_port, tls=tls,
                          max_workers=args.max_workers or workers_for(classes))
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


def _client(args) -> int:
    import os

    from nitsum_jax.server.client import GenerateError, NitsumClient

    with NitsumClient(args.target, api_key=args.api_key or os.environ.get("NITSUM_API_KEY"),
                      tls_ca=args.tls_ca) as client:
        try:
            if args.health:
                print(client.health())
                return 0
            if args.info:
                print(json.dumps(client.server_info(), indent=2))
                return 0
            kwargs = dict(priority=args.priority, max_tokens=args.max_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop, timeout=args.timeout)
            prompt = None if args.token_ids else args.prompt
            if args.json:
                r = client.generate(prompt, prompt_token_ids=args.token_ids, **kwargs)
                print(json.dumps({"token_ids": r.token_ids, "text": r.text, "finish_reason": r.finish_reason,
                                  "prompt_tokens": r.prompt_tokens, "served_by": r.served_by,
                                  "ttft_s": r.ttft_s}))
                return 0
            for event in client.stream(prompt, prompt_token_ids=args.token_ids, **kwargs):
                sys.stdout.write(event.text)
                sys.stdout.flush()
                if event.finish_reason:
                    print(f"\n[finish: {event.finish_reason}, prompt tokens {event.usage[0]}, completion tokens "
                          f"{event.usage[1]}, served by {event.served_by}]")
            return 0
        except GenerateError as e:
            print(f"nitsum-jax: error: {e.code.name}: {e.details}", file=sys.stderr)
            return 1


def _api_key(args) -> int:
    import secrets

    from nitsum_jax.server.tenants import key_sha256

    key = secrets.token_urlsafe(32)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    print(f"# API key of tenant {args.name!r} (give it to the client; it is not stored): {key}", file=sys.stderr)
    print(f'[[tenant]]\nname = "{args.name}"\nkey_sha256 = "{key_sha256(key)}"\nclasses = {json.dumps(classes)}')
    if args.tokens_per_minute:
        print(f"tokens_per_minute = {args.tokens_per_minute}")
    return 0
