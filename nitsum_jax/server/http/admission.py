"""From an HTTP body to an engine request: the same checks, in the same order, as the gRPC path.

The gate (503 while starting or draining), the key (401), the tier (400 unknown, 403 not the
tenant's), the body's own checks (400 naming field, value and limit), the tenant's token rate and
the tier's queue (429 with Retry-After). The bookkeeping of a request (metrics, the tenant's
unused tokens refunded, the gate told it ended) is the gRPC service's `_Call`, so a request
counts the same whichever API it came through.
"""

from __future__ import annotations

import itertools
from typing import Mapping

from nitsum_jax.chat import ChatTemplate, ChatTemplateError
from nitsum_jax.sampling import SamplingError, SamplingParams
from nitsum_jax.scheduler import QueueFull
from nitsum_jax.sequence import RequestError, validate_prompt
from nitsum_jax.server.http.errors import ApiError, field_of, invalid
from nitsum_jax.server.http.priority import resolve_tier, slo_targets
from nitsum_jax.server.http.schemas import NEUTRAL, ChatCompletionRequest, CompletionRequest
from nitsum_jax.server.service import Gate, _Call
from nitsum_jax.server.tenants import AccessError

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
QUEUE_FULL_RETRY_S = 1.0  # a full tier queue drains at the pace of steps: try again soon


class Admission:
    """Admits HTTP requests into the engine; the attributes `_Call` reads (`gate`, `metrics`,
    `default_class`) are the server's own, shared with the gRPC service."""

    def __init__(self, gate: Gate, tenants, metrics, *, default_class: str, model_name: str,
                 chat_template: ChatTemplate | None, objectives: Mapping[str, str], usage=None):
        """`usage`: the usage ledger that gets a row per request (the server's; None: none)."""
        self.gate, self.tenants, self.metrics, self.usage = gate, tenants, metrics, usage
        self.default_class, self.model_name = default_class, model_name
        self.chat_template, self.objectives = chat_template, dict(objectives)
        self._ids = itertools.count(1)

    def admit(self, body: CompletionRequest | ChatCompletionRequest, headers: Mapping[str, str]) -> tuple[_Call, dict]:
        """Submit the request; (its call, with `handle` set; its SLO targets). Raises ApiError."""
        call = _Call(self, self.default_class, api="http")
        try:
            engine = self.gate.enter()
        except AccessError as e:
            self.metrics.requests.labels(call.class_label, e.code).inc()
            raise ApiError(e.code, str(e), retry_after_s=5.0) from None
        self.metrics.in_flight.inc()
        try:
            call.tenant = self.tenants.authenticate(headers.get("authorization"))
            call.authenticated = True
            call.priority_class, _ = resolve_tier(body.priority, headers, engine.classes, self.objectives,
                                                  self.default_class)
            self.tenants.authorize(call.tenant, call.priority_class)
            slo = slo_targets(headers)
            self._check_unsupported(body)
            ids = self._prompt_ids(body, engine)
            sampling = sampling_from_body(body, default_max_tokens=self._default_max_tokens(body, ids, engine))
            validate_prompt(ids, sampling, engine.cfg.vocab_size, engine.grid.max_seq_len)
            if call.tenant is not None:
                call.tenant.charge(len(ids) + sampling.max_tokens)
                call.reserved = len(ids) + sampling.max_tokens
            try:
                call.handle = engine.submit(ids, sampling, priority_class=call.priority_class,
                                            request_id=f"http-{next(self._ids)}",
                                            slo_targets=(slo.get("ttft"), slo.get("tpot")),
                                            cache_salt=call.tenant.cache_salt if call.tenant is not None else None)
            except QueueFull as e:
                raise ApiError("RESOURCE_EXHAUSTED", str(e), error_code="queue_full",
                               retry_after_s=QUEUE_FULL_RETRY_S) from None
        except AccessError as e:
            call.settle(e.code)
            raise ApiError(e.code, str(e), retry_after_s=e.retry_after_s,
                           error_code="rate_limit_exceeded" if e.code == "RESOURCE_EXHAUSTED" else None) from None
        except ApiError as e:
            call.settle(e.code)
            raise
        except (RequestError, SamplingError, ChatTemplateError, ValueError) as e:
            call.settle("INVALID_ARGUMENT")
            raise invalid(str(e), "messages" if isinstance(e, ChatTemplateError) else field_of(str(e))) from None
        with self.gate.idle:
            self.gate.handles.add(call.handle)
        return call, slo

    def _check_unsupported(self, body) -> None:
        if body.model is not None and body.model != self.model_name:
            raise ApiError("NOT_FOUND", f"model {body.model!r} is not served here; this server serves "
                                        f"{self.model_name!r} (GET /v1/models)", param="model",
                           error_code="model_not_found")
        if body.n != 1:
            raise invalid(f"n must be 1 (one choice per request), got {body.n}", "n")
        for field, neutral in NEUTRAL.items():
            value = getattr(body, field, None)
            if value is not None and value != neutral:
                raise invalid(f"{field} is not supported by this server; send it unset or {neutral!r}, got "
                              f"{value!r}", field, "unsupported_field")
        if isinstance(body, CompletionRequest) and body.logprobs not in (None, 0):
            raise invalid(f"logprobs must be 0 or null: the engine records each chosen token's logprob, no "
                          f"alternatives; got {body.logprobs}", "logprobs")
        if isinstance(body, ChatCompletionRequest) and body.top_logprobs not in (None, 0):
            raise invalid(f"top_logprobs must be 0 or null: the engine records each chosen token's logprob, no "
                          f"alternatives; got {body.top_logprobs}", "top_logprobs")

    def _prompt_ids(self, body, engine) -> list[int]:
        if isinstance(body, ChatCompletionRequest):
            if self.chat_template is None:
                raise invalid(f"model {self.model_name!r} has no chat template (no chat_template in its "
                              f"tokenizer_config.json): use /v1/completions, or start the server with "
                              f"--chat-template FILE", "messages", "chat_template_missing")
            if engine.tokenizer is None:
                raise invalid("the model has no tokenizer: chat needs one", "messages")
            text = self.chat_template.render([m.for_template() for m in body.messages])
            return list(engine.tokenizer.encode(text, add_bos=False))  # the template writes its own BOS
        if isinstance(body.prompt, str):
            if engine.tokenizer is None:
                raise invalid("prompt is text but the model has no tokenizer: send token ids", "prompt")
            return list(engine.tokenizer.encode(body.prompt))
        return list(body.prompt)

    @staticmethod
    def _default_max_tokens(body, ids: list[int], engine) -> int:
        """Completions: OpenAI's 16. Chat: what the context has room for (as vLLM does)."""
        if isinstance(body, ChatCompletionRequest):
            return body.max_completion_tokens or max(1, engine.grid.max_seq_len - len(ids))
        return COMPLETIONS_DEFAULT_MAX_TOKENS


def sampling_from_body(body, *, default_max_tokens: int) -> SamplingParams:
    """The body's sampling fields; OpenAI's defaults where absent (temperature 1, top_p 1)."""
    max_tokens = body.max_tokens
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    top_k = body.top_k if body.top_k not in (None, -1) else 0  # vLLM spells "off" -1
    return SamplingParams(max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
                          temperature=1.0 if body.temperature is None else body.temperature,
                          top_k=top_k, top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed,
                          stop=stop, ignore_eos=body.ignore_eos)


def wants_logprobs(body) -> bool:
    return body.logprobs is not None and body.logprobs is not False

