"""Plan switches as the scheduler sees them: which running sequences of the lanes that leave
move to a lane of the new set and which are recomputed, by the measured costs and the room
there is. A part of `Scheduler` (its state changes stay in the scheduler)."""

from __future__ import annotations

from nitsum_jax.scheduler.requests import LaneQueue, Move, Request, SwitchPlan


class SwitchPlanning:
    """Mixed into `Scheduler`: uses its `lanes`, `costs` and `_recompute`."""

    def switch_lanes(self, lanes: list[LaneQueue]) -> SwitchPlan:
        """Serve from `lanes` from now on (a plan switch; every lane is at a step boundary).
        Lanes in both sets keep their running batch. Each running sequence of a lane that leaves
        moves to a lane of the new set that serves its class, has a batch slot and room for its
        pages, when the measured costs say moving is cheaper than recomputing; else it goes back
        in line (keeping its place) to be recomputed. The plan's moves are the driver's to carry
        out; a move that fails is handed back with `move_failed`."""
        new = {q.name: q for q in lanes}
        plan = SwitchPlan()
        for old in self.lanes.values():
            if old.name in new:
                new[old.name].running = old.running
        pending: dict[str, int] = {name: 0 for name in new}  # pages the planned moves will take
        for old in self.lanes.values():
            if old.name in new:
                continue
            plan.leaving[old.name] = old
            for req in list(old.running):
                old.running.remove(req)
                dst = self._switch_target(old, req, new, pending)
                if dst is None:
                    self._recompute(old, req)
                    plan.recomputed.append(req)
                    continue
                pending[dst.name] += len(old.allocator.pages(req.request_id))
                req.lane, req.published = dst.name, 0  # its pages there are private copies, to offer again
                dst.running.append(req)
                plan.moves.append(Move(req, old.name, dst.name, req.num_computed))
        self.lanes = new
        return plan

    def move_failed(self, move: Move, src_queue: LaneQueue) -> None:
        """A planned move did not happen (its pages are still on `src_queue`'s allocator, none on
        the destination): the sequence goes back in line to be recomputed."""
        dst = self.lanes.get(move.dst)
        if dst is not None and move.request in dst.running:
            dst.running.remove(move.request)
        self._recompute(src_queue, move.request)

    def _switch_target(self, old: LaneQueue, req: Request, new: dict[str, LaneQueue],
                       pending: dict[str, int]) -> LaneQueue | None:
        if req.num_computed == 0 or self.costs.move_s(req.num_computed) >= self.costs.recompute_s(req.num_computed):
            return None
        pages = len(old.allocator.pages(req.request_id))
        options = [q for q in new.values() if q.serves(req.priority_class) and len(q.running) < q.max_batch
                   and q.allocator.num_free - pending[q.name] >= pages]
        return max(options, key=lambda q: q.allocator.num_free - pending[q.name], default=None)
