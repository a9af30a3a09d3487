"""KV moves between GPUs in one pass: a CUDA kernel copies a sequence's pages straight from the
source lane's cache into the destination lane's pages on other GPUs, over NVLink.

The packed path (plans/moves.py) makes three passes: a gather into one buffer per device pair,
a `device_put` between GPUs, and a scatter into the destination's pages. On 4x H200 a 537 MB
(4096-token, 8B) move into or out of one GPU ran at 192-258 GB/s that way: the gather and
scatter each take ~0.27 ms in series with the ~1.4 ms copy, and `device_put` adds ~0.5 ms before
its copy starts (BENCHMARKS.md, "KV moves"). Here one kernel per GPU reads each page where it
lies and writes it where it goes, through unified virtual addresses with peer access enabled
between the GPUs: no staging buffer, no second pass, no runtime copy path.

Which GPU runs the kernel: "push" (each source GPU loads its own pages and stores them into
peer memory), "pull" (each destination GPU loads from peer memory) or "split" (the first half of
the pages pushed, the rest pulled, so both sides' multiprocessors drive the links);
NITSUM_MOVE_DIRECT_MODE picks, push by default. A move whose pages form few runs of adjacent pages
on both sides goes instead by the copy engines, one pitched copy per array pair and run
(ENGINE_RUNS). The host waits for the streams by polling them (NITSUM_MOVE_WAIT=block: a blocking
wait), which sees a sub-millisecond copy done at once.

Safety with XLA's runtime: the caller holds both lanes' `kv_lock`, so no program that writes
either cache can be enqueued; this module waits (`block_until_ready`) for the programs already
enqueued, launches or copies on streams of its own, and waits for them before returning, so the next
program that reads the destination cache sees the pages. Only pages the allocator gave the moving
sequence are written. Arrays are addressed per shard (`unsafe_buffer_pointer`), held alive by the
caller's references for the whole call.
"""

from __future__ import annotations

import ctypes
import threading
import typing
import weakref

import jax
import numpy as np

from nitsum_jax.kernels.cuda import Contexts, CudaError, check, compile_cubin
from nitsum_jax.settings import Settings, settings as process_settings

MAX_ARRAYS = 16  # (source, destination) cache arrays one launch copies between
MAX_PAGES = 448  # pages per launch: the page lists travel in the kernel's parameters (4 KB)
# Pages whose words one thread loads before storing (loads in flight), and threads per block:
# the best of 8 settings on 4x H100 (BENCHMARKS.md, "KV moves": kernel settings on 4x H100).
PAGES_PER_BLOCK = 4
THREADS = 128
MODES = ("push", "pull", "split")
# Moves whose pages form at most this many runs (adjacent on both sides, as the lowest-first
# allocator hands out a sequence reserved at once) go by the GPUs' copy engines, one pitched copy
# (cuMemcpy2DAsync) per array pair and run, on ENGINE_STREAMS streams a GPU; the kernel takes the
# rest. Device time of a TP1 -> TP1 move on 4x H200 (BENCHMARKS.md, "KV moves"): copy engine 0.370 / 1.391
# ms against the kernel's 0.384 / 1.481 at 1024 / 4096 tokens. NITSUM_MOVE_ENGINE_RUNS=0: never.
ENGINE_RUNS = Settings().move_engine_runs  # the default of NITSUM_MOVE_ENGINE_RUNS
ENGINE_STREAMS = 1
CU_MEMORYTYPE_DEVICE = 2

_TEMPLATE = r"""
struct Args {
  unsigned long long src[%(arrays)d];
  unsigned long long dst[%(arrays)d];
  long long rows;       // rows of pages per array: layers x kv heads of the shard
  long long src_pages;  // pages per row in the source cache
  long long dst_pages;
  int words;            // 16-byte words per page
  int n;                // pages to copy
  int src_page[%(pages)d];
  int dst_page[%(pages)d];
};

// Block (x, y, z): pages x*PPB.. of row y of array pair z; each thread copies words i, i+T, ..
// of every one of those pages, loading all of them before storing any (PPB loads in flight).
extern "C" __global__ void __launch_bounds__(%(threads)d) copy_pages(const Args a) {
  const uint4* __restrict__ src = reinterpret_cast<const uint4*>(a.src[blockIdx.z]);
  uint4* __restrict__ dst = reinterpret_cast<uint4*>(a.dst[blockIdx.z]);
  const int first = blockIdx.x * %(ppb)d;
  long long s[%(ppb)d], d[%(ppb)d];
  #pragma unroll
  for (int k = 0; k < %(ppb)d; ++k) {
    const int p = min(first + k, a.n - 1);
    s[k] = (blockIdx.y * a.src_pages + a.src_page[p]) * a.words;
    d[k] = (blockIdx.y * a.dst_pages + a.dst_page[p]) * a.words;
  }
  for (int i = threadIdx.x; i < a.words; i += blockDim.x) {
    uint4 v[%(ppb)d];
    #pragma unroll
    for (int k = 0; k < %(ppb)d; ++k) v[k] = src[s[k] + i];
    #pragma unroll
    for (int k = 0; k < %(ppb)d; ++k) if (first + k < a.n) dst[d[k] + i] = v[k];
  }
}
"""


