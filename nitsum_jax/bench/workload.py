"""Workloads: the requests a bench sends, fixed before any configuration runs.

A workload is a list of `BenchRequest`s, each with its arrival offset, class, prompt and
output length. It is drawn once from a seed (Poisson or gamma arrivals, a class mix, length
distributions) or read from a CSV or JSONL trace (`nitsum_jax.bench.trace`), so every
configuration sees exactly the same requests at the same offsets.
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
                     temperature: float = 0.8, burstiness: float = 1.0, class_mix: dict[str, float] | None = None,
                     with_ids: bool = True) -> Workload:
    """Poisson arrivals at `rate` requests/s for `duration_s` (or exactly `num_requests`),
    `high_fraction` of them `high` and the rest `low` (or classes drawn by `class_mix`, class ->
    share), lengths from the given distributions; `sampled_fraction` of them sample at
    `temperature` (top_p 0.95, a seed each), the rest are greedy. `burstiness` != 1: gamma
    inter-arrival gaps of the same mean whose squared coefficient of variation is `burstiness`
    (1 is Poisson, > 1 burstier). `with_ids` False: no prompt ids are drawn (the simulator needs
    only lengths)."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0 (1 is Poisson), got {burstiness}")
    if not 0.0 <= high_fraction <= 1.0:
        raise ValueError(f"high_fraction must be in [0, 1], got {high_fraction}")
    if not 0.0 <= sampled_fraction <= 1.0:
        raise ValueError(f"sampled_fraction must be in [0, 1], got {sampled_fraction}")
    if sampled_fraction > 0 and not 0.0 < temperature <= 100.0:
        raise ValueError(f"temperature must be in (0, 100] for sampled requests, got {temperature}")
    if num_requests is None and (duration_s is None or duration_s <= 0):
        raise ValueError("give num_requests or a duration_s > 0")
    rng = np.random.default_rng(seed)
    arrivals = _arrivals(rng, rate, duration_s, num_requests, burstiness)
    n = len(arrivals)
    classes = (np.where(rng.random(n) < high_fraction, "high", "low") if class_mix is None
               else assign_classes(rng, n, class_mix))
    prompts = LengthDist.parse(prompt_len).sample(rng, n)
    outputs = LengthDist.parse(output_len).sample(rng, n)
    ids = [tuple(int(t) for t in rng.integers(0, PROMPT_VOCAB, int(prompts[i]))) if with_ids else ()
           for i in range(n)]
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
              "sampled_requests": int(sampled.sum()), "burstiness": burstiness}
    if class_mix is not None:
        params["class_mix"] = dict(class_mix)
    return Workload(requests, params)


def _arrivals(rng: np.random.Generator, rate: float, duration_s: float | None, num_requests: int | None,
              burstiness: float) -> np.ndarray:
    """Arrival offsets [n]: exactly `num_requests`, or those before `duration_s`."""
    if burstiness == 1.0:
        if num_requests is not None:  # exponential gaps
            return np.cumsum(rng.exponential(1.0 / rate, size=num_requests))
        # a Poisson count, uniform times: the same process on [0, duration)
        return np.sort(rng.uniform(0.0, duration_s, size=max(1, int(rng.poisson(rate * duration_s)))))
    shape = 1.0 / burstiness  # gamma gaps: mean 1/rate, CV^2 = 1/shape
    if num_requests is not None:
        return np.cumsum(rng.gamma(shape, 1.0 / (rate * shape), size=num_requests))
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=int(rate * duration_s * 2) + 16)
    while gaps.sum() < duration_s:  # rare: a very bursty draw ran short
        gaps = np.concatenate([gaps, rng.gamma(shape, 1.0 / (rate * shape), size=len(gaps))])
    arrivals = np.cumsum(gaps)
    return arrivals[:max(1, int(np.searchsorted(arrivals, duration_s)))]


def assign_classes(rng: np.random.Generator, n: int, class_mix: dict[str, float]) -> np.ndarray:
    """`n` class names drawn by `class_mix` (class -> share; shares must be >= 0 and sum to 1)."""
    if not class_mix or any(v < 0 for v in class_mix.values()) or abs(sum(class_mix.values()) - 1) > 1e-6:
        raise ValueError(f"class mix {class_mix}: shares must be >= 0 and sum to 1")
    names = sorted(class_mix)
    return np.array(names)[rng.choice(len(names), size=n, p=[class_mix[c] for c in names])]


def parse_class_mix(text: str) -> dict[str, float]:
    """`high=0.2,mid=0.3,low=0.5` -> {class: share}."""
    mix = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, share = item.partition("=")
        try:
            mix[name.strip()] = float(share)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"class mix {text!r}: expected CLASS=SHARE,... (e.g. high=0.3,low=0.7)")
    assign_classes(np.random.default_rng(0), 0, mix)  # validates the shares
    return mix


def load_trace(path: str | Path, *, seed: int = 0, time_scale: float = 1.0, id_prefix: str = "r",
               **kwargs) -> Workload:
    """A CSV or JSONL trace (see `nitsum_jax.bench.trace.load_trace`)."""
    from nitsum_jax.bench.trace import load_trace as load

    return load(path, seed=seed, time_scale=time_scale, id_prefix=id_prefix, **kwargs)


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
