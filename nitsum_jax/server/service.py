"""The `nitsum.v1.Serving` service: one Generate call = one engine request, streamed back.

A call passes, in order: the gate (UNAVAILABLE before the engine is warm and while draining),
the admission interceptor (duplicate headers, the key, concurrency budgets: `admission.py`),
the key again (UNAUTHENTICATED), the priority class from `x-nitsum-priority` (INVALID_ARGUMENT if
unknown, PERMISSION_DENIED if the tenant may not claim it), the request's own checks
(INVALID_ARGUMENT naming field, value and limit), the tenant's rate and the class queue
(RESOURCE_EXHAUSTED). The client's deadline becomes the scheduler's deadline; a client cancel
or disconnect cancels the engine request, which leaves at the next step and frees its pages.

The stream: one message per generated token (`token_ids`, the `text` it adds, `served_by`),
then a last message with `finish_reason` ("stop" or "length"), `usage` and any text held back
(text that could still turn out to be part of a stop string). A request that ends otherwise
ends with a status: DEADLINE_EXCEEDED, CANCELLED, UNAVAILABLE (cut off by a drain whose grace
period ran out: retry elsewhere) or INTERNAL.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Iterator

import grpc

from nitsum_jax.sampling import SamplingError, SamplingParams
from nitsum_jax.scheduler import QueueFull
from nitsum_jax.sequence import RequestError, validate_prompt
from nitsum_jax.server._proto import serving_pb2 as pb
from nitsum_jax.server._proto import serving_pb2_grpc as pb_grpc
from nitsum_jax.server.engine_view import lanes_info, plan_names, served_by
from nitsum_jax.server.metrics import ServerMetrics
from nitsum_jax.server.tenants import ANONYMOUS, AccessError, Tenants
from nitsum_jax.usage import UsageLedger, refused_row, row_from_handle

PRIORITY_METADATA = "x-nitsum-priority"
DEFAULT_MAX_TOKENS = 16  # when the request leaves sampling.max_tokens at 0 (unset in proto3)
_NO_DEADLINE_S = 1e7  # grpc reports a far-future deadline when the client set none
UNKNOWN_CLASS_LABEL = "unknown"  # metrics label of a call naming no known class (labels stay bounded)
MAX_REQUEST_ID_CHARS = 128


class UndecodableRequest:
    """Stands for a request message that did not parse (e.g. a string field that is not UTF-8):
    the service answers it INVALID_ARGUMENT, where grpc's own deserializer failure would be an
    INTERNAL "Exception deserializing request!"."""

    def __init__(self, message_type, error: Exception):
        self.message_type, self.error = message_type, error

    def __str__(self) -> str:
        return f"request is not a valid {self.message_type.DESCRIPTOR.full_name}: {self.error}"


def lenient_deserializer(message_type):
    """A request deserializer that hands an `UndecodableRequest` to the service instead of raising."""
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError (and friends) on malformed bytes
            return UndecodableRequest(message_type, e)
    return parse


class Gate:
    """Admits calls only while the engine is warm and not draining; counts calls in flight."""

    def __init__(self):
        self.engine = None  # set once the engine is built and warm
        self.draining = False
        self.in_flight = 0
        self.idle = threading.Condition()
        self.handles: set = set()  # engine requests of calls in flight (cancelled when a drain times out)
        self.cut_off: set = set()  # those a drain cancelled: their calls end UNAVAILABLE, not CANCELLED

    def enter(self):
        with self.idle:
            if self.draining:
                raise AccessError("UNAVAILABLE", "server is draining (shutting down): retry on another replica")
            if self.engine is None:
                raise AccessError("UNAVAILABLE", "server is starting: the engine is still compiling its plans")
            self.in_flight += 1
            return self.engine

    def leave(self, handle=None) -> None:
        with self.idle:
            self.in_flight -= 1
            self.handles.discard(handle)
            self.cut_off.discard(handle)
            self.idle.notify_all()

    def cut_off_all(self) -> list:
        """Mark every request in flight as cut off by the drain and return their handles."""
        with self.idle:
            self.cut_off |= self.handles
            return list(self.handles)

    def wait_idle(self, timeout: float) -> bool:
        with self.idle:
            return self.idle.wait_for(lambda: self.in_flight == 0, timeout)


def sampling_from_proto(s: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(max_tokens=s.max_tokens or DEFAULT_MAX_TOKENS, temperature=s.temperature,
                          top_k=s.top_k, top_p=s.top_p or 1.0, seed=s.seed if s.HasField("seed") else None,
                          stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids))


def request_cost(prompt_len: int, sampling: SamplingParams) -> int:
    """Tokens a request is charged against its tenant's rate: prompt, max_tokens, and its stop
    rules (each is checked at every generated token: one token per stop id and per character)."""
    return prompt_len + sampling.max_tokens + len(sampling.stop_token_ids) + sum(len(s) for s in sampling.stop)


def check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise RequestError(f"request_id has {len(request_id)} characters, more than the limit {MAX_REQUEST_ID_CHARS}")


def prompt_ids(request: pb.GenerateRequest, engine) -> list[int]:
    if request.prompt and request.prompt_token_ids:
        raise RequestError(f"give either prompt ({len(request.prompt)} characters) or prompt_token_ids "
                           f"({len(request.prompt_token_ids)} ids), not both")
    if request.prompt:
        if engine.tokenizer is None:
            raise RequestError("prompt is text but the model has no tokenizer: send prompt_token_ids")
        return list(engine.tokenizer.encode(request.prompt))
    return list(request.prompt_token_ids)


class TextStream:
    """Text deltas of a growing token list: holds back an unfinished UTF-8 character and the
    last len(longest stop)-1 characters, which a stop string could still cut off. Decodes each
    new token once (`TextTokenizer.stream`), not the whole list again."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.emitted = ""
        self.decoder = tokenizer.stream() if tokenizer is not None else None
        self.fed = 0
        self.holdback = max((len(s) for s in stop), default=1) - 1

    def delta(self, token_ids: list[int]) -> str:
        if self.decoder is None:
            return ""
        for token in token_ids[self.fed:]:
            self.decoder.add(token)
        self.fed = len(token_ids)
        safe = self.decoder.text
        return self._advance(safe[:max(0, len(safe) - self.holdback)])

    def rest(self, final_text: str | None) -> str:
        return self._advance(final_text or "")

    def _advance(self, text: str) -> str:
        if not text.startswith(self.emitted) or len(text) <= len(self.emitted):
            return ""
        out, self.emitted = text[len(self.emitted):], text
        return out


