"""What a bench drives: a small backend contract, an in-process engine, a gRPC server and an
OpenAI-compatible HTTP server (nitsum-jax's own, or any other: vLLM, SGLang, ...).

A backend accepts a `BenchRequest` without blocking and returns a `Pending` the runner polls;
a finished `Pending` yields a plain record of the request (times relative to the run start,
on this process's monotonic clock). `window_stats()` reports what the backend measured
itself over the run (busy fraction, plan switches, KV moves, preemptions).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from nitsum_jax.bench.workload import BenchRequest

COMPLETED, REJECTED, FAILED = "completed", "rejected", "failed"


def make_record(request: BenchRequest, t0: float, *, sent: float, first_token: float | None,
                finish: float | None, output_tokens: int, status: str, finish_reason: str | None = None,
                error: str | None = None) -> dict:
    """One request's outcome; times are seconds since the run start `t0` (monotonic)."""
    rel = lambda t: None if t is None else t - t0  # noqa: E731
    return {"request_id": request.request_id, "priority_class": request.priority_class,
            "scheduled_s": request.arrival_s, "sent_s": rel(sent), "first_token_s": rel(first_token),
            "finish_s": rel(finish), "prompt_tokens": request.prompt_len, "output_tokens": output_tokens,
            "max_tokens": request.output_len, "status": status, "finish_reason": finish_reason, "error": error}


class Pending(Protocol):
    def poll(self) -> dict | None: ...


class Backend(Protocol):
    name: str

    def begin(self) -> None: ...  # start of a measured run (after warm-up)
    def submit(self, request: BenchRequest, t0: float) -> Pending: ...
    def window_stats(self) -> dict: ...  # measured since begin()
    def info(self) -> dict: ...
    def close(self) -> None: ...


class _Done:
    def __init__(self, record: dict):
        self.record = record

    def poll(self) -> dict:
        return self.record


# -- in-process engine ------------------------------------------------------------------
class _EnginePending:
    def __init__(self, request: BenchRequest, handle, t0: float):
        self.request, self.handle, self.t0 = request, handle, t0

    def poll(self) -> dict | None:
        try:
            completion = self.handle.result(timeout=0)
        except TimeoutError:
            return None
        h = self.handle
        reason = completion.finish_reason
        ok = reason in ("length", "stop")
        return make_record(self.request, self.t0, sent=h.request.arrival, first_token=h.first_token_time,
                           finish=h.finish_time, output_tokens=len(completion.token_ids),
                           status=COMPLETED if ok else FAILED, finish_reason=reason,
                           error=None if ok else (h.error or f"finished with {reason!r}"))


