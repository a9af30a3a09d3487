"""A small engine with no model that implements the engine contract (`nitsum_jax.engine.api`),
so the server's own behaviour is tested in milliseconds, as JetStream tests its orchestrator
against a mock engine. Each request's i-th token is (prompt's last token + i + 1) mod vocab, one
every `token_s` seconds, from a thread per request."""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
from types import SimpleNamespace

from nitsum_jax.scheduler import default_classes
from nitsum_jax.sequence import Completion
from nitsum_jax.tokenizer import TextTokenizer

VOCAB = 264


def expected_tokens(prompt_ids, n):
    return [(prompt_ids[-1] + i + 1) % VOCAB for i in range(n)]


@dataclasses.dataclass
class FakeRequest:
    request_id: str
    priority_class: str
    arrival: float
    deadline: float | None
    finish_reason: str | None = None


class FakeHandle:
    def __init__(self, request, prompt_ids, sampling, token_s, on_end):
        self.request = request
        self.seq = SimpleNamespace(prompt_ids=list(prompt_ids), output_ids=[], output_logprobs=[])
        self.first_token_time = self.finish_time = self.error = None
        self.served_by, self.moved, self.cached_tokens = None, 0, 0
        self._events, self._done, self._cancel = queue.Queue(), threading.Event(), threading.Event()
        self._sampling, self._token_s, self._on_end = sampling, token_s, on_end
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        for token in expected_tokens(self.seq.prompt_ids, self._sampling.max_tokens):
            if self._cancel.wait(self._token_s):
                self.request.finish_reason = "cancelled"
                break
            self.seq.output_ids.append(token)
            self.seq.output_logprobs.append(-0.5)
            self.first_token_time = self.first_token_time or time.monotonic()
            self.served_by = ("only", "fake@0", 1)
            self._events.put(token)
        else:
            self.request.finish_reason = "length"
        self.finish_time = time.monotonic()
        self._events.put(None)
        self._done.set()
        self._on_end(self)

    def __iter__(self):
        while (item := self._events.get()) is not None:
            yield item

    def cancel(self):
        self._cancel.set()

    def result(self, timeout=None):
        if not self._done.wait(timeout):
            raise TimeoutError(self.request.request_id)
        return Completion(list(self.seq.output_ids), None, self.request.finish_reason, len(self.seq.prompt_ids),
                          list(self.seq.output_logprobs))


class FakeEngine:
    """The contract: classes, tokenizer, cfg, grid, plan_name, plan_names, submit, stats,
    lanes_info, close."""

    def __init__(self, token_s=0.001, max_seq_len=256):
        self.classes = default_classes()
        self.tokenizer = TextTokenizer.byte_level()
        self.cfg = SimpleNamespace(vocab_size=VOCAB, eos_token_ids=())
        self.grid = SimpleNamespace(max_seq_len=max_seq_len)
        self.plan_name, self.plan_names = "only", ["only"]
        self.token_s, self.submitted, self.closed = token_s, [], False
        self._ids, self._lock, self._live = itertools.count(1), threading.Lock(), set()

    def submit(self, prompt, sampling, *, priority_class="low", deadline_s=None, request_id=None, **_):
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        now = time.monotonic()
        req = FakeRequest(request_id or f"fake-{next(self._ids)}", priority_class, now,
                          None if deadline_s is None else now + deadline_s)
        handle = FakeHandle(req, ids, sampling, self.token_s, self._ended)
        with self._lock:
            self.submitted.append(handle)
            self._live.add(handle)
        return handle

    def _ended(self, handle):
        with self._lock:
            self._live.discard(handle)

    def live(self) -> int:
        with self._lock:
            return len(self._live)

    def stats(self):
        return {"plan": self.plan_name, "classes": {}, "queue": {c: 0 for c in self.classes},
                "running": {c: 0 for c in self.classes}, "plan_switches": [], "preemptions": 0, "kv_moves": 0,
                "device_busy_fraction": 0.0, "lanes": self.lanes_info()}

    def lanes_info(self):
        return [{"name": "fake@0", "devices": [0], "tp": 1, "kv_pages_used": 0, "kv_pages_total": 64,
                 "healthy": True, "in_plan": True, "serves": ["all"], "decode_step_s": None}]

    def close(self):
        self.closed = True
