"""The direct KV-move transport (kernels/peer_pages.py): one CUDA kernel pass GPU to GPU.

CI has no GPU, so the kernel itself runs on the GPU machine (bench/gpu_moves.py checks every
moved page there). Here: the kernel source compiles with NVRTC, the transport is chosen and
refused as documented, and the launches a move plans, carried out by a host executor of the
kernel's copy rule, move sequences between every TP degree with the tokens and NLL of a run that
never moved, and leave the destination cache bit-identical to the packed transport's result.
"""

import jax
import numpy as np
import pytest

from nitsum_jax.kernels import cuda, peer_pages
from nitsum_jax.plans import BucketGrid, PlanSet, parse_plans
from nitsum_jax.settings import Settings
from test_plans import PAGE_SIZE, reference, walk_moves  # noqa: F401  (reference: a fixture)

PLANS = "big: all=tp4@0-3; mix: high=tp2@0-1, low=tp1@2, low=tp1@3; pair: low=tp2@0-1, low=tp2@2-3"


class HostExecutor(peer_pages.PeerPageMover):
    """Carries out the launches `PeerPageMover.move` plans with numpy on the host, by the kernel's
    rule: for each (source, destination) array pair, page src_pages[p] of every row of the source
    shard becomes page dst_pages[p] of the same row of the destination shard; and the copy-engine
    copies it plans (`engine_runs`), each a run of adjacent pages of every row. Addresses are keys."""

    def __init__(self, mode: str, engine_runs: int = 0, engine_streams: int = 3):
        self.mode, self.engine_runs, self.engine_streams = mode, engine_runs, engine_streams
        self.launches: list = []
        self._lanes, self._groups = {}, {}

    def addresses(self, lane):
        self._lanes[lane.name] = lane
        index = {d.id: i for i, d in enumerate(lane.devices)}
        return {(kind, r, index[s.device.id]): (lane.name, kind, r, s.device.id)
                for kind, arr in enumerate((lane.kv.k, lane.kv.v)) for s in arr.addressable_shards
                for r in range(lane.layout.slots)}

    def run(self, launches, dst):
        self.launches += launches
        shards = {(dst.name, kind, s.device.id): np.array(s.data)  # [positions, L, K, P, S, H]
                  for kind, arr in enumerate((dst.kv.k, dst.kv.v)) for s in arr.addressable_shards}

        def views(skey, dkey, item):
            src_lane = self._lanes[skey[0]]
            arr = (src_lane.kv.k, src_lane.kv.v)[skey[1]]
            src = np.asarray(next(s.data for s in arr.addressable_shards if s.device.id == skey[3]))[skey[2]]
            rows = src.shape[0] * src.shape[1]
            assert rows == item.rows
            out = shards[(dkey[0], dkey[1], dkey[3])][dkey[2]].reshape(rows, item.dst_total, -1)  # a view
            assert out.dtype.itemsize * out.shape[-1] == item.words * 16
            return src.reshape(rows, item.src_total, -1), out

        for item in launches:
            if isinstance(item, peer_pages.PitchedCopy):  # copy engine: a run of adjacent pages
                assert item.runner == item.src[3] if self.mode == "push" else item.runner == item.dst[3]
                assert 0 <= item.stream < self.engine_streams
                src, out = views(item.src, item.dst, item)
                out[:, item.dst_page:item.dst_page + item.pages] = src[:, item.src_page:item.src_page + item.pages]
                continue
            assert item.runner in {k[3] for pair in item.pairs for k in pair}
            for skey, dkey in item.pairs:
                src, out = views(skey, dkey, item)
                out[:, list(item.dst_pages)] = src[:, list(item.src_pages)]

        def rebuild(kind, a):
            return jax.make_array_from_single_device_arrays(
                a.shape, a.sharding, [jax.device_put(shards[(dst.name, kind, s.device.id)], s.device)
                                      for s in a.addressable_shards])
        dst.kv = type(dst.kv)(k=rebuild(0, dst.kv.k), v=rebuild(1, dst.kv.v))


def use_direct(plan_set, executor, monkeypatch):
    """Moves of `plan_set` by the direct transport with `executor` in place of the GPU kernel;
    monkeypatch puts the plan set's transport back after the test."""
    for name in ("peer_mover", "move_transport", "direct_pairs"):
        monkeypatch.setattr(plan_set, name, getattr(plan_set, name))
    plan_set.peer_mover = executor
    plan_set.use_transport("direct")


