"""The engine core on a virtual clock: `EngineCore` driven by an event heap, as the GPU runtime
(`engine/runtime.py`) drives it with threads.

Events: a request arrives (`submit`), a lane's step ends (its seconds from the step model),
the control loop ticks (`tick`, every `tick_s` while anything is in flight, as the runtime's
control thread does every 5 ms), a plan switch ends (its cost from the profile: the switch's own
time plus each move's bytes over the measured bandwidth). A lane, at its step boundary, asks the
core for work; single-program decode steps chain as the runtime's do (`chain_step` right after
dispatch, while the step is in flight); a pending switch waits for every lane's step to end.
Every decision is the core's. Decode tokens are a fixed id and every request finishes by
length (`ignore_eos`): the figures depend on token counts, not on token values.
"""

from __future__ import annotations

import dataclasses
import heapq

from nitsum_jax.bench.backends import COMPLETED, FAILED, REJECTED, make_record
from nitsum_jax.bench.workload import BenchRequest
from nitsum_jax.engine.core import EngineCore
from nitsum_jax.engine.stats import COMPLETED_REASONS
from nitsum_jax.plans.spec import Plan, check_plan_classes
from nitsum_jax.sampling_params import SamplingParams
from nitsum_jax.scheduler import CostModel, PriorityClass, QueueFull, Work
from nitsum_jax.scheduler.controller import PlanController
from nitsum_jax.sim.lanes import Grid, MoveCosts, SimLane
from nitsum_jax.sim.step_model import StepModel

TOKEN = 1  # every decoded token (values do not matter to the figures)
ARRIVE, STEP, TICK, SWITCH_END, WAKE = 0, 1, 2, 3, 4  # event kinds; at equal times a lower kind goes first


@dataclasses.dataclass(frozen=True)
class SimSettings:
    grid: Grid = Grid()
    num_pages: int = 4096  # KV pages per lane
    page_size: int = 16
    token_budget: int | str = 512  # or "auto": the engine's measured budget (`EngineCore`)
    tick_s: float = 0.005  # the runtime's control loop period
    chain_steps: int | None = None  # per single-program decode chain; None: as the runtime on the profile's platform
    keep_finished: int = 1000


@dataclasses.dataclass
class InStep:
    work: list[Work]
    seconds: float
    follow: list[Work] | None  # the chained decode step planned while this one runs
    chain_left: int


