"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

The messages are the gRPC path's own (the request checks of `sequence.validate_prompt` and
`SamplingParams.validate`, the tenants' refusals), so both APIs name the same field, value and
limit; only the status differs in kind. The openai client turns each status into its exception
type (400 BadRequestError, 401 AuthenticationError, 403 PermissionDeniedError, 404
NotFoundError, 413 / 503 APIStatusError, 429 RateLimitError).
"""

from __future__ import annotations

import json
import math

from fastapi.responses import JSONResponse

# grpc.StatusCode name -> (HTTP status, OpenAI error type)
_BY_GRPC_CODE = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "invalid_request_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "UNAVAILABLE": (503, "service_unavailable_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
    "CANCELLED": (499, "cancelled_error"),
    "INTERNAL": (500, "server_error"),
}
# The first word of a request check's message is the field it refuses; the HTTP body spells a few
# of them differently.
_FIELDS = {"max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stop_token_ids", "prompt"}
_HTTP_FIELD = {"prompt_token_ids": "prompt", "stop_token_ids": "stop"}


class ApiError(Exception):
    """A refusal on its way to the client; `code` is the grpc.StatusCode name the request is counted
    under in the metrics (the same for both APIs)."""

    def __init__(self, code: str, message: str, *, param: str | None = None, error_code: str | None = None,
                 retry_after_s: float | None = None, status: int | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param
        self.status, self.type = _BY_GRPC_CODE.get(code, (500, "server_error"))
        if status is not None:
            self.status = status
        self.error_code, self.retry_after_s = error_code, retry_after_s

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.error_code}}

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))  # whole seconds (RFC 9110)
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    def sse(self) -> str:
        """The error as a last server-sent event (after a stream's 200 has gone out)."""
        return f"data: {json.dumps(self.body())}\n\n"


def invalid(message: str, param: str | None = None, error_code: str | None = None) -> ApiError:
    return ApiError("INVALID_ARGUMENT", message, param=param, error_code=error_code)


def field_of(message: str) -> str | None:
    """The request field a check's message names first ("top_p must be in (0, 1], got 2.0" -> top_p)."""
    words = message.replace("(", " ").split()
    if words[:2] == ["prompt", "tokens"]:
        return "max_tokens"  # "prompt tokens (n) + max_tokens (m) = ... exceeds the context limit"
    first = words[0] if words else ""
    return _HTTP_FIELD.get(first, first) if first in _FIELDS | set(_HTTP_FIELD) else None


def from_validation(errors: list[dict]) -> ApiError:
    """pydantic's errors for a body -> one 400 naming the first bad field, its value and what it must be."""
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    # a union's members add their type to the location ("priority.str"): the field is what came before
    loc = [p for p in loc if p not in ("str", "int", "float", "bool", "list[int]", "list[str]", "list[TextPart]")]
    param = ".".join(loc) or None
    if e.get("type") == "json_invalid":
        return invalid(f"request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}",
                       error_code="json_invalid")
    if e.get("type") == "extra_forbidden":
        return invalid(f"unknown field {param!r}: this server does not read it (see docs/http.md for the fields "
                       f"it accepts)", param, "unknown_field")
    if e.get("type") == "missing":
        return invalid(f"field {param!r} is required", param, "missing_field")
    value = json.dumps(e.get("input"))[:80] if "input" in e else "?"
    return invalid(f"{param}: {e.get('msg', 'invalid value')}, got {value}", param, e.get("type"))
