"""The serving core: deterministic, no threads, no JAX, no wall clock.

It owns the scheduler and the plan controller and every request's state. Events come in as
method calls, each with the time it happened (`now`, seconds on the driver's clock):
submit, cancel, a lane's step done (its tokens and its measured seconds), a KV move done or
failed, a lane failed, time advanced (`tick`). Answers are commands: the work of a lane's next
step (`next_step`, `chain_step`), the plan to switch to (`tick`), the moves and recomputes of
a switch (`begin_switch`), the tokens to stream and the requests that ended (`step_done`,
`take_finished`). Same events, same answers, every time: the GPU runtime
(`engine/runtime.py`) and a simulator drive the same core.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Callable, Protocol, Sequence as Seq

from nitsum_jax.engine import stats as figures
from nitsum_jax.pages import PageAllocator, next_page_key, page_keys
from nitsum_jax.plans.spec import LaneSpec, Plan
from nitsum_jax.sampling_params import SamplingParams
from nitsum_jax.scheduler import (CostModel, LaneQueue, Move, PriorityClass, Request, Scheduler, State, SwitchPlan,
                                  Work)
from nitsum_jax.scheduler.classes import urgent_names
from nitsum_jax.scheduler.controller import Load, PlanController
from nitsum_jax.sequence import Sequence, append_token

_log = logging.getLogger(__name__)
SLO_WINDOW = 50  # finished requests per class that the controller's SLO attainment looks back on


class LanePort(Protocol):
    """What the core reads of a lane (`plans.Lane` for JAX devices, a simulated lane, a fake)."""

    name: str
    spec: LaneSpec
    allocator: PageAllocator


@dataclasses.dataclass
class Entry:
    """A live request: the scheduler's view (`request`) and its tokens (`seq`)."""

    request: Request
    seq: Sequence
    first_token_time: float | None = None
    finish_time: float | None = None
    served_by: tuple[str, str, int] | None = None  # (plan, lane, tp) of its last step
    error: str | None = None  # why it finished with "error"
    moved: int = 0  # KV moves between lanes
    cache_salt: str | None = None  # its prefix-cache namespace


@dataclasses.dataclass(frozen=True)
class Finished:
    """What is kept of a finished request: small, whatever its prompt or sampling settings were."""

    request: Request
    output_ids: tuple[int, ...]
    first_token_time: float | None
    finish_time: float
    served_by: tuple[str, str, int] | None
    error: str | None
    moved: int
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache

    @property
    def latency(self) -> figures.Latency:
        return figures.latency(self.request.arrival, self.first_token_time, self.finish_time, len(self.output_ids),
                               self.request.finish_reason in figures.COMPLETED_REASONS)


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
    move_s: float = 0.0  # time of those moves (each synced): moved_bytes / move_s is their bandwidth