@pytest.fixture(scope="module")
def plan_set(tiny_cfg, tiny_params):
    return PlanSet(tiny_cfg, tiny_params, parse_plans(PLANS), num_pages=24, page_size=PAGE_SIZE,
                   grid=BucketGrid(decode_batch=(1,), prefill_len=(16,), max_seq_len=64))


def test_copy_plan_sends_each_chunk_from_the_slot_holding_it_to_the_slot_that_will():
    src, dst = ((0, 1), (2, 3)), ((3, 0, 2, 1),)  # tp2 -> tp1 with the chunks in another order
    plan = peer_pages.copy_plan(src, dst)
    assert plan == {0: [(0, 0, 1), (1, 0, 3)], 1: [(0, 0, 2), (1, 0, 0)]}
    back = peer_pages.copy_plan(dst, src)
    assert back == {0: [(0, 1, 1), (1, 0, 0), (2, 1, 0), (3, 0, 1)]}


def test_launches_are_split_at_the_kernel_limits():
    plan = {0: [(r, 0, r) for r in range(10)]}  # 20 array pairs from one device
    ptr = {(k, r, 0): (k, r) for k in (0, 1) for r in range(10)}
    pages = list(range(1000))
    launches = peer_pages.plan_launches(plan, ptr, ptr, [5], [7], "push", (2, 1, 1000, 8, 16), 1000, 4, pages,
                                        pages[::-1])
    assert [(len(x.pairs), len(x.src_pages)) for x in launches] == [(16, 448), (16, 448), (16, 104),
                                                                   (4, 448), (4, 448), (4, 104)]
    assert {x.runner for x in launches} == {5}
    assert sum(x.nbytes for x in launches) == 20 * 2 * 1000 * 8 * 16 * 4
    pulled = peer_pages.plan_launches(plan, ptr, ptr, [5], [7], "pull", (2, 1, 1000, 8, 16), 1000, 4, pages, pages)
    assert {x.runner for x in pulled} == {7}
    split = peer_pages.plan_launches(plan, ptr, ptr, [5], [7], "split", (2, 1, 1000, 8, 16), 1000, 4, pages, pages)
    assert [(x.runner, x.src_pages[0], len(x.src_pages)) for x in split if len(x.pairs) == 16] == [
        (5, 0, 448), (5, 448, 52), (7, 500, 448), (7, 948, 52)]


def test_page_runs_and_copy_engine_plans():
    assert peer_pages.page_runs([3, 4, 5, 9, 10, 11], [7, 8, 0, 1, 2, 5]) == [(3, 7, 2), (5, 0, 1), (9, 1, 2),
                                                                              (11, 5, 1)]
    assert peer_pages.page_runs(list(range(10, 74)), list(range(64))) == [(10, 0, 64)]
    by_runner = {5: [("k0", "K0"), ("v0", "V0")], 6: [("k1", "K1"), ("v1", "V1")]}
    copies = peer_pages.plan_copies(by_runner, (2, 3, 100, 8, 16), 40, 2, [(3, 7, 2), (9, 1, 4)], 3)
    assert [(c.runner, c.stream, c.src, c.dst, c.src_page, c.dst_page, c.pages) for c in copies[:4]] == [
        (5, 0, "k0", "K0", 3, 7, 2), (5, 1, "k0", "K0", 9, 1, 4), (5, 2, "v0", "V0", 3, 7, 2), (5, 0, "v0", "V0", 9, 1, 4)]
    assert {(c.rows, c.src_total, c.dst_total, c.words) for c in copies} == {(6, 100, 40, 16)}
    assert sum(c.nbytes for c in copies) == 4 * 6 * 6 * 8 * 16 * 2


