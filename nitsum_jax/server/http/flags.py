"""The `nitsum-jax serve` flags of the HTTP API. Imports nothing heavy: the CLI builds its parser
before JAX may be imported (the top-level `--devices` flag must apply first)."""

from __future__ import annotations

import argparse

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # a 128k-token prompt as JSON token ids is under 1 MB


def add_http_args(parser: argparse.ArgumentParser) -> None:
    """The `nitsum-jax serve` flags of the OpenAI-compatible HTTP API (docs/http.md)."""
    g = parser.add_argument_group("OpenAI-compatible HTTP API (docs/http.md)")
    g.add_argument("--http-port", type=int, default=None,
                   help="serve /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics on this port "
                        "(0: a free one; default: no HTTP)")
    g.add_argument("--http-host", default=None, help="address for HTTP (default: --host)")
    g.add_argument("--no-grpc", action="store_true", help="serve HTTP only (needs --http-port)")
    g.add_argument("--served-model-name", default=None,
                   help="the model id of /v1/models and of the `model` field (default: the checkpoint path or "
                        "preset:NAME)")
    g.add_argument("--chat-template", default=None,
                   help="Jinja chat template file (default: chat_template of the checkpoint's tokenizer_config.json)")
    g.add_argument("--objective", action="append", default=[], metavar="NAME=TIER",
                   help="map a gateway InferenceObjective name (x-llm-d-inference-objective) to a tier; repeatable")
    g.add_argument("--http-max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="larger request bodies are refused 413 (default: %(default)s)")


def check_http_args(args, classes) -> None:
    """ValueError naming a bad combination or value, before anything starts."""
    if args.no_grpc and args.http_port is None:
        raise ValueError("--no-grpc needs --http-port: the server would serve no API")
    if args.http_max_body_bytes < 1024:
        raise ValueError(f"--http-max-body-bytes must be >= 1024, got {args.http_max_body_bytes}")
    from nitsum_jax.server.http.priority import parse_objectives

    parse_objectives(args.objective, classes)
