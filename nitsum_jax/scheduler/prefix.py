"""Prefix caching as the scheduler sees it: which cached pages a request reuses at admission,
which lane of the plan should admit it, and which of its computed full pages (prompt and
output: the engine core keys output pages as they fill) it offers to its lane's cache. A part of `Scheduler` (its state changes stay in the scheduler).

The lane rule. Among the lanes of the plan that serve the request's tier and could take it now
(a free batch slot, pages for its first chunk, healthy), the request goes to the lane with the
fewest estimated steps until its prompt is computed:

    steps(lane) = (prefill tokens queued on the lane + the request's tokens not cached there)
                  / (prefill tokens a step of the lane carries: its token budget less one token
                     per decoding row, within its prefill limit; at least 1)

so a cached prefix counts for exactly the prefill it saves, against the work already queued
where it is cached. Ties go to the lane asking (admission is pulled by each lane at its step
boundary), so a request is never bounced between lanes; with no cached prefix on any lane the
rule is not applied and admission is what it is without a cache.
"""

from __future__ import annotations

from typing import Callable

from nitsum_jax.scheduler.requests import LaneQueue, Request


class PrefixReuse:
    """Mixed into `Scheduler`: uses its `lanes`, `classes`, `prefill_chunk`, `prefill_limit` and
    `budget_for`."""

    def _init_prefix(self) -> None:
        # Whether a lane may admit now (the engine core says no for an unhealthy lane).
        self.can_admit: Callable[[str], bool] = lambda lane_name: True
        # (tier, lane) -> [requests, prompt tokens, cached prompt tokens], at first admissions.
        self.prefix_counts: dict[tuple[str, str], list[int]] = {}

    def cached_prefix(self, lane: LaneQueue, req: Request) -> list[int]:
        """The lane's cached pages of the request's prefix that it may reuse: never the page of
        the last token it holds, which is computed so that the step draws the next token."""
        usable = min(len(req.page_keys), (req.total_len - 1) // lane.allocator.page_size)
        return lane.allocator.match(req.page_keys[:usable]) if usable > 0 else []

    def _defers(self, lane: LaneQueue, req: Request) -> bool:
        """Whether another lane should admit `req` by the lane rule (module docstring)."""
        if not req.page_keys or req.num_computed:
            return False
        hits = {name: len(self.cached_prefix(q, req)) * q.allocator.page_size
                for name, q in self.lanes.items() if q is lane or q.serves(req.priority_class)}
        if not any(hits.values()):
            return False
        options = [q for name, q in self.lanes.items()
                   if name in hits and (q is lane or self._could_admit(q, req, hits[name]))]
        best = min(options, key=lambda q: (self.prefill_steps(q, req, hits[q.name]), q is not lane, q.name))
        return best is not lane

    def _could_admit(self, q: LaneQueue, req: Request, hit: int) -> bool:
        first_chunk = min(req.total_len, hit + self.prefill_chunk)
        return (len(q.running) < q.max_batch and self.can_admit(q.name)
                and q.allocator.num_free >= q.allocator.pages_for(first_chunk))

    def prefill_steps(self, q: LaneQueue, req: Request, hit: int) -> float:
        """Estimated steps of lane `q` until `req`'s prompt is computed there, with `hit` tokens cached."""
        ahead = sum(r.total_len - r.num_computed for r in q.running if r.in_prefill)
        decoding = sum(1 for r in q.running if not r.in_prefill)
        per_step = min(self.budget_for(q.name) - decoding, self.prefill_limit.get(q.name, self.budget_for(q.name)))
        return (ahead + req.total_len - hit) / max(1, per_step)

    def _attach_cached(self, lane: LaneQueue, req: Request) -> None:
        """At admission: the request holds the lane's cached pages of its prefix and starts after them."""
        if not req.page_keys or req.num_computed or req.request_id in lane.allocator:
            return
        pages = self.cached_prefix(lane, req)
        if pages:
            lane.allocator.attach(req.request_id, pages, self.classes[req.priority_class].rank)
        req.num_computed, req.published = len(pages) * lane.allocator.page_size, len(pages)

    def _detach_cached(self, lane: LaneQueue, req: Request) -> None:
        """Admission failed after `_attach_cached`: the cached pages go back (idle, still cached)."""
        if req.request_id in lane.allocator:
            lane.allocator.free(req.request_id)
        req.num_computed = req.published = 0

    def _count_admission(self, lane: LaneQueue, req: Request) -> None:
        if req.cached_tokens is not None:
            return  # counted at its first admission; a readmission recomputes, it is not a new prompt
        req.cached_tokens = min(req.num_computed, req.prompt_len)
        counts = self.prefix_counts.setdefault((req.priority_class, lane.name), [0, 0, 0])
        counts[0] += 1
        counts[1] += req.prompt_len
        counts[2] += req.cached_tokens

    def _publish(self, lane: LaneQueue, req: Request) -> None:
        """Offer the request's newly computed full pages that have keys to the lane's cache."""
        full = min(len(req.page_keys), req.num_computed // lane.allocator.page_size)
        if full <= req.published or req.lane != lane.name:
            return
        rank = self.classes[req.priority_class].rank
        for index in range(req.published, full):
            lane.allocator.publish(req.request_id, index, req.page_keys[index], rank)
        req.published = full

    def prefix_stats(self) -> dict:
        """Hit rates of first admissions: {"by_tier": {tier: figures}, "by_lane": {lane: figures},
        "total": figures}, figures = requests, prompt_tokens, cached_tokens, hit_rate (cached
        prompt tokens / prompt tokens)."""
        by_tier: dict[str, list[int]] = {}
        by_lane: dict[str, list[int]] = {}
        total = [0, 0, 0]
        for (tier, lane), counts in self.prefix_counts.items():
            for bucket in (by_tier.setdefault(tier, [0, 0, 0]), by_lane.setdefault(lane, [0, 0, 0]), total):
                for i, v in enumerate(counts):
                    bucket[i] += v
        return {"by_tier": {k: _figures(v) for k, v in by_tier.items()},
                "by_lane": {k: _figures(v) for k, v in by_lane.items()}, "total": _figures(total)}


def _figures(counts: list[int]) -> dict:
    requests, prompt, cached = counts
    return {"requests": requests, "prompt_tokens": prompt, "cached_tokens": cached,
            "hit_rate": cached / prompt if prompt else None}
