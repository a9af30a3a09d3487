"""Workloads: the requests a bench sends, fixed before any configuration runs.

A workload is a list of `BenchRequest`s, each with its arrival offset, class, prompt and
output length. It is drawn once from a seed (Poisson arrivals, a class mix, length
distributions) or read from a JSONL trace, so every configuration sees exactly the same
requests at the same offsets.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

PROMPT_VOCAB = 256  # prompt ids drawn below this: valid for the byte-level tokenizer and any real vocabulary


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    request_id: str
    arrival_s: float  # offset from the start of the run
    priority_class: str
    prompt_len: int
    output_len: int  # max_tokens, with EOS ignored, so every configuration generates the same count
    prompt: str | None = None  # trace text; None: `prompt_len` token ids drawn from the workload seed
    prompt_ids: tuple[int, ...] = ()
    temperature: float = 0.0  # > 0: the request samples (seeded by `seed`), 0: greedy
    seed: int = 0

    def sampling_kwargs(self) -> dict:
        """temperature, top_p and seed for SamplingParams or the gRPC client ({} when greedy)."""
        return {"temperature": self.temperature, "top_p": 0.95, "seed": self.seed} if self.temperature > 0 else {}

    def prompt_input(self) -> str | list[int]:
        return self.prompt if self.prompt is not None else list(self.prompt_ids)


@dataclasses.dataclass(frozen=True)
class LengthDist:
    """`"32"` (fixed), `"16-64"` (uniform, inclusive) or `"lognormal:32:0.5"` (median, sigma; clipped
    to [1, 4 x median])."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str | int) -> "LengthDist":
        text = str(text).strip()
        try:
            if text.startswith("lognormal:"):
                _, median, sigma = text.split(":")
                dist = cls("lognormal", float(median), float(sigma))
            elif "-" in text:
                lo, hi = text.split("-")
                dist = cls("uniform", int(lo), int(hi))
            else:
                dist = cls("fixed", int(text))
        except ValueError:
            raise ValueError(f"length distribution {text!r}: expected N, LO-HI or lognormal:MEDIAN:SIGMA") from None
        if dist.a < 1 or (dist.kind == "uniform" and dist.b < dist.a):
            raise ValueError(f"length distribution {text!r}: lengths must be >= 1 and LO <= HI")
        return dist

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, int(self.a))
        if self.kind == "uniform":
            return rng.integers(int(self.a), int(self.b) + 1, size=n)
        draws = rng.lognormal(np.log(self.a), self.b, size=n)
        return np.clip(np.rint(draws), 1, 4 * self.a).astype(int)

    def __str__(self) -> str:
        return {"fixed": f"{int(self.a)}", "uniform": f"{int(self.a)}-{int(self.b)}"}.get(
            self.kind, f"lognormal:{self.a:g}:{self.b:g}")


@dataclasses.dataclass(frozen=True)
class Workload:
    requests: tuple[BenchRequest, ...]
    params: dict  # how it was made (goes into results.json)

    @property
    def request_ids(self) -> list[str]:
        return [r.request_id for r in self.requests]

    @property
    def duration_s(self) -> float:
        return max((r.arrival_s for r in self.requests), default=0.0)

    def to_records(self) -> list[dict]:
        """Plain dicts (pandas.DataFrame(workload.to_records()) in a notebook)."""
        return [{k: v for k, v in dataclasses.asdict(r).items() if k != "prompt_ids"} for r in self.requests]

    def to_jsonl(self, path: str | Path) -> None:
        """Write as a trace `load_trace` reads back (prompt ids are redrawn from prompt_len)."""
        with open(path, "w") as f:
            for r in self.requests:
                row = {"arrival_s": r.arrival_s, "class": r.priority_class, "output_len": r.output_len}
                row |= {"prompt": r.prompt} if r.prompt is not None else {"prompt_len": r.prompt_len}
                row |= {"temperature": r.temperature, "seed": r.seed} if r.temperature > 0 else {}
                f.write(json.dumps(row) + "\n")


