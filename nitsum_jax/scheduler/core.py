"""The scheduler core: plain Python, no JAX, driven by an injectable clock.

Per lane and per step it decides which requests run and how many new tokens each gets:
decodes first (one token each), then prefill chunks in the remaining token budget, so a long
low-class prompt cannot stall a lane's decode. Admission reserves KV pages, reusing the lane's
cached pages of the request's prefix (`prefix.py`, which also picks the lane); a waiting request
of a more urgent class may preempt running less urgent ones when pages or batch slots are
short. A preempted request keeps its arrival time (its place in line) and is never preempted
twice; waiting requests age, so no class starves. Every change of the scheduler's state goes
through its methods: submit, cancel, schedule, complete, finish, evict a lane, switch lanes.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

from nitsum_jax.scheduler.classes import PriorityClass
from nitsum_jax.scheduler.prefix import PrefixReuse
from nitsum_jax.scheduler.queues import WaitingQueues
from nitsum_jax.scheduler.switch import SwitchPlanning
from nitsum_jax.scheduler.requests import (CostModel, LaneQueue, Move, QueueFull, Request, State, SwitchPlan,
                                           Work)

__all__ = ["CostModel", "LaneQueue", "Move", "QueueFull", "Request", "Scheduler", "State", "SwitchPlan", "Work"]

_log = logging.getLogger(__name__)


class Scheduler(SwitchPlanning, PrefixReuse):
    def __init__(self, classes: dict[str, PriorityClass], lanes: list[LaneQueue], *,
                 clock: Callable[[], float] = time.monotonic, token_budget: int = 512, prefill_chunk: int = 128,
                 max_preemptions: int = 1, costs: CostModel | None = None,
                 mover: Callable[[Request, str, str], None] | None = None, prefill_buckets: Sequence[int] = ()):
        """`mover(request, src_lane, dst_lane)` moves a preemption victim's KV pages at once (it
        may raise: the victim is then recomputed); without one, victims are always recomputed.
        `token_budget`: new tokens a step of a lane may carry, an int for every lane or a
        {lane name: int} (lanes absent from it take `default_budget`). `prefill_buckets`: the
        lengths of the lanes' prefill programs; a chunk runs as the shortest that holds it, so a
        lane with a `prefill_limit` is charged that length for each chunk (`bucket_of`)."""
        self.classes, self.clock = classes, clock
        self.costs, self.mover = costs or CostModel(), mover
        self.migrations: list[tuple[float, str, str, str]] = []  # (time, request, from lane, to lane)
        self.lanes = {lane.name: lane for lane in lanes}
        self.prefill_chunk, self.max_preemptions = prefill_chunk, max_preemptions
        self.default_budget = token_budget if isinstance(token_budget, int) else 512
        self.lane_budget: dict[str, int] = {} if isinstance(token_budget, int) else dict(token_budget)
        # Prefill tokens a lane's step may carry beside its decodes (absent: no limit beyond the
        # budget); the engine core sets it from measured step costs so urgent tiers keep their TPOT.
        self.prefill_limit: dict[str, int] = {}
        self.prefill_buckets = tuple(sorted(prefill_buckets))
        self.queues = WaitingQueues(classes)
        # Requests with a deadline or a cancel, until they end (a dict: insertion order is deterministic).
        self._watched: dict[Request, None] = {}
        self.finished: list[Request] = []  # finished since the owner last took them (`take_finished`)
        self.preemption_log: list[tuple[float, str, str]] = []  # (time, victim, for whom)
        # Whether a lane may take a migrated sequence now (the engine says no while its step runs).
        self.can_receive: Callable[[str], bool] = lambda lane_name: True
        self._init_prefix()

    @property
    def token_budget(self) -> int:
        return self.default_budget

    def budget_for(self, lane_name: str) -> int:
        return self.lane_budget.get(lane_name, self.default_budget)

    def bucket_of(self, n: int) -> int:
        """The length of the prefill program that runs an n-token chunk (n without buckets)."""
        return next((b for b in self.prefill_buckets if b >= n), n)

    def _prefill_take(self, lane_name: str, want: int, budget: int, prefill_left: int) -> tuple[int, int]:
        """(tokens, what they cost of `prefill_left`) of a prefill chunk of at most `want` tokens.
        Under a lane's `prefill_limit` a chunk costs its program's length, and is cut to the
        longest program that fits what is left, so the limit bounds the programs' work."""
        n = min(self.prefill_chunk, want, budget, prefill_left)
        if not self.prefill_buckets or lane_name not in self.prefill_limit or n <= 0:
            return n, n
        fits = [b for b in self.prefill_buckets if b <= prefill_left]
        if not fits:
            return 0, 0
        n = min(n, fits[-1])
        return n, self.bucket_of(n)

    # -- intake --------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        if request.priority_class not in self.classes:
            raise ValueError(f"unknown priority class {request.priority_class!r}; known: {sorted(self.classes)}")
        self.queues.push(request)
        if request.deadline is not None:
            self._watched[request] = None

    def cancel(self, request: Request) -> None:
        request.cancel_requested = True
        self._watched[request] = None

    @property
    def waiting(self) -> list[Request]:
        """Every waiting request, most urgent first (a copy: change them through the methods)."""
        return self.queues.all(self.urgency_at(self.clock()))

    def waiting_count(self, class_name: str) -> int:
        return self.queues.count(class_name)

    def take_finished(self) -> list[Request]:
        """Requests that ended since the last call, in the order they ended."""
        done, self.finished = self.finished, []
        return done

    # -- one step ------------------------------------------------------------------------
    def urgency_at(self, now: float) -> Callable[[Request], tuple[float, float]]:
        """The sort key of requests at time `now`: effective rank (class rank minus aging), then
        arrival (the clock is read once for a whole step's decisions)."""
        classes = self.classes

        def key(request: Request) -> tuple[float, float]:
            cls = classes[request.priority_class]
            return cls.rank - (now - request.arrival) / cls.aging_s, request.arrival
        return key

    def schedule(self, lane_name: str) -> list[Work]:
        """The work of the lane's next step. Call at a step boundary."""
        lane = self.lanes[lane_name]
        self._reap(lane)
        work: list[Work] = []
        stalled: list[tuple[Request, int]] = []  # running requests with no page to grow into
        budget = self.budget_for(lane_name)
        prefill_left = self.prefill_limit.get(lane_name, budget)
        urgency = self.urgency_at(self.clock())
        # 1. Running decodes grow by one token; running prefills continue.
        for req in sorted(lane.running, key=urgency):
            if req.state is not State.RUNNING or req.lane != lane.name:
                continue  # preempted below for a more urgent running request
            n, cost = (1, 0) if not req.in_prefill else self._prefill_take(
                lane_name, req.total_len - req.num_computed, budget, prefill_left)
            if n <= 0:
                continue
            if not self._reserve(lane, req, req.num_computed + n):
                stalled.append((req, n))
                continue
            work.append(Work(req, req.num_computed, n))
            budget -= n
            prefill_left -= cost
        # 2. Admit waiting requests the lane serves, most urgent first. In a full lane only a
        # request that can preempt is admitted, and whether one can depends on its class's rank
        # alone: once a rank finds no victim, no request of that rank or a less urgent one is tried.
        blocked = None  # the most urgent rank that found no victim in the full lane
        top_rank = min(self.queues.waiting_ranks(lane.serves), default=None)
        for req in self.queues.ordered(urgency, lane.serves):
            if budget <= 0 or prefill_left <= 0:
                break
            if req.state is not State.WAITING:
                continue  # taken meanwhile (a copy of the queues is iterated)
            if len(lane.running) >= lane.max_batch:
                rank = self.classes[req.priority_class].rank
                if (blocked is None or rank < blocked) and self._victim_below(lane, rank) is None:
                    blocked = rank
                if blocked is not None and rank >= blocked:
                    if blocked <= top_rank:
                        break  # no waiting request of any rank can preempt
                    continue
            if self._defers(lane, req):
                continue  # another lane holds more of its prefix for the load it carries
            if len(lane.running) >= lane.max_batch and not self._preempt_for(lane, req):
                continue
            self._attach_cached(lane, req)
            n, cost = self._prefill_take(lane_name, req.total_len - req.num_computed, budget, prefill_left)
            if n <= 0 and lane_name in self.prefill_limit:  # no prefill program fits what is left
                self._detach_cached(lane, req)
                break
            if not self._reserve(lane, req, req.num_computed + n):
                self._detach_cached(lane, req)
                continue
            self._count_admission(lane, req)
            self.queues.remove(req)
            req.state, req.lane = State.RUNNING, lane.name
            lane.running.append(req)
            work.append(Work(req, req.num_computed, n))
            budget -= n
            prefill_left -= cost
        # 3. Nothing could move: running requests each hold part of the lane and wait for each
        # other. The latest of the least urgent gives way so the most urgent stalled one grows.
        if not work:
            for req, n in stalled:
                if req in lane.running and self._make_room(lane, req, req.num_computed + n):
                    work.append(Work(req, req.num_computed, n))
                    break
        # Admission may have preempted (or moved away) a request planned above.
        return [w for w in work if w.request.state is State.RUNNING and w.request.lane == lane.name]

    def next_decode(self, lane_name: str, work: list[Work]) -> list[Work] | None:
        """The lane's step after `work` (in flight, not completed) when it can be planned now:
        every running request of the lane is in `work` drawing a token, each gets one more
        decode row, and nothing else needs the step boundary (a waiting request the lane could
        admit, a cancel or expired deadline, a request that `work` ends by length, a page that
        would need a preemption). Reserves the pages; None when `schedule` must decide."""
        lane = self.lanes[lane_name]
        if not work or len(work) != len(lane.running):
            return None
        now = self.clock()
        for w in work:
            r = w.request
            if (r.state is not State.RUNNING or r.lane != lane_name or r.cancel_requested
                    or (r.deadline is not None and now >= r.deadline)
                    or w.num_tokens != 1 or w.start_pos + 1 != r.total_len  # not a decode row
                    or r.num_output + 1 >= r.max_tokens):  # `work` gives its last token
                return None
        ranks = self.queues.waiting_ranks(lane.serves)
        if ranks:
            if len(lane.running) < lane.max_batch:
                return None
            if self._victim_below(lane, min(ranks)) is not None:  # a waiting request could preempt
                return None
        for w in work:  # the token `work` draws is written by the next step: one more position each
            r = w.request
            if lane.allocator.covers(r.request_id, r.total_len + 1):
                continue  # its pages hold the next position already (15 steps in 16)
            if not lane.allocator.can_reserve(r.total_len + 1, r.request_id):
                return None  # pages reserved so far are the ones `schedule` would reserve next
            lane.allocator.reserve(r.request_id, r.total_len + 1)
        return [Work(w.request, w.request.total_len, 1) for w in work]

    def complete(self, lane_name: str, work: list[Work], tokens: dict[str, int] | None = None,
                 finished: dict[str, str] | None = None) -> None:
        """Record a finished step: computed tokens advance; a row that finished its prompt or
        decoded gets one output token; `finished` maps request ids to a finish reason."""
        lane = self.lanes[lane_name]
        finished = finished or {}
        for w in work:
            req = w.request
            if req.state is not State.RUNNING:
                continue
            req.num_computed = w.start_pos + w.num_tokens
            self._publish(lane, req)
            if req.num_computed >= req.total_len:
                req.num_output += 1
                if req.num_output >= req.max_tokens:
                    finished.setdefault(req.request_id, "length")
            if req.request_id in finished:
                self.finish(lane_name, req, finished[req.request_id])

    def finish(self, lane_name: str, req: Request, reason: str) -> None:
        """A running request ends (`reason`: stop, length, cancelled, deadline, error); its pages go back."""
        lane = self.lanes[lane_name]
        lane.running.remove(req)
        if req.request_id in lane.allocator:
            lane.allocator.free(req.request_id)
        self._ended(req, reason)

    def drop_waiting(self, req: Request, reason: str) -> None:
        """A waiting request ends without running (no lane can serve it)."""
        self.queues.remove(req)
        self._ended(req, reason)

    def _ended(self, req: Request, reason: str) -> None:
        # Its page keys (32 bytes a page) are not needed any more: the finished record stays small.
        req.state, req.finish_reason, req.page_keys = State.FINISHED, reason, ()
        self.finished.append(req)

    # -- lanes ---------------------------------------------------------------------------
    def evict_lane(self, lane_name: str) -> list[Request]:
        """Every running request of a lane goes back in line (the lane failed or is leaving)."""
        lane = self.lanes[lane_name]
        evicted = list(lane.running)
        for req in evicted:
            self._requeue(lane, req)
        return evicted

    def remove_lane(self, lane_name: str) -> list[Request]:
        """A lane leaves for good (it failed and no plan is without it): its running requests go
        back in line, and waiting requests no remaining lane serves end with "error" (returned)."""
        self.evict_lane(lane_name)
        del self.lanes[lane_name]
        stranded = [r for r in self.waiting if not any(q.serves(r.priority_class) for q in self.lanes.values())]
        for req in stranded:
            self.drop_waiting(req, "error")
        return stranded

    def pages_in_use(self) -> dict[str, int]:
        return {name: lane.allocator.num_used for name, lane in self.lanes.items()}

    # -- internals -----------------------------------------------------------------------
    def _reap(self, lane: LaneQueue) -> None:
        """Cancelled or expired requests leave at the step boundary and give their pages back."""
        now = self.clock()
        for req in list(lane.running):
            if req.cancel_requested or (req.deadline is not None and now >= req.deadline):
                self.finish(lane.name, req, "cancelled" if req.cancel_requested else "deadline")
        for req in list(self._watched):
            if req.state is State.FINISHED:
                del self._watched[req]
            elif req.state is State.WAITING and (req.cancel_requested or now >= req.deadline):
                self.drop_waiting(req, "cancelled" if req.cancel_requested else "deadline")
                del self._watched[req]

    def _reserve(self, lane: LaneQueue, req: Request, tokens: int) -> bool:
        if lane.allocator.covers(req.request_id, tokens):
            return True  # its pages hold the tokens already (a decode row, most steps)
        while not lane.allocator.can_reserve(tokens, req.request_id):
            if not self._preempt_for(lane, req):
                return False
        lane.allocator.reserve(req.request_id, tokens)
        return True

    def _make_room(self, lane: LaneQueue, req: Request, tokens: int) -> bool:
        """A running request cannot grow, and nothing else in the lane can run: requeue (for
        recompute) the least urgent, latest-arriving running request of its class or below,
        which may be `req` itself. Without this, requests admitted on the way up could each hold
        part of the lane and wait for each other forever."""
        rank = self.classes[req.priority_class].rank
        while not lane.allocator.can_reserve(tokens, req.request_id):
            candidates = [r for r in lane.running if self.classes[r.priority_class].rank >= rank]
            victim = max(candidates, key=lambda r: (self.classes[r.priority_class].rank, r.arrival))
            victim.preemptions += 1
            self._requeue(lane, victim)
            self.preemption_log.append((self.clock(), victim.request_id, req.request_id))
            if victim is req:
                return False
        lane.allocator.reserve(req.request_id, tokens)
        return True

    def _victim(self, lane: LaneQueue, for_req: Request) -> Request | None:
        """Least urgent class first; within it the latest arrival (least sunk work first).
        Only strictly less urgent classes, and never one preempted `max_preemptions` times."""
        return self._victim_below(lane, self.classes[for_req.priority_class].rank, for_req)

    def _victim_below(self, lane: LaneQueue, rank: int, for_req: Request | None = None) -> Request | None:
        """`_victim` for a request of class rank `rank` (`for_req`, if running, is never its own victim)."""
        candidates = [r for r in lane.running if r is not for_req
                      and self.classes[r.priority_class].rank > rank and r.preemptions < self.max_preemptions]
        if not candidates:
            return None
        return max(candidates, key=lambda r: (self.classes[r.priority_class].rank, r.arrival))

    def _preempt_for(self, lane: LaneQueue, for_req: Request) -> bool:
        victim = self._victim(lane, for_req)
        if victim is None:
            return False
        lane.running.remove(victim)
        victim.preemptions += 1
        self.preemption_log.append((self.clock(), victim.request_id, for_req.request_id))
        dst = self._migration_target(lane, victim)
        if dst is not None:
            try:
                self.mover(victim, lane.name, dst.name)
            except Exception:  # the move failed (its pages stay on `lane`): recompute the victim instead
                _log.exception("KV move of %s from %s to %s failed; it will be recomputed",
                               victim.request_id, lane.name, dst.name)
                dst = None
        if dst is None:
            self._recompute(lane, victim)
            return True
        victim.lane, victim.published = dst.name, 0  # its pages there are private copies, to offer again
        dst.running.append(victim)
        self.migrations.append((self.clock(), victim.request_id, lane.name, dst.name))
        return True

    def _requeue(self, lane: LaneQueue, req: Request) -> None:
        """Back to the waiting queue, pages freed, to be recomputed on readmission."""
        if req in lane.running:
            lane.running.remove(req)
        self._recompute(lane, req)

    def _recompute(self, lane: LaneQueue, req: Request) -> None:
        """`req` (already off `lane`'s running batch) goes back in line at its arrival's place,
        its pages on `lane` freed: it is recomputed (prompt and output so far) on readmission."""
        if req.request_id in lane.allocator:
            lane.allocator.free(req.request_id)
        req.state, req.lane, req.num_computed, req.published = State.WAITING, None, 0, 0
        self.queues.push(req, bounded=False)

    def _migration_target(self, lane: LaneQueue, victim: Request) -> LaneQueue | None:
        """Another lane that serves the victim's class and has a slot and pages for it, when
        moving its KV costs less than recomputing it (measured costs)."""
        if self.mover is None or victim.num_computed == 0:
            return None
        if self.costs.move_s(victim.num_computed) >= self.costs.recompute_s(victim.num_computed):
            return None
        tokens = lane.allocator.capacity(victim.request_id)
        options = [q for q in self.lanes.values() if q is not lane and q.serves(victim.priority_class)
                   and len(q.running) < q.max_batch and q.allocator.can_reserve(tokens) and self.can_receive(q.name)]
        return max(options, key=lambda q: q.allocator.num_free, default=None)