@pytest.mark.parametrize("mode, engine_runs", [("push", 0), ("pull", 0), ("split", 0), ("push", 64), ("pull", 1)])
def test_direct_moves_keep_tokens_and_nll_between_every_tp_degree(tiny_cfg, plan_set, reference, mode,  # noqa: F811
                                                                 engine_runs, monkeypatch):
    """engine_runs 64: every move by the copy engines; 1: those of one run of pages, the rest by
    the kernel."""
    executor = HostExecutor(mode, engine_runs)
    use_direct(plan_set, executor, monkeypatch)
    lanes = plan_set.lanes
    holes = [lanes[(2,)], lanes[(2, 3)]] if engine_runs == 1 else []
    for lane in holes:  # every other page held: a sequence moved in gets pages spread over the pool
        for p in range(6):
            lane.allocator.reserve(("filler", p), PAGE_SIZE)
        for p in range(0, 6, 2):
            lane.allocator.free(("filler", p))
    route = [lanes[(0, 1, 2, 3)], lanes[(0, 1)], lanes[(0, 1, 2, 3)], lanes[(2,)], lanes[(0, 1)], lanes[(2, 3)],
             lanes[(3,)], lanes[(2,)], lanes[(0, 1, 2, 3)]]  # tp4>2>4>1>2>2(other devices)>1>1>4
    walk_moves(tiny_cfg, plan_set, route, reference[2])
    for lane in holes:
        for p in range(1, 6, 2):
            lane.allocator.free(("filler", p))
    assert len({x.runner for x in executor.launches}) > 1
    kinds = {type(x) for x in executor.launches}
    assert kinds == ({peer_pages.PitchedCopy} if engine_runs == 64 else
                     {peer_pages.Launch, peer_pages.PitchedCopy} if engine_runs else {peer_pages.Launch})
    assert all(not lane.allocator.num_used for lane in lanes.values())


def test_direct_and_packed_transports_leave_the_same_bits(plan_set, monkeypatch):
    from nitsum_jax.plans.probe import fill_random

    for i, lane in enumerate(plan_set.lanes.values()):
        fill_random(lane, 50 + i)
    lanes = plan_set.lanes
    for a, b in [((0, 1, 2, 3), (3,)), ((2,), (0, 1)), ((0, 1), (2, 3))]:
        src, dst = lanes[a], lanes[b]
        results = []
        before = [np.asarray(dst.kv.k), np.asarray(dst.kv.v)]
        shardings = [dst.kv.k.sharding, dst.kv.v.sharding]
        for transport, engine_runs in (("packed", 0), ("direct", 0), ("direct", 8)):
            restored = tuple(jax.device_put(x, s) for x, s in zip(before, shardings))
            dst.kv = type(dst.kv)(k=restored[0], v=restored[1])
            use_direct(plan_set, HostExecutor("push", engine_runs), monkeypatch)
            plan_set.use_transport(transport)
            src.allocator.reserve("s", 40)
            dst.allocator.reserve("other", 8)  # destination page ids differ from the source's
            plan_set.move("s", src, dst)
            assert "s" not in src.allocator and len(dst.allocator.pages("s")) == 5
            results.append([np.asarray(dst.kv.k), np.asarray(dst.kv.v)])
            dst.allocator.free("s")
            dst.allocator.free("other")
        for packed, direct, engine in zip(*results):
            np.testing.assert_array_equal(packed, direct)
            np.testing.assert_array_equal(packed, engine)
        assert any(not np.array_equal(x, r) for x, r in zip(before, results[0]))


def test_transport_choice_on_a_machine_without_gpus(tiny_cfg, tiny_params):
    plans = parse_plans("one: all=tp1@0; two: all=tp1@1")
    grid = BucketGrid(decode_batch=(1,), prefill_len=(16,), max_seq_len=16)
    ps = PlanSet(tiny_cfg, tiny_params, plans, num_pages=4, page_size=PAGE_SIZE, grid=grid)
    assert ps.move_transport == "packed" and "no GPU" in ps.move_transport_note and ps.direct_pairs == set()
    with pytest.raises(ValueError, match="was not built"):
        ps.use_transport("direct")
    with pytest.raises(ValueError, match="needs GPUs"):
        PlanSet(tiny_cfg, tiny_params, plans, num_pages=4, page_size=PAGE_SIZE, grid=grid, move_transport="direct")
    with pytest.raises(ValueError, match="expected auto, direct or packed"):
        PlanSet(tiny_cfg, tiny_params, plans, num_pages=4, page_size=PAGE_SIZE, grid=grid, move_transport="nccl")


@pytest.mark.skipif(cuda.nvrtc() is None, reason="NVRTC not installed (the test extras install it)")
@pytest.mark.parametrize("arch, ppb, threads", [("sm_80", 4, 256), ("sm_90", 4, 256), ("sm_90", 8, 128)])
def test_kernel_source_compiles_with_nvrtc(arch, ppb, threads):
    cubin = cuda.compile_cubin(peer_pages.kernel_source(ppb, threads), "copy_pages.cu", arch)
    assert cubin[:4] == b"\x7fELF" and b"copy_pages" in cubin


