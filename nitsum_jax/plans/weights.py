"""Weight buffers for a plan set, shared by every lane that reads them; lanes see them through
`jax.make_array_from_single_device_arrays`, so nothing is copied per lane or per plan.

A device keeps its layer weights as runs of chunks, one buffer per weight and run
(`model.LayerGroup`, `layout.weight_runs`): usually one run of every chunk it holds, ordered so
that each lane on it reads a prefix, so a TP1 lane that holds four chunks for the TP2 and TP4
lanes reads each weight with one gemm, like a lane of a one-chunk set. The vocabulary tables
stay one buffer per (device, chunk)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nitsum_jax.config import LlamaConfig
from nitsum_jax.model import (CHUNK_AXIS, ChunkLayout, ChunkWeights, LayerGroup, Params, fold_norms, group_of,
                              param_specs)
from nitsum_jax.plans.layout import WeightRuns
from nitsum_jax.quant import CONTRACTED, Fp8Weight, channel_amax, check_format, quantize, weight_format

REPLICATED = ("attn_norm", "mlp_norm", "final_norm")
VOCAB = ("embed", "lm_head")


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


def _vocab(pieces: dict) -> ChunkWeights:
    """A chunk's vocabulary tables, its layer weights left out (they live in the runs)."""
    return ChunkWeights(**{f.name: pieces.get(f.name) if f.name in VOCAB else None
                           for f in dataclasses.fields(ChunkWeights)})


def _layers(pieces: dict) -> ChunkWeights:
    return ChunkWeights(**{f.name: None if f.name in VOCAB else pieces[f.name] for f in dataclasses.fields(ChunkWeights)})


