"""A small Python client of the nitsum.v1.Serving service (used by `nitsum-jax client` and the bench).

    client = NitsumClient("localhost:50051", api_key="...")
    for event in client.stream("Hello", priority="high", max_tokens=16):
        print(event.token_ids, event.text, event.time)       # one event per token, then a final one
    result = client.generate("Hello", max_tokens=16)          # collected; raises GenerateError
    print(result.token_ids, result.finish_reason, result.ttft_s)

A call that ends with a non-OK status raises `GenerateError` (its `.code` is a grpc.StatusCode,
`.details` the server's message) from the iteration.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator, Sequence

import grpc

from nitsum_jax.server._proto import serving_pb2 as pb
from nitsum_jax.server._proto import serving_pb2_grpc as pb_grpc

PRIORITY_METADATA = "x-nitsum-priority"


class GenerateError(Exception):
    """A call ended with a non-OK gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


@dataclasses.dataclass(frozen=True)
class StreamEvent:
    token_ids: list[int]  # the tokens this message carries (empty in the final message)
    text: str  # the text they add
    time: float  # time.perf_counter() when the message arrived
    finish_reason: str = ""  # set in the final message only: "stop" or "length"
    usage: tuple[int, int] | None = None  # (prompt_tokens, completion_tokens), final message only
    served_by: tuple[str, str, int] | None = None  # (plan, lane, tp)


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    served_by: tuple[str, str, int] | None
    start_time: float  # perf_counter when the call was made
    token_times: list[float]  # perf_counter when each token arrived

    @property
    def ttft_s(self) -> float | None:
        return self.token_times[0] - self.start_time if self.token_times else None


class GenerateCall:
    """A Generate call in progress: iterate for `StreamEvent`s; `cancel()` stops it on the server."""

    def __init__(self, call, start_time: float):
        self._call, self.start_time = call, start_time

    def __iter__(self) -> Iterator[StreamEvent]:
        try:
            for msg in self._call:
                yield StreamEvent(list(msg.token_ids), msg.text, time.perf_counter(), msg.finish_reason,
                                  (msg.usage.prompt_tokens, msg.usage.completion_tokens) if msg.HasField("usage")
                                  else None,
                                  (msg.served_by.plan, msg.served_by.lane, msg.served_by.tp)
                                  if msg.HasField("served_by") else None)
        except grpc.RpcError as e:
            raise GenerateError(e.code(), e.details()) from None

    def cancel(self) -> None:
        self._call.cancel()


class NitsumClient:
    def __init__(self, target: str, *, api_key: str | None = None, tls_ca: bytes | str | None = None,
                 tls: bool = False, server_name: str | None = None):
        """`tls_ca`: PEM bytes or a file path of the CA that signed the server's certificate
        (`tls=True` with no CA uses the system roots); `server_name` overrides the name checked."""
        if tls or tls_ca is not None:
            if isinstance(tls_ca, str):
                with open(tls_ca, "rb") as f:
                    tls_ca = f.read()
            options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(tls_ca), options=options)
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.ServingStub(self.channel)
        self._auth = [("authorization", f"Bearer {api_key}")] if api_key else []

    def _metadata(self, priority: str | None) -> list[tuple[str, str]]:
        return self._auth + ([(PRIORITY_METADATA, priority)] if priority else [])

    def stream(self, prompt: str | None = None, *, prompt_token_ids: Sequence[int] | None = None,
               priority: str | None = None, max_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
               request_id: str = "", timeout: float | None = None) -> GenerateCall:
        """Start a Generate call; `timeout` (seconds) becomes the call's deadline."""
        sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                     stop=list(stop), stop_token_ids=list(stop_token_ids))
        if seed is not None:
            sampling.seed = seed
        request = pb.GenerateRequest(request_id=request_id, prompt=prompt or "",
                                     prompt_token_ids=list(prompt_token_ids or ()), sampling=sampling)
        start = time.perf_counter()
        return GenerateCall(self.stub.Generate(request, timeout=timeout, metadata=self._metadata(priority)), start)

    def generate(self, prompt: str | None = None, **kwargs) -> GenerateResult:
        """Run a call to the end; raises `GenerateError` on a non-OK status."""
        return self.collect(self.stream(prompt, **kwargs))

    @staticmethod
    def collect(call: GenerateCall) -> GenerateResult:
        """Run a started call to the end; raises `GenerateError` on a non-OK status."""
        ids, text, times, reason, prompt_tokens, served = [], [], [], "", 0, None
        for event in call:
            ids += event.token_ids
            text.append(event.text)
            times += [event.time] * len(event.token_ids)
            served = event.served_by or served
            if event.finish_reason:
                reason, prompt_tokens = event.finish_reason, event.usage[0] if event.usage else 0
        return GenerateResult(ids, "".join(text), reason, prompt_tokens, served, call.start_time, times)

    def server_info(self, timeout: float | None = 10.0) -> dict:
        try:
            info = self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=timeout, metadata=self._auth)
        except grpc.RpcError as e:
            raise GenerateError(e.code(), e.details()) from None
        return {"model": info.model, "classes": list(info.classes), "plans": list(info.plans),
                "current_plan": info.current_plan,
                "lanes": [{"name": lane.name, "devices": list(lane.devices), "tp": lane.tp,
                           "kv_pages_used": lane.kv_pages_used, "kv_pages_total": lane.kv_pages_total,
                           "in_plan": lane.in_plan, "healthy": lane.healthy}
                          for lane in info.lanes]}

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """"SERVING" / "NOT_SERVING" from grpc.health.v1; raises `GenerateError` if the server cannot
        be reached (UNAVAILABLE) or does not answer in time."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            reply = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                   timeout=timeout)
        except grpc.RpcError as e:
            raise GenerateError(e.code(), e.details()) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_serving(self, timeout: float = 300.0) -> None:
        """Block until health says SERVING (the engine is built and warm)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health() == "SERVING":
                    return
            except GenerateError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not SERVING after {timeout}s")
            time.sleep(0.2)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "NitsumClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
