"""A running server: gRPC (Serving, health, reflection), metrics, engine start-up and drain.

Start-up order: the port opens first with health NOT_SERVING (Generate answers UNAVAILABLE),
the engine is built on a thread (every plan compiled and run once: warm), then health turns
SERVING. `drain()` (SIGTERM in `nitsum-jax serve`) turns health NOT_SERVING, answers new calls
UNAVAILABLE, lets calls in flight finish within the grace period (cancelling what is left
after it), then stops the server and closes the engine.
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nitsum_jax.server._proto import serving_pb2 as pb
from nitsum_jax.server.metrics import ServerMetrics
from nitsum_jax.server.service import Gate, ServingService, lenient_deserializer
from nitsum_jax.server.tenants import Tenants

log = logging.getLogger("nitsum_jax.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Serving"].full_name  # "nitsum.v1.Serving"


def _add_serving(service: ServingService, server: grpc.Server) -> None:
    """`pb_grpc.add_ServingServicer_to_server`, except that a request that does not parse reaches
    the service (INVALID_ARGUMENT naming the parse error) instead of failing in grpc (INTERNAL)."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            service.Generate, request_deserializer=lenient_deserializer(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString),
        "GetServerInfo": grpc.unary_unary_rpc_method_handler(
            service.GetServerInfo, request_deserializer=lenient_deserializer(pb.GetServerInfoRequest),
            response_serializer=pb.ServerInfo.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def workers_for(classes: dict, running: int = 64) -> int:
    """gRPC threads for every call the class queues may hold (their `max_queue`s), `running`
    calls being served and a few for health and info: the class queues, priority-aware and
    bounded, are then where calls wait."""
    return sum(c.max_queue for c in classes.values()) + running + 8


class NitsumServer:
    def __init__(self, build_engine: Callable[[], object], *, host: str = "[::]", port: int | None = 50051,
                 tenants: Tenants | None = None, default_class: str = "low", model_name: str = "",
                 metrics_port: int | None = None, tls: tuple[bytes, bytes] | None = None, max_workers: int = 64):
        """`build_engine()` makes the engine (called on a start-up thread); `tls` = (cert PEM, key PEM);
        `port` 0 and `metrics_port` 0 pick free ports (`port` None: no gRPC). `max_workers` bounds the calls served at once
        (each holds a thread while it waits or streams): size it with `workers_for(classes)`, since a
        call beyond it is refused RESOURCE_EXHAUSTED whatever its class."""
        self._build_engine = build_engine
        self.tenants = tenants or Tenants.open()
        self.gate = Gate()
        self.metrics = ServerMetrics(lambda: self.gate.engine)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        # Calls beyond the threads are refused, not queued inside grpc: such a queue is unbounded,
        # blind to priority and in front of the class queues (high would wait behind low there).
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers, thread_name_prefix="nitsum-grpc"),
                                  maximum_concurrent_rpcs=max_workers)
        _add_serving(ServingService(self.gate, self.tenants, self.metrics, default_class=default_class,
                                    model_name=model_name), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        address = f"{host}:{port}"
        if port is None:  # gRPC off: another API (HTTP) serves this engine
            self.port = None
        elif tls is None:
            self.port = self.server.add_insecure_port(address)
        else:
            cert, key = tls
            self.port = self.server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
        if self.port == 0:
            raise OSError(f"could not bind {address}")
        self.stop_hooks: list[Callable[[], None]] = []  # other APIs on this gate, stopped by drain()
        self._metrics_port_asked = metrics_port
        self.metrics_port: int | None = None
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self.start_error: BaseException | None = None
        self._drain_lock = threading.Lock()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    def _set_health(self, status) -> None:
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)

    def start(self) -> "NitsumServer":
        self.server.start()
        if self._metrics_port_asked is not None:
            self.metrics_port = self.metrics.serve(self._metrics_port_asked)
        if self.tenants.is_open:
            log.warning("no --api-keys file: the server is OPEN, any caller may claim any priority class")
        threading.Thread(target=self._warm_up, name="nitsum-engine-build", daemon=True).start()
        return self

    def _warm_up(self) -> None:
        try:
            engine = self._build_engine()  # compiles and runs every plan's steps once
        except BaseException as e:  # noqa: BLE001 - reported, and the server stays NOT_SERVING
            log.exception("engine start-up failed")
            self.start_error = e
            self.ready.set()
            return
        with self.gate.idle:
            if self.gate.draining:  # drained while compiling
                engine.close()
                return
            self.gate.engine = engine
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving on port %s (plan %s)", self.port, engine.plan_name)
        self.ready.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once warm and serving; raises the start-up error if the engine failed to build."""
        ok = self.ready.wait(timeout)
        if self.start_error is not None:
            raise RuntimeError(f"engine start-up failed: {self.start_error}") from self.start_error
        return ok

    def drain(self, grace_s: float = 30.0) -> bool:
        """Graceful shutdown; True if every call in flight finished within `grace_s`."""
        with self._drain_lock:
            if self.stopped.is_set():
                return True
            self.health.enter_graceful_shutdown()  # NOT_SERVING for every service, for good
            with self.gate.idle:
                self.gate.draining = True
                in_flight = self.gate.in_flight
            log.info("draining: %d calls in flight, grace %.1fs", in_flight, grace_s)
            finished = self.gate.wait_idle(grace_s)
            if not finished:
                with self.gate.idle:
                    left = list(self.gate.handles)
                log.warning("grace period over: cancelling %d requests", len(left))
                for handle in left:
                    handle.cancel()  # they end with CANCELLED at the next step, pages freed
                self.gate.wait_idle(10.0)
            for stop in self.stop_hooks:
                stop()
            self.server.stop(grace=1.0).wait()
            self.metrics.close()
            if self.gate.engine is not None:
                self.gate.engine.close()
            self.stopped.set()
            return finished

    def stop(self) -> None:
        """Immediate stop (tests, errors): no grace."""
        self.drain(grace_s=0.0)