def kernel_source(pages_per_block: int = PAGES_PER_BLOCK, threads: int = THREADS) -> str:
    return _TEMPLATE % {"arrays": MAX_ARRAYS, "pages": MAX_PAGES, "ppb": pages_per_block, "threads": threads}


class _Args(ctypes.Structure):
    _fields_ = [("src", ctypes.c_uint64 * MAX_ARRAYS), ("dst", ctypes.c_uint64 * MAX_ARRAYS),
                ("rows", ctypes.c_int64), ("src_pages", ctypes.c_int64), ("dst_pages", ctypes.c_int64),
                ("words", ctypes.c_int32), ("n", ctypes.c_int32),
                ("src_page", ctypes.c_int32 * MAX_PAGES), ("dst_page", ctypes.c_int32 * MAX_PAGES)]


class _Memcpy2D(ctypes.Structure):  # CUDA_MEMCPY2D
    _fields_ = [("srcXInBytes", ctypes.c_size_t), ("srcY", ctypes.c_size_t), ("srcMemoryType", ctypes.c_int),
                ("srcHost", ctypes.c_void_p), ("srcDevice", ctypes.c_uint64), ("srcArray", ctypes.c_void_p),
                ("srcPitch", ctypes.c_size_t), ("dstXInBytes", ctypes.c_size_t), ("dstY", ctypes.c_size_t),
                ("dstMemoryType", ctypes.c_int), ("dstHost", ctypes.c_void_p), ("dstDevice", ctypes.c_uint64),
                ("dstArray", ctypes.c_void_p), ("dstPitch", ctypes.c_size_t), ("WidthInBytes", ctypes.c_size_t),
                ("Height", ctypes.c_size_t)]


def copy_plan(src_assign, dst_assign) -> dict[int, list[tuple[int, int, int]]]:
    """Per source device index i: (source slot r, destination device index j, destination slot q)
    for every chunk the source device holds, i.e. where each of its cache arrays goes."""
    where = {c: (j, q) for j, row in enumerate(dst_assign) for q, c in enumerate(row)}
    return {i: [(r, *where[c]) for r, c in enumerate(row)] for i, row in enumerate(src_assign)}


def supported(src_shard_shape, dst_shard_shape, itemsize: int) -> bool:
    """Same rows (layers, kv heads per shard) and page size on both sides, and whole 16-byte
    words per page."""
    L, K, _, S, H = src_shard_shape
    return (src_shard_shape[:2] == dst_shard_shape[:2] and src_shard_shape[3:] == dst_shard_shape[3:]
            and (S * H * itemsize) % 16 == 0)


