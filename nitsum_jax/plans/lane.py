"""A lane: one mesh, its weights (views of shared buffers), its paged KV arrays, its page
allocator, and its steps compiled ahead of time for a fixed grid of shapes."""

from __future__ import annotations

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nitsum_jax.attention import KVCache
from nitsum_jax.config import LlamaConfig
from nitsum_jax.kernels import page_copy
from nitsum_jax.kv import PageAllocator, kv_bytes_per_page
from nitsum_jax.model import ChunkLayout, Params, StepInput
from nitsum_jax.plans.spec import LaneSpec
from nitsum_jax.quant import step_options as weight_step_options
from nitsum_jax.sampling import SamplingBatch, SamplingParams, draws, sample_rows
from nitsum_jax.settings import Settings, settings as process_settings
from nitsum_jax.steps import greedy_step


class ShapeOutsideGrid(ValueError):
    """A step's shape is not in the grid compiled at start-up (serving never compiles)."""


@dataclasses.dataclass(frozen=True)
class BucketGrid:
    decode_batch: tuple[int, ...] = (1, 2, 4, 8)  # decode steps: [B, 1]
    prefill_len: tuple[int, ...] = (16, 64)  # prefill chunks of one sequence: [1, T]
    max_seq_len: int = 256  # pages_per_seq = max_seq_len / page_size, one width for all steps
    min_move_pages: int = 4  # KV-move programs for 4, 8, 16, ... pages up to pages_per_seq

    def batch_for(self, n: int) -> int:
        return _pick(self.decode_batch, n, "decode batch")

    def prefill_for(self, n: int) -> int:
        return _pick(self.prefill_len, n, "prefill chunk")


def _pick(grid: tuple[int, ...], n: int, what: str) -> int:
    for b in sorted(grid):
        if n <= b:
            return b
    raise ShapeOutsideGrid(f"{what} of {n} is outside the compiled grid {sorted(grid)}")


# XLA options for the model steps on GPU. Measured on an H100 (BENCHMARKS.md, llama-3.1-8b TP1,
# batch 32): with the defaults, each layer's weights are copied out of the stacked [layers, ...]
# arrays by a memcpy every step (9.6 ms of a 19.6 ms step); cuBLAS gemms with dynamic-slice
# fusion read the layer's slice in place (10.3 ms, MBU 75%). Triton gemm fusions cannot take the
# slice in place, hence both options. NITSUM_XLA_OPTIONS=off compiles with XLA's defaults.
GPU_STEP_OPTIONS = {"xla_gpu_enable_triton_gemm": False, "xla_gpu_enable_dynamic_slice_fusion": True}


def step_compiler_options(devices: list, settings: Settings) -> dict:
    """Per-compile XLA options of the model steps. NITSUM_XLA_EXTRA_OPTIONS="name=value,..." adds
    options for experiments (bench/gpu_step.py); values true/false/integers are typed."""
    if not settings.xla_options or devices[0].platform != "gpu":
        return {}
    return {**GPU_STEP_OPTIONS, **dict(settings.xla_extra_options)}


def move_copy_impl(devices: list, settings: Settings) -> str:
    """How KV-move programs copy pages: "kernel" (Pallas page copies, GPU), "xla" (XLA gather /
    scatter of 4-byte words, CPU) or "interpret" (the kernels in Pallas interpret mode: tests).
    NITSUM_MOVE_COPY overrides the choice made from the platform."""
    if settings.move_copy == "auto":
        return "kernel" if devices[0].platform == "gpu" else "xla"
    return settings.move_copy


def pow2_upto(n: int, start: int = 1) -> tuple[int, ...]:
    out, b = [], start
    while b < n:
        out.append(b)
        b *= 2
    return tuple(out) + (n,)


