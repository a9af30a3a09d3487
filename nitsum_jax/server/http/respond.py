"""An admitted request's answer: a JSON body, or server-sent events token by token.

The engine's `RequestHandle` streams tokens through a blocking iterator; a `TokenPump` thread
per request moves them onto the event loop, so the loop never blocks and a slow client holds no
engine thread. Tokens that arrive together go out in one chunk. Whatever ends the answer (its
last event, the client going away, the server stopping), the request is cancelled in the
engine (a no-op once finished: it leaves at the next step and frees its KV pages) and settled
once.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import AsyncIterator

from starlette.requests import Request

from nitsum_jax.server.http.errors import ApiError
from nitsum_jax.server.http.shapes import SSE_DONE, Shape, sse, usage
from nitsum_jax.server.service import TextStream

_DONE_TIMEOUT_S = 30.0  # the engine marks a request done right after its last token


class _End:
    def __init__(self, completion):
        self.completion = completion  # a Completion when the request finished "stop"/"length", else None


class TokenPump:
    """Moves one request's tokens from the engine's iterator (on a thread of its own) to the loop."""

    def __init__(self, handle):
        self.handle = handle
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        threading.Thread(target=self._run, name=f"nitsum-http-{handle.request.request_id}", daemon=True).start()

    def _run(self) -> None:
        for token in self.handle:
            self._put(token)
        ok = self.handle.request.finish_reason in ("stop", "length")
        self._put(_End(self.handle.result(timeout=_DONE_TIMEOUT_S) if ok else None))

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server stopped, nobody is listening
            pass

    async def batches(self) -> AsyncIterator[list[int] | _End]:
        """Lists of the tokens available together, then the `_End`."""
        while True:
            item = await self.queue.get()
            batch: list[int] = []
            while not isinstance(item, _End):
                batch.append(item)
                if self.queue.empty():
                    break
                item = self.queue.get_nowait()
            if batch:
                yield batch
            if isinstance(item, _End):
                yield item
                return


async def _cancel_on_disconnect(request: Request, handle) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    handle.cancel()


def failure(handle, n: int, max_tokens: int) -> ApiError:
    """The error a request that did not finish "stop"/"length" ends with (as the gRPC path words it)."""
    reason = handle.request.finish_reason
    if reason == "deadline":
        return ApiError("DEADLINE_EXCEEDED", f"deadline passed after {n} of max_tokens {max_tokens} tokens; "
                                             f"request stopped and its KV pages freed")
    if reason == "cancelled":
        return ApiError("CANCELLED", f"request cancelled after {n} tokens")
    return ApiError("INTERNAL", f"request failed after {n} tokens: {handle.error or reason}")


class Answer:
    """One admitted request's response, streamed (`events`) or whole (`body`)."""

    def __init__(self, call, engine, shape: Shape, *, logprobs: bool, include_usage: bool = False,
                 continuous_usage: bool = False, on_end=None):
        """`continuous_usage`: every chunk carries the usage so far; `on_end(handle, code)`: called
        once the request is settled (the SLO record)."""
        self.call, self.engine, self.shape, self.on_end = call, engine, shape, on_end
        self.handle = call.handle
        self.logprobs, self.include_usage, self.continuous_usage = logprobs, include_usage, continuous_usage
        self.text = TextStream(engine.tokenizer, self.handle.seq.params.stop)
        self.generated: list[int] = []

    def _logprobs(self, start: int, end: int, offset: int):
        if not self.logprobs:
            return None
        ids = self.generated[start:end]
        tokens = [self.engine.tokenizer.decode([t]) if self.engine.tokenizer else str(t) for t in ids]
        return self.shape.logprobs(tokens, self.handle.seq.output_logprobs[start:end], offset)

    async def _run(self, request: Request):
        """Yields the token batches' (text delta, logprobs), then the request's Completion (or None)."""
        pump = TokenPump(self.handle)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, self.handle))
        try:
            async for item in pump.batches():
                if isinstance(item, _End):
                    yield item
                    return
                start = len(self.generated)
                self.generated += item
                offset = len(self.text.emitted)
                yield self.text.delta(self.generated), self._logprobs(start, len(self.generated), offset)
        finally:
            watcher.cancel()

    async def events(self, request: Request) -> AsyncIterator[str]:
        """The SSE stream: an opening chunk (chat), a chunk per token batch, the finish chunk, the usage
        chunk when asked for, then `[DONE]`; an error event instead of the finish if the request failed."""
        code = "CANCELLED"  # unless the stream reaches its end: the client went away or the server stopped
        try:
            if self.shape.opens_with_role:
                yield sse(self.shape.chunk("", None, None, first=True))
            async with contextlib.aclosing(self._run(request)) as items:
                async for item in items:
                    if isinstance(item, _End):
                        events, code = self._closing(item)
                        for event in events:
                            yield event
                        break
                    delta, logprobs = item
                    if delta or logprobs or self.continuous_usage:
                        yield sse(self._with_usage(self.shape.chunk(delta, None, logprobs), len(self.generated)))
        finally:
            self._end(code)

    def _with_usage(self, chunk: dict, completion_tokens: int) -> dict:
        if self.continuous_usage:
            chunk["usage"] = usage(len(self.handle.seq.prompt_ids), completion_tokens)
        return chunk

    def _closing(self, end: _End) -> tuple[list[str], str]:
        """The last events of a stream and the status the request is counted under."""
        if end.completion is None:
            error = failure(self.handle, len(self.generated), self.handle.seq.params.max_tokens)
            return [error.sse(), SSE_DONE], error.code
        done = end.completion
        events = [sse(self._with_usage(self.shape.chunk(self.text.rest(done.text), done.finish_reason, None),
                                       len(done.token_ids)))]
        if self.include_usage:
            events.append(sse(self.shape.usage_chunk(done.prompt_tokens, len(done.token_ids),
                                                     getattr(self.handle, "cached_tokens", 0))))
        return events + [SSE_DONE], "OK"

    async def body(self, request: Request) -> dict:
        """The whole response once the request ends; raises ApiError if it did not finish."""
        code = "CANCELLED"
        try:
            async with contextlib.aclosing(self._run(request)) as items:
                async for item in items:
                    if not isinstance(item, _End):
                        continue
                    if item.completion is None:
                        error = failure(self.handle, len(self.generated), self.handle.seq.params.max_tokens)
                        code = error.code
                        raise error
                    done, code = item.completion, "OK"
                    self.generated = list(done.token_ids)
                    return self.shape.response(done.text or "", done.finish_reason,
                                               self._logprobs(0, len(done.token_ids), 0), done.prompt_tokens,
                                               len(done.token_ids), getattr(self.handle, "cached_tokens", 0))
            raise ApiError("INTERNAL", "the request's token stream ended without a result")
        finally:
            self._end(code)

    def _end(self, code: str) -> None:
        self.handle.cancel()  # a no-op for a finished request; else it leaves at the next step, pages freed
        self.call.settle(code)
        if self.on_end is not None:
            self.on_end(self.handle, code)
