"""The GPU runtime: lanes of the current plan stepping side by side, driven by the engine core.

Every lane of the plan set has its own thread. While its lane is in the current plan, the
thread loops: ask the core for the lane's next work (under the engine lock), dispatch the step
and wait for its tokens (without the lock), then hand the tokens to the core and stream what it
emits. On single-GPU accelerator lanes, plain decode steps are chained: the next one is
dispatched, fed by this one's tokens on the device, before the host reads them (`_timed_step`).
Lanes do not wait for each other, so a fast TP2 lane for the urgent tier keeps its own step time
while TP1 lanes beside it take longer steps. A control thread ticks the core; a plan switch
pauses every lane at its next step boundary, carries out the moves the core planned, and lets
the lanes of the new plan run. No scheduling decision is made here: the core makes them.
Thread-per-lane was chosen by measurement (BENCHMARKS.md, "Lanes side by side"): two TP2 lanes
ran at 0.65-0.72x their solo rate from one dispatching thread and at 0.89-1.0x with a thread per lane.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import sys
import threading
import time
from typing import Sequence as Seq

import jax

from nitsum_jax.config import LlamaConfig
from nitsum_jax.engine.core import EngineCore, Finished, PlanSwitch, class_stats
from nitsum_jax.engine.dispatch import dispatch_work, host_results, run_rows
from nitsum_jax.engine.handle import RequestHandle
from nitsum_jax.engine.turnstile import Turnstile
from nitsum_jax.kv import kv_bytes_per_page
from nitsum_jax.model import Params
from nitsum_jax.plans import BucketGrid, Lane, Plan, PlanSet
from nitsum_jax.plans.spec import check_plan_classes
from nitsum_jax.sampling import SamplingParams
from nitsum_jax.scheduler import CostModel, PriorityClass, Request, Work, default_classes
from nitsum_jax.scheduler.controller import PlanController
from nitsum_jax.sequence import Completion, validate_prompt
from nitsum_jax.settings import settings
from nitsum_jax.tokenizer import TextTokenizer

_log = logging.getLogger(__name__)


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
                 devices: list | None = None, token_budget: int | dict[str, int] | str = 512,
                 initial_plan: str | None = None, controller: PlanController | None = None,
                 gil_switch_s: float | None | str = "settings", chain_steps: int | None = None,
                 prefix_cache: bool = True):
        """`classes`: the tiers (default `high`/`low`); every lane must name known classes.
        `token_budget`: new tokens a lane's step may carry (an int, {lane: int}, or "auto": 512, and
        lanes serving urgent tiers limit their prefill tokens from measured step costs so a step
        stays within the tier's TPOT target).
        `controller`: switch plans adaptively (None: stay on the plan unless `switch_plan`).
        `gil_switch_s`: on accelerators, the interpreter's thread switch interval while lanes run
        (`sys.setswitchinterval`, restored by `close()`; default from NITSUM_GIL_SWITCH_S; None
        leaves it). `chain_steps`: at most this many decode steps dispatched ahead of their
        predecessor's tokens (`_timed_step`), for every lane; None: NITSUM_CHAIN_STEPS if set,
        else 64 for single-GPU lanes on accelerators and 0 for the rest (`self.chain_steps`).
        `prefix_cache`: reuse the cached K/V pages of a prompt's prefix (docs/prefix-cache.md)."""
        self.classes = classes or default_classes()
        for warning in check_plan_classes(plans, self.classes):
            _log.warning(warning)
        self.cfg, self.tokenizer, self.grid = cfg, tokenizer, grid
        self.plan_set = PlanSet(cfg, params, plans, devices=devices, num_pages=num_pages, page_size=page_size,
                                grid=grid, settings=settings())
        self._lanes = {lane.name: lane for lane in self.plan_set.lanes.values()}
        self.core = EngineCore(self.classes, plans, self._lanes, initial_plan=initial_plan,
                               token_budget=token_budget, prefill_chunk=max(grid.prefill_len),
                               max_batch=max(grid.decode_batch),
                               costs=CostModel(kv_bytes_per_token=kv_bytes_per_page(cfg, 1)), controller=controller,
                               tokenizer=tokenizer, eos_token_ids=cfg.eos_token_ids, mover=self._migrate,
                               recompute_sample_tokens=max(grid.decode_batch), prefix_cache=prefix_cache,
                               prefill_buckets=grid.prefill_len)
        self.core.reset_stats(time.monotonic())
        self._faults: dict[str, Exception] = {}  # test hook: lane name -> error its next step raises
        self._handles: dict[str, RequestHandle] = {}  # requests not finished yet
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)  # lanes wait on it for work, switches for lanes
        self._in_step: set[str] = set()  # lanes whose step is on the device (their KV is theirs alone)
        # Host "devices" of a CPU-only machine are slices of the same cores: lanes there take turns
        # (in arrival order) instead of crowding each other out, which would let busy bulk lanes
        # starve an urgent lane of CPU time. Accelerator lanes step freely side by side.
        cpu_only = all(d.platform == "cpu" for d in self.plan_set.devices)
        self._step_turns = Turnstile() if cpu_only else contextlib.nullcontext()
        self.chain_steps = _chain_steps(self._lanes, chain_steps, cpu_only)
        self._restore_switch_s = _set_switch_interval(gil_switch_s, cpu_only)  # put back by close()
        self._switching = False
        self._stop = False
        self._ids = 0
        self._chained = {name: 0 for name in self._lanes}
        self._sampled = {name: 0 for name in self._lanes}
        self._threads = [threading.Thread(target=self._lane_loop, args=(name,), name=f"nitsum-{name}", daemon=True)
                         for name in self._lanes]
        self._threads.append(threading.Thread(target=self._control_loop, name="nitsum-control", daemon=True))
        for thread in self._threads:
            thread.start()

    @classmethod
    def build(cls, **kwargs) -> "Engine":
        """An engine from a preset or a checkpoint: see `nitsum_jax.engine.build.build_engine`."""
        from nitsum_jax.engine.build import build_engine

        return build_engine(cls, **kwargs)

    # What the core owns, read through the engine (read-only views).
    scheduler = property(lambda self: self.core.scheduler)
    controller = property(lambda self: self.core.controller)
    plan_name = property(lambda self: self.core.plan_name, doc="the plan in force")
    switches = property(lambda self: self.core.switches, doc="PlanSwitch records since start")
    plan_history = property(lambda self: self.core.plan_history, doc="[(time, plan)] since reset_stats")
    unhealthy = property(lambda self: self.core.unhealthy, doc="lane name -> the error that took it out")
    kv_moves = property(lambda self: self.core.kv_moves)
    costs = property(lambda self: self.core.costs, doc="the measured costs the core decides by")
    plan_names = property(lambda self: list(self.core.plans), doc="the plans of the set, in order")

    # -- public API ----------------------------------------------------------------------
    def submit(self, prompt: str | Seq[int], sampling: SamplingParams = SamplingParams(), *,
               priority_class: str = "low", deadline_s: float | None = None,
               request_id: str | None = None,
               slo_targets: tuple[float | None, float | None] = (None, None),
               cache_salt: str | None = None) -> RequestHandle:
        """Queue a prompt (text or token ids) under `priority_class`; returns at once. `deadline_s`:
        seconds from now after which the request ends with finish_reason "deadline". `slo_targets`:
        (TTFT, TPOT) seconds where stricter than the class's (a gateway's SLO headers). `cache_salt`:
        the prefix-cache namespace (None: shared by every request without one; a server passes the
        tenant's). Raises ValueError (unknown class) or a RequestError/SamplingError naming the bad value."""
        if priority_class not in self.classes:
            raise ValueError(f"unknown priority class {priority_class!r}; known: {sorted(self.classes)}")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        validate_prompt(ids, sampling, self.cfg.vocab_size, self.grid.max_seq_len)
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
        keys = self.core.prompt_keys(ids, cache_salt)  # hashing the prompt needs no lock
        with self._lock:
            self._ids += 1
            rid = request_id or f"req-{self._ids}"
            entry = self.core.submit(rid, ids, sampling, seed, priority_class, time.monotonic(), deadline_s,
                                     slo_targets, cache_salt, keys)
            handle = RequestHandle(entry, self._cancel)
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
        with self._lock:
            self.core.request_switch(name, reason)
        self._wake()

    def measure_switch_costs(self, tokens: int | None = None, repeats: int = 5, max_moves: int = 8) -> dict:
        """Time, on an idle engine, what a plan switch costs (see `engine/switch_probe.py`)."""
        from nitsum_jax.engine.switch_probe import measure_switch_costs

        return measure_switch_costs(self, tokens, repeats, max_moves)

    def recent(self) -> list[Finished]:
        """Compact records of the last finished requests, oldest first (no prompt or sampling
        settings are kept, so a long-running server does not grow)."""
        with self._lock:
            return list(self.core.recent)

    def lanes_info(self) -> list[dict]:
        """Every lane of the plan set: name, device ids, TP degree, KV pages, health, whether in
        the current plan, and its measured decode step time (None until measured)."""
        with self._lock:
            return self.core.lanes_info()

    def reset_stats(self) -> None:
        """Start the busy-time window (and the plan history) afresh, e.g. after a warm-up."""
        with self._lock:
            self.core.reset_stats(time.monotonic())
            self._chained = {name: 0 for name in self._lanes}
            self._sampled = {name: 0 for name in self._lanes}

    def inject_fault(self, lane_name: str, error: Exception | None = None) -> None:
        """Test hook: the lane's next step raises `error` (the fault path of a real failure)."""
        if lane_name not in self._lanes:
            raise ValueError(f"unknown lane {lane_name!r}; known: {sorted(self._lanes)}")
        self._faults[lane_name] = error or RuntimeError(f"injected fault in lane {lane_name}")

    def stats(self) -> dict:
        """Plain data: current `plan`; per-class TTFT/TPOT/e2e p50/p99 (seconds) of finished requests;
        waiting requests per class; KV pages in use per lane; plan switches, preemptions, KV moves;
        `lanes` (as `lanes_info`); busy seconds, steps, chained decode steps and sampler runs
        (programs with a sampled row) per lane, `device_busy_fraction`, `plan_history`
        ([(time, plan), ...]) since `reset_stats`; unhealthy lanes; `prefix_cache` (on or off, hit
        rates by tier, lane and in total, idle cached pages per lane)."""
        with self._lock:  # a snapshot under the lock; the percentiles are computed after it
            core = self.core
            recent, completed = list(core.recent), dict(core.completed)
            out = {
                "plan": core.plan_name,
                "queue": {c: core.scheduler.waiting_count(c) for c in self.classes},
                "running": core.running_counts(),
                "pages_in_use": {name: lane.allocator.num_used for name, lane in self._lanes.items()},
                "plan_switches": [dataclasses.asdict(s) for s in core.switches],
                "preemptions": len(core.scheduler.preemption_log),
                "kv_moves": core.kv_moves,
                "lanes": core.lanes_info(),
                "lane_busy_s": dict(core.busy_s),
                "steps": dict(core.steps),
                "chained_steps": dict(self._chained),
                "sampler_runs": dict(self._sampled),
                "device_busy_fraction": core.busy_fraction(time.monotonic()),
                "plan_history": list(core.plan_history),
                "unhealthy": dict(core.unhealthy),
                "prefix_cache": core.prefix_stats(),
            }
        return {"classes": class_stats(recent, completed)} | out

    def close(self) -> None:
        """Stop the lane and control threads (requests still running are not finished)."""
        self._stop = True
        self._wake()
        for thread in self._threads:
            thread.join(timeout=30)
        if self._restore_switch_s is not None:
            sys.setswitchinterval(self._restore_switch_s)
            self._restore_switch_s = None

    # -- driving the core ----------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _cancel(self, request_id: str) -> None:
        with self._lock:
            self.core.cancel(request_id)
        self._wake()

    def _flush_finished(self) -> None:
        """Under the engine lock: end the handles of requests the core finished."""
        for entry in self.core.take_finished(time.monotonic()):
            handle = self._handles.pop(entry.request.request_id, None)
            if handle is not None:
                handle._finish()

    def _stream(self, emitted) -> None:
        for entry, token in emitted:
            self._handles[entry.request.request_id]._token(token)

    def _control_loop(self) -> None:
        """Tick the core, and carry out the switches it asks for at the lanes' step boundaries."""
        while not self._stop:
            with self._cond:
                pending = self.core.tick(time.monotonic())
                if pending:
                    self._switching = True
                    while self._in_step and not self._stop:  # lanes finish the step they are in
                        self._cond.wait(0.05)
                    try:
                        self._switch_now(*pending)
                    finally:
                        self.core.pending_switch, self._switching = None, False
                        self._flush_finished()
                        self._cond.notify_all()
                self._cond.wait(0.005)

    def _lane_loop(self, name: str) -> None:
        while not self._stop:
            with self._cond:
                if self._switching or not self.core.in_plan(name):
                    self._cond.wait(0.05)
                    continue
                work = self.core.next_step(name, time.monotonic())
                self._flush_finished()
                if not work:
                    self._cond.wait(0.005)
                    continue
                self._in_step.add(name)
                seqs = {w.request.request_id: self.core.entries[w.request.request_id].seq for w in work}
            try:
                work, results, seconds = self._timed_step(name, work, seqs)
            except Exception as error:  # the lane failed: its requests go elsewhere
                with self._cond:
                    self._in_step.discard(name)
                    self.core.lane_failed(name, error)
                    self._flush_finished()
                    self._cond.notify_all()
                continue
            with self._cond:
                self._in_step.discard(name)
                self._step_done(name, work, results, seconds)

    def _step_done(self, name: str, work: list[Work], results, seconds: float) -> None:
        """Under the engine lock: a finished step's tokens go to the core, its emits to the handles."""
        self._stream(self.core.step_done(name, work, results, seconds, time.monotonic()))
        self._flush_finished()
        self._cond.notify_all()

    def _timed_step(self, name: str, work: list[Work], seqs: dict):
        """Runs on the lane's worker thread: dispatch the step, wait for its tokens. Returns the
        last step's (work, host results, seconds).

        Chained decode (`chain_steps[name]` > 0): while the core says the lane's next step is plain
        decode of the same rows (`EngineCore.chain_step`), it is dispatched before this step's
        tokens are read, fed by them on the device, so the device runs step N+1 while the host
        streams step N's tokens and plans N+2. A row that step N finishes (EOS, stop string) draws
        one token in N+1 that is dropped; its pages are freed after N+1 on the lane's device queue."""
        fault = self._faults.pop(name, None)
        if fault is not None:
            raise fault
        lane = self._lanes[name]
        decode_batch = max(self.grid.decode_batch)
        with self._step_turns:  # the step's time starts when its turn does
            t0 = time.perf_counter()
            pending = dispatch_work(lane, work, seqs, decode_batch, self._sampled)
            for _ in range(self.chain_steps[name]):
                with self._cond:
                    follow = None if (self._switching or self._stop or name in self._faults
                                      or len(pending) != 1) else self.core.chain_step(name, work, time.monotonic())
                if follow is None:  # one decode group only: more rows than a batch do not chain
                    break
                fed = [(follow, run_rows(lane, follow, seqs, lane.batch_for(len(follow)), 1, self._sampled,
                                         feed=pending[0][1][0]))]
                self._chained[name] += 1
                results = host_results(pending)
                t1 = time.perf_counter()
                with self._cond:
                    self._step_done(name, work, results, t1 - t0)
                work, pending, t0 = follow, fed, t1
            results = host_results(pending)
            return work, results, time.perf_counter() - t0

    def _migrate(self, request: Request, src: str, dst: str) -> None:
        """A preemption victim moves to another lane. Only enqueued: the destination may be mid-step
        (the device orders the move after it); the cost model learns from switch moves, which sync."""
        self.plan_set.move(request.request_id, self._lanes[src], self._lanes[dst], enqueue_only=True)
        self.core.migrated(request)

    def _timed_move(self, request_id: str, src: Lane, dst: Lane) -> tuple[int, float]:
        """A move with every lane paused (plan switch): synced, so its bandwidth feeds the cost
        model. Returns (the sequence's own KV bytes, seconds)."""
        moved = src.kv_bytes(request_id)
        t0 = time.perf_counter()
        self.plan_set.move(request_id, src, dst)
        jax.block_until_ready(dst.kv)
        return moved, time.perf_counter() - t0

    def _switch_now(self, name: str, reason: str) -> None:
        """Under the engine lock, every lane at a step boundary: carry out the core's switch."""
        if name == self.plan_name:
            return
        t0 = time.perf_counter()
        plan = self.core.begin_switch(name)
        moved = moved_bytes = 0
        move_s = 0.0
        for move in plan.moves:
            try:
                nbytes, seconds = self._timed_move(move.request.request_id, self._lanes[move.src],
                                                   self._lanes[move.dst])
            except Exception:  # the pages stay on the old lane: recompute, as with no room
                _log.exception("KV move of %s from %s to %s failed; it will be recomputed",
                               move.request.request_id, move.src, move.dst)
                self.core.move_failed(move, plan)
                continue
            self.core.move_done(move, nbytes, seconds)
            moved, moved_bytes, move_s = moved + 1, moved_bytes + nbytes, move_s + seconds
        self.core.end_switch(name, reason, plan, moved, moved_bytes, move_s, time.perf_counter() - t0,
                             time.monotonic())