@dataclasses.dataclass
class WeightStore:
    """Per-device buffers: `runs[(device_id, i)]` is the LayerGroup of run i of `layout.runs[device_id]`,
    `vocab[(device_id, chunk)]` a ChunkWeights of that chunk's vocabulary tables (single-device arrays)."""

    cfg: LlamaConfig
    num_chunks: int
    layout: WeightRuns
    runs: dict[tuple[int, int], LayerGroup]
    vocab: dict[tuple[int, int], ChunkWeights]
    replicated: dict[int, dict[str, jax.Array]]

    @classmethod
    def build(cls, cfg: LlamaConfig, params: Params, layout: WeightRuns, devices: list) -> "WeightStore":
        """Slice the unsplit `params` into the chunks each device holds and place them, each run
        assembled on the host and placed once."""
        full = params.chunks[0]
        c = next(iter(layout.layouts.values())).num_chunks
        # a weight is an array or an Fp8Weight of two; tree maps cut and place either
        host = {f.name: jax.tree.map(np.asarray, getattr(full, f.name)) for f in dataclasses.fields(ChunkWeights)}

        def piece(name, ch):
            return None if host[name] is None else jax.tree.map(lambda a: chunk_slice(cfg, name, a, ch, c), host[name])

        runs, vocab, replicated = {}, {}, {}
        for d, device_runs in sorted(layout.runs.items()):
            dev = devices[d]
            replicated[d] = {n: jax.device_put(getattr(params, n), dev) for n in REPLICATED}
            for i, run in enumerate(device_runs):
                group = group_of([_layers({n: piece(n, ch) for n in CONTRACTED}) for ch in run])
                runs[(d, i)] = _fold(jax.device_put(group, dev), replicated[d])
                for ch in run:
                    vocab[(d, ch)] = jax.device_put(_vocab({n: piece(n, ch) for n in VOCAB}), dev)
        return cls(cfg, c, layout, runs, vocab, replicated)

    @classmethod
    def random(cls, cfg: LlamaConfig, layout: WeightRuns, devices: list, seed: int = 0,
               weights: str = "bf16") -> "WeightStore":
        """Random weights made on the devices themselves (benchmarks of large shapes): each chunk
        is drawn once on the first device that holds it and copied device to device to the rest.
        `weights="fp8"`: the same weights, quantized there as `build` would quantize them."""
        from nitsum_jax.model import declare

        c = next(iter(layout.layouts.values())).num_chunks
        held = {d: {ch for run in rs for ch in run} for d, rs in layout.runs.items()}
        drawn = _draw_chunks(cfg, held, devices, seed, c)
        if check_format(weights) == "fp8":
            drawn = _quantize_chunks(drawn)
        runs, vocab, replicated = {}, {}, {}
        for d, device_runs in sorted(layout.runs.items()):
            dev = devices[d]
            for i, run in enumerate(device_runs):
                pieces = [jax.device_put(_layers(drawn[ch]), dev) for ch in run]
                # the norms are ones (below): folded, the weights are unchanged
                runs[(d, i)] = jax.block_until_ready(fold_norms(group_of(pieces), None, None))
                del pieces
                for ch in run:
                    vocab[(d, ch)] = jax.device_put(_vocab(drawn[ch]), dev)
        del drawn
        full = declare(cfg)
        for d in layout.runs:
            replicated[d] = {n: jax.device_put(np.ones(getattr(full, n).shape, cfg.jnp_dtype), devices[d])
                             for n in REPLICATED}
        return cls(cfg, c, layout, runs, vocab, replicated)

    def lane_params(self, lane_devices: tuple[int, ...], mesh: Mesh) -> Params:
        """The lane's Params: each of its layer groups one global array per weight over the lane
        mesh, assembled from the run each device holds for it (`layout.lanes`); position r's
        vocabulary tables from the buffers of chunk layout.assign[i][r] on device i. No data is copied."""
        layout = self.layout.layouts[lane_devices]
        tp = PartitionSpec(None, "tp")

        def assemble(spec: PartitionSpec, *pieces: jax.Array) -> jax.Array:
            # the global shape: pieces side by side on the axis `tp` shards, if any (an fp8 scale
            # of wo or w_down is replicated: every device holds all of it)
            shape = [n * (len(pieces) if i < len(spec) and spec[i] is not None else 1)
                     for i, n in enumerate(pieces[0].shape)]
            return jax.make_array_from_single_device_arrays(tuple(shape), NamedSharding(mesh, spec), list(pieces))

        def group_spec(name, w):
            if not isinstance(w, Fp8Weight):
                return tp
            return Fp8Weight(q=tp, scale=PartitionSpec() if name in ("wo", "w_down") else tp, inputs_last=w.inputs_last)

        groups = []
        for run_of, used in self.layout.lanes[lane_devices]:
            pieces = [self.runs[(d, run_of[i])] for i, d in enumerate(lane_devices)]
            fields = {}
            for f in ("wqkv", "wo", "w_gate_up", "w_down"):
                ws = [getattr(p, f) for p in pieces]
                fields[f] = jax.tree.map(assemble, group_spec(f, ws[0]), *ws,
                                         is_leaf=lambda x: isinstance(x, PartitionSpec))
            groups.append(LayerGroup(**fields, used=used, norms_folded=pieces[0].norms_folded))

        specs = param_specs(self.cfg).chunks[0]
        slots = []
        for r in range(layout.slots):
            fields = {}
            for name in VOCAB:
                pieces = [getattr(self.vocab[(d, layout.assign[i][r])], name) for i, d in enumerate(lane_devices)]
                fields[name] = None if pieces[0] is None else assemble(getattr(specs, name), *pieces)
            slots.append(_vocab(fields))
        rep = {n: jax.make_array_from_single_device_arrays(
            self.replicated[lane_devices[0]][n].shape, NamedSharding(mesh, PartitionSpec()),
            [self.replicated[d][n] for d in lane_devices]) for n in REPLICATED}
        return Params(chunks=tuple(slots), groups=tuple(groups), **rep)

    @property
    def weights_format(self) -> str:
        return weight_format(next(iter(self.runs.values())).wqkv)

    def bytes_per_device(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for (d, _), buffers in list(self.runs.items()) + list(self.vocab.items()):
            out[d] = out.get(d, 0) + sum(a.nbytes for a in jax.tree.leaves(buffers))
        for d, rep in self.replicated.items():
            out[d] = out.get(d, 0) + sum(a.nbytes for a in rep.values())
        return out


_fold_donated = jax.jit(fold_norms, donate_argnums=0)


def _fold(group: LayerGroup, replicated: dict) -> LayerGroup:
    """`model.fold_norms` on the group's device, the unfolded buffers given up (donated)."""
    return _fold_donated(group, replicated["attn_norm"], replicated["mlp_norm"])


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
