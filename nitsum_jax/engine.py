"""The engine: lanes of the current plan stepping side by side, fed by the scheduler.

Every lane of the plan set has its own thread. While its lane is in the current plan, the
thread loops: take the lane's next work from the scheduler (under the engine lock), dispatch
the step and wait for its tokens (without the lock), then stream the tokens and report back.
On single-GPU accelerator lanes, plain decode steps are chained: the next one is dispatched,
fed by this one's tokens on the device, before the host reads them (`_timed_step`).
Lanes do not wait for each other, so a fast TP2 lane for `high` keeps its own step time while
TP1 lanes beside it take longer steps. A control thread runs the plan controller; a plan
switch pauses every lane at its next step boundary, moves or requeues the sequences of lanes
that leave, and lets the lanes of the new plan run. Thread-per-lane was chosen by measurement
(BENCHMARKS.md, 4x H100): two TP2 lanes ran at 0.65-0.72x their solo rate from one dispatching
thread and at 0.89-1.0x with a thread per lane.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import queue
import random
import statistics
import sys
import threading
import time
from typing import Iterator, Sequence as Seq

import jax
import numpy as np

from nitsum_jax.config import LlamaConfig
from nitsum_jax.model import Params
from nitsum_jax.plans import BucketGrid, Lane, Plan, PlanSet
from nitsum_jax.sampling import SamplingBatch, SamplingParams
from nitsum_jax.kv import kv_bytes_per_page
from nitsum_jax.scheduler import (CostModel, LaneQueue, PriorityClass, Request, Scheduler, State, Work,
                                  default_classes)
from nitsum_jax.scheduler.controller import Load, PlanController
from nitsum_jax.sequence import Completion, Sequence, append_token, validate_prompt
from nitsum_jax.tokenizer import TextTokenizer


_log = logging.getLogger(__name__)
_GIL_SWITCH_S = float(os.environ.get("NITSUM_GIL_SWITCH_S", "0.0005"))


class Turnstile:
    """A lock that lets waiting threads through in arrival order (threading.Lock is not fair)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting: collections.deque[threading.Event] = collections.deque()
        self._busy = False

    def __enter__(self):
        turn = threading.Event()
        with self._lock:
            if not self._busy:
                self._busy = True
                return self
            self._waiting.append(turn)
        turn.wait()
        return self

    def __exit__(self, *exc):
        with self._lock:
            if self._waiting:
                self._waiting.popleft().set()  # handed over: stays busy
            else:
                self._busy = False


@dataclasses.dataclass
class PlanSwitch:
    time: float
    from_plan: str
    to_plan: str
    reason: str
    duration_s: float
    moved: int
    recomputed: int
    moved_bytes: int = 0  # KV bytes of the moved sequences
    move_s: float = 0.0  # wall time of those moves (each synced): moved_bytes / move_s is their bandwidth


