"""The HTTP API beside gRPC in one process: same engine, gate, tenants and metrics registry.

`start_http(server, args,
classes)` starts the HTTP server on a running `NitsumServer` and registers its stop with the
server's drain, so SIGTERM drains both APIs at once (new requests 503, requests in flight
finish within the grace period).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

import uvicorn

from nitsum_jax.chat import ChatTemplate
from nitsum_jax.server.http.admission import Admission
from nitsum_jax.server.http.gateway_metrics import GatewayCollector
from nitsum_jax.server.http.priority import parse_objectives
from nitsum_jax.server.http.flags import DEFAULT_MAX_BODY_BYTES
from nitsum_jax.server.http.routes import create_app

log = logging.getLogger("nitsum_jax.server.http")


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on `host` ("[::]" / "::": every address, IPv4 too) and `port` (0: a free one)."""
    host = host.strip("[]")
    if host == "::":
        return socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=2048)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=2048)


class HttpServer:
    """uvicorn serving the OpenAI-compatible app on a thread of its own (its own event loop)."""

    def __init__(self, server, *, host: str = "[::]", port: int = 8000, model_name: str,
                 chat_template: ChatTemplate | None = None, objectives: dict[str, str] | None = None,
                 default_class: str = "low", max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        """`server`: the `NitsumServer` whose gate, tenants and metrics this API shares."""
        self.admission = Admission(server.gate, server.tenants, server.metrics, default_class=default_class,
                                   model_name=model_name, chat_template=chat_template, objectives=objectives or {},
                                   usage=server.usage)
        gate = server.gate

        def in_flight() -> list:
            with gate.idle:
                return list(gate.handles)

        server.metrics.registry.register(GatewayCollector(lambda: gate.engine, in_flight))
        app = create_app(self.admission, max_body_bytes=max_body_bytes)
        # h11 (pure Python) over httptools: one less compiled dependency; timeout_graceful_shutdown bounds stop().
        self._uvicorn = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", http="h11",
                                                      timeout_graceful_shutdown=5, access_log=False))
        self._socket = _listen(host, port)
        self.port: int = self._socket.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="nitsum-http", daemon=True)

    def _serve(self) -> None:
        asyncio.run(self._uvicorn.serve(sockets=[self._socket]))

    def start(self) -> "HttpServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting and close connections (the gate has drained the requests by then)."""
        self._uvicorn.should_exit = True
        self._thread.join(timeout=15)
        self._socket.close()


def start_http(server, args, classes, model_name: str) -> HttpServer | None:
    """Start the HTTP API on `server` (a NitsumServer) if --http-port is set; its stop joins the drain."""
    if args.http_port is None:
        return None
    template = ChatTemplate.for_checkpoint(args.checkpoint, args.chat_template)
    if template is None:
        log.warning("no chat template (checkpoint tokenizer_config.json or --chat-template): /v1/chat/completions "
                    "answers 400")
    http = HttpServer(server, host=args.http_host or args.host, port=args.http_port,
                      model_name=args.served_model_name or model_name, chat_template=template,
                      objectives=parse_objectives(args.objective, classes), default_class=args.default_class,
                      max_body_bytes=args.http_max_body_bytes).start()
    server.stop_hooks.append(http.stop)
    return http