def poisson_workload(rate: float, *, duration_s: float | None = 20.0, num_requests: int | None = None,
                     high_fraction: float = 0.3, prompt_len: str = "8-48", output_len: str = "16-48",
                     seed: int = 0, id_prefix: str = "r", sampled_fraction: float = 0.0,
                     temperature: float = 0.8) -> Workload:
    """Poisson arrivals at `rate` requests/s for `duration_s` (or exactly `num_requests`),
    `high_fraction` of them `high` and the rest `low`, lengths from the given distributions;
    `sampled_fraction` of them sample at `temperature` (top_p 0.95, a seed each), the rest are greedy."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    if not 0.0 <= high_fraction <= 1.0:
        raise ValueError(f"high_fraction must be in [0, 1], got {high_fraction}")
    if not 0.0 <= sampled_fraction <= 1.0:
        raise ValueError(f"sampled_fraction must be in [0, 1], got {sampled_fraction}")
    if sampled_fraction > 0 and not 0.0 < temperature <= 100.0:
        raise ValueError(f"temperature must be in (0, 100] for sampled requests, got {temperature}")
    if num_requests is None and (duration_s is None or duration_s <= 0):
        raise ValueError("give num_requests or a duration_s > 0")
    rng = np.random.default_rng(seed)
    if num_requests is not None:  # exponential gaps
        n = num_requests
        arrivals = np.cumsum(rng.exponential(1.0 / rate, size=n))
    else:  # a Poisson count, uniform times: the same process on [0, duration)
        n = max(1, int(rng.poisson(rate * duration_s)))
        arrivals = np.sort(rng.uniform(0.0, duration_s, size=n))
    classes = np.where(rng.random(n) < high_fraction, "high", "low")
    prompts = LengthDist.parse(prompt_len).sample(rng, n)
    outputs = LengthDist.parse(output_len).sample(rng, n)
    ids = [tuple(int(t) for t in rng.integers(0, PROMPT_VOCAB, int(prompts[i]))) for i in range(n)]
    # Drawn after everything else, so a greedy workload is the same with or without this option.
    sampled = rng.random(n) < sampled_fraction if sampled_fraction > 0 else np.zeros(n, bool)
    requests = tuple(
        BenchRequest(f"{id_prefix}{i:05d}", round(float(arrivals[i]), 6), str(classes[i]), int(prompts[i]),
                     int(outputs[i]), prompt_ids=ids[i], temperature=temperature if sampled[i] else 0.0,
                     seed=(seed * 1_000_003 + i) % 2**32 if sampled[i] else 0)
        for i in range(n))
    params = {"kind": "poisson", "rate_rps": rate, "duration_s": duration_s, "num_requests": n,
              "high_fraction": high_fraction, "prompt_len": str(LengthDist.parse(prompt_len)),
              "output_len": str(LengthDist.parse(output_len)), "seed": seed,
              "sampled_fraction": sampled_fraction, "temperature": temperature if sampled_fraction > 0 else None,
              "sampled_requests": int(sampled.sum())}
    return Workload(requests, params)


def load_trace(path: str | Path, *, seed: int = 0, time_scale: float = 1.0, id_prefix: str = "r") -> Workload:
    """A JSONL trace, one request a line: `arrival_s` (offset), `class`, `prompt` (text) or
    `prompt_len`, `output_len`, optionally `temperature` and `seed` (a sampled request).
    `time_scale` < 1 replays it faster."""
    rng = np.random.default_rng(seed)
    requests = []
    for line_no, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = row.get("prompt")
            plen = len(prompt) if prompt is not None else int(row["prompt_len"])
            request = BenchRequest(f"{id_prefix}{len(requests):05d}", float(row["arrival_s"]) * time_scale,
                                   str(row.get("class", "low")), plen, int(row["output_len"]), prompt,
                                   () if prompt is not None else tuple(int(t) for t in rng.integers(0, PROMPT_VOCAB, plen)),
                                   temperature=float(row.get("temperature", 0.0)), seed=int(row.get("seed", 0)))
        except (KeyError, ValueError, TypeError) as error:
            raise ValueError(f"{path}:{line_no}: bad trace row ({error}); expected arrival_s, class, "
                             f"prompt or prompt_len, output_len") from None
        requests.append(request)
    requests.sort(key=lambda r: r.arrival_s)
    classes = [r.priority_class for r in requests]
    params = {"kind": "trace", "path": str(path), "num_requests": len(requests), "time_scale": time_scale,
              "high_fraction": classes.count("high") / max(1, len(classes)), "seed": seed,
              "rate_rps": len(requests) / max(1e-9, requests[-1].arrival_s) if requests else 0.0}
    return Workload(tuple(requests), params)


@dataclasses.dataclass(frozen=True)
class AgentShape:
    """`"N:S:R"`: agent conversations of N calls sharing a system prompt of S tokens, each call
    adding a tool result of R tokens."""

    calls: int
    system_len: int
    tool_len: int

    @classmethod
    def parse(cls, text: str) -> "AgentShape":
        try:
            calls, system_len, tool_len = (int(t) for t in str(text).split(":"))
        except ValueError:
            raise ValueError(f"agent shape {text!r}: expected CALLS:SYSTEM_TOKENS:TOOL_TOKENS, e.g. 6:512:64") from None
        if calls < 1 or system_len < 0 or tool_len < 1:
            raise ValueError(f"agent shape {text!r}: calls must be >= 1, system tokens >= 0, tool tokens >= 1")
        return cls(calls, system_len, tool_len)

    def __str__(self) -> str:
        return f"{self.calls}:{self.system_len}:{self.tool_len}"


def agent_workload(rate: float, shape: AgentShape | str, *, duration_s: float | None = 20.0,
                   num_conversations: int | None = None, high_fraction: float = 0.3, output_len: str = "16-48",
                   think_s: float = 1.0, seed: int = 0, id_prefix: str = "a",
                   max_seq_len: int | None = None) -> Workload:
    """Multi-turn agent conversations arriving as a Poisson process at `rate` conversations/s for
    `duration_s` (or exactly `num_conversations`), each of `shape.calls` calls in one tier (`high`
    for `high_fraction` of the conversations, else `low`). Every conversation starts from one
    system prompt of `shape.system_len` tokens, shared by all; call k's prompt is call k-1's
    prompt + call k-1's answer + a new tool result of `shape.tool_len` tokens (call 1: the system
    prompt + a tool result). The answer's tokens are not known before the run, so the answer in
    the next prompt is stand-in tokens as many as the previous call's output length, drawn from
    the seed like the rest: what a later call can find cached is its predecessors' prompts.
    Calls are sent open loop, call k a think time after call k-1 was sent (exponential, mean
    `think_s`), so every configuration sees the same requests at the same offsets."""
    shape = AgentShape.parse(shape) if isinstance(shape, str) else shape
    if rate <= 0:
        raise ValueError(f"rate must be > 0 conversations/s, got {rate}")
    if not 0.0 <= high_fraction <= 1.0:
        raise ValueError(f"high_fraction must be in [0, 1], got {high_fraction}")
    if think_s < 0:
        raise ValueError(f"think time must be >= 0 s, got {think_s}")
    if num_conversations is None and (duration_s is None or duration_s <= 0):
        raise ValueError("give num_conversations or a duration_s > 0")
    rng = np.random.default_rng(seed)
    if num_conversations is not None:
        starts = np.cumsum(rng.exponential(1.0 / rate, size=num_conversations))
    else:
        starts = np.sort(rng.uniform(0.0, duration_s, size=max(1, int(rng.poisson(rate * duration_s)))))
    n = len(starts)
    tiers = np.where(rng.random(n) < high_fraction, "high", "low")
    outputs = LengthDist.parse(output_len).sample(rng, n * shape.calls).reshape(n, shape.calls)
    gaps = rng.exponential(think_s, size=(n, shape.calls)) if think_s > 0 else np.zeros((n, shape.calls))
    system = rng.integers(0, PROMPT_VOCAB, shape.system_len).tolist()
    requests = []
    for c in range(n):
        prompt, at = list(system), float(starts[c])
        for k in range(shape.calls):
            if k:
                prompt += rng.integers(0, PROMPT_VOCAB, int(outputs[c, k - 1])).tolist()  # the answer's stand-in
                at += float(gaps[c, k])
            prompt += rng.integers(0, PROMPT_VOCAB, shape.tool_len).tolist()
            requests.append(BenchRequest(f"{id_prefix}{c:04d}-{k:02d}", round(at, 6), str(tiers[c]), len(prompt),
                                         int(outputs[c, k]), prompt_ids=tuple(prompt)))
    longest = max(r.prompt_len + r.output_len for r in requests)
    if max_seq_len is not None and longest > max_seq_len:
        raise ValueError(f"agent shape {shape} with outputs {output_len}: the longest call needs {longest} tokens "
                         f"(prompt + output), over the context limit {max_seq_len}; use fewer or shorter calls")
    requests.sort(key=lambda r: r.arrival_s)
    params = {"kind": "agent", "rate_rps": rate * shape.calls, "conversation_rate": rate, "agent": str(shape),
              "calls": shape.calls, "system_len": shape.system_len, "tool_len": shape.tool_len,
              "conversations": n, "num_requests": len(requests), "duration_s": duration_s,
              "high_fraction": high_fraction, "output_len": str(LengthDist.parse(output_len)),
              "think_s": think_s, "seed": seed}
    return Workload(tuple(requests), params)
