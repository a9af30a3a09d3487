"""A running server: gRPC (Serving, health, reflection), metrics, engine start-up and drain.

Start-up order: the port opens first with health NOT_SERVING (Generate answers UNAVAILABLE),
the engine is built on a thread (every plan compiled and run once: warm), then health turns
SERVING. `drain()` (SIGTERM in `nitsum-jax serve`) turns health NOT_SERVING, answers new calls
UNAVAILABLE, lets calls in flight finish within the grace period (cancelling what is left
after it: they end UNAVAILABLE), then stops the server and closes the engine.

Every call first meets the admission interceptor (`admission.py`): keys and concurrency budgets are
checked on the headers, before a worker thread waits for the request message.
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from typing import Callable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from nitsum_jax.server.admission import Admission

from nitsum_jax.server._proto import serving_pb2 as pb
from nitsum_jax.server.metrics import ServerMetrics
from nitsum_jax.server.service import Gate, ServingService, lenient_deserializer
from nitsum_jax.server.tenants import Tenants
from nitsum_jax.usage import UsageLedger

log = logging.getLogger("nitsum_jax.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Serving"].full_name  # "nitsum.v1.Serving"
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
SERVICE_SLOTS = 16  # calls reserved for health and reflection: they answer whatever Generate does


def _reflection_v1_descriptor() -> None:
    """Put `grpc.reflection.v1` in the default descriptor pool: grpcio-reflection ships only
    v1alpha, whose messages are the same (field for field) under another package name."""
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(REFLECTION_V1)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = proto.package, "grpc.reflection.v1"
    proto.name, proto.package = "grpc/reflection/v1/reflection.proto", new
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(f".{old}.", f".{new}.")
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(f".{old}.", f".{new}.")
        method.output_type = method.output_type.replace(f".{old}.", f".{new}.")
    pool.Add(proto)


def _add_reflection(server: grpc.Server, services: tuple[str, ...]) -> None:
    """Reflection under both names, `grpc.reflection.v1` (grpcurl, current clients) and `v1alpha`:
    one servicer, since the two speak the same bytes."""
    _reflection_v1_descriptor()
    servicer = reflection.ReflectionServicer(services + (reflection.SERVICE_NAME, REFLECTION_V1))
    method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    for name in (reflection.SERVICE_NAME, REFLECTION_V1):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": method}),))


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
                 metrics_port: int | None = None, metrics_host: str | None = None, tenant_labels: bool = False,
                 tls: tuple[bytes, bytes] | None = None, max_workers: int = 64, message_timeout_s: float = 10.0,
                 usage_db: str | None = None):
        """`build_engine()` makes the engine (called on a start-up thread); `tls` = (cert PEM, key PEM);
        `port` 0 and `metrics_port` 0 pick free ports (`port` None: no gRPC). `max_workers` bounds the calls served at once
        (each holds a thread while it waits or streams): size it with `workers_for(classes)`, since a
        call beyond it is refused RESOURCE_EXHAUSTED whatever its class; `SERVICE_SLOTS` more serve health
        and reflection. `/metrics` listens on `metrics_host` (default: `host`); `tenant_labels` puts
        tenant names on the token counters (off: they are summed per class). A call that sends no request
        message within `message_timeout_s` of its headers is cancelled. `usage_db`: the usage ledger
        file (docs/usage-ledger.md); raises LedgerError if it is not one."""
        self._build_engine = build_engine
        self.tenants = tenants or Tenants.open()
        self.gate = Gate()
        self.metrics = ServerMetrics(lambda: self.gate.engine, tenant_labels=tenant_labels)
        self.usage = UsageLedger(usage_db, registry=self.metrics.registry) if usage_db else None
        self.health = health.HealthServicer(experimental_non_blocking=True)
        service = ServingService(self.gate, self.tenants, self.metrics, default_class=default_class,
                                 model_name=model_name, usage=self.usage)
        self.admission = Admission(self.tenants, SERVICE_NAME, serving_slots=max_workers,
                                   service_slots=SERVICE_SLOTS, message_timeout_s=message_timeout_s,
                                   refused=service.refused)
        # Calls beyond the threads are refused, not queued inside grpc: such a queue is unbounded,
        # blind to priority and in front of the class queues (high would wait behind low there).
        # The admission budgets keep within it, so grpc's own refusal only meets unknown methods.
        threads = max_workers + SERVICE_SLOTS
        self.server = grpc.server(futures.ThreadPoolExecutor(threads, thread_name_prefix="nitsum-grpc"),
                                  interceptors=(self.admission,), maximum_concurrent_rpcs=threads)
        _add_serving(service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        _add_reflection(self.server, (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
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
        self._metrics_host = metrics_host or host.strip("[]") or "::"
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
            self.metrics_port = self.metrics.serve(self._metrics_port_asked, self._metrics_host)
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
                left = self.gate.cut_off_all()
                log.warning("grace period over: cancelling %d requests", len(left))
                for handle in left:
                    handle.cancel()  # they end UNAVAILABLE at the next step (retry elsewhere), pages freed
                self.gate.wait_idle(10.0)
            for stop in self.stop_hooks:
                stop()
            self.server.stop(grace=1.0).wait()
            if self.usage is not None:
                self.usage.close()  # after the last call settled: every row written
            self.metrics.close()
            if self.gate.engine is not None:
                self.gate.engine.close()
            self.stopped.set()
            return finished

    def stop(self) -> None:
        """Immediate stop (tests, errors): no grace."""
        self.drain(grace_s=0.0)