class EngineBackend:
    """An `Engine` in this process; `adaptive` installs its plan controller."""

    def __init__(self, engine, name: str, description: str = ""):
        self.engine, self.name, self.description = engine, name, description
        self._base = {}

    @classmethod
    def build(cls, name: str, *, adaptive: bool, preset: str = "tiny", checkpoint: str | None = None,
              plans: str | None = None, num_devices: int | None = None, static_plan: str | None = None,
              **engine_kwargs) -> "EngineBackend":
        """`static`: `static_plan`, else the plan set's `static` plan (one lane over every device,
        classes in priority order), no controller. `adaptive`: the whole plan set with the
        controller (a set without the static plan keeps fewer weight chunks per device)."""
        import jax

        from nitsum_jax.engine import Engine
        from nitsum_jax.plans import read_plans
        from nitsum_jax.scheduler import by_rank, default_classes

        cfg = _model_config(preset, checkpoint)
        n = num_devices or jax.device_count()
        tiers = tuple(c.name for c in by_rank(engine_kwargs.get("classes") or default_classes()))
        plan_set = read_plans(plans, n, cfg, tiers)
        if not adaptive and static_plan is not None:
            plans = static_plan
        elif not adaptive:
            static = next((p for p in plan_set if p.name == "static"), plan_set[0])
            plans = str(static)
        engine = Engine.build(preset=preset, checkpoint=checkpoint, plans=plans, num_devices=n, adaptive=adaptive,
                              **engine_kwargs)
        description = "; ".join(str(p) for p in engine.plan_set.plans.values())  # the plans as written
        return cls(engine, name, description + (" (adaptive controller)" if adaptive else " (no controller)"))

    def begin(self) -> None:
        self.engine.reset_stats()
        stats = self.engine.stats()
        self._base = {"switches": len(stats["plan_switches"]), "kv_moves": stats["kv_moves"],
                      "preemptions": stats["preemptions"], "t0": time.monotonic()}

    def submit(self, request: BenchRequest, t0: float) -> Pending:
        from nitsum_jax.sampling import SamplingError, SamplingParams
        from nitsum_jax.scheduler import QueueFull
        from nitsum_jax.sequence import RequestError

        sent = time.monotonic()
        try:
            handle = self.engine.submit(request.prompt_input(),
                                        SamplingParams(max_tokens=request.output_len, ignore_eos=True,
                                                       **request.sampling_kwargs()),
                                        priority_class=request.priority_class, request_id=request.request_id)
        except QueueFull as error:
            return _Done(make_record(request, t0, sent=sent, first_token=None, finish=None, output_tokens=0,
                                     status=REJECTED, error=str(error)))
        except (RequestError, SamplingError, ValueError) as error:
            return _Done(make_record(request, t0, sent=sent, first_token=None, finish=None, output_tokens=0,
                                     status=FAILED, error=f"{type(error).__name__}: {error}"))
        return _EnginePending(request, handle, t0)

    def window_stats(self) -> dict:
        stats = self.engine.stats()
        t0 = self._base.get("t0", 0.0)
        switches = stats["plan_switches"][self._base.get("switches", 0):]
        return {
            "device_busy_fraction": stats.get("device_busy_fraction"),
            "lane_busy_s": stats.get("lane_busy_s"),
            "steps": stats.get("steps"),
            "chained_steps": stats.get("chained_steps"),
            "sampler_runs": stats.get("sampler_runs"),
            "plan_switches": [dict(s, time=s["time"] - t0) for s in switches],
            "kv_moves": stats["kv_moves"] - self._base.get("kv_moves", 0),
            "preemptions": stats["preemptions"] - self._base.get("preemptions", 0),
            # (seconds since begin(), plan); the plan in force at begin() comes first
            "plan_history": [(max(0.0, t - t0), plan) for t, plan in stats.get("plan_history", [])],
            "lanes": stats.get("lanes"),
            "prefix_cache": stats.get("prefix_cache"),  # hit rates since begin()
        }

    def switch_costs(self, repeats: int = 3) -> dict | None:
        """The engine's switch-cost probe after a run (None for a single-lane, single-plan set)."""
        if len(self.engine.plan_set.plans) < 2 and len(self.engine.plan_set.lanes) < 2:
            return None
        return self.engine.measure_switch_costs(repeats=repeats)

    def info(self) -> dict:
        return {"kind": "engine", "plans": self.description, "plan_names": list(self.engine.plan_set.plans),
                "classes": {c.name: {"rank": c.rank, "ttft_target_s": c.ttft_target_s,
                                     "tpot_target_s": c.tpot_target_s} for c in self.engine.classes.values()}}

    @property
    def classes(self) -> dict:
        return self.engine.classes

    def warm_up(self, classes: list[str]) -> None:
        """One short request per class, so first-dispatch costs stay out of the measured run."""
        from nitsum_jax.sampling import SamplingParams

        handles = [self.engine.submit([1, 2, 3, 4], SamplingParams(max_tokens=2, ignore_eos=True),
                                      priority_class=c, request_id=f"warmup-{c}") for c in classes]
        for h in handles:
            h.result(timeout=120)

    def close(self) -> None:
        self.engine.close()


def _model_config(preset: str, checkpoint: str | None):
    if checkpoint:
        from checkpoints_tools.store import read_config

        return read_config(checkpoint)
    from nitsum_jax.config import preset as preset_config

    return preset_config(preset)


