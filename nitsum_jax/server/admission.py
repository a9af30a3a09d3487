"""Admission of a call before it costs anything: a gRPC server interceptor.

grpc runs interceptors on its polling thread as soon as a call's headers arrive, before a worker
thread is given to it and before its request message is read. Here, in that order:

- a duplicated `authorization` or `x-nitsum-priority` header is refused INVALID_ARGUMENT (a proxy
  reading the first and the server reading the last would disagree on who calls and how urgently);
- a `nitsum.v1.Serving` call with a missing or unknown key is refused UNAUTHENTICATED;
- a call beyond its budget is refused RESOURCE_EXHAUSTED: the Serving calls of one tenant (its
  `max_concurrent_calls`, default half the Serving slots), all Serving calls (the worker threads
  less a reserve), and health + reflection calls (the reserve: they always find a thread);
- an admitted call that sends no request message within `message_timeout_s` is cancelled, so a
  call that stalls after its headers holds its slot for a bounded time.

A refusal answers from a request-streaming handler that never reads the message, so it holds a
worker thread only for as long as it takes to send the status. Admitted unary-request handlers are
served request-streaming too: the slot is released by a callback registered before the message is
awaited, which runs however the call ends (a stalled call that the client cancels included).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Callable

import grpc

from nitsum_jax.server.tenants import ANONYMOUS, AccessError, Tenants

PRIORITY_METADATA = "x-nitsum-priority"
SINGLE_VALUED = ("authorization", PRIORITY_METADATA)


class Budget:
    """Calls in flight per key, each key with its own limit."""

    def __init__(self):
        self._lock = threading.Lock()
        self.held: dict[str, int] = {}

    def take(self, key: str, limit: int) -> bool:
        with self._lock:
            n = self.held.get(key, 0)
            if n >= limit:
                return False
            self.held[key] = n + 1
            return True

    def give_back(self, key: str) -> None:
        with self._lock:
            n = self.held[key] - 1
            if n:
                self.held[key] = n
            else:
                del self.held[key]


class Watchdog:
    """One thread that cancels calls whose request message has not arrived by their deadline."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []  # (deadline, token), earliest first
        self._armed: dict[int, grpc.ServicerContext] = {}
        self._tokens = itertools.count()
        threading.Thread(target=self._run, name="nitsum-message-watchdog", daemon=True).start()

    def arm(self, context: grpc.ServicerContext) -> int:
        with self._cond:
            token = next(self._tokens)
            self._armed[token] = context
            heapq.heappush(self._heap, (time.monotonic() + self.timeout_s, token))
            self._cond.notify()
            return token

    def disarm(self, token: int) -> None:
        with self._cond:
            self._armed.pop(token, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                deadline, token = self._heap[0]
                wait_s = deadline - time.monotonic()
                if wait_s > 0:
                    self._cond.wait(wait_s)
                    continue
                heapq.heappop(self._heap)
                context = self._armed.pop(token, None)
            if context is not None:
                context.cancel()  # the blocked read of the message ends; the call's callbacks run


def _refusal(code: str, message: str) -> grpc.RpcMethodHandler:
    def refuse(_requests, context):
        context.abort(getattr(grpc.StatusCode, code), message)
    return grpc.stream_unary_rpc_method_handler(refuse)


def _duplicate(metadata) -> str | None:
    keys = [key for key, _ in metadata or ()]
    return next((k for k in SINGLE_VALUED if keys.count(k) > 1), None)


class Admission(grpc.ServerInterceptor):
    """See the module docstring. `serving_slots` bounds all Serving calls, `service_slots` health
    and reflection; `refused(priority, code)` counts a Serving refusal in the server's metrics."""

    def __init__(self, tenants: Tenants, serving_service: str, *, serving_slots: int, service_slots: int,
                 message_timeout_s: float = 10.0, refused: Callable[[str | None, str], None] = lambda p, c: None):
        self.tenants, self.serving_prefix = tenants, f"/{serving_service}/"
        self.serving_slots, self.service_slots = serving_slots, service_slots
        self.default_tenant_slots = max(1, serving_slots // 2)
        self.refused = refused
        self.calls, self.tenant_calls = Budget(), Budget()
        self.watchdog = Watchdog(message_timeout_s)

    def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        if handler is None:
            return None  # UNIMPLEMENTED, answered by grpc without a worker thread
        metadata = details.invocation_metadata or ()
        if not details.method.startswith(self.serving_prefix):
            if not self.calls.take("service", self.service_slots):
                return _refusal("RESOURCE_EXHAUSTED", f"{self.service_slots} health/reflection calls in flight, "
                                                      "the server's bound: retry")
            return self._guarded(handler, lambda: self.calls.give_back("service"))
        priority = next((v for k, v in metadata if k == PRIORITY_METADATA), None)
        try:
            self._check(metadata)
            tenant = self.tenants.authenticate(next((v for k, v in metadata if k == "authorization"), None))
        except AccessError as e:
            self.refused(priority, e.code)
            return _refusal(e.code, str(e))
        name = tenant.name if tenant is not None else ANONYMOUS
        limit = (tenant.max_concurrent_calls if tenant is not None else None) or self.default_tenant_slots
        if not self.tenant_calls.take(name, limit):
            self.refused(priority, "RESOURCE_EXHAUSTED")
            return _refusal("RESOURCE_EXHAUSTED", f"tenant {name!r} has {limit} calls in flight, its bound "
                                                  "(max_concurrent_calls): retry when one ends")
        if not self.calls.take("serving", self.serving_slots):
            self.tenant_calls.give_back(name)
            self.refused(priority, "RESOURCE_EXHAUSTED")
            return _refusal("RESOURCE_EXHAUSTED", f"the server has {self.serving_slots} calls in flight, its "
                                                  "bound (--max-workers): retry")

        def release():
            self.calls.give_back("serving")
            self.tenant_calls.give_back(name)
        return self._guarded(handler, release)

    @staticmethod
    def _check(metadata) -> None:
        duplicate = _duplicate(metadata)
        if duplicate is not None:
            raise AccessError("INVALID_ARGUMENT", f"metadata {duplicate!r} given more than once: send it once")

    def _guarded(self, handler: grpc.RpcMethodHandler, release: Callable[[], None]) -> grpc.RpcMethodHandler:
        """`handler` served request-streaming, `release` run when the call ends however it ends."""
        def start(context) -> None:
            once = threading.Lock()

            def release_once():
                if once.acquire(blocking=False):
                    release()
            if not context.add_callback(release_once):
                release_once()

        if handler.request_streaming:
            behavior = handler.stream_stream or handler.stream_unary

            def streaming(requests, context):
                start(context)
                return behavior(requests, context)
            make = (grpc.stream_stream_rpc_method_handler if handler.response_streaming
                    else grpc.stream_unary_rpc_method_handler)
            return make(streaming, handler.request_deserializer, handler.response_serializer)

        def first_message(requests, context):
            token = self.watchdog.arm(context)
            try:
                return next(requests)
            except StopIteration:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call ended without a request message")
            finally:
                self.watchdog.disarm(token)

        if handler.response_streaming:
            def responses(requests, context):
                yield from handler.unary_stream(first_message(requests, context), context)

            def unary_stream(requests, context):
                start(context)  # now, not when grpc first advances the generator
                return responses(requests, context)
            return grpc.stream_stream_rpc_method_handler(unary_stream, handler.request_deserializer,
                                                         handler.response_serializer)

        def unary_unary(requests, context):
            start(context)
            return handler.unary_unary(first_message(requests, context), context)
        return grpc.stream_unary_rpc_method_handler(unary_unary, handler.request_deserializer,
                                                    handler.response_serializer)
