"""OpenAI response bodies and stream chunks (completions and chat), as plain dicts.

One `Shape` per endpoint knows its object names and where a choice's text goes; the service
fills in text, finish reason, logprobs and usage the same way for both.
"""

from __future__ import annotations

import json
import time
import uuid


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens`: prompt tokens reused from the
    prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class Shape:
    """The envelope of one request's response: id, created, model, object names."""

    object = chunk_object = prefix = ""
    opens_with_role = False  # a stream's first chunk carries the role alone (chat)

    def __init__(self, model: str):
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _envelope(self, obj: str, choices: list, extra: dict | None = None) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **(extra or {})}

    def response(self, text: str, finish_reason: str, logprobs, prompt_tokens: int, completion_tokens: int,
                 cached_tokens: int = 0) -> dict:
        choice = self.choice(text, finish_reason, logprobs)
        return self._envelope(self.object, [choice],
                              {"usage": usage(prompt_tokens, completion_tokens, cached_tokens)})

    def chunk(self, text: str | None, finish_reason: str | None, logprobs, *, first: bool = False) -> dict:
        return self._envelope(self.chunk_object, [self.chunk_choice(text, finish_reason, logprobs, first)])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
        """`stream_options.include_usage`: one last chunk with no choices and the usage."""
        return self._envelope(self.chunk_object, [], {"usage": usage(prompt_tokens, completion_tokens, cached_tokens)})

    def choice(self, text, finish_reason, logprobs) -> dict:
        raise NotImplementedError

    def chunk_choice(self, text, finish_reason, logprobs, first) -> dict:
        raise NotImplementedError

    def logprobs(self, tokens: list[str], values: list[float], offset: int) -> dict:
        raise NotImplementedError


class CompletionShape(Shape):
    object = chunk_object = "text_completion"
    prefix = "cmpl"

    def choice(self, text, finish_reason, logprobs) -> dict:
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def chunk_choice(self, text, finish_reason, logprobs, first) -> dict:
        return self.choice(text or "", finish_reason, logprobs)

    def logprobs(self, tokens: list[str], values: list[float], offset: int) -> dict:
        """`logprobs: 0`: each chosen token and its logprob; no alternatives (top_logprobs: null)."""
        offsets, at = [], offset
        for token in tokens:
            offsets.append(at)
            at += len(token)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": None, "text_offset": offsets}


class ChatShape(Shape):
    object, chunk_object = "chat.completion", "chat.completion.chunk"
    prefix = "chatcmpl"
    opens_with_role = True

    def choice(self, text, finish_reason, logprobs) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def chunk_choice(self, text, finish_reason, logprobs, first) -> dict:
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    def logprobs(self, tokens: list[str], values: list[float], offset: int) -> dict:
        return {"content": [{"token": t, "logprob": v, "bytes": list(t.encode()), "top_logprobs": []}
                            for t, v in zip(tokens, values)]}