# -- a running server over gRPC ---------------------------------------------------------
class GrpcBackend:
    """A nitsum-jax server at `target` (host:port), through the project's gRPC client. Requests
    stream on a thread pool; the server's busy fraction and plan figures are not visible here."""

    def __init__(self, target: str, name: str, *, api_key: str | None = None, max_in_flight: int = 256):
        try:
            from nitsum_jax.server import client as grpc_client
        except ImportError as error:  # e.g. the generated _proto modules are missing
            raise RuntimeError(f"--target needs the gRPC client (nitsum_jax.server.client), which is not "
                               f"available in this checkout: {error}") from None
        self._client_module = grpc_client
        self.target, self.name, self.api_key = target, name, api_key
        self.client = _open_client(grpc_client, target, api_key)
        self._pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="bench-grpc")

    def begin(self) -> None:
        self._t0, self._plan_at_begin = time.monotonic(), self._current_plan()

    def _current_plan(self) -> str | None:
        try:
            return self.client.server_info()["current_plan"] or None
        except Exception:  # informative only
            return None

    def submit(self, request: BenchRequest, t0: float) -> Pending:
        future = self._pool.submit(self._stream, request, t0)
        return _FuturePending(future)

    def _stream(self, request: BenchRequest, t0: float) -> dict:
        return _stream_via_client(self.client, request, t0)

    def window_stats(self) -> dict:
        """The server's busy figures are not visible over gRPC; the plan is sampled at both ends."""
        history = [(0.0, self._plan_at_begin)] if self._plan_at_begin else []
        end = self._current_plan()
        if end and end != self._plan_at_begin:
            history.append((time.monotonic() - self._t0, end))
        return {"device_busy_fraction": None, "plan_switches": [], "kv_moves": None, "preemptions": None,
                "plan_history": history}

    def info(self) -> dict:
        try:
            server = self.client.server_info()
        except Exception as error:  # the figures are informative; the run does not need them
            server = {"error": str(error)}
        return {"kind": "grpc", "target": self.target, "server": server}

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        close = getattr(self.client, "close", None)
        if close:
            close()


class _FuturePending:
    def __init__(self, future: Future):
        self.future = future

    def poll(self) -> dict | None:
        return self.future.result() if self.future.done() else None


def _open_client(grpc_client, target: str, api_key: str | None):
    client = grpc_client.NitsumClient(target, api_key=api_key)
    try:
        client.wait_serving(timeout=120.0)
    except TimeoutError:
        client.close()
        raise RuntimeError(f"no nitsum-jax server SERVING at {target} (waited 120 s)") from None
    return client


def _stream_via_client(client, request: BenchRequest, t0: float) -> dict:
    """One Generate call to the end. The service has no ignore_eos: an answer may stop early."""
    import grpc

    from nitsum_jax.server.client import GenerateError

    to_monotonic = time.monotonic() - time.perf_counter()  # client times are perf_counter
    prompt = request.prompt_input()
    kwargs = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": prompt}
    sent = time.monotonic()
    first = None
    tokens, reason = 0, None
    try:
        for event in client.stream(**kwargs, priority=request.priority_class, max_tokens=request.output_len,
                                   request_id=request.request_id, **request.sampling_kwargs()):
            if event.token_ids and first is None:
                first = event.time + to_monotonic
            tokens += len(event.token_ids)
            reason = event.finish_reason or reason
    except GenerateError as error:
        status = REJECTED if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED else FAILED
        return make_record(request, t0, sent=sent, first_token=first, finish=time.monotonic(), output_tokens=tokens,
                           status=status, error=str(error))
    return make_record(request, t0, sent=sent, first_token=first, finish=time.monotonic(), output_tokens=tokens,
                       status=COMPLETED, finish_reason=reason)


# -- a running OpenAI-compatible server over HTTP -----------------------------------------
def open_target(target: str, name: str, *, api_key: str | None = None) -> "GrpcBackend | HttpBackend":
    """`http://host:port` (or https): an OpenAI-compatible server; `host:port`: a nitsum-jax gRPC server."""
    if target.startswith(("http://", "https://")):
        return HttpBackend(target, name, api_key=api_key)
    return GrpcBackend(target, name, api_key=api_key)