class Simulation:
    """One run: a plan set (with a controller, or one plan static) over a workload."""

    def __init__(self, model: StepModel, classes: dict[str, PriorityClass], plans: tuple[Plan, ...],
                 settings: SimSettings = SimSettings(), controller: PlanController | None = None,
                 initial_plan: str | None = None):
        check_plan_classes(plans, classes)
        self.settings, self.classes = settings, classes
        chunks = max(lane.tp for plan in plans for lane in plan.lanes)  # the plan set's weight chunks
        self.lanes: dict[str, SimLane] = {}
        for plan in plans:
            for spec in plan.lanes:
                if spec.name not in self.lanes:
                    self.lanes[spec.name] = SimLane(spec, settings.num_pages, settings.page_size,
                                                    model.lane(spec.tp, chunks), settings.grid,
                                                    model.profile.get("host"))
        self.moves = MoveCosts(model.profile)
        switch = model.profile.get("switch_ms")
        self.switch_s = switch["ms"] / 1e3 if switch else 0.0
        grid = settings.grid
        self.core = EngineCore(classes, plans, self.lanes, initial_plan=initial_plan,
                               token_budget=settings.token_budget, prefill_buckets=grid.prefill_len,
                               prefill_chunk=grid.prefill_len[-1],
                               max_batch=grid.decode_batch[-1],
                               costs=CostModel(kv_bytes_per_token=model.profile["kv_bytes_per_token"]),
                               controller=controller, keep_finished=settings.keep_finished, mover=self._migrate,
                               recompute_sample_tokens=grid.decode_batch[-1])
        self.now = 0.0
        self.core.scheduler.can_receive = lambda name: name not in self.in_step
        self.core.reset_stats(0.0)
        accelerator = model.profile.get("platform") != "cpu"
        chain = settings.chain_steps
        # As the runtime: single-GPU lanes on accelerators chain 64 steps, other lanes do not.
        self.chain = {name: (chain if chain is not None else 64 if accelerator and lane.spec.tp == 1 else 0)
                      for name, lane in self.lanes.items()}
        self.in_step: dict[str, InStep] = {}
        self.blocked_until = {name: 0.0 for name in self.lanes}  # migrations into or out of a lane
        self.switching = False
        self._events: list[tuple[float, int, int, object]] = []
        self._seq = 0
        self._tick_at: float | None = None
        self._changed = True  # an event other than a tick came since the controller last decided
        self.records: dict[str, dict] = {}
        self.move_s = 0.0

    # -- events ---------------------------------------------------------------------------
    def _push(self, t: float, kind: int, payload=None) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, kind, self._seq, payload))

    def run(self, requests: tuple[BenchRequest, ...]) -> list[dict]:
        """Every request's record (the bench's `make_record`), in the order given."""
        self._requests = {r.request_id: r for r in requests}
        for r in requests:
            self._push(r.arrival_s, ARRIVE, r)
        while self._events:
            self.now, kind, _, payload = heapq.heappop(self._events)
            if kind != TICK:
                self._changed = True  # the core's state changes only in events other than ticks
            if kind == ARRIVE:
                self._arrive(payload)
            elif kind == STEP:
                self._step_ended(payload)
            elif kind == TICK:
                self._tick()
            elif kind == SWITCH_END:
                self._switch_ended(*payload)  # WAKE: nothing but the lanes' look below
            if not self.switching:
                self._start_idle_lanes()
            self._want_tick()
        for rid in list(self.core.entries):  # cannot happen unless a lane stalls forever; say so
            r = self._requests[rid]
            self.records[rid] = make_record(r, 0.0, sent=r.arrival_s, first_token=None, finish=None,
                                            output_tokens=0, status=FAILED, error="never finished (simulation)")
        return [self.records[r.request_id] for r in requests]

    def _arrive(self, r: BenchRequest) -> None:
        if r.prompt_len + r.output_len > self.settings.grid.max_seq_len:
            self._reject(r, f"prompt ({r.prompt_len}) + max_tokens ({r.output_len}) exceeds max_seq_len "
                            f"{self.settings.grid.max_seq_len}")
            return
        sampling = SamplingParams(max_tokens=r.output_len, ignore_eos=True)
        try:
            if r.prompt_ids:  # a workload with contents (the agent chains): the prefix cache hits what it would
                self.core.submit(r.request_id, list(r.prompt_ids), sampling, 0, r.priority_class, self.now)
            else:  # a trace gives lengths only: nothing is known to be shared, so nothing is cached
                self.core.submit(r.request_id, [TOKEN] * r.prompt_len, sampling, 0, r.priority_class, self.now,
                                 prompt_keys=())
        except (QueueFull, ValueError) as error:
            self._reject(r, str(error))

    def _reject(self, r: BenchRequest, error: str) -> None:
        self.records[r.request_id] = make_record(r, 0.0, sent=self.now, first_token=None, finish=None,
                                                 output_tokens=0, status=REJECTED, error=error)

    def _flush_finished(self) -> None:
        for entry in self.core.take_finished(self.now):
            req = entry.request
            r = self._requests[req.request_id]
            ok = req.finish_reason in COMPLETED_REASONS
            self.records[req.request_id] = make_record(
                r, 0.0, sent=req.arrival, first_token=entry.first_token_time, finish=entry.finish_time,
                output_tokens=len(entry.seq.output_ids), status=COMPLETED if ok else FAILED,
                finish_reason=req.finish_reason, error=entry.error)

    # -- lanes ----------------------------------------------------------------------------
    def _start_idle_lanes(self) -> None:
        """Lanes not in a step look for work (the runtime's lane threads, woken): only while a
        request waits or the lane still holds running ones, else the core has nothing for them."""
        scheduler = self.core.scheduler
        waiting = {c for c in self.classes if scheduler.waiting_count(c)}
        queues = scheduler.lanes
        for name in self.lanes:
            if name in self.in_step or name not in queues:
                continue
            queue = queues[name]
            if (queue.running or any(queue.serves(c) for c in waiting)) and self.core.in_plan(name):
                self._start_step(name)

    def _start_step(self, name: str) -> None:
        if self.blocked_until[name] > self.now:
            self._push(self.blocked_until[name], WAKE)  # look again when its migration has landed
            return
        work = self.core.next_step(name, self.now)
        self._flush_finished()
        if work:
            self._dispatch(name, work, self.chain[name], self.lanes[name].host_seconds(work))

    def _dispatch(self, name: str, work: list[Work], chain_left: int, host_s: float = 0.0) -> None:
        """`host_s`: the engine's host time before the step starts (a step that is not chained;
        a chained one was enqueued while the last ran)."""
        lane = self.lanes[name]
        seconds = lane.step_seconds(work)
        self.in_step[name] = InStep(work, seconds, None, chain_left)
        if chain_left > 0 and not self.switching and lane.programs(work) == 1:
            self.in_step[name].follow = self.core.chain_step(name, work, self.now)
        self._push(self.now + host_s + seconds, STEP, name)

    def _step_ended(self, name: str) -> None:
        step = self.in_step.pop(name)
        results = [(rows, [TOKEN] * len(rows), [0.0] * len(rows)) for rows in self._programs(name, step.work)]
        self.core.step_done(name, step.work, results, step.seconds, self.now)
        self._flush_finished()
        if step.follow is not None:
            self._dispatch(name, step.follow, step.chain_left - 1)
        elif self.switching and not self.in_step:
            self._begin_switch()

    def _programs(self, name: str, work: list[Work]) -> list[list[Work]]:
        top = self.lanes[name].grid.decode_batch[-1]
        singles = [w for w in work if w.num_tokens == 1]
        return [singles[i:i + top] for i in range(0, len(singles), top)] + [[w] for w in work if w.num_tokens > 1]

    def _migrate(self, request, src: str, dst: str) -> None:
        """A preemption victim's pages move now; both lanes wait for the copy before their next step."""
        _, seconds = self._move_pages(request.request_id, src, dst)
        for name in (src, dst):
            self.blocked_until[name] = max(self.blocked_until[name], self.now) + seconds
        self.core.migrated(request)

    def _move_pages(self, request_id: str, src: str, dst: str) -> tuple[int, float]:
        """As `PlanSet.move` does to the allocators; returns the sequence's KV bytes and the
        move's seconds by the profile."""
        a, b = self.lanes[src], self.lanes[dst]
        pages = a.allocator.pages(request_id)
        nbytes = len(pages) * a.allocator.page_size * self.moves.kv_bytes_per_token
        b.allocator.reserve(request_id, len(pages) * a.allocator.page_size)
        a.allocator.free(request_id)
        seconds = self.moves.seconds(a.spec, b.spec, nbytes)
        self.move_s += seconds
        return nbytes, seconds

    # -- control and switches ---------------------------------------------------------------
    def _want_tick(self) -> None:
        """Keep the control loop ticking while requests are in flight, a switch is pending, or the
        controller would move from the current plan (an idle engine's ticks do nothing else)."""
        if self._tick_at is not None and self._tick_at > self.now:
            return
        busy = self.core.entries or self.core.pending_switch or self.switching
        if busy or (self.core.controller is not None
                    and self.core.controller.preferred(self.core.load())[0] != self.core.plan_name):
            self._tick_at = self.now + self.settings.tick_s
            self._push(self._tick_at, TICK)

    def _tick(self) -> None:
        if self.switching:
            return
        controller = self.core.controller
        if not self._changed and self.core.pending_switch is None and controller is not None and controller.settled:
            return  # the same load as the last tick, which stayed: the controller would stay again
        self._changed = False
        pending = self.core.tick(self.now)
        if pending:
            self.switching = True
            if not self.in_step:
                self._begin_switch()

    def _begin_switch(self) -> None:
        name, reason = self.core.pending_switch
        if name == self.core.plan_name:  # as `_switch_now`: nothing to do
            self.core.pending_switch, self.switching = None, False
            return
        plan = self.core.begin_switch(name)
        moved = moved_bytes = 0
        move_s = 0.0
        for move in plan.moves:
            nbytes, seconds = self._move_pages(move.request.request_id, move.src, move.dst)
            self.core.move_done(move, nbytes, seconds)
            moved, moved_bytes, move_s = moved + 1, moved_bytes + nbytes, move_s + seconds
        duration = self.switch_s + move_s
        self._push(self.now + duration, SWITCH_END, (name, reason, plan, moved, moved_bytes, move_s, duration))

    def _switch_ended(self, name, reason, plan, moved, moved_bytes, move_s, duration) -> None:
        self.core.end_switch(name, reason, plan, moved, moved_bytes, move_s, duration, self.now)
        self.core.pending_switch, self.switching = None, False
        self._flush_finished()

    def window_stats(self) -> dict:
        """What the bench's engine backend reports for a run (`Engine.stats()` fields)."""
        core = self.core
        return {"device_busy_fraction": core.busy_fraction(self.now),
                "plan_switches": [dataclasses.asdict(s) for s in core.switches],
                "kv_moves": core.kv_moves, "preemptions": len(core.scheduler.preemption_log),
                "plan_history": list(core.plan_history), "lane_busy_s": dict(core.busy_s),
                "steps": dict(core.steps), "move_s": self.move_s, "prefix_cache": core.prefix_stats()}