class Lane:
    def __init__(self, name: str, spec: LaneSpec, cfg: LlamaConfig, layout: ChunkLayout, mesh: Mesh,
                 params: Params, num_pages: int, page_size: int, grid: BucketGrid, settings: Settings | None = None):
        """`settings`: the NITSUM_* knobs the lane is built with (None: the process's, `settings()`);
        its programs keep them, so no step reads the environment while it is traced."""
        self.name, self.spec, self.cfg, self.layout, self.mesh = name, spec, cfg, layout, mesh
        self.settings = settings or process_settings()
        self.params = params
        self.grid = grid
        self.page_size = page_size
        self.pages_per_seq = -(-grid.max_seq_len // page_size)
        self.allocator = PageAllocator(num_pages, page_size)
        kv_heads = spec.tp * max(1, cfg.num_kv_heads // layout.num_chunks)
        # One chunk position's cache (`kv_shape`, sharded `slot_sharding`); the lane's K and V are
        # each one array of all positions (`cache_shape`), position r contiguous on each device.
        self.kv_shape = (cfg.num_layers, kv_heads, num_pages, page_size, cfg.head_dim)
        self.cache_shape = (layout.slots,) + self.kv_shape
        self.slot_sharding = NamedSharding(mesh, P(None, "tp"))
        self.kv_sharding = NamedSharding(mesh, P(None, None, "tp"))
        self.replicated = NamedSharding(mesh, P())
        zeros = jax.jit(lambda: KVCache(k=jnp.zeros(self.cache_shape, cfg.jnp_dtype),
                                        v=jnp.zeros(self.cache_shape, cfg.jnp_dtype)),
                        out_shardings=KVCache(k=self.kv_sharding, v=self.kv_sharding))
        self.kv: KVCache = zeros()
        self._steps: dict[tuple[int, int], object] = {}
        self._feeds: dict[int, object] = {}
        self._samplers: dict[int, object] = {}  # batch -> program drawing sampled rows from logits
        # Held while a program that consumes (donates) `self.kv` is enqueued and `self.kv` is
        # replaced by its output: a step on the lane's thread and a KV move from another thread
        # take turns, and the device orders the programs by their data dependencies.
        self.kv_lock = threading.Lock()
        self._gathers: dict[int, object] = {}
        self._scatters: dict[int, object] = {}
        self._packed_gathers: dict[tuple, object] = {}  # (pages, a route's gather table) -> program
        self._packed_scatters: dict[tuple, object] = {}  # (pages, a route's scatter table) -> program
        self.move_copy = move_copy_impl(self.devices, self.settings)
        if self.move_copy != "xla" and not all(page_copy.supported(self.cache_shape, n) for n in self.move_sizes()):
            self.move_copy = "xla"

    # -- ahead-of-time compilation -------------------------------------------------------
    def _abstract(self, shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self.replicated)

    def compile(self) -> int:
        """Compile and run once every step of the grid and every KV-move program; returns count."""
        kv_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), self.kv)
        step_fn = jax.jit(greedy_step, static_argnames=("cfg", "layout", "attention"), donate_argnames=("kv",),
                          out_shardings=(self.replicated, self.replicated, self.replicated,
                                         jax.tree.map(lambda a: a.sharding, self.kv)))
        shapes = [(b, 1) for b in self.grid.decode_batch] + [(1, t) for t in self.grid.prefill_len]
        options = {**step_compiler_options(self.devices, self.settings),
                   **weight_step_options(self.params, self.devices)}
        for b, t in shapes:
            step = StepInput(tokens=self._abstract((b, t), jnp.int32), start_pos=self._abstract((b,), jnp.int32),
                             num_new=self._abstract((b,), jnp.int32),
                             page_table=self._abstract((b, self.pages_per_seq), jnp.int32))
            self._steps[(b, t)] = step_fn.lower(self.params, kv_abs, step, cfg=self.cfg, layout=self.layout,
                                                attention=self.settings.attention).compile(options)
        # Rows that sample (temperature > 0) are drawn from the step's logits by a second program,
        # enqueued only for batches that have such rows (`dispatch`).
        for b in sorted({b for b, _ in shapes}):
            sampling = SamplingBatch(temperature=self._abstract((b,), jnp.float32),
                                     top_k=self._abstract((b,), jnp.int32), top_p=self._abstract((b,), jnp.float32),
                                     seed=self._abstract((b,), jnp.uint32), position=self._abstract((b,), jnp.int32))
            self._samplers[b] = jax.jit(sample_rows, out_shardings=(self.replicated, self.replicated)).lower(
                self._abstract((b, self.cfg.vocab_size), jnp.float32), sampling,
                self._abstract((b,), jnp.int32)).compile()
        # A chained decode step takes its tokens from the previous step's output on the device
        # (engine: the host prepares step N+1 while step N runs): [B] -> [B, 1], per batch bucket.
        for b in self.grid.decode_batch:
            self._feeds[b] = jax.jit(lambda t: t[:, None], out_shardings=self.replicated).lower(
                self._abstract((b,), jnp.int32)).compile()
        for n in pow2_upto(self.pages_per_seq, self.grid.min_move_pages):
            pages = self._abstract((n,), jnp.int32)
            self._gathers[n] = jax.jit(_gather_pages).lower(kv_abs, pages).compile()
            piece = jax.ShapeDtypeStruct(self.kv_shape[:2] + (n,) + self.kv_shape[3:], self.kv.k.dtype,
                                         sharding=self.slot_sharding)
            pieces = (piece,) * self.layout.slots
            self._scatters[n] = jax.jit(_scatter_pages, donate_argnames=("kv",)).lower(
                kv_abs, pages, pieces, pieces).compile()
        self.warm_up()
        return len(self._steps) + len(self._samplers) + len(self._feeds) + len(self._gathers) + len(self._scatters)

    def kv_bytes(self, seq_id) -> int:
        """The K and V bytes of the pages `seq_id` holds on this lane (all layers, all kv heads)."""
        return len(self.allocator.pages(seq_id)) * kv_bytes_per_page(self.cfg, self.page_size)

    def move_sizes(self) -> tuple[int, ...]:
        return pow2_upto(self.pages_per_seq, self.grid.min_move_pages)

    def _packed_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(None, None, None, "tp"))  # [q, K|V, layers, kv_heads, n, S, H]

    def compile_packed_gather(self, table: tuple[tuple[tuple[int, ...], ...], ...]) -> int:
        """Programs that copy a sequence's pages out as one buffer per transfer group: table[i][t]
        lists the positions device i packs into buffer t (moves.py)."""
        kv_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), self.kv)
        count = 0
        for n in self.move_sizes():
            if (n, table) in self._packed_gathers:
                continue
            fn = jax.jit(self._gather_fn(), static_argnames=("table",),
                         out_shardings=tuple(self._packed_sharding() for _ in table[0]))
            self._packed_gathers[(n, table)] = fn.lower(kv_abs, self._abstract((n,), jnp.int32),
                                                        table=table).compile()
            count += 1
        return count

    def compile_packed_scatter(self, table: tuple[tuple[tuple[int, ...], ...], ...]) -> int:
        """Programs that write incoming packed buffers into this lane's pages: entry q of incoming
        buffer u lands in position table[j][u][q] on device j (moves.py)."""
        kv_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), self.kv)
        incoming, per_buffer = len(table[0]), len(table[0][0])
        count = 0
        for n in self.move_sizes():
            if (n, table) in self._packed_scatters:
                continue
            buf = jax.ShapeDtypeStruct(self.packed_buffer_shape(per_buffer, n), self._packed_dtype(),
                                       sharding=self._packed_sharding())
            fn = jax.jit(self._scatter_fn(), static_argnames=("table",), donate_argnames=("kv",))
            self._packed_scatters[(n, table)] = fn.lower(kv_abs, self._abstract((n,), jnp.int32),
                                                         (buf,) * incoming, table=table).compile()
            count += 1
        return count

    def gather_packed(self, pages: list[int], table):
        n = _pick(self.move_sizes(), len(pages), "KV move")
        padded = np.zeros(n, np.int32)
        padded[:len(pages)] = pages
        return self._packed_gathers[(n, table)](self.kv, padded), n

    def scatter_packed(self, pages: list[int], buffers: tuple[jax.Array, ...], table, n: int) -> None:
        padded = np.full(n, self.kv_shape[2], np.int32)  # out of range: padding rows are dropped
        padded[:len(pages)] = pages
        self.kv = self._packed_scatters[(n, table)](self.kv, padded, buffers)

    def packed_buffer_shape(self, per_buffer: int, n: int) -> tuple[int, ...]:
        layers, kv_heads, _, page_size, head_dim = self.kv_shape
        if self.move_copy == "xla":
            head_dim = _as_words(jax.ShapeDtypeStruct((head_dim,), self.cfg.jnp_dtype)).shape[-1]
        return (per_buffer, 2, layers, kv_heads, n, page_size, head_dim)

    def _packed_dtype(self):
        if self.move_copy == "xla":
            return _as_words(jax.ShapeDtypeStruct((self.kv_shape[-1],), self.cfg.jnp_dtype)).dtype
        return self.cfg.jnp_dtype

    def _gather_fn(self):
        """gather(kv, pages, table) -> one packed buffer [q, K|V, layers, kv_heads, n, S, H] per
        group, sharded over tp: each device packs its own positions (its row of `table`)."""
        copy = self.move_copy
        kv_spec = KVCache(k=P(None, None, "tp"), v=P(None, None, "tp"))

        def gather(kv, pages, table):
            def local(kv, pages):
                mine = jnp.asarray(np.asarray(table, np.int32))[jax.lax.axis_index("tp")]  # [groups, q]
                if copy == "xla":
                    return tuple(_gather_words(kv, pages, mine[t]) for t in range(mine.shape[0]))
                out = []
                for t in range(mine.shape[0]):
                    q = mine.shape[1]
                    packed = page_copy.gather_pages_kernel((kv.k, kv.v), pages, jnp.repeat(mine[t], 2),
                                                           kinds=(0, 1) * q, interpret=copy == "interpret")
                    out.append(packed.reshape((q, 2) + packed.shape[1:]))
                return tuple(out)
            return jax.shard_map(local, mesh=self.mesh, in_specs=(kv_spec, P()),
                                 out_specs=tuple(P(None, None, None, "tp") for _ in table[0]),
                                 check_vma=False)(kv, pages)
        return gather

    def _scatter_fn(self):
        """scatter(kv, pages, buffers, table): entry q of buffer u into position table[j][u][q] on device j."""
        copy = self.move_copy
        kv_spec = KVCache(k=P(None, None, "tp"), v=P(None, None, "tp"))

        def scatter(kv, pages, buffers, table):
            def local(kv, pages, buffers):
                mine = jnp.asarray(np.asarray(table, np.int32))[jax.lax.axis_index("tp")]  # [incoming, q]
                if copy == "xla":
                    return _scatter_words(kv, pages, buffers, mine)
                flat = tuple(b.reshape((-1,) + b.shape[2:]) for b in buffers)  # [q, 2, ...] -> [2q, ...]
                q = mine.shape[1]
                sources = tuple((u, 2 * e + kind, kind) for u in range(len(buffers)) for e in range(q)
                                for kind in (0, 1))
                k, v = page_copy.scatter_pages_kernel((kv.k, kv.v), pages, flat, jnp.repeat(mine.reshape(-1), 2),
                                                      sources=sources, interpret=copy == "interpret")
                return KVCache(k=k, v=v)
            return jax.shard_map(local, mesh=self.mesh,
                                 in_specs=(kv_spec, P(), tuple(P(None, None, None, "tp") for _ in buffers)),
                                 out_specs=kv_spec, check_vma=False)(kv, pages, buffers)
        return scatter

    def warm_up(self) -> None:
        """Run every compiled step once on idle rows (num_new 0: nothing is written)."""
        for b, feed in self._feeds.items():
            feed(jax.device_put(np.zeros(b, np.int32), self.replicated))
        drawing = SamplingParams(temperature=1.0)
        for (b, t) in self._steps:
            self.step(np.zeros((b, t), np.int32), np.zeros(b, np.int32), np.zeros(b, np.int32),
                      np.zeros((b, self.pages_per_seq), np.int32),
                      SamplingBatch.from_params([drawing] * b, [0] * b, [0] * b))

    # -- serving -------------------------------------------------------------------------
    def dispatch(self, tokens: np.ndarray, start_pos: np.ndarray, num_new: np.ndarray, page_table: np.ndarray,
                 sampling: SamplingBatch | None) -> tuple[jax.Array, jax.Array]:
        """Enqueue one compiled step without waiting; returns device arrays (tokens, logprobs).
        `sampling` None: every row is greedy (the step's argmax is the token)."""
        b, t = tokens.shape
        fn = self._steps.get((b, t))
        if fn is None:
            raise ShapeOutsideGrid(f"step shape [batch {b}, tokens {t}] is not in lane {self.name}'s grid "
                                   f"{sorted(self._steps)}")
        step = StepInput(tokens=tokens, start_pos=start_pos, num_new=num_new, page_table=page_table)
        with self.kv_lock:
            next_tokens, logprobs, logits, self.kv = fn(self.params, self.kv, step)
        if draws(sampling):  # the step's argmax stays the token of greedy rows
            next_tokens, logprobs = self._samplers[b](logits, sampling, next_tokens)
        return next_tokens, logprobs

    def dispatch_fed(self, previous: jax.Array, start_pos: np.ndarray, num_new: np.ndarray, page_table: np.ndarray,
                     sampling: SamplingBatch | None) -> tuple[jax.Array, jax.Array]:
        """A decode step whose input tokens are `previous` (a step's output tokens [B], still on
        the device, rows in the same order): no wait for the host to read them."""
        b = previous.shape[0]
        return self.dispatch(self._feeds[b](previous), start_pos, num_new, page_table, sampling)

    def step(self, tokens: np.ndarray, start_pos: np.ndarray, num_new: np.ndarray, page_table: np.ndarray,
             sampling: SamplingBatch) -> tuple[np.ndarray, np.ndarray]:
        """One compiled step; shapes must be a grid entry. Returns tokens [B] and logprobs [B]."""
        return jax.device_get(self.dispatch(tokens, start_pos, num_new, page_table, sampling))

    def batch_for(self, n: int) -> int:
        return self.grid.batch_for(n)

    def prefill_for(self, n: int) -> int:
        return self.grid.prefill_for(n)

    def gather_pages(self, pages: list[int]) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...], int]:
        n = _pick(tuple(self._gathers), len(pages), "KV move")
        padded = np.zeros(n, np.int32)
        padded[:len(pages)] = pages
        k, v = self._gathers[n](self.kv, padded)
        return k, v, n

    def scatter_pages(self, pages: list[int], k_pieces, v_pieces, n: int) -> None:
        padded = np.full(n, self.kv_shape[2], np.int32)  # out of range: padding rows are dropped
        padded[:len(pages)] = pages
        self.kv = self._scatters[n](self.kv, padded, k_pieces, v_pieces)

    @property
    def devices(self) -> list:
        return list(self.mesh.devices.flat)