class HttpBackend:
    """An OpenAI-compatible server at `target` (http://host:port, with or without /v1), measured like
    the gRPC target: each request streams /v1/completions on a thread pool; TTFT is the first chunk
    with text, the output length the server's `usage`. The request's class goes in the
    `x-nitsum-priority` header (other servers ignore it) and `ignore_eos` in the body (a vLLM
    extension nitsum-jax shares), so outputs have the workload's lengths."""

    def __init__(self, target: str, name: str, *, api_key: str | None = None, max_in_flight: int = 256,
                 ready_timeout_s: float = 120.0):
        import httpx

        self.target, self.name = target, name
        base = target.rstrip("/")
        base = base[:-3] if base.endswith("/v1") else base
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=f"{base}/v1", headers=headers,
                                   timeout=httpx.Timeout(None, connect=10.0),
                                   limits=httpx.Limits(max_connections=max_in_flight,
                                                       max_keepalive_connections=max_in_flight))
        self.model = self._wait_model(ready_timeout_s)
        self._pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="bench-http")

    def _wait_model(self, timeout_s: float) -> str:
        """The served model's id, once /v1/models answers (the server is warm)."""
        import httpx

        give_up = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < give_up:
            try:
                reply = self.client.get("/models")
                if reply.status_code == 200 and reply.json().get("data"):
                    return reply.json()["data"][0]["id"]
                last = f"HTTP {reply.status_code}: {reply.text[:200]}"
            except httpx.HTTPError as error:
                last = str(error)
            time.sleep(0.5)
        self.client.close()
        raise RuntimeError(f"no OpenAI-compatible server ready at {self.target} (waited {timeout_s:g} s; "
                           f"GET /v1/models: {last})")

    def begin(self) -> None:
        pass

    def submit(self, request: BenchRequest, t0: float) -> Pending:
        return _FuturePending(self._pool.submit(self._stream, request, t0))

    def _stream(self, request: BenchRequest, t0: float) -> dict:
        return stream_completion(self.client, self.model, request, t0)

    def window_stats(self) -> dict:
        """An OpenAI-compatible server shows no busy or plan figures."""
        return {"device_busy_fraction": None, "plan_switches": [], "kv_moves": None, "preemptions": None,
                "plan_history": []}

    def info(self) -> dict:
        return {"kind": "http", "target": self.target, "server": {"model": self.model}}

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.client.close()


def stream_completion(client, model: str, request: BenchRequest, t0: float) -> dict:
    """One streamed /v1/completions request to its end, as a record."""
    import json

    import httpx

    body = {"model": model, "prompt": request.prompt_input(), "max_tokens": request.output_len, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True,
            "temperature": 0.0, **request.sampling_kwargs()}
    sent = time.monotonic()
    first, tokens, reason = None, 0, None
    fail = lambda status, error: make_record(request, t0, sent=sent, first_token=first,  # noqa: E731
                                             finish=time.monotonic(), output_tokens=tokens, status=status,
                                             error=error)
    try:
        with client.stream("POST", "/completions", json=body,
                           headers={"x-nitsum-priority": request.priority_class}) as reply:
            if reply.status_code != 200:
                text = reply.read().decode(errors="replace")[:300]
                return fail(REJECTED if reply.status_code == 429 else FAILED, f"HTTP {reply.status_code}: {text}")
            for line in reply.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return fail(FAILED, f"stream error: {event['error'].get('message')}")
                for choice in event.get("choices", ()):
                    if choice.get("text") and first is None:
                        first = time.monotonic()
                    reason = choice.get("finish_reason") or reason
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError as error:
        return fail(FAILED, f"{type(error).__name__}: {error}")
    return make_record(request, t0, sent=sent, first_token=first, finish=time.monotonic(), output_tokens=tokens,
                       status=COMPLETED, finish_reason=reason)
