"""The request bodies of /v1/completions and /v1/chat/completions, as pydantic models.

Strict types (a string where a number belongs is refused, not coerced) and no unknown fields:
a misspelt field is a 400 naming it, not a silently ignored knob. OpenAI fields this server
does not implement are accepted only at their neutral value (`NEUTRAL`), so clients that send
the defaults explicitly keep working. `priority`, `top_k` and `ignore_eos` are the vLLM / SGLang
extensions their users send through the openai client's `extra_body`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Fields accepted only at this value: anything else is a 400 saying the server does not implement it.
NEUTRAL = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "best_of": 1, "echo": False, "logit_bias": {},
           "suffix": None, "parallel_tool_calls": None}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage in every chunk (GuideLLM counts tokens by it)


class _Generation(_Strict):
    """What both endpoints share: sampling, streaming, priority."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None  # None: OpenAI's default, 1.0
    top_p: float | None = None
    top_k: int | None = None  # 0 or -1: off
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    priority: str | int | None = None  # a tier name, or a tier rank (0 = most urgent)
    ignore_eos: bool = False
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Generation):
    prompt: str | list[int] = Field(...)
    logprobs: int | None = None  # 0: each chosen token's logprob (no alternatives are recorded)
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def for_template(self) -> dict:
        """The message as chat templates read it: content as one string."""
        content = self.content if not isinstance(self.content, list) else "".join(p.text for p in self.content)
        out = {"role": self.role, "content": content or ""}
        if self.name is not None:
            out["name"] = self.name
        return out


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None  # only 0: no alternatives are recorded
    parallel_tool_calls: bool | None = None