def _abort(context: grpc.ServicerContext, code: str, message: str):
    context.abort(getattr(grpc.StatusCode, code), message)


class ServingService(pb_grpc.ServingServicer):
    def __init__(self, gate: Gate, tenants: Tenants, metrics: ServerMetrics, *, default_class: str = "low",
                 model_name: str = "", usage: UsageLedger | None = None):
        """`usage`: the ledger that gets one row per call (None: no ledger)."""
        self.gate, self.tenants, self.metrics = gate, tenants, metrics
        self.default_class, self.model_name = default_class, model_name
        self.usage = usage
        self._ids = itertools.count(1)

    def refused(self, priority_class: str | None, code: str) -> None:
        """Count a Generate call refused before it reached the service (by the admission interceptor)."""
        call = _Call(self, priority_class or self.default_class)
        self.metrics.requests.labels(call.class_label, code).inc()

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        metadata = dict(context.invocation_metadata())
        call = _Call(self, metadata.get(PRIORITY_METADATA) or self.default_class)
        call.request_id = getattr(request, "request_id", "")
        if isinstance(request, UndecodableRequest):
            self.metrics.requests.labels(call.class_label, "INVALID_ARGUMENT").inc()
            _abort(context, "INVALID_ARGUMENT", str(request))
        try:
            engine = self.gate.enter()
        except AccessError as e:
            self.metrics.requests.labels(call.class_label, e.code).inc()
            _abort(context, e.code, str(e))
        self.metrics.in_flight.inc()
        # Runs when the call ends however it ends; a client cancel, disconnect or deadline leaves
        # the response generator suspended (grpc never resumes it), so this is what frees the request.
        if not context.add_callback(lambda: call.terminated(context)):
            call.terminated(context)
        try:
            call.tenant = self.tenants.authenticate(metadata.get("authorization"))
            call.authenticated = True
            if call.priority_class not in engine.classes:
                raise RequestError(f"{PRIORITY_METADATA} {call.priority_class!r} is not a priority class; "
                                   f"known: {sorted(engine.classes)}")
            self.tenants.authorize(call.tenant, call.priority_class)
            check_request_id(request.request_id)
            sampling = sampling_from_proto(request.sampling)
            sampling.validate(engine.cfg.vocab_size)  # bounded stop rules before any text is tokenized
            ids = prompt_ids(request, engine)
            validate_prompt(ids, sampling, engine.cfg.vocab_size, engine.grid.max_seq_len)
            if call.tenant is not None:
                call.reserved, call.max_tokens = request_cost(len(ids), sampling), sampling.max_tokens
                call.tenant.charge(call.reserved)
            remaining = context.time_remaining()
            try:
                handle = None if call.settled else engine.submit(
                    ids, sampling, priority_class=call.priority_class,
                    deadline_s=remaining if remaining is not None and remaining < _NO_DEADLINE_S else None,
                    request_id=f"{request.request_id}@{next(self._ids)}" if request.request_id else None,
                    cache_salt=call.tenant.cache_salt if call.tenant is not None else None)
            except QueueFull as e:
                raise AccessError("RESOURCE_EXHAUSTED", str(e)) from None
        except AccessError as e:
            call.settle(e.code)
            _abort(context, e.code, str(e))
        except (RequestError, SamplingError, ValueError) as e:
            call.settle("INVALID_ARGUMENT")
            _abort(context, "INVALID_ARGUMENT", str(e))
        if not call.attach(handle):
            return  # the call ended (client cancel, deadline) while it was being admitted
        code, message = yield from self._stream(engine, call, sampling)
        if code != "OK":
            _abort(context, code, message)

    def _stream(self, engine, call: "_Call", sampling: SamplingParams) -> Iterator[pb.GenerateResponse]:
        """Yields the responses; settles the call and returns the status (code name, message) it ends with."""
        handle = call.handle
        text = TextStream(engine.tokenizer, sampling.stop)
        generated: list[int] = []
        for token in handle:
            generated.append(token)
            yield pb.GenerateResponse(token_ids=[token], text=text.delta(generated),
                                      served_by=_served_by(engine, handle))
        reason = handle.request.finish_reason
        n = len(generated)
        if reason in ("stop", "length"):
            done = handle.result(timeout=30)
            call.settle("OK")
            yield pb.GenerateResponse(text=text.rest(done.text), finish_reason=reason,
                                      usage=pb.Usage(prompt_tokens=done.prompt_tokens,
                                                     completion_tokens=len(done.token_ids),
                                                     cached_tokens=getattr(handle, "cached_tokens", 0)),
                                      served_by=_served_by(engine, handle))
            return "OK", ""
        if reason == "deadline":
            code, message = "DEADLINE_EXCEEDED", (f"deadline passed after {n} of max_tokens {sampling.max_tokens} "
                                                  f"tokens; request stopped and its KV pages freed")
        elif reason == "cancelled" and handle in self.gate.cut_off:
            code, message = "UNAVAILABLE", (f"server shutting down: its drain grace period ran out after {n} "
                                            f"tokens of this request; retry on another replica")
        elif reason == "cancelled":  # the client's own cancel
            code, message = "CANCELLED", f"request cancelled after {n} tokens"
        else:
            code, message = "INTERNAL", f"request failed after {n} tokens: {handle.error or reason}"
        call.settle(code)
        return code, message

    def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext) -> pb.ServerInfo:
        if isinstance(request, UndecodableRequest):
            _abort(context, "INVALID_ARGUMENT", str(request))
        try:
            engine = self.gate.enter()
        except AccessError as e:
            _abort(context, e.code, str(e))
        try:
            try:
                self.tenants.authenticate(dict(context.invocation_metadata()).get("authorization"))
            except AccessError as e:
                _abort(context, e.code, str(e))
            classes = sorted(engine.classes, key=lambda c: engine.classes[c].rank)
            lanes = [pb.LaneInfo(name=lane["name"], devices=lane["devices"], tp=lane["tp"],
                                 kv_pages_used=lane["kv_pages_used"], kv_pages_total=lane["kv_pages_total"],
                                 in_plan=lane.get("in_plan", True), healthy=lane.get("healthy", True))
                     for lane in lanes_info(engine)]
            return pb.ServerInfo(model=self.model_name, classes=classes, plans=plan_names(engine),
                                 current_plan=engine.plan_name, lanes=lanes)
        finally:
            self.gate.leave()