class PeerPageMover:
    """Compiles `copy_pages` once (NVRTC) and loads it on every GPU of `devices` at start-up."""

    def __init__(self, devices: list, mode: str | None = None, pages_per_block: int = PAGES_PER_BLOCK,
                 threads: int = THREADS, engine_runs: int | None = None, engine_streams: int = ENGINE_STREAMS,
                 settings: Settings | None = None):
        """`mode` and `engine_runs` None: NITSUM_MOVE_DIRECT_MODE and NITSUM_MOVE_ENGINE_RUNS, from
        `settings` (None: the process's, read once); NITSUM_MOVE_WAIT likewise. Checked before any
        CUDA call."""
        settings = settings or process_settings()
        self.mode = mode or settings.move_direct_mode
        if self.mode not in MODES:
            raise ValueError(f"direct move mode {self.mode!r}; expected one of {MODES}")
        self.pages_per_block, self.threads = pages_per_block, threads
        engine_runs = settings.move_engine_runs if engine_runs is None else engine_runs
        if engine_runs < 0:
            raise ValueError(f"engine_runs={engine_runs}; expected a whole number (0: never the copy engines)")
        self.engine_runs, self.engine_streams = engine_runs, engine_streams
        self.spin = settings.move_wait == "spin"  # poll the streams, else block in cuStreamSynchronize
        self.cu = Contexts(devices)
        lib = self.cu.lib
        self.fn: dict[int, ctypes.c_void_p] = {}
        self.streams: dict[int, ctypes.c_void_p] = {}
        self.engine_stream: dict[int, list[ctypes.c_void_p]] = {}
        cubins: dict[str, bytes] = {}
        for d in devices:
            arch = self.cu.arch(d.id)
            if arch not in cubins:
                cubins[arch] = compile_cubin(kernel_source(pages_per_block, threads), "copy_pages.cu", arch)
            self.cu.use(d.id)
            module, fn = ctypes.c_void_p(), ctypes.c_void_p()
            check(lib, lib.cuModuleLoadData(ctypes.byref(module), cubins[arch]), "cuModuleLoadData")
            check(lib, lib.cuModuleGetFunction(ctypes.byref(fn), module, b"copy_pages"), "cuModuleGetFunction")
            self.fn[d.id] = fn
            self.streams[d.id] = self.cu.stream(d.id)
            self.engine_stream[d.id] = [self.streams[d.id]] + [self.cu.stream(d.id) for _ in range(engine_streams - 1)]
        self._lock = threading.Lock()
        # cuLaunchKernel copies the parameters and cuMemcpy2DAsync the descriptor when called, so
        # one of each serves every launch and copy.
        self._args, self._desc = _Args(), _Memcpy2D(srcMemoryType=CU_MEMORYTYPE_DEVICE, dstMemoryType=CU_MEMORYTYPE_DEVICE)
        self._params = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.pointer(self._args), ctypes.c_void_p))
        self._desc_ref = ctypes.byref(self._desc)
        self._current = None  # the GPU whose context run() made current last (reset per call)
        self._addresses: dict = {}  # lane -> (weak reference to its kv when read, addresses)
        self._groups: dict = {}  # (src lane, dst lane, mode) -> (their address tables, pairs by runner)

    def move(self, src, dst, src_pages: list[int], dst_pages: list[int]) -> int:
        """Copy the K and V of pages `src_pages` of lane `src` into pages `dst_pages` of lane
        `dst`, each chunk from the device and slot that hold it on `src` to those that hold it on
        `dst` (copy_plan). The caller holds both lanes' kv_lock. Returns the bytes copied, once
        the copies are complete."""
        if len(src_pages) != len(dst_pages):
            raise ValueError(f"moving {len(src_pages)} pages into {len(dst_pages)}")
        if not src_pages:
            return 0
        jax.block_until_ready((src.kv, dst.kv))
        src_ptr, dst_ptr = self.addresses(src), self.addresses(dst)
        shape, itemsize = src.slot_sharding.shard_shape(src.kv_shape), src.kv.k.dtype.itemsize
        dst_total = dst.kv_shape[2]
        if self.mode == "split":  # half the pages pushed, half pulled: two sets of pairs
            work = plan_launches(copy_plan(src.layout.assign, dst.layout.assign), src_ptr, dst_ptr,
                                 [d.id for d in src.devices], [d.id for d in dst.devices], self.mode, shape, dst_total,
                                 itemsize, src_pages, dst_pages)
        else:
            pairs = self._pairs(src, dst, src_ptr, dst_ptr)
            runs = page_runs(src_pages, dst_pages) if self.engine_runs else ()
            if runs and len(runs) <= self.engine_runs:
                work = plan_copies(pairs, shape, dst_total, itemsize, runs, self.engine_streams)
            else:
                work = launches_for(pairs, shape, dst_total, itemsize, src_pages, dst_pages)
        self.run(work, dst)
        return sum(item.nbytes for item in work)

    def _pairs(self, src, dst, src_ptr, dst_ptr) -> dict[int, list[tuple]]:
        """The (source, destination) address pairs each GPU copies for a move src -> dst in this
        mover's mode, worked out once per pair of address tables."""
        cached = self._groups.get((src, dst, self.mode))
        if cached is not None and cached[0] is src_ptr and cached[1] is dst_ptr:
            return cached[2]
        groups = pairs_by_runner(copy_plan(src.layout.assign, dst.layout.assign), src_ptr, dst_ptr,
                                 [d.id for d in src.devices], [d.id for d in dst.devices], self.mode)
        self._groups[(src, dst, self.mode)] = (src_ptr, dst_ptr, groups)
        return groups

    def addresses(self, lane) -> dict[tuple[int, int, int], int]:
        """(0 for K / 1 for V, chunk position, device index in the lane) -> device address of that
        position's [L, K, P, S, H] block on that device.
        Read again whenever the lane's cache arrays were replaced (every step replaces them; the
        moves of one plan switch, back to back, read them once)."""
        cached = self._addresses.get(lane)
        if cached is not None and cached[0]() is lane.kv:  # (a weak reference keeps no old cache alive)
            return cached[1]
        index = {d.id: i for i, d in enumerate(lane.devices)}
        # position r of a device's shard [R, L, K, P, S, H] starts r shards of one position in
        per_position = int(np.prod(lane.slot_sharding.shard_shape(lane.kv_shape))) * lane.kv.k.dtype.itemsize
        out = {}
        for kind, arr in enumerate((lane.kv.k, lane.kv.v)):
            for shard in arr.addressable_shards:
                base = shard.data.unsafe_buffer_pointer()
                for r in range(lane.cache_shape[0]):
                    out[(kind, r, index[shard.device.id])] = base + r * per_position
        self._addresses[lane] = (weakref.ref(lane.kv), out)
        return out

    def run(self, work: list, dst) -> None:
        """Launch the kernels and start the copies, then wait for every stream used (dst: the lane
        written, for other executors)."""
        with self._lock:
            self._current = None  # the calling thread's current context is not known
            streams = {}
            for item in work:
                if isinstance(item, Launch):
                    self._launch(item)
                    streams[id(self.streams[item.runner])] = self.streams[item.runner]
                else:
                    stream = self.engine_stream[item.runner][item.stream]
                    self._copy(item, stream)
                    streams[id(stream)] = stream
            for stream in streams.values():
                self.cu.wait(stream) if self.spin else self.cu.synchronize(stream)

    def _copy(self, copy: "PitchedCopy", stream) -> None:
        page, desc = copy.words * 16, self._desc  # one descriptor, filled per copy (under _lock)
        desc.srcDevice, desc.srcPitch = copy.src + copy.src_page * page, copy.src_total * page
        desc.dstDevice, desc.dstPitch = copy.dst + copy.dst_page * page, copy.dst_total * page
        desc.WidthInBytes, desc.Height = copy.pages * page, copy.rows
        self._use(copy.runner)
        check(self.cu.lib, self.cu.lib.cuMemcpy2DAsync_v2(self._desc_ref, stream), "cuMemcpy2DAsync")

    def _use(self, device_id: int) -> None:
        if self._current != device_id:  # cuCtxSetCurrent only when the GPU changes
            self.cu.use(device_id)
            self._current = device_id

    def _launch(self, launch: "Launch") -> None:
        args = self._args  # one parameter block, filled per launch (under _lock)
        for z, (s, d) in enumerate(launch.pairs):
            args.src[z], args.dst[z] = s, d
        args.rows, args.src_pages, args.dst_pages = launch.rows, launch.src_total, launch.dst_total
        args.words, args.n = launch.words, len(launch.src_pages)
        args.src_page[:args.n] = launch.src_pages
        args.dst_page[:args.n] = launch.dst_pages
        lib = self.cu.lib
        self._use(launch.runner)
        grid_x = -(-args.n // self.pages_per_block)
        check(lib, lib.cuLaunchKernel(self.fn[launch.runner], grid_x, launch.rows, len(launch.pairs), self.threads, 1, 1, 0,
                                      self.streams[launch.runner], self._params, None), "cuLaunchKernel(copy_pages)")


class Launch(typing.NamedTuple):  # a tuple: made per move, cheaply
    """One launch of `copy_pages`: on GPU `runner`, for each (source, destination) array pair,
    pages src_pages[p] of every row of the source go to pages dst_pages[p] of the same row."""
    runner: int
    pairs: tuple
    rows: int
    src_total: int
    dst_total: int
    words: int
    src_pages: tuple[int, ...]
    dst_pages: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return len(self.pairs) * self.rows * len(self.src_pages) * self.words * 16


class PitchedCopy(typing.NamedTuple):
    """One copy-engine copy (cuMemcpy2DAsync) started on GPU `runner`, stream `stream` of its
    engine streams: pages src_page.. (`pages` of them, adjacent) of every row of array `src` go to
    pages dst_page.. of the same row of array `dst`."""
    runner: int
    stream: int
    src: object
    dst: object
    rows: int
    src_total: int
    dst_total: int
    words: int
    src_page: int
    dst_page: int
    pages: int

    @property
    def nbytes(self) -> int:
        return self.rows * self.pages * self.words * 16


def page_runs(src_pages, dst_pages) -> list[tuple[int, int, int]]:
    """(first source page, first destination page, length) of each run of positions where both
    page lists go up by one."""
    n = len(src_pages)
    if n and src_pages[-1] - src_pages[0] == n - 1 and dst_pages[-1] - dst_pages[0] == n - 1 and \
            list(src_pages) == list(range(src_pages[0], src_pages[0] + n)) and \
            list(dst_pages) == list(range(dst_pages[0], dst_pages[0] + n)):
        return [(src_pages[0], dst_pages[0], n)]  # the common case: one run (checked in C)
    s, d = np.asarray(src_pages, dtype=np.int64), np.asarray(dst_pages, dtype=np.int64)
    breaks = np.flatnonzero((np.diff(s) != 1) | (np.diff(d) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    lengths = np.diff(np.concatenate((starts, [len(s)])))
    return list(zip(s[starts].tolist(), d[starts].tolist(), lengths.tolist()))


def pairs_by_runner(plan: dict, src_ptr: dict, dst_ptr: dict, src_ids: list[int], dst_ids: list[int],
                    mode: str) -> dict[int, list[tuple]]:
    """GPU id -> the (source, destination) array address pairs it copies: in "push" the GPU that
    holds the source shard, in "pull" the one that holds the destination shard."""
    by_runner: dict[int, list] = {}
    for i, targets in sorted(plan.items()):
        for r, j, q in targets:
            runner = src_ids[i] if mode == "push" else dst_ids[j]
            for kind in (0, 1):
                by_runner.setdefault(runner, []).append((src_ptr[(kind, r, i)], dst_ptr[(kind, q, j)]))
    return by_runner


def launches_for(by_runner: dict, src_shard_shape, dst_total: int, itemsize: int, src_pages: list[int],
                 dst_pages: list[int]) -> list[Launch]:
    """Kernel launches copying pages src_pages -> dst_pages of every pair in `by_runner`, at most
    MAX_ARRAYS pairs and MAX_PAGES pages per launch."""
    L, K, src_total, S, H = src_shard_shape
    words = S * H * itemsize // 16
    src_pages, dst_pages = tuple(src_pages), tuple(dst_pages)
    return [Launch(runner, tuple(pairs[a:a + MAX_ARRAYS]), L * K, src_total, dst_total, words,
                   src_pages[p:p + MAX_PAGES], dst_pages[p:p + MAX_PAGES])
            for runner, pairs in by_runner.items()
            for a in range(0, len(pairs), MAX_ARRAYS) for p in range(0, len(src_pages), MAX_PAGES) if src_pages]


def plan_copies(by_runner: dict, src_shard_shape, dst_total: int, itemsize: int, runs: list[tuple[int, int, int]],
                streams: int) -> list[PitchedCopy]:
    """Copy-engine copies of `runs` (page_runs') for every pair in `by_runner`: one pitched copy
    per pair and run, spread round-robin over each GPU's `streams` engine streams."""
    L, K, src_total, S, H = src_shard_shape
    words = S * H * itemsize // 16
    return [PitchedCopy(runner, n % streams, s, d, L * K, src_total, dst_total, words, a, b, length)
            for runner, pairs in by_runner.items()
            for n, ((s, d), (a, b, length)) in enumerate((pair, run) for pair in pairs for run in runs)]


def plan_launches(plan: dict, src_ptr: dict, dst_ptr: dict, src_ids: list[int], dst_ids: list[int], mode: str,
                  src_shard_shape, dst_total: int, itemsize: int, src_pages: list[int],
                  dst_pages: list[int]) -> list[Launch]:
    """The launches of one move. plan: copy_plan's; src_ptr / dst_ptr: (K 0 / V 1, slot, device
    index) -> address (any value: tests pass keys); src_ids / dst_ids: the lanes' device ids in
    mesh order; mode "push" runs each launch on the source GPU, "pull" on the destination GPU,
    "split" pushes the first half of the pages and pulls the rest.
    At most MAX_ARRAYS pairs and MAX_PAGES pages per launch."""
    if mode == "split":
        half = len(src_pages) // 2
        args = (plan, src_ptr, dst_ptr, src_ids, dst_ids)
        return (plan_launches(*args, "push", src_shard_shape, dst_total, itemsize, src_pages[:half], dst_pages[:half])
                + plan_launches(*args, "pull", src_shard_shape, dst_total, itemsize, src_pages[half:],
                                dst_pages[half:]))
    return launches_for(pairs_by_runner(plan, src_ptr, dst_ptr, src_ids, dst_ids, mode), src_shard_shape, dst_total,
                        itemsize, src_pages, dst_pages)


__all__ = ["CudaError", "Launch", "PeerPageMover", "PitchedCopy", "copy_plan", "launches_for", "page_runs",
           "pairs_by_runner", "plan_copies", "plan_launches", "supported"]