class EngineCore:
    def __init__(self, classes: dict[str, PriorityClass], plans: Seq[Plan], lanes: dict[str, LanePort], *,
                 initial_plan: str | None = None, token_budget: int | dict[str, int] | str = 512, prefill_chunk: int = 128,
                 max_batch: int = 8, costs: CostModel | None = None, controller: PlanController | None = None,
                 tokenizer=None, eos_token_ids: Seq[int] = (), keep_finished: int = 1000,
                 mover: Callable[[Request, str, str], None] | None = None, recompute_sample_tokens: int = 0,
                 tpot_budget: bool = False, prefix_cache: bool = True, prefill_buckets: Seq[int] = ()):
        """`lanes`: every lane of the plan set by name. `mover`: carries out a preemption victim's
        KV move at once (the driver's; None: victims are recomputed). `recompute_sample_tokens`:
        a step with more new tokens than this is a sample of the recompute cost. `token_budget`:
        new tokens a lane's step may carry (an int, {lane: int}, or "auto": 512 and `tpot_budget`).
        `tpot_budget`:
        a lane that serves an urgent tier limits the prefill tokens of its steps, from its measured
        step costs, so that a step stays within that tier's TPOT target (`_learn_budget`); lanes of
        relaxed tiers only keep `token_budget`. `prefix_cache`: requests reuse the cached K/V pages
        of their prompt's prefix on a lane (keyed by content and `cache_salt`; docs/prefix-cache.md).
        `prefill_buckets`: the lengths of the lanes' prefill programs (`Scheduler`)."""
        self.classes, self.plans = classes, {p.name: p for p in plans}
        self.lanes, self.max_batch = lanes, max_batch
        self.tokenizer, self.eos_token_ids = tokenizer, tuple(eos_token_ids)
        self.plan_name = initial_plan or plans[0].name
        self.costs = costs or CostModel()
        self.controller = controller
        self._urgent = urgent_names(classes) if len(classes) > 1 else set()
        self.now = 0.0  # the time of the latest event: the scheduler's clock
        if token_budget == "auto":
            token_budget, tpot_budget = 512, True
        self.scheduler = Scheduler(classes, self._queues(self.plan_name), clock=lambda: self.now,
                                   token_budget=token_budget, prefill_chunk=prefill_chunk, costs=self.costs,
                                   mover=mover, prefill_buckets=prefill_buckets)
        self.recompute_sample_tokens = recompute_sample_tokens
        self.tpot_budget = tpot_budget
        # lane -> marginal seconds per token of the prefill programs a step ran, padding included (EMA)
        self.prefill_s_per_token: dict[str, float] = {}
        self.entries: dict[str, Entry] = {}  # requests not finished yet
        self.recent: collections.deque[Finished] = collections.deque(maxlen=keep_finished)
        self.completed: dict[str, int] = {c: 0 for c in classes}  # requests finished since start
        # Per class, whether each of its latest SLO_WINDOW finished requests (that got a token) met its targets.
        self._met: dict[str, collections.deque[bool]] = {c: collections.deque(maxlen=SLO_WINDOW) for c in classes}
        self.switches: list[PlanSwitch] = []
        self.kv_moves = 0
        self.unhealthy: dict[str, str] = {}  # lane name -> the error that took it out
        self.pending_switch: tuple[str, str] | None = None  # (plan, reason)
        self.step_s: dict[str, float] = {}  # lane -> decode step seconds (EMA)
        self.prefix_cache = prefix_cache
        page_sizes = {lane.allocator.page_size for lane in lanes.values()}
        if prefix_cache and len(page_sizes) > 1:
            raise ValueError(f"prefix caching needs one page size on every lane, got {sorted(page_sizes)}")
        self.page_size = page_sizes.pop() if page_sizes else 1
        self.scheduler.can_admit = lambda lane_name: lane_name not in self.unhealthy
        self.reset_stats(0.0)

    # -- requests ------------------------------------------------------------------------
    def submit(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams, seed: int,
               priority_class: str, now: float, deadline_s: float | None = None,
               slo_targets: tuple[float | None, float | None] = (None, None), cache_salt: str | None = None,
               prompt_keys: Seq[bytes] | None = None) -> Entry:
        """Queue a validated prompt; raises ValueError (unknown class) or QueueFull. `slo_targets`:
        (TTFT, TPOT) seconds for this request where stricter than its class's (None: the class's);
        its SLO attainment, which the plan controller reads, is judged by them. `cache_salt`: the
        prefix-cache namespace (None: the shared one); a request reuses only pages cached under its
        own salt. `prompt_keys`: `self.prompt_keys(prompt_ids, cache_salt)`, when the caller
        computed them already (outside a lock others need)."""
        if priority_class not in self.classes:
            raise ValueError(f"unknown priority class {priority_class!r}; known: {sorted(self.classes)}")
        self.now = now
        if request_id in self.entries:
            raise ValueError(f"request id {request_id!r} is already in flight")
        cls = self.classes[priority_class]
        ttft, tpot = (None if t is None else min(t, c) for t, c in zip(slo_targets, (cls.ttft_target_s,
                                                                                  cls.tpot_target_s)))
        if prompt_keys is None:
            prompt_keys = self.prompt_keys(prompt_ids, cache_salt)
        req = Request(request_id, priority_class, len(prompt_ids), sampling.max_tokens, now,
                      None if deadline_s is None else now + deadline_s, ttft_target_s=ttft, tpot_target_s=tpot,
                      page_keys=tuple(prompt_keys))
        entry = Entry(req, Sequence(request_id, prompt_ids, sampling, seed), cache_salt=cache_salt)
        self.scheduler.submit(req)
        self.entries[request_id] = entry
        return entry

    def prompt_keys(self, prompt_ids: Seq[int], cache_salt: str | None = None) -> list[bytes]:
        """The content keys of the prompt's full pages (none with the prefix cache off). Reads no state."""
        return page_keys(prompt_ids, self.page_size, cache_salt) if self.prefix_cache else []

    def cancel(self, request_id: str) -> None:
        """The request leaves at its lane's next step boundary (or now, if it waits)."""
        entry = self.entries.get(request_id)
        if entry is not None:
            self.scheduler.cancel(entry.request)

    def take_finished(self, now: float) -> list[Entry]:
        """Requests that ended since the last call (their pages are back); they leave the core."""
        done = []
        for req in self.scheduler.take_finished():
            entry = self.entries.pop(req.request_id)
            entry.finish_time = now
            self.completed[req.priority_class] += 1
            done_record = Finished(req, tuple(entry.seq.output_ids), entry.first_token_time, now,
                                   entry.served_by, entry.error, entry.moved, req.cached_tokens or 0)
            self.recent.append(done_record)
            if entry.first_token_time is not None:
                cls = self.classes[req.priority_class]
                self._met[cls.name].append(figures.meets_slo(done_record.latency, req.ttft_target_s or cls.ttft_target_s,
                                                             req.tpot_target_s or cls.tpot_target_s))
            done.append(entry)
        return done

    # -- steps ---------------------------------------------------------------------------
    def in_plan(self, lane_name: str) -> bool:
        return lane_name in self.scheduler.lanes and lane_name not in self.unhealthy

    def next_step(self, lane_name: str, now: float) -> list[Work]:
        """The work of the lane's next step (empty: nothing to do). A scheduling error fails the
        lane's running requests rather than stranding them."""
        self.now = now
        try:
            return self.scheduler.schedule(lane_name)
        except Exception as error:
            self.fail_running(lane_name, error)
            return []

    def chain_step(self, lane_name: str, work: list[Work], now: float) -> list[Work] | None:
        """The decode step to dispatch after `work`, before its tokens are read (None: the next
        step needs the boundary; also while a switch is pending)."""
        self.now = now
        if self.pending_switch is not None or not self.in_plan(lane_name):
            return None
        return self.scheduler.next_decode(lane_name, work)

    def step_done(self, lane_name: str, work: list[Work], results, seconds: float,
                  now: float) -> list[tuple[Entry, int]]:
        """A lane's step finished in `seconds`: `results` are [(rows, tokens, logprobs)], one
        token and logprob per row (host values). Returns the (request, token) pairs to stream."""
        self.now = now
        self.busy_s[lane_name] += seconds
        self.steps[lane_name] += 1
        tokens = sum(w.num_tokens for w in work)
        if all(w.num_tokens == 1 for w in work):  # a decode step: the controller's cost
            self.step_s[lane_name] = _ema(self.step_s.get(lane_name, seconds), seconds)
        elif tokens > self.recompute_sample_tokens:  # prefill-heavy: a recompute cost sample
            self.costs.recompute_s_per_token = _ema(self.costs.recompute_s_per_token, seconds / tokens)
        if self.tpot_budget:
            self._learn_budget(lane_name, work, seconds)
        try:
            return self._emit(lane_name, results, now)
        except Exception as error:
            self.fail_running(lane_name, error)
            return []

    def _emit(self, lane_name: str, results, now: float) -> list[tuple[Entry, int]]:
        emitted, finished, work = [], {}, []
        served_by = (self.plan_name, lane_name, self.lanes[lane_name].spec.tp)
        entries, tokenizer, eos, keyed, ps = (self.entries, self.tokenizer, self.eos_token_ids, self.prefix_cache,
                                              self.page_size)
        running = State.RUNNING
        for rows, tokens, logprobs in results:
            work.extend(rows)
            for w, token, logprob in zip(rows, tokens, logprobs):
                req = w.request
                if req.state is not running or w.start_pos + w.num_tokens < req.total_len:
                    continue  # a prompt chunk that is not the last draws nothing
                entry = entries[req.request_id]
                seq = entry.seq
                seq.output_logprobs.append(logprob)
                append_token(seq, token, tokenizer, eos)
                if keyed and seq.total_len % ps == 0:
                    self._key_last_page(entry)
                entry.served_by = served_by
                if entry.first_token_time is None:
                    entry.first_token_time = now
                emitted.append((entry, token))
                if seq.finish_reason is not None:
                    finished[req.request_id] = seq.finish_reason
        self.scheduler.complete(lane_name, work, finished=finished)
        return emitted

    def _key_last_page(self, entry: Entry) -> None:
        """The newest token completed a page: key it, chained on from the prompt's keys, so that a
        later prompt carrying this answer (an agent's next call) reuses its pages too."""
        req, seq, ps = entry.request, entry.seq, self.page_size
        if len(req.page_keys) != seq.total_len // ps - 1:
            return  # an earlier page has no key (the cache was off when it was made)
        tail = seq.output_ids[-ps:]
        page = tail if len(tail) == ps else seq.prompt_ids[len(seq.prompt_ids) - (ps - len(tail)):] + tail
        req.page_keys += (next_page_key(req.page_keys[-1] if req.page_keys else None, page, entry.cache_salt),)

    def _learn_budget(self, lane_name: str, work: list[Work], seconds: float) -> None:
        """Step time ~ decode step + the prefill programs' tokens x marginal cost, both measured
        on this lane (EMA); a chunk counts as the length of the program that runs it (the
        scheduler's `bucket_of`), since a padded program costs its whole length. The lane's
        prefill limit is what keeps a step within the tightest TPOT target of the urgent tiers it
        serves (90% of it, for the estimate's noise): at least the shortest prefill program (one
        page without buckets) so prompts still progress; no limit on a lane of relaxed tiers only."""
        sched = self.scheduler
        prefill = sum(sched.bucket_of(w.num_tokens) for w in work if w.num_tokens > 1)
        decode_s = self.step_s.get(lane_name)
        if prefill and decode_s is not None:
            marginal = max(seconds - decode_s, 0.0) / prefill
            self.prefill_s_per_token[lane_name] = _ema(self.prefill_s_per_token.get(lane_name, marginal), marginal)
        targets = [c.tpot_target_s for c in self.classes.values() if c.name in self._urgent
                   and any(q.serves(c.name) for q in [sched.lanes.get(lane_name)] if q is not None)]
        per_token = self.prefill_s_per_token.get(lane_name)
        if not targets or per_token is None or decode_s is None:
            sched.prefill_limit.pop(lane_name, None)
            return
        allowed = (0.9 * min(targets) - decode_s) / max(per_token, 1e-12)
        floor = sched.prefill_buckets[0] if sched.prefill_buckets else self.lanes[lane_name].allocator.page_size
        sched.prefill_limit[lane_name] = int(max(floor, min(allowed, sched.budget_for(lane_name))) + 1e-9)

    def fail_running(self, lane_name: str, error: Exception) -> None:
        """Finish the lane's running requests with an error (their pages go back); waiting ones stay."""
        _log.error("lane %s: engine error: %s", lane_name, error, exc_info=error)
        lane = self.scheduler.lanes.get(lane_name)
        for req in list(lane.running if lane else []):
            self.entries[req.request_id].error = f"{type(error).__name__}: {error}"
            self.scheduler.finish(lane_name, req, "error")

    def lane_failed(self, lane_name: str, error: Exception) -> None:
        """A lane's step raised: mark it unhealthy, put its requests back in line to be recomputed
        on other lanes (their streamed tokens stay: recompute re-reads prompt + output), and leave
        for a plan without it. With no such plan, requests no remaining lane serves fail."""
        _log.error("lane %s failed, marked unhealthy: %s", lane_name, error)
        self.unhealthy[lane_name] = f"{type(error).__name__}: {error}"
        self.lanes[lane_name].allocator.drop_cached()  # what a failed lane computed is not reused
        if self.controller is not None:
            self.controller.mark_unhealthy(lane_name)
        if lane_name not in self.scheduler.lanes:
            return
        self.scheduler.evict_lane(lane_name)
        healthy = [p for p in self.plans.values() if not any(s.name in self.unhealthy for s in p.lanes)]
        if healthy:
            current = self.controller.current if self.controller else None
            target = next((p for p in healthy if p.name == current), healthy[0])
            self.pending_switch = (target.name, f"lane {lane_name} failed: {self.unhealthy[lane_name]}")
            return
        for req in self.scheduler.remove_lane(lane_name):
            self.entries[req.request_id].error = f"no healthy lane serves class {req.priority_class!r}"

    def migrated(self, request: Request) -> None:
        """A preemption victim's pages moved (by the driver's mover)."""
        self.kv_moves += 1
        self.entries[request.request_id].moved += 1

    # -- plans ---------------------------------------------------------------------------
    def request_switch(self, plan_name: str, reason: str) -> None:
        if plan_name not in self.plans:
            raise ValueError(f"unknown plan {plan_name!r}; known: {sorted(self.plans)}")
        self.pending_switch = (plan_name, reason)

    def tick(self, now: float) -> tuple[str, str] | None:
        """Time advanced: the switch to carry out at the lanes' next step boundary, if any."""
        self.now = now
        if self.controller is not None and self.pending_switch is None:
            self.pending_switch = self.controller.decide(self.load(), now)
        return self.pending_switch

    def begin_switch(self, plan_name: str) -> SwitchPlan:
        """Every lane is at a step boundary: serve from `plan_name`'s lanes. Returns the moves the
        driver carries out (then `move_done` / `move_failed` each) and the recomputed requests."""
        return self.scheduler.switch_lanes(self._queues(plan_name))

    def move_done(self, move: Move, nbytes: int, seconds: float) -> None:
        """A switch's move took `seconds` for `nbytes` of KV: the cost model learns from it."""
        self.kv_moves += 1
        self.entries[move.request.request_id].moved += 1
        if seconds > 0:
            self.costs.move_bytes_per_s = _ema(self.costs.move_bytes_per_s, nbytes / seconds)

    def move_failed(self, move: Move, plan: SwitchPlan) -> None:
        self.scheduler.move_failed(move, plan.leaving[move.src])

    def end_switch(self, plan_name: str, reason: str, plan: SwitchPlan, moved: int, moved_bytes: int,
                   move_s: float, duration_s: float, now: float) -> PlanSwitch:
        record = PlanSwitch(now, self.plan_name, plan_name, reason, duration_s, moved,
                            len(plan.recomputed) + len(plan.moves) - moved, moved_bytes, move_s)
        self.switches.append(record)
        current = {s.name for s in self.plans[plan_name].lanes}
        for name, lane in self.lanes.items():
            if name not in current:  # a lane out of the plan admits nothing: its idle cached pages go
                lane.allocator.drop_cached()
        self.plan_name = plan_name
        self.plan_history.append((now, plan_name))
        self.pending_switch = None
        if self.controller is not None:
            self.controller.force(plan_name, now)
        return record

    def _queues(self, plan_name: str) -> list[LaneQueue]:
        return [LaneQueue(s.name, s.classes, self.lanes[s.name].allocator, self.max_batch)
                for s in self.plans[plan_name].lanes]

    # -- figures -------------------------------------------------------------------------
    def reset_stats(self, now: float) -> None:
        self.now = self.stats_t0 = now
        self.busy_s = {name: 0.0 for name in self.lanes}
        self.steps = {name: 0 for name in self.lanes}
        self.plan_history: list[tuple[float, str]] = [(now, self.plan_name)]
        self.scheduler.prefix_counts.clear()  # hit rates count from here too

    def lanes_info(self) -> list[dict]:
        """Every lane of the plan set: name, device ids, TP degree, KV pages, health, whether in
        the current plan (and the classes it serves there), and its measured decode step time
        (None until measured)."""
        current = {s.name: s.classes for s in self.plans[self.plan_name].lanes}
        return [{"name": name, "devices": [int(d) for d in lane.spec.devices], "tp": lane.spec.tp,
                 "kv_pages_used": lane.allocator.num_used, "kv_pages_total": lane.allocator.num_pages,
                 "kv_pages_cached": lane.allocator.num_cached, "healthy": name not in self.unhealthy,
                 "in_plan": name in current,
                 "serves": list(current.get(name, ())),  # the classes it serves in the current plan
                 "decode_step_s": self.step_s.get(name)}
                for name, lane in self.lanes.items()]

    def prefix_stats(self) -> dict:
        """Whether the prefix cache is on; hit rates (cached prompt tokens / prompt tokens, at
        first admissions) by tier, by lane and in total; idle cached pages per lane."""
        return {"enabled": self.prefix_cache, **self.scheduler.prefix_stats(),
                "cached_pages": {name: lane.allocator.num_cached for name, lane in self.lanes.items()}}

    def running_counts(self) -> dict[str, int]:
        """Running requests per class, over the lanes of the current plan."""
        running = dict.fromkeys(self.classes, 0)
        running.update(collections.Counter(r.priority_class for q in self.scheduler.lanes.values() for r in q.running))
        return running

    def load(self) -> Load:
        return Load(self.scheduler.queues.counts(), self.running_counts(), self.slo_attainment(), dict(self.step_s))

    def slo_attainment(self) -> dict[str, float]:
        """Per class, the fraction of its last `SLO_WINDOW` finished requests that got a token and
        met both targets (kept as they finish: the control loop asks every tick)."""
        return {c: figures.attainment(list(met)) for c, met in self._met.items() if met}

    def class_stats(self) -> dict[str, dict]:
        """Per class: TTFT/TPOT/e2e p50/p99 of the recent finished requests that got a token."""
        return class_stats(list(self.recent), dict(self.completed))

    def busy_fraction(self, now: float) -> float:
        """Device-seconds inside steps over device-seconds elapsed since `reset_stats`, over the
        devices of the whole plan set (a lane of TP n keeps n devices busy while it steps)."""
        elapsed = now - self.stats_t0
        devices = {d for lane in self.lanes.values() for d in lane.spec.devices}
        busy = sum(s * self.lanes[name].spec.tp for name, s in self.busy_s.items())
        return min(1.0, busy / (elapsed * len(devices))) if elapsed > 0 else 0.0


def class_stats(recent: list[Finished], completed: dict[str, int]) -> dict[str, dict]:
    """Per class: TTFT/TPOT/e2e p50/p99 of `recent` finished requests that got a token, how many,
    and `completed` (finished since start)."""
    lats: dict[str, list] = {}
    for f in recent:
        if f.first_token_time is not None:
            lats.setdefault(f.request.priority_class, []).append(
                figures.latency(f.request.arrival, f.first_token_time, f.finish_time, len(f.output_ids)))
    return {c: figures.latency_summary(v) | {"completed": len(v), "finished_total": completed.get(c, 0)}
            for c, v in lats.items()}


def _ema(old: float, new: float, weight: float = 0.2) -> float:
    return (1 - weight) * old + weight * new
