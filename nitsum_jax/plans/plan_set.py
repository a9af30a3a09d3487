"""Start-up of a plan set: shared weight buffers, every lane of every plan with its KV arrays
and compiled programs, and KV moves between lanes. After `PlanSet(...)` returns, serving
compiles nothing and creates no communicators."""

from __future__ import annotations

import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nitsum_jax.config import LlamaConfig
from nitsum_jax.kernels import peer_pages
from nitsum_jax.model import Params
from nitsum_jax.plans.lane import BucketGrid, Lane
from nitsum_jax.plans.layout import assign_chunks, weight_runs
from nitsum_jax.plans.memory import MemoryBudget, memory_report
from nitsum_jax.plans.moves import MoveRoute, plan_route
from nitsum_jax.plans.spec import LaneSpec, Plan, validate_plans
from nitsum_jax.plans.weights import WeightStore
from nitsum_jax.quant import is_abstract, weights_format
from nitsum_jax.settings import Settings, settings as process_settings


def lane_name(spec: LaneSpec) -> str:
    return spec.name


class PlanSet:
    def __init__(self, cfg: LlamaConfig, params: Params | None, plans: tuple[Plan, ...], *,
                 devices: list | None = None, num_pages: int = 256, page_size: int = 16,
                 grid: BucketGrid = BucketGrid(), random_seed: int = 0, move_pieces: int | None = None,
                 move_transport: str | None = None, settings: Settings | None = None):
        """`params` is the unsplit model; None draws random weights on the devices (benchmarks), as
        does an abstract tree (`model.abstract_params(cfg, weights="fp8")`: random fp8 weights).
        `move_pieces`: a KV move is sent in up to this many pieces of pages, so that the copy
        of one piece may overlap the transfer of the next (default: NITSUM_MOVE_PIECES, else 1:
        on 4 GPUs two pieces were slower, BENCHMARKS.md, "KV moves"). Whether the host waits for a
        gather before sending it: NITSUM_MOVE_SYNC=0/1, else `_sync_for` decides per move.
        `move_transport` (default NITSUM_MOVE_TRANSPORT, else "auto"): "direct" copies pages
        GPU to GPU in one pass, by the copy engines or a kernel (kernels/peer_pages.py), "packed" gathers, sends and
        scatters (moves.py); "auto" takes direct on GPUs where its kernel builds, else packed.
        `settings`: the NITSUM_* knobs of this plan set, its lanes and its KV mover (None: the
        process's, read once: `nitsum_jax.settings.settings()`)."""
        self.cfg, self.plans = cfg, {p.name: p for p in plans}
        self.devices = list(devices or jax.devices())
        self.settings = settings = settings or process_settings()
        self.move_pieces = max(1, int(move_pieces or settings.move_pieces))
        self.move_sync: bool | None = settings.move_sync  # None: chosen per move (_sync_for)
        validate_plans(plans, len(self.devices), cfg)
        t0 = time.perf_counter()
        runs = weight_runs(assign_chunks(plans, cfg))
        self.layouts = runs.layouts
        if params is None or is_abstract(params):  # abstract: random weights of that form (fp8 or not)
            self.weights = WeightStore.random(cfg, runs, self.devices, random_seed,
                                              "bf16" if params is None else weights_format(params))
        else:
            self.weights = WeightStore.build(cfg, params, runs, self.devices)
        self.lanes: dict[tuple[int, ...], Lane] = {}
        self.num_programs = 0
        for plan in plans:
            for spec in plan.lanes:
                if spec.devices in self.lanes:
                    continue
                mesh = Mesh(np.array([self.devices[d] for d in spec.devices]), ("tp",))
                lane_params = self.weights.lane_params(spec.devices, mesh)
                lane = Lane(lane_name(spec), spec, cfg, self.layouts[spec.devices], mesh, lane_params,
                            num_pages, page_size, grid, settings)
                self.num_programs += lane.compile()
                self.lanes[spec.devices] = lane
        # Packed KV-move programs for every ordered pair of lanes, compiled now like the steps.
        self.routes: dict[tuple[tuple[int, ...], tuple[int, ...]], MoveRoute] = {}
        for a, src in self.lanes.items():
            for b, dst in self.lanes.items():
                route = plan_route(src.layout, dst.layout) if a != b else None
                if route is not None:
                    self.routes[(a, b)] = route
                    self.num_programs += src.compile_packed_gather(route.gather)
                    self.num_programs += dst.compile_packed_scatter(route.scatter)
        self.direct_pairs: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()  # lane pairs moved by the kernel
        self.move_transport, self.move_transport_note = self._build_transport(
            move_transport or settings.move_transport)
        self.budget = MemoryBudget(num_pages, page_size, max(grid.decode_batch), max(grid.prefill_len, default=1))
        self.startup_seconds = time.perf_counter() - t0

    def _build_transport(self, wanted: str) -> tuple[str, str]:
        """The transport KV moves use and why; builds the direct kernel at start-up."""
        if wanted not in ("auto", "direct", "packed"):
            raise ValueError(f"move transport {wanted!r}; expected auto, direct or packed")
        self.peer_mover = None
        if wanted == "packed":
            return "packed", "asked for"
        if self.devices[0].platform != "gpu":
            if wanted == "direct":
                raise ValueError("the direct KV-move transport needs GPUs")
            return "packed", f"no GPU ({self.devices[0].platform})"
        try:
            self.peer_mover = peer_pages.PeerPageMover(self.devices, settings=self.settings)
        except (peer_pages.CudaError, OSError) as e:
            if wanted == "direct":
                raise
            return "packed", f"direct kernel unavailable: {e}"
        self.use_transport("direct")
        mover = self.peer_mover
        engines = f"copy engines where a sequence's pages form <= {mover.engine_runs} runs, else " if mover.engine_runs else ""
        return "direct", f"one pass GPU to GPU: {engines}the kernel ({mover.mode})"

    def use_transport(self, name: str) -> None:
        """Switch KV moves to transport `name` ("direct" needs the kernel built at start-up) and
        derive the lane pairs it serves: direct where both lanes' per-device caches agree in
        rows and page size (`peer_pages.supported`), the packed path for every other pair."""
        if name not in ("direct", "packed"):
            raise ValueError(f"move transport {name!r}; expected direct or packed")
        if name == "direct" and self.peer_mover is None:
            raise ValueError("the direct KV-move transport was not built (no GPU or no NVRTC)")
        self.move_transport = name
        shard = {key: lane.slot_sharding.shard_shape(lane.kv_shape) for key, lane in self.lanes.items()}
        self.direct_pairs = {(a, b) for a, x in self.lanes.items() for b in self.lanes if a != b and name == "direct"
                             and peer_pages.supported(shard[a], shard[b], x.kv.k.dtype.itemsize)}

    def lanes_of(self, plan_name: str) -> list[Lane]:
        return [self.lanes[spec.devices] for spec in self.plans[plan_name].lanes]

    def memory_report(self) -> dict:
        return memory_report(self.cfg, tuple(self.plans.values()), self.layouts, self.budget,
                             self.weights.weights_format)

    def move(self, seq_id, src: Lane, dst: Lane, enqueue_only: bool = False) -> int:
        """Move a sequence's pages from `src` to `dst` by per-shard device-to-device copies.

        Each chunk's K/V slice goes from the device that holds it on `src` to the device that
        holds it on `dst`; page ids may change, contents do not. Returns bytes moved. If the
        move fails, it raises with the sequence still on `src` and no page held on `dst`.
        `enqueue_only`: the host must not wait for programs in flight on either lane (a lane may be
        mid-step, as in a preemption's migration), so the move takes the packed path, whose
        programs the devices order after those steps; the direct transport waits for them.
        """
        if src is dst:
            return 0
        first, second = sorted((src, dst), key=lambda lane: lane.name)  # one lock order: no deadlock
        with first.kv_lock, second.kv_lock:
            return self._move(seq_id, src, dst, enqueue_only)

    def _move(self, seq_id, src: Lane, dst: Lane, enqueue_only: bool = False) -> int:
        src_pages = src.allocator.pages(seq_id)
        dst.allocator.reserve(seq_id, len(src_pages) * src.page_size)
        dst_pages = dst.allocator.pages(seq_id)
        route = self.routes.get((src.spec.devices, dst.spec.devices))
        try:
            if not enqueue_only and (src.spec.devices, dst.spec.devices) in self.direct_pairs:
                moved = self.peer_mover.move(src, dst, src_pages, dst_pages)
            elif route is not None:
                moved = self._move_packed(route, src, dst, src_pages, dst_pages)
            else:
                moved = self._move_pieces(src, dst, src_pages, dst_pages)
        except BaseException:  # the sequence stays where it was; the destination's pages go back
            dst.allocator.free(seq_id)
            raise
        src.allocator.free(seq_id)
        return moved

    def _move_packed(self, route: MoveRoute, src: Lane, dst: Lane, src_pages: list[int],
                     dst_pages: list[int]) -> int:
        """One transfer per (source device, destination device) pair and piece (see moves.py).

        Measured on the GPU machine (BENCHMARKS.md, "KV moves"): a program whose input is still in
        flight from another device blocks its dispatch until the transfer lands, so every piece's
        gather is enqueued first, then its transfers, then the scatters."""
        want = -(-len(src_pages) // self.move_pieces)
        per = next((n for n in src.move_sizes() if n >= want), len(src_pages))
        starts = range(0, len(src_pages), per)
        gathered = [src.gather_packed(src_pages[i:i + per], route.gather) for i in starts]
        targets = [dst.devices[j] for _, _, j in route.transfers]
        sent, moved = [], 0
        sync = self._sync_for(src, dst)
        for buffers, n in gathered:
            if sync:
                jax.block_until_ready(buffers)
            shards = [{s.device: s.data for s in b.addressable_shards} for b in buffers]
            pieces = [shards[t][src.devices[i]] for t, i, _ in route.transfers]
            moved += sum(p.nbytes for p in pieces)
            sent.append((jax.device_put(pieces, targets), n))
        sharding = NamedSharding(dst.mesh, P(None, None, None, "tp"))
        for i, (placed, n) in zip(starts, sent):
            arrived = {(j, route.sources[j].index((t, k))): a for (t, k, j), a in zip(route.transfers, placed)}
            shape = dst.packed_buffer_shape(route.per_buffer, n)
            incoming = tuple(jax.make_array_from_single_device_arrays(
                shape, sharding, [arrived[(j, u)] for j in range(len(dst.devices))])
                for u in range(route.incoming))
            dst.scatter_packed(dst_pages[i:i + per], incoming, route.scatter, n)
        return moved

    def _sync_for(self, src: Lane, dst: Lane) -> bool:
        """Wait on the host for the gather before `device_put`? Measured in one run on 4 GPUs
        (BENCHMARKS.md, "KV moves"): 8-37% faster between lanes of 2+ GPUs each, 6% faster
        to 18% slower when one side is a single GPU. So: on GPU, between multi-GPU lanes."""
        if self.move_sync is not None:
            return self.move_sync
        return src.devices[0].platform == "gpu" and min(src.spec.tp, dst.spec.tp) > 1

    def _move_pieces(self, src: Lane, dst: Lane, src_pages: list[int], dst_pages: list[int]) -> int:
        """Fallback for layouts without a packed route: one transfer per (chunk, K or V) piece."""
        k_src, v_src, n = src.gather_pages(src_pages)  # per position: [layers, kv heads, n, S, H]
        where = {c: (i, r) for i, row in enumerate(src.layout.assign) for r, c in enumerate(row)}
        sharding = NamedSharding(dst.mesh, P(None, "tp"))
        out, moved = [], 0
        for arrays in (k_src, v_src):
            shards = [{s.device: s.data for s in a.addressable_shards} for a in arrays]
            # Every piece goes from its source device to its destination device in one batched
            # device_put, so the transfers between device pairs run concurrently.
            pieces, targets = [], []
            for r in range(dst.layout.slots):
                for i, device in enumerate(dst.devices):
                    si, sr = where[dst.layout.assign[i][r]]
                    pieces.append(shards[sr][src.devices[si]])
                    targets.append(device)
            placed = jax.device_put(pieces, targets)
            moved += sum(p.nbytes for p in pieces)
            width = len(dst.devices)
            shape = dst.kv_shape[:2] + (n,) + dst.kv_shape[3:]
            out.append(tuple(jax.make_array_from_single_device_arrays(
                shape, sharding, placed[r * width:(r + 1) * width]) for r in range(dst.layout.slots)))
        dst.scatter_pages(dst_pages, out[0], out[1], n)
        return moved
