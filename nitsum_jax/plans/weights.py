"""Weight buffers for a plan set: one buffer per (device, chunk, weight), shared by every lane
that places that chunk on that device; lanes see them through
`jax.make_array_from_single_device_arrays`, so nothing is copied per lane or per plan."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nitsum_jax.config import LlamaConfig
from nitsum_jax.model import CHUNK_AXIS, ChunkLayout, ChunkWeights, Params, fuse_qkv, param_specs
from nitsum_jax.quant import CONTRACTED, Fp8Weight, channel_amax, check_format, chunk_format, quantize

REPLICATED = ("attn_norm", "mlp_norm", "final_norm")


def chunk_slice(cfg: LlamaConfig, name: str, full: np.ndarray, chunk: int, num_chunks: int) -> np.ndarray:
    """The piece of weight `name` (or of its fp8 values or scale) that chunk `chunk` of
    `num_chunks` holds."""
    axis = CHUNK_AXIS[name]
    if full.shape[axis] == 1 and name not in ("wk", "wv"):
        return full  # the scale of a weight whose chunks split its input: each chunk needs all of it
    if name in ("wk", "wv") and cfg.num_kv_heads < num_chunks:
        # Fewer kv heads than chunks: each chunk holds (a replica of) the kv head its query heads use.
        head = chunk * cfg.num_kv_heads // num_chunks
        return np.take(full, [head], axis=axis)
    width = full.shape[axis] // num_chunks
    return np.take(full, np.arange(chunk * width, (chunk + 1) * width), axis=axis)


@dataclasses.dataclass
class WeightStore:
    """Per-device buffers: `chunks[(device_id, chunk)]` is a ChunkWeights of single-device arrays."""

    cfg: LlamaConfig
    num_chunks: int
    chunks: dict[tuple[int, int], ChunkWeights]
    replicated: dict[int, dict[str, jax.Array]]

    @classmethod
    def build(cls, cfg: LlamaConfig, params: Params, held: dict[int, set[int]], devices: list) -> "WeightStore":
        """Slice the unsplit `params` into the chunks each device holds and place them."""
        full = params.chunks[0]
        c = max(max(ch) for ch in held.values()) + 1
        # a weight is an array or an Fp8Weight of two; tree maps cut and place either
        host = {f.name: jax.tree.map(np.asarray, getattr(full, f.name)) for f in dataclasses.fields(ChunkWeights)}
        chunks, replicated = {}, {}
        for d, held_chunks in sorted(held.items()):
            dev = devices[d]
            replicated[d] = {n: jax.device_put(getattr(params, n), dev) for n in REPLICATED}
            for ch in sorted(held_chunks):
                pieces = {n: jax.tree.map(lambda a, n=n: jax.device_put(chunk_slice(cfg, n, a, ch, c), dev), w)
                          for n, w in host.items()}
                chunks[(d, ch)] = fuse_qkv(ChunkWeights(**pieces))
        return cls(cfg, c, chunks, replicated)

    @classmethod
    def random(cls, cfg: LlamaConfig, held: dict[int, set[int]], devices: list, seed: int = 0,
               weights: str = "bf16") -> "WeightStore":
        """Random weights made on the devices themselves (benchmarks of large shapes): each chunk
        is drawn once on the first device that holds it and copied device to device to the rest.
        `weights="fp8"`: the same weights, quantized there as `build` would quantize them."""
        from nitsum_jax.model import declare

        c = max(max(ch) for ch in held.values()) + 1
        drawn = _draw_chunks(cfg, held, devices, seed, c)
        if check_format(weights) == "fp8":
            drawn = _quantize_chunks(drawn)
        chunks, replicated = {}, {}
        for ch, first in drawn.items():
            fused = fuse_qkv(ChunkWeights(**first))
            for d in sorted(d for d, h in held.items() if ch in h):
                chunks[(d, ch)] = jax.tree.map(lambda a, d=d: jax.device_put(a, devices[d]), fused)
        full = declare(cfg)
        for d in held:
            replicated[d] = {n: jax.device_put(np.ones(getattr(full, n).shape, cfg.jnp_dtype), devices[d])
                             for n in REPLICATED}
        return cls(cfg, c, chunks, replicated)

    def lane_params(self, lane_devices: tuple[int, ...], layout: ChunkLayout, mesh: Mesh) -> Params:
        """The lane's Params: slot r is a global array over the lane mesh assembled from the
        buffers of chunk layout.assign[i][r] on device i. No data is copied."""
        fp8 = self.weights_format == "fp8"
        qkv_spec = PartitionSpec(None, None, "tp", None, None)  # `fuse_qkv`: the device's chunk on axis 2
        specs = param_specs(self.cfg, weights=self.weights_format).chunks[0].replace(
            wqkv=Fp8Weight(q=qkv_spec, scale=qkv_spec) if fp8 else qkv_spec)

        def assemble(spec: PartitionSpec, *pieces: jax.Array) -> jax.Array:
            # the global shape: pieces side by side on the axis `tp` shards, if any (an fp8 scale
            # of wo or w_down is replicated: every device holds all of it)
            shape = [n * (len(pieces) if i < len(spec) and spec[i] is not None else 1)
                     for i, n in enumerate(pieces[0].shape)]
            return jax.make_array_from_single_device_arrays(tuple(shape), NamedSharding(mesh, spec), list(pieces))

        slots = []
        for r in range(layout.slots):
            fields = {}
            for f in dataclasses.fields(ChunkWeights):
                pieces = [getattr(self.chunks[(d, layout.assign[i][r])], f.name) for i, d in enumerate(lane_devices)]
                fields[f.name] = None if pieces[0] is None else jax.tree.map(
                    assemble, getattr(specs, f.name), *pieces, is_leaf=lambda x: isinstance(x, PartitionSpec))
            slots.append(ChunkWeights(**fields))
        rep = {n: jax.make_array_from_single_device_arrays(
            self.replicated[lane_devices[0]][n].shape, NamedSharding(mesh, PartitionSpec()),
            [self.replicated[d][n] for d in lane_devices]) for n in REPLICATED}
        return Params(chunks=tuple(slots), **rep)

    @property
    def weights_format(self) -> str:
        return chunk_format(next(iter(self.chunks.values())))

    def bytes_per_device(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for (d, _), cw in self.chunks.items():
            out[d] = out.get(d, 0) + sum(a.nbytes for a in jax.tree.leaves(cw))
        for d, rep in self.replicated.items():
            out[d] = out.get(d, 0) + sum(a.nbytes for a in rep.values())
        return out


def _draw_chunks(cfg: LlamaConfig, held: dict[int, set[int]], devices: list, seed: int,
                 c: int) -> dict[int, dict[str, jax.Array | None]]:
    """Chunk -> its weights (normal, std 1/sqrt(fan_in)), drawn on the first device holding it."""
    import jax.numpy as jnp

    from nitsum_jax.model import declare

    decl = declare(cfg).chunks[0]
    shapes = {}
    for f in dataclasses.fields(ChunkWeights):
        d = getattr(decl, f.name)
        if d is None:
            shapes[f.name] = None
            continue
        shape = list(d.shape)
        axis = CHUNK_AXIS[f.name]
        shape[axis] = 1 if f.name in ("wk", "wv") and cfg.num_kv_heads < c else shape[axis] // c
        shapes[f.name] = (tuple(shape), d.fan_in)

    def draw(key, shape, fan_in):
        return (jax.random.normal(key, shape, jnp.float32) / np.sqrt(fan_in)).astype(cfg.jnp_dtype)

    draw = jax.jit(draw, static_argnums=(1, 2))
    drawn = {}
    for ch in range(c):
        holders = [d for d, h in sorted(held.items()) if ch in h]
        if not holders:
            continue
        key = jax.random.fold_in(jax.random.key(seed), ch)
        with jax.default_device(devices[holders[0]]):
            drawn[ch] = {n: None if sh is None else draw(jax.random.fold_in(key, i), *sh)
                         for i, (n, sh) in enumerate(shapes.items())}
    return drawn


def _quantize_chunks(drawn: dict[int, dict[str, jax.Array | None]]) -> dict[int, dict[str, object]]:
    """Each chunk's linear weights in fp8 with the scales of the whole weight: where chunks split
    a weight's input (wo, w_down), a channel's largest |w| is the largest over every chunk, so
    all chunks hold one scale (a replicated array on a lane), as `build` gives them. In place,
    weight by weight, so a device holds one weight twice at most."""
    for name, contracted in CONTRACTED.items():
        amax = {ch: channel_amax(weights[name], contracted) for ch, weights in drawn.items()}
        if CHUNK_AXIS[name] in contracted:
            whole = functools.reduce(np.maximum, [np.asarray(a) for a in amax.values()])
            amax = {ch: jax.device_put(whole, next(iter(a.devices()))) for ch, a in amax.items()}
        for ch, weights in drawn.items():
            weights[name] = quantize(weights[name], contracted, amax[ch])
    return drawn
