"""The FastAPI application: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

FastAPI (over Starlette) because the bodies are declared once as pydantic models, which both
validate them (a 400 naming the field) and publish them (/openapi.json, /docs), the way vLLM's
OpenAI server does; uvicorn runs it.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nitsum_jax.server.engine_view import lanes_info
from nitsum_jax.server.http.admission import Admission, wants_logprobs
from nitsum_jax.server.http.errors import ApiError, from_validation
from nitsum_jax.server.http.flags import DEFAULT_MAX_BODY_BYTES
from nitsum_jax.server.http.gateway_metrics import SloRecord
from nitsum_jax.server.http.respond import Answer
from nitsum_jax.server.http.schemas import ChatCompletionRequest, CompletionRequest
from nitsum_jax.server.http.shapes import ChatShape, CompletionShape



TIER_HEADER = "x-nitsum-tier"


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is answered 413 before it is parsed, by its
    Content-Length, or as it streams in when chunked (FastAPI's handler for HTTPException answers
    that one)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large(int(declared), self.max_bytes).response()(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, too_large(seen, self.max_bytes).message)
            return message

        await self.app(scope, counted, send)


def too_large(size: int, limit: int) -> ApiError:
    return ApiError("INVALID_ARGUMENT", f"request body is {size} bytes or more, over the limit of {limit} bytes "
                                        f"(--http-max-body-bytes)", status=413, error_code="body_too_large")


def create_app(admission: Admission, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> ASGIApp:
    app = FastAPI(title="nitsum-jax OpenAI-compatible API", docs_url="/docs", redoc_url=None)
    started = int(time.time())
    slo = SloRecord(admission.metrics.registry)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(_request, exc: RequestValidationError):
        return from_validation(list(exc.errors())).response()

    @app.exception_handler(HTTPException)
    async def _http_error(_request, exc: HTTPException):  # unknown paths, wrong methods, 413 while streaming in
        code = {404: "NOT_FOUND", 405: "INVALID_ARGUMENT", 413: "INVALID_ARGUMENT"}.get(exc.status_code, "INTERNAL")
        return ApiError(code, str(exc.detail), status=exc.status_code,
                        error_code="body_too_large" if exc.status_code == 413 else None).response()

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return exc.response()

    async def serve(body, request: Request, shape):
        headers = {k.lower(): v for k, v in request.headers.items()}
        call, targets = admission.admit(body, headers)
        engine = admission.gate.engine
        options = body.stream_options
        answer = Answer(call, engine, shape, logprobs=wants_logprobs(body),
                        include_usage=options is not None and options.include_usage,
                        continuous_usage=options is not None and options.continuous_usage_stats,
                        on_end=lambda handle, code: slo.observe(engine, handle, code, targets))
        tier = {TIER_HEADER: call.priority_class}  # the tier the request was admitted under
        if body.stream:
            return StreamingResponse(answer.events(request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", **tier})
        return JSONResponse(await answer.body(request), headers=tier)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await serve(body, request, CompletionShape(admission.model_name))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await serve(body, request, ChatShape(admission.model_name))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": admission.model_name, "object": "model", "created": started,
                                            "owned_by": "nitsum-jax"}]}

    @app.get("/health")
    async def health():
        ok, reason = serving_state(admission.gate)
        return JSONResponse({"status": "ok" if ok else "unavailable", "reason": reason}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(admission.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return BodyLimit(app, max_body_bytes)


def serving_state(gate) -> tuple[bool, str]:
    """(serving?, why not): warm, not draining, and some lane of the current plan healthy."""
    if gate.draining:
        return False, "draining: shutting down"
    engine = gate.engine
    if engine is None:
        return False, "starting: the engine is still compiling its plans"
    if not any(lane.get("healthy", True) and lane.get("in_plan", True) for lane in lanes_info(engine)):
        return False, "no healthy lane in the current plan"
    return True, "serving"