@pytest.mark.parametrize("name, value, message", [
    ("NITSUM_MOVE_DIRECT_MODE", "sideways", "expected one of"), ("NITSUM_MOVE_ENGINE_RUNS", "four", "whole number"),
    ("NITSUM_MOVE_ENGINE_RUNS", "-1", "whole number"), ("NITSUM_MOVE_WAIT", "sleep", "expected spin or block")])
def test_bad_transport_settings_are_refused_by_name(name, value, message):
    with pytest.raises(ValueError, match=f"{name}={value!r}.*{message}"):
        peer_pages.PeerPageMover(jax.devices(), settings=Settings.from_env({name: value}))  # before any CUDA call


def test_nvrtc_errors_carry_the_compiler_log():
    if cuda.nvrtc() is None:
        with pytest.raises(cuda.CudaError, match="NVRTC"):
            cuda.compile_cubin("x", "x.cu", "sm_90")
    else:
        with pytest.raises(cuda.CudaError, match="could not compile bad.cu: .*error"):
            cuda.compile_cubin("extern \"C\" __global__ void f() { undefined_thing(); }", "bad.cu", "sm_90")


def test_shard_addresses_are_read_again_once_the_lane_replaces_its_cache(plan_set):
    import gc
    import weakref

    from nitsum_jax.plans.probe import fill_random

    mover = object.__new__(peer_pages.PeerPageMover)  # the address book only: no CUDA here
    mover._addresses = {}
    lane = plan_set.lanes[(0, 1)]
    first = mover.addresses(lane)
    assert mover.addresses(lane) is first  # back-to-back moves read the shards once
    assert set(first) == {(kind, r, i) for kind in (0, 1) for r in range(lane.layout.slots) for i in range(2)}
    shard = lane.kv.k.addressable_shards[1]
    assert first[(0, 0, 1)] == shard.data.unsafe_buffer_pointer()
    # position 1 of a device's shard [positions, L, K, P, S, H] starts one position's block further in
    assert first[(0, 1, 1)] == first[(0, 0, 1)] + shard.data.nbytes // lane.layout.slots
    old = weakref.ref(lane.kv)
    fill_random(lane, 7)  # a new cache (as every step makes)
    gc.collect()
    assert old() is None  # the address book keeps no replaced cache alive
    second = mover.addresses(lane)
    assert second is not first
    assert second[(1, 0, 0)] == lane.kv.v.addressable_shards[0].data.unsafe_buffer_pointer()


class FailingTransport(peer_pages.PeerPageMover):
    """A GPU transport whose copy fails (as a CUDA error would surface), after planning its launches."""

    def __init__(self):
        self.mode, self._addresses, self._groups, self.calls, self.engine_runs = "push", {}, {}, 0, 0

    def run(self, launches, dst):
        self.calls += 1
        raise peer_pages.CudaError("cuLaunchKernel(copy_pages) failed: CUDA_ERROR_LAUNCH_FAILED")


def test_a_failed_move_leaves_the_sequence_on_its_lane_and_no_page_at_the_destination(plan_set, monkeypatch):
    failing = FailingTransport()
    use_direct(plan_set, failing, monkeypatch)
    src, dst = plan_set.lanes[(2,)], plan_set.lanes[(0, 1)]
    src.allocator.reserve("stays", 40)
    pages = list(src.allocator.pages("stays"))
    free_before = dst.allocator.num_free
    with pytest.raises(peer_pages.CudaError, match="LAUNCH_FAILED"):
        plan_set.move("stays", src, dst)
    assert failing.calls == 1
    assert src.allocator.pages("stays") == pages and "stays" not in dst.allocator
    assert dst.allocator.num_free == free_before
    src.allocator.free("stays")


def test_an_enqueue_only_move_takes_the_packed_path_even_where_direct_is_chosen(plan_set, monkeypatch):
    """Preemption migrations must not wait on the host for a lane's step in flight."""
    executor = HostExecutor("push")
    use_direct(plan_set, executor, monkeypatch)
    src, dst = plan_set.lanes[(2,)], plan_set.lanes[(3,)]
    src.allocator.reserve("migrant", 24)
    assert plan_set.move("migrant", src, dst, enqueue_only=True) > 0
    assert executor.launches == [] and "migrant" in dst.allocator and "migrant" not in src.allocator
    plan_set.move("migrant", dst, src)
    assert executor.launches and "migrant" in src.allocator
    src.allocator.free("migrant")