def _chain_steps(lanes: dict[str, Lane], chain_steps: int | None, cpu_only: bool) -> dict[str, int]:
    """Decode steps each lane may dispatch ahead of its predecessor's tokens. Default, as measured
    (BENCHMARKS.md, "Engine host path"): single-GPU lanes chain (a TP1 lane's step fell 5-21% on
    2x H200); lanes over several GPUs do not (with chaining, TP4's step was 9% longer on 4x H200,
    TP2's 3-20%); host CPU devices do not (lanes take turns there)."""
    if chain_steps is None:
        chain_steps = settings().chain_steps
    return {name: chain_steps if chain_steps is not None else (64 if not cpu_only and lane.spec.tp == 1 else 0)
            for name, lane in lanes.items()}


def _set_switch_interval(gil_switch_s: float | None | str, cpu_only: bool) -> float | None:
    """A lane thread whose step just finished needs the GIL back to read its tokens and schedule
    the next step; while other lanes run Python it waits up to the interpreter's switch interval
    (5 ms by default: most of a decode step). A short interval bounds that wait. Process-wide, so
    it is set here and put back by `close()`. Returns the interval to restore (None: unchanged)."""
    if gil_switch_s == "settings":
        gil_switch_s = settings().gil_switch_s
    if cpu_only or gil_switch_s is None:
        return None
    restore = sys.getswitchinterval()
    sys.setswitchinterval(gil_switch_s)
    return restore