class _Call:
    """One Generate call's bookkeeping, settled exactly once: metrics, the tenant's unused
    tokens refunded, and the gate told the call is over."""

    def __init__(self, service: ServingService, priority_class: str, api: str = "grpc"):
        """`service`: what admitted the call (the gRPC service or the HTTP admission); `api`: its
        API as the usage ledger records it."""
        self.service, self.priority_class, self.api = service, priority_class, api
        self.tenant = None
        self.handle = None
        self.reserved = 0  # tokens charged to the tenant
        self.max_tokens = 0  # of them, the tokens to generate: what is not generated is refunded
        self.arrival = time.monotonic()
        self.authenticated = False  # a refused call is recorded only once its tenant is known
        self.request_id = ""
        self._settled = False
        self._lock = threading.Lock()

    @property
    def settled(self) -> bool:
        return self._settled

    def attach(self, handle) -> bool:
        """Record the engine request of this call; False (and the request cancelled) if the call
        has already ended: a call cancelled in the instant after it was sent leaves nothing behind."""
        if handle is None:
            return False
        with self._lock:
            if not self._settled:
                self.handle = handle
                with self.service.gate.idle:
                    self.service.gate.handles.add(handle)
                return True
        handle.cancel()
        return False

    @property
    def class_label(self) -> str:
        """The class as a metrics label: a name the client made up becomes "unknown", so random
        x-nitsum-priority values cannot grow the registry without bound."""
        engine = self.service.gate.engine
        known = engine.classes if engine is not None else (self.service.default_class,)
        return self.priority_class if self.priority_class in known else UNKNOWN_CLASS_LABEL

    def terminated(self, context: grpc.ServicerContext) -> None:
        """The RPC ended (also: the client cancelled, went away or its deadline passed)."""
        if self.handle is not None:
            self.handle.cancel()  # no-op for a finished request; else it leaves at the next step
        remaining = context.time_remaining()
        self.settle("DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED")

    def settle(self, code: str) -> None:
        with self._lock:
            if self._settled:
                return
            self._settled = True
        metrics, h = self.service.metrics, self.handle
        if h is not None:
            n = len(h.seq.output_ids)
            end = h.finish_time or time.monotonic()
            first = h.first_token_time
            metrics.observe(self.class_label, self.tenant.name if self.tenant else ANONYMOUS,
                            prompt_tokens=len(h.seq.prompt_ids), completion_tokens=n,
                            ttft_s=None if first is None else first - h.request.arrival,
                            tpot_s=(end - first) / (n - 1) if first is not None and n > 1 else None,
                            e2e_s=end - h.request.arrival if code == "OK" else None)
            if self.tenant is not None:
                self.tenant.refund(self.max_tokens - n)
        elif self.tenant is not None:
            self.tenant.refund(self.reserved)
        metrics.requests.labels(self.class_label, code).inc()
        metrics.in_flight.dec()
        self._record_usage(code)
        self.service.gate.leave(h)

    def _record_usage(self, code: str) -> None:
        """The call's ledger row: every call that reached the engine, and calls refused after
        authentication that named a known tier (queue full, rate, a malformed request)."""
        ledger, engine = self.service.usage, self.service.gate.engine
        if ledger is None or engine is None or self.priority_class not in engine.classes:
            return
        tier, tenant = engine.classes[self.priority_class], self.tenant.name if self.tenant else ANONYMOUS
        if self.handle is not None:
            row = row_from_handle(self.handle, tier, tenant=tenant, api=self.api, status=code,
                                  wall_offset=ledger.wall_offset,
                                  cached_tokens=getattr(self.handle, "cached_tokens", 0))
        elif self.authenticated:
            row = refused_row(f"{self.request_id or 'call'}@refused-{next(self.service._ids)}", tier,
                              tenant=tenant, api=self.api, status=code, arrival=self.arrival,
                              wall_offset=ledger.wall_offset)
        else:
            return
        ledger.record(row)


def _served_by(engine, handle) -> pb.ServedBy | None:
    value = served_by(engine, handle)
    return None if value is None else pb.ServedBy(plan=value[0], lane=value[1], tp=value[2])