class RequestHandle:
    """Streams a request's tokens as they are made; `result()` blocks for the completion."""

    def __init__(self, engine: "Engine", request: Request, seq: Sequence):
        self._engine, self.request, self.seq = engine, request, seq
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.served_by: tuple[str, str, int] | None = None  # (plan, lane, tp) of the last step
        self.error: str | None = None  # set when the request finished with "error"

    def __iter__(self) -> Iterator[int]:
        while True:
            item = self._events.get()
            if item is None:
                return
            yield item

    def cancel(self) -> None:
        """Stop the request at the next step boundary; its KV pages are freed."""
        self._engine.scheduler.cancel(self.request)
        self._engine._wake()

    def result(self, timeout: float | None = None) -> Completion:
        """Block until the request ends; its tokens, text and finish reason (TimeoutError after `timeout` s)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request.request_id} not done after {timeout}s")
        return dataclasses.replace(self.seq.completion(), finish_reason=self.request.finish_reason or "length")


class Engine:
    """Serves priority classes on the lanes of a plan set: `submit` a prompt with a class, stream its
    tokens from the returned `RequestHandle`, read `stats()`; `close()` when done.

    `Engine.build(preset=... | checkpoint=..., plans=..., num_devices=..., adaptive=...)` is the
    usual way in; the constructor takes a config, params and `Plan`s directly. Every lane of every
    plan is compiled before the constructor returns, so serving compiles nothing; a request whose
    prompt + max_tokens exceeds `grid.max_seq_len` is refused at `submit`.
    """

    def __init__(self, cfg: LlamaConfig, params: Params | None, plans: tuple[Plan, ...], *,
                 classes: dict[str, PriorityClass] | None = None, tokenizer: TextTokenizer | None = None,
                 num_pages: int = 256, page_size: int = 16, grid: BucketGrid = BucketGrid(),
                 devices: list | None = None, token_budget: int = 512, initial_plan: str | None = None,
                 controller: PlanController | None = None, gil_switch_s: float | None = _GIL_SWITCH_S,
                 chain_steps: int | None = None):
        """`controller`: switch plans adaptively (None: stay on the plan unless `switch_plan`).
        `gil_switch_s`: on accelerators, the interpreter's thread switch interval while lanes run
        (`sys.setswitchinterval`, restored by `close()`; env NITSUM_GIL_SWITCH_S; None leaves it).
        `chain_steps`: at most this many decode steps dispatched ahead of their predecessor's
        tokens (`_timed_step`), for every lane; None: env NITSUM_CHAIN_STEPS if set, else 64 for
        single-GPU lanes on accelerators and 0 for the rest (`self.chain_steps`, per lane)."""
        self.cfg, self.tokenizer = cfg, tokenizer
        self.plan_set = PlanSet(cfg, params, plans, devices=devices, num_pages=num_pages, page_size=page_size,
                                grid=grid)
        self.grid = grid
        self._lanes_by_name = {lane.name: lane for lane in self.plan_set.lanes.values()}
        self.classes = classes or default_classes()
        self.plan_name = initial_plan or plans[0].name
        # Victims of preemption move or recompute by these costs, updated from measured moves and steps.
        self.costs = CostModel(kv_bytes_per_token=kv_bytes_per_page(cfg, 1))
        self.scheduler = Scheduler(self.classes, self._lane_queues(self.plan_name), token_budget=token_budget,
                                   prefill_chunk=max(grid.prefill_len), costs=self.costs, mover=self._migrate)
        self.controller = controller
        self.switches: list[PlanSwitch] = []
        self.kv_moves = 0
        self.unhealthy: dict[str, str] = {}  # lane name -> the error that took it out
        self._faults: dict[str, Exception] = {}  # test hook: lane name -> error its next step raises
        self.reset_stats()
        self._handles: dict[str, RequestHandle] = {}  # requests not finished yet
        self._recent: list[RequestHandle] = []  # the last `keep_finished` finished, newest last
        self.keep_finished = 1000
        self._completed: dict[str, int] = {}  # class -> requests finished since start
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)  # lanes wait on it for work, switches for lanes
        self._in_step: set[str] = set()  # lanes whose step is on the device (their KV is theirs alone)
        # Host "devices" of a CPU-only machine are slices of the same cores: lanes there take turns
        # (in arrival order) instead of crowding each other out, which would let busy low lanes
        # starve a high lane of CPU time. Accelerator lanes step freely side by side.
        cpu_only = all(d.platform == "cpu" for d in self.plan_set.devices)
        self._step_turns = Turnstile() if cpu_only else contextlib.nullcontext()
        if chain_steps is None and "NITSUM_CHAIN_STEPS" in os.environ:
            chain_steps = int(os.environ["NITSUM_CHAIN_STEPS"])
        # Per lane. Default, as measured (BENCHMARKS.md, session 4, runs B and F): single-GPU lanes
        # chain (a TP1 lane's step fell 5-21% on 2x H200); lanes over several GPUs do not (with
        # chaining, TP4's step was 9% longer in both pairs of 4x H200 runs, TP2's 3-20%); host CPU
        # devices do not (lanes take turns there).
        self.chain_steps = {lane.name: chain_steps if chain_steps is not None
                            else (64 if not cpu_only and lane.spec.tp == 1 else 0)
                            for lane in self.plan_set.lanes.values()}
        self._restore_switch_s: float | None = None  # the interpreter's interval, put back by close()
        if not cpu_only and gil_switch_s is not None:
            # A lane thread whose step just finished needs the GIL back to read its tokens and
            # schedule the next step; while other lanes run Python it waits up to the interpreter's
            # switch interval (5 ms by default: most of a decode step). A short interval bounds
            # that wait. Process-wide, so it is a constructor argument (None: leave it).
            self._restore_switch_s = sys.getswitchinterval()
            sys.setswitchinterval(gil_switch_s)
        self._switching = False
        self._pending_switch: tuple[str, str] | None = None
        self._stop = False
        self._ids = 0
        self._threads = [threading.Thread(target=self._lane_loop, args=(lane.name,), name=f"nitsum-{lane.name}",
                                          daemon=True) for lane in self.plan_set.lanes.values()]
        self._threads.append(threading.Thread(target=self._control_loop, name="nitsum-control", daemon=True))
        for thread in self._threads:
            thread.start()

    @classmethod
    def build(cls, *, preset: str = "tiny", checkpoint: str | None = None, plans: str | None = None,
              num_devices: int | None = None, seed: int = 0, dtype: str | None = None, adaptive: bool = False,
              hold_s: float = 0.5, min_dwell_s: float = 1.0, **kwargs) -> "Engine":
        """An engine from a preset (random weights) or a checkpoint, over the first `num_devices`
        devices, with a plan set in the compact form or a TOML path (None: the default set).
        `adaptive`: a PlanController picks the plan from the load (else the first plan, or
        `initial_plan`, stays until `switch_plan`).
        On a CPU-only machine set XLA_FLAGS=--xla_force_host_platform_device_count=N first."""
        from nitsum_jax.plans import read_plans
        from nitsum_jax.scheduler import default_classes
        from nitsum_jax.source import load_model

        if checkpoint is None and preset != "tiny":
            # Random weights of a large shape are drawn on the devices, chunk by chunk (no host copy).
            from nitsum_jax.config import preset as preset_config
            from nitsum_jax.source import LoadedModel

            cfg = preset_config(preset)
            if dtype:
                cfg = cfg.replace(dtype={"bf16": "bfloat16", "fp32": "float32"}.get(dtype, dtype))
            model = LoadedModel(cfg, None, None, f"preset:{preset}")
        else:
            model = load_model(checkpoint, preset, seed, dtype)
        devices = jax.devices()[:num_devices] if num_devices else jax.devices()
        plan_set = read_plans(plans, len(devices), model.cfg)
        kwargs.setdefault("tokenizer", model.tokenizer)
        if adaptive and kwargs.get("controller") is None:
            classes = kwargs.get("classes") or default_classes()
            high = classes.get("high")
            kwargs["controller"] = PlanController(
                plan_set, kwargs.get("initial_plan") or plan_set[0].name, hold_s=hold_s, min_dwell_s=min_dwell_s,
                high_tpot_target_s=high.tpot_target_s if high else None)
        return cls(model.cfg, model.params, plan_set, devices=devices, **kwargs)

    # -- public API ----------------------------------------------------------------------
    def submit(self, prompt: str | Seq[int], sampling: SamplingParams = SamplingParams(), *,
               priority_class: str = "low", deadline_s: float | None = None,
               request_id: str | None = None) -> RequestHandle:
        """Queue a prompt (text or token ids) under `priority_class`; returns at once. `deadline_s`:
        seconds from now after which the request ends with finish_reason "deadline". Raises
        ValueError (unknown class) or a RequestError/SamplingError naming the bad value."""
        if priority_class not in self.classes:
            raise ValueError(f"unknown priority class {priority_class!r}; known: {sorted(self.classes)}")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        validate_prompt(ids, sampling, self.cfg.vocab_size, self.grid.max_seq_len)
        with self._lock:
            self._ids += 1
            rid = request_id or f"req-{self._ids}"
            now = time.monotonic()
            req = Request(rid, priority_class, len(ids), sampling.max_tokens, now,
                          None if deadline_s is None else now + deadline_s)
            seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
            handle = RequestHandle(self, req, Sequence(rid, ids, sampling, seed))
            self.scheduler.submit(req)
            self._handles[rid] = handle
        self._wake()
        return handle

    def generate(self, prompts: Seq[str | Seq[int]], sampling: SamplingParams = SamplingParams(),
                 priority_class: str = "low") -> list[Completion]:
        """Submit every prompt under one class and wait for all of them; completions in prompt order."""
        handles = [self.submit(p, sampling, priority_class=priority_class) for p in prompts]
        return [h.result() for h in handles]

    def switch_plan(self, name: str, reason: str = "requested") -> None:
        """Switch at the next step boundary."""
        if name not in self.plan_set.plans:
            raise ValueError(f"unknown plan {name!r}; known: {sorted(self.plan_set.plans)}")
        self._pending_switch = (name, reason)
        self._wake()

    def measure_switch_costs(self, tokens: int | None = None, repeats: int = 5, max_moves: int = 8) -> dict:
        """Time, on an idle engine, what a plan switch costs: every switch to another plan and back
        with nothing running (no KV moves), and a `tokens`-token sequence (default: the grid's
        longest, whole pages) moved between lanes of the plan set, one ordered lane pair per kind
        of move (TP degrees, shared devices), at most `max_moves`, contents checked after the moves.

        Lanes and the controller are held off meanwhile; the probe's switches are not kept in
        `stats()`. The free pages of the lanes get random contents (no live sequence holds them).
        Raises RuntimeError while requests run or wait."""
        from nitsum_jax.plans.probe import fill_random, measure_move

        with self._cond:
            while self._in_step:  # a lane may still be finishing a step
                self._cond.wait(0.05)
            # From here on the lock is held: lanes, the control loop and `submit` wait for the probe.
            if self._handles or self.scheduler.waiting or any(q.running for q in self.scheduler.lanes.values()):
                raise RuntimeError("measure_switch_costs needs an idle engine (requests are running or waiting)")
            self._switching = True  # and lanes do not chain steps past it
            start_plan, kept, history = self.plan_name, len(self.switches), len(self.plan_history)
            try:
                switch_ms: dict[str, list[float]] = {}
                for _ in range(repeats):
                    for name in self.plan_set.plans:
                        if name == start_plan:
                            continue
                        for target in (name, start_plan):
                            self._do_switch(target, "switch-cost probe")
                            key = f"{self.switches[-1].from_plan}->{target}"
                            switch_ms.setdefault(key, []).append(self.switches[-1].duration_s * 1e3)
                lanes = list(self.plan_set.lanes.values())
                for i, lane in enumerate(lanes):
                    fill_random(lane, 1000 + i)
                pages = min(lane.pages_per_seq for lane in lanes)
                tokens = min(tokens or self.grid.max_seq_len, pages * lanes[0].page_size)
                moves, kinds = [], set()
                for src in lanes:
                    for dst in lanes:
                        kind = (src.spec.tp, dst.spec.tp, bool(set(src.spec.devices) & set(dst.spec.devices)))
                        if src is dst or kind in kinds or len(moves) >= max_moves:
                            continue
                        kinds.add(kind)
                        moves.append({"src": src.name, "dst": dst.name,
                                      **measure_move(self.plan_set, src, dst, tokens, repeats)})
            finally:
                del self.switches[kept:], self.plan_history[history:]
                if self.controller is not None:
                    self.controller.force(start_plan, time.monotonic())
                self._switching = False
                self._cond.notify_all()
        all_ms = [t for ts in switch_ms.values() for t in ts]
        return {"switch_ms": {k: statistics.median(v) for k, v in switch_ms.items()},
                "switch_ms_max": max(all_ms) if all_ms else None,
                "switch_ms_median": statistics.median(all_ms) if all_ms else None,
                "moves": moves, "repeats": repeats, "move_transport": self.plan_set.move_transport,
                "move_transport_note": self.plan_set.move_transport_note}

    def recent(self) -> list[RequestHandle]:
        """Handles of the last `keep_finished` finished requests, oldest first (live ones are not
        kept after they finish, so a long-running server does not grow)."""
        with self._lock:
            return list(self._recent)

    def lanes_info(self) -> list[dict]:
        """Every lane of the plan set: name, device ids, TP degree, KV pages, health, whether in
        the current plan, and its measured decode step time (None until measured)."""
        current = {self.plan_set.lanes[s.devices].name for s in self.plan_set.plans[self.plan_name].lanes}
        return [{"name": lane.name, "devices": [int(d) for d in lane.spec.devices], "tp": lane.spec.tp,
                 "kv_pages_used": lane.allocator.num_used, "kv_pages_total": lane.allocator.num_pages,
                 "healthy": lane.name not in self.unhealthy, "in_plan": lane.name in current,
                 "decode_step_s": self._step_s.get(lane.name)}
                for lane in self.plan_set.lanes.values()]

    def reset_stats(self) -> None:
        """Start the busy-time window (and the plan history) afresh, e.g. after a warm-up."""
        self._stats_t0 = time.monotonic()
        self._busy_s = {lane.name: 0.0 for lane in self.plan_set.lanes.values()}
        self._steps = {lane.name: 0 for lane in self.plan_set.lanes.values()}
        # decode steps dispatched before their predecessor's tokens were read (`_timed_step`)
        self._chained = {lane.name: 0 for lane in self.plan_set.lanes.values()}
        # runs of the sampler program: one per step program dispatched with a sampled row (temperature
        # > 0); a step may dispatch a decode batch and prefill chunks, so this can exceed `steps`
        self._sampled = {lane.name: 0 for lane in self.plan_set.lanes.values()}
        if not hasattr(self, "_step_s"):
            self._step_s: dict[str, float] = {}
        self.plan_history: list[tuple[float, str]] = [(self._stats_t0, self.plan_name)]

    def inject_fault(self, lane_name: str, error: Exception | None = None) -> None:
        """Test hook: the lane's next step raises `error` (the fault path of a real failure)."""
        self._lane(lane_name)
        self._faults[lane_name] = error or RuntimeError(f"injected fault in lane {lane_name}")

    def stats(self) -> dict:
        """Plain data: current `plan`; per-class TTFT/TPOT/e2e p50/p99 (seconds) of finished requests;
        waiting requests per class; KV pages in use per lane; plan switches, preemptions, KV moves;
        `lanes` (as `lanes_info`); busy seconds, steps, chained decode steps and sampler runs (programs with a sampled row) per lane, `device_busy_fraction`,
        `plan_history` ([(time, plan), ...]) since `reset_stats`; unhealthy lanes."""
        with self._lock:
            per_class: dict[str, dict] = {}
            for h in self._recent:
                if h.finish_time is None or h.first_token_time is None:
                    continue
                c = per_class.setdefault(h.request.priority_class, {"ttft": [], "tpot": [], "e2e": []})
                c["ttft"].append(h.first_token_time - h.request.arrival)
                c["e2e"].append(h.finish_time - h.request.arrival)
                if len(h.seq.output_ids) > 1:
                    c["tpot"].append((h.finish_time - h.first_token_time) / (len(h.seq.output_ids) - 1))
            latency = {cls: {f"{k}_{q}_s": float(np.percentile(v, p)) if v else None
                             for k, v in vals.items() for q, p in (("p50", 50), ("p99", 99))}
                       | {"completed": len(vals["e2e"]), "finished_total": self._completed.get(cls, 0)}
                       for cls, vals in per_class.items()}
            return {
                "plan": self.plan_name,
                "classes": latency,
                "queue": {c: sum(1 for r in self.scheduler.waiting if r.priority_class == c) for c in self.classes},
                "pages_in_use": {lane.name: lane.allocator.num_used for lane in self.plan_set.lanes.values()},
                "plan_switches": [dataclasses.asdict(s) for s in self.switches],
                "preemptions": len(self.scheduler.preemption_log),
                "kv_moves": self.kv_moves,
                "lanes": self.lanes_info(),
                "lane_busy_s": dict(self._busy_s),
                "steps": dict(self._steps),
                "chained_steps": dict(self._chained),
                "sampler_runs": dict(self._sampled),
                "device_busy_fraction": self._busy_fraction(),
                "plan_history": list(self.plan_history),
                "unhealthy": dict(self.unhealthy),
            }

    def _busy_fraction(self) -> float:
        """Device-seconds inside steps over device-seconds elapsed since `reset_stats`, over
        the devices of the whole plan set (a lane of TP n keeps n devices busy while it steps)."""
        elapsed = time.monotonic() - self._stats_t0
        devices = {d for lane in self.plan_set.lanes.values() for d in lane.spec.devices}
        tp = {lane.name: lane.spec.tp for lane in self.plan_set.lanes.values()}
        busy = sum(s * tp[name] for name, s in self._busy_s.items())
        return min(1.0, busy / (elapsed * len(devices))) if elapsed > 0 else 0.0

    def close(self) -> None:
        """Stop the lane and control threads (requests still running are not finished)."""
        self._stop = True
        self._wake()
        for thread in self._threads:
            thread.join(timeout=30)
        if self._restore_switch_s is not None:
            sys.setswitchinterval(self._restore_switch_s)
            self._restore_switch_s = None

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- engine thread -------------------------------------------------------------------
    def _lane_queues(self, plan_name: str) -> list[LaneQueue]:
        specs = self.plan_set.plans[plan_name].lanes
        return [LaneQueue(self.plan_set.lanes[s.devices].name, s.classes, self.plan_set.lanes[s.devices].allocator,
                          max(self.grid.decode_batch)) for s in specs]

    def _lane(self, name: str) -> Lane:
        return self._lanes_by_name[name]

    def _control_loop(self) -> None:
        """Plan control: ask the controller, and carry out switches at the lanes' step boundaries."""
        while not self._stop:
            with self._cond:
                if self.controller is not None and self._pending_switch is None:
                    self._pending_switch = self.controller.decide(self._load(), time.monotonic())
                if self._pending_switch:
                    self._switching = True
                    while self._in_step and not self._stop:  # lanes finish the step they are in
                        self._cond.wait(0.05)
                    try:
                        self._do_switch(*self._pending_switch)
                    finally:
                        self._pending_switch, self._switching = None, False
                        self._cond.notify_all()
                self._cond.wait(0.005)

    def _lane_loop(self, name: str) -> None:
        while not self._stop:
            with self._cond:
                if self._switching or name not in self.scheduler.lanes or name in self.unhealthy:
                    self._cond.wait(0.05)
                    continue
                try:
                    work = self.scheduler.schedule(name)
                except Exception as error:  # a scheduling bug must not strand the lane's requests
                    self._fail_running(name, error)
                    continue
                self._flush_finished()
                if not work:
                    self._cond.wait(0.005)
                    continue
                self._in_step.add(name)
            try:
                work, outputs, seconds = self._timed_step(name, work)
            except Exception as error:  # the lane failed: its requests go elsewhere
                with self._cond:
                    self._in_step.discard(name)
                    self._lane_failed(name, error)
                    self._flush_finished()
                    self._cond.notify_all()
                continue
            with self._cond:
                self._in_step.discard(name)
                self._record_step(name, work, outputs, seconds)

    def _record_step(self, name: str, work: list[Work], outputs, seconds: float) -> None:
        """Under the engine lock: a finished step's tokens go to their requests; stats and costs."""
        self._busy_s[name] += seconds
        self._steps[name] += 1
        tokens = sum(w.num_tokens for w in work)
        if all(w.num_tokens == 1 for w in work):  # a decode step: the controller's cost
            self._step_s[name] = _ema(self._step_s.get(name, seconds), seconds)
        elif tokens > max(self.grid.decode_batch):  # prefill-heavy: a recompute cost sample
            self.costs.recompute_s_per_token = _ema(self.costs.recompute_s_per_token, seconds / tokens)
        try:
            self._complete(name, work, outputs)
        except Exception as error:
            self._fail_running(name, error)
        self._flush_finished()
        self._cond.notify_all()

    def _fail_running(self, lane_name: str, error: Exception) -> None:
        """Finish the lane's running requests with an error (their pages go back); waiting ones stay."""
        _log.exception("lane %s: engine error: %s", lane_name, error)
        lane = self.scheduler.lanes.get(lane_name)
        for req in list(lane.running if lane else []):
            self._handles[req.request_id].error = f"{type(error).__name__}: {error}"
            self.scheduler._finish(lane, req, "error")
        self._flush_finished()

    def _timed_step(self, name: str, work: list[Work]):
        """Runs on the lane's worker thread: dispatch the step, wait for its tokens. Returns the
        last step's (work, host outputs, seconds).

        Chained decode (`chain_steps[name]` > 0): while the lane's next step is plain decode of the same
        rows (`Scheduler.next_decode`), it is dispatched before this step's tokens are read, fed
        by them on the device, so the device runs step N+1 while the host streams step N's tokens
        and plans N+2. A row that step N finishes (EOS, stop string) draws one token in N+1 that
        is dropped; its pages are freed after N+1 on the lane's device queue."""
        fault = self._faults.pop(name, None)
        if fault is not None:
            raise fault
        lane = self._lane(name)
        with self._step_turns:  # the step's time starts when its turn does
            t0 = time.perf_counter()
            pending = self._dispatch(lane, work)
            for _ in range(self.chain_steps[name]):
                with self._cond:
                    follow = self._chain(name, work, pending)
                if follow is None:
                    break
                fed = [(follow, self._run(lane, follow, lane.batch_for(len(follow)), 1, feed=pending[0][1][0]))]
                self._chained[name] += 1
                outputs = jax.device_get(pending)
                t1 = time.perf_counter()
                with self._cond:
                    self._record_step(name, work, outputs, t1 - t0)
                work, pending, t0 = follow, fed, t1
            outputs = jax.device_get(pending)
            return work, outputs, time.perf_counter() - t0

    def _chain(self, name: str, work: list[Work], pending) -> list[Work] | None:
        """Under the engine lock: the decode step to dispatch after `work` before its tokens are read."""
        if (self._switching or self._pending_switch is not None or self._stop or name in self.unhealthy
                or name in self._faults or name not in self.scheduler.lanes
                or len(pending) != 1):  # one decode group: more rows than a batch do not chain
            return None
        return self.scheduler.next_decode(name, work)

    def _lane_failed(self, name: str, error: Exception) -> None:
        """A lane's step raised: mark it unhealthy, put its requests back in line to be recomputed
        on other lanes (their streamed tokens stay: recompute re-reads prompt + output), and leave
        for a plan without it. With no such plan, requests no remaining lane serves fail."""
        _log.error("lane %s failed, marked unhealthy: %s", name, error)
        self.unhealthy[name] = f"{type(error).__name__}: {error}"
        lane = self._lane(name)
        if self.controller is not None:
            self.controller.mark_unhealthy(lane.spec.devices)
        self.scheduler.evict_lane(name)
        healthy = [p for p in self.plan_set.plans.values()
                   if not any(self.plan_set.lanes[s.devices].name in self.unhealthy for s in p.lanes)]
        if healthy:
            target = next((p for p in healthy if p.name == (self.controller.current if self.controller else None)),
                          healthy[0])
            self._pending_switch = (target.name, f"lane {name} failed: {self.unhealthy[name]}")
            return
        del self.scheduler.lanes[name]
        for req in list(self.scheduler.waiting):
            if not any(q.serves(req.priority_class) for q in self.scheduler.lanes.values()):
                self._handles[req.request_id].error = f"no healthy lane serves class {req.priority_class!r}"
                self.scheduler.drop_waiting(req, "error")

    def _migrate(self, request: Request, src: str, dst: str) -> None:
        """A preemption victim moves to another lane. Only enqueued: the destination may be mid-step
        (the device orders the move after it); the cost model learns from switch moves, which sync."""
        self.plan_set.move(request.request_id, self._lane(src), self._lane(dst), enqueue_only=True)
        self.kv_moves += 1

    def _timed_move(self, request_id: str, src: Lane, dst: Lane) -> tuple[int, float]:
        """A move with every lane paused (plan switch): synced, so its bandwidth feeds the cost
        model. Returns (bytes moved, seconds)."""
        # The sequence's own KV bytes (the transfer itself may carry padding up to a compiled size):
        # what the cost model's per-token estimate and the switch log's bandwidth are about.
        moved = src.kv_bytes(request_id)
        t0 = time.perf_counter()
        self.plan_set.move(request_id, src, dst)
        jax.block_until_ready(dst.kv)
        seconds = time.perf_counter() - t0
        self.costs.move_bytes_per_s = _ema(self.costs.move_bytes_per_s, moved / seconds)
        return moved, seconds

    def _load(self) -> Load:
        step_s = {self._lane(name).spec.devices: s for name, s in self._step_s.items()}
        waiting = {c: 0 for c in self.classes}
        running = {c: 0 for c in self.classes}
        for r in self.scheduler.waiting:
            waiting[r.priority_class] += 1
        for q in self.scheduler.lanes.values():
            for r in q.running:
                running[r.priority_class] += 1
        return Load(waiting, running, self._slo_attainment(), step_s)

    def _slo_attainment(self, window: int = 50) -> dict[str, float]:
        """Per class, the fraction of its last `window` completed requests that met both targets."""
        met: dict[str, list[bool]] = {}
        done = [h for h in self._recent if h.finish_time is not None and h.first_token_time is not None]
        for h in done[-window * len(self.classes):]:
            target = self.classes[h.request.priority_class]
            n = len(h.seq.output_ids)
            tpot = (h.finish_time - h.first_token_time) / (n - 1) if n > 1 else 0.0
            met.setdefault(target.name, []).append(h.first_token_time - h.request.arrival <= target.ttft_target_s
                                                   and tpot <= target.tpot_target_s)
        return {c: sum(v[-window:]) / len(v[-window:]) for c, v in met.items()}

    def _dispatch(self, lane: Lane, work: list[Work]):
        """Decode-shaped rows (one token) in one batch, prefill chunks one by one."""
        singles = [w for w in work if w.num_tokens == 1]
        chunks = [w for w in work if w.num_tokens > 1]
        out = []
        for i in range(0, len(singles), max(self.grid.decode_batch)):
            rows = singles[i:i + max(self.grid.decode_batch)]
            out.append((rows, self._run(lane, rows, lane.batch_for(len(rows)), 1)))
        for w in chunks:
            out.append(([w], self._run(lane, [w], 1, lane.prefill_for(w.num_tokens))))
        return out

    def _run(self, lane: Lane, rows: list[Work], batch: int, width: int, feed: jax.Array | None = None):
        """Enqueue one step; `feed`: the previous step's output tokens on the device, in `rows` order
        (a chained decode step), instead of tokens read from the host."""
        tokens = np.zeros((batch, width), np.int32) if feed is None else None
        start = np.zeros(batch, np.int32)
        num_new = np.zeros(batch, np.int32)
        seqs = [self._handles[w.request.request_id].seq for w in rows]
        for i, (w, seq) in enumerate(zip(rows, seqs)):
            if feed is None:
                tokens[i, :w.num_tokens] = seq.all_ids[w.start_pos:w.start_pos + w.num_tokens]
            start[i], num_new[i] = w.start_pos, w.num_tokens
        ids = [w.request.request_id for w in rows] + [None] * (batch - len(rows))
        table = lane.allocator.page_table(ids, lane.pages_per_seq)
        sampling = None  # all greedy: the step's argmax is every row's token
        if not all(seq.params.greedy for seq in seqs):
            sampling = SamplingBatch.from_params([s.params for s in seqs] + [None] * (batch - len(rows)),
                                                 [s.seed for s in seqs] + [0] * (batch - len(rows)),
                                                 [w.start_pos + w.num_tokens for w in rows] + [0] * (batch - len(rows)))
            self._sampled[lane.name] += 1
        if feed is not None:
            return lane.dispatch_fed(feed, start, num_new, table, sampling)
        return lane.dispatch(tokens, start, num_new, table, sampling)

    def _complete(self, lane_name: str, work: list[Work], results) -> None:
        finished: dict[str, str] = {}
        now = time.monotonic()
        served_by = (self.plan_name, lane_name, self._lane(lane_name).spec.tp)
        for rows, (tokens, logprobs) in results:
            tokens, logprobs = tokens.tolist(), logprobs.tolist()  # Python scalars once, not per row
            for i, w in enumerate(rows):
                req = w.request
                if req.state is not State.RUNNING or w.start_pos + w.num_tokens < req.total_len:
                    continue  # a prompt chunk that is not the last draws nothing
                handle = self._handles[req.request_id]
                seq = handle.seq
                seq.output_logprobs.append(logprobs[i])
                append_token(seq, tokens[i], self.tokenizer, self.cfg.eos_token_ids)
                handle.served_by = served_by
                if handle.first_token_time is None:
                    handle.first_token_time = now
                handle._events.put(tokens[i])
                if seq.finished:
                    finished[req.request_id] = seq.finish_reason
        self.scheduler.complete(lane_name, work, finished=finished)

    def _flush_finished(self) -> None:
        while self.scheduler.finished:
            req = self.scheduler.finished.pop()
            handle = self._handles.pop(req.request_id)
            handle.finish_time = time.monotonic()
            self._completed[req.priority_class] = self._completed.get(req.priority_class, 0) + 1
            handle._events.put(None)
            handle._done.set()
            self._recent.append(handle)
            del self._recent[:-self.keep_finished]

    def _do_switch(self, name: str, reason: str) -> None:
        if name == self.plan_name:
            return
        t0 = time.perf_counter()
        moved = recomputed = moved_bytes = 0
        move_s = 0.0
        with self._lock:
            new_queues = {q.name: q for q in self._lane_queues(name)}
            # Lanes in both plans keep their running batch; do this before any move adds to them.
            for old in self.scheduler.lanes.values():
                if old.name in new_queues:
                    new_queues[old.name].running = old.running
            for old in self.scheduler.lanes.values():
                if old.name in new_queues:
                    continue
                for req in list(old.running):
                    dst = max((q for q in new_queues.values() if q.serves(req.priority_class)
                               and len(q.running) < q.max_batch
                               and q.allocator.can_reserve(len(old.allocator.pages(req.request_id)) * old.allocator.page_size)),
                              key=lambda q: q.allocator.num_free, default=None)
                    old.running.remove(req)
                    if dst is not None:
                        try:
                            nbytes, seconds = self._timed_move(req.request_id, self._lane(old.name),
                                                               self._lane(dst.name))
                        except Exception:  # the pages stay on the old lane: recompute, as with no room
                            _log.exception("KV move of %s from %s to %s failed; it will be recomputed",
                                           req.request_id, old.name, dst.name)
                            dst = None
                    if dst is None:  # no room: recompute later from the waiting queue, keeping its place
                        old.allocator.free(req.request_id)
                        req.state, req.lane, req.num_computed = State.WAITING, None, 0
                        self.scheduler.waiting.append(req)
                        recomputed += 1
                        continue
                    moved_bytes, move_s = moved_bytes + nbytes, move_s + seconds
                    req.lane = dst.name
                    dst.running.append(req)
                    moved += 1
            self.scheduler.lanes = new_queues
            self.kv_moves += moved
            self.switches.append(PlanSwitch(time.monotonic(), self.plan_name, name, reason,
                                            time.perf_counter() - t0, moved, recomputed, moved_bytes, move_s))
            self.plan_name = name
            self.plan_history.append((time.monotonic(), name))
            if self.controller is not None:
                self.controller.force(name, time.monotonic())


def _ema(old: float, new: float, weight: float = 0.2) -> float:
    return (1 - weight) * old + weight * new