def _gather_pages(kv: KVCache, pages: jax.Array):
    """Per position r, its pages [layers, kv_heads, n, page_size, head_dim], sharded over tp:
    one tuple for K, one for V, so each device's shard of an entry is one (chunk, K|V) piece."""
    slots = kv.k.shape[0]
    return tuple(kv.k[r][:, :, pages] for r in range(slots)), tuple(kv.v[r][:, :, pages] for r in range(slots))


def _as_words(a):
    """[..., H] of a 2-byte dtype -> [..., H/2] uint32 over the same bytes (other dtypes: as is).
    Gathers and scatters of pages move elements one by one; 4-byte words halve their count."""
    if jnp.dtype(a.dtype).itemsize != 2 or a.shape[-1] % 2:
        return a
    if isinstance(a, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(a.shape[:-1] + (a.shape[-1] // 2,), jnp.uint32)
    return jax.lax.bitcast_convert_type(a.reshape(a.shape[:-1] + (a.shape[-1] // 2, 2)), jnp.uint32)


def _from_words(w, dtype):
    if w.dtype == dtype:
        return w
    x = jax.lax.bitcast_convert_type(w, dtype)  # [..., H/2, 2]
    return x.reshape(x.shape[:-2] + (x.shape[-2] * 2,))


def _gather_words(kv: KVCache, pages: jax.Array, positions: jax.Array) -> jax.Array:
    """One device's packed buffer [q, K|V, layers, kv_heads, n, S, H as words] of `positions` [q]."""
    k, v = _as_words(kv.k), _as_words(kv.v)
    take = lambda a, r: jax.lax.dynamic_index_in_dim(a, r, 0, keepdims=False)[:, :, pages]
    return jnp.stack([jnp.stack([take(k, positions[e]), take(v, positions[e])]) for e in range(positions.shape[0])])


def _scatter_words(kv: KVCache, pages: jax.Array, buffers, positions: jax.Array) -> KVCache:
    """One device's scatter: entry e of buffer u into position positions[u, e]."""
    def put(a, kind):
        words = _as_words(a)
        for u, buf in enumerate(buffers):
            for e in range(positions.shape[1]):
                # One in-place scatter (position and pages both index arrays, split by slices, so
                # the page axis leads the update); slicing the position out and back copied it.
                words = words.at[positions[u, e], :, :, pages].set(jnp.moveaxis(buf[e, kind], 2, 0), mode="drop")
        return _from_words(words, a.dtype)

    return KVCache(k=put(kv.k, 0), v=put(kv.v, 1))


def _scatter_pages(kv: KVCache, pages: jax.Array, k_pieces, v_pieces) -> KVCache:
    k, v = kv.k, kv.v
    for r, (kp, vp) in enumerate(zip(k_pieces, v_pieces)):
        k = k.at[r:r + 1, :, :, pages].set(kp[None], mode="drop")
        v = v.at[r:r + 1, :, :, pages].set(vp[None], mode="drop")
    return KVCache(k=k, v=v)
