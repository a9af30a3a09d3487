"""Per-device memory of a plan set, computed from shapes (nothing is allocated), so that
`nitsum-jax plans --preset llama-3.1-70b --devices 8` answers on a laptop."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nitsum_jax.config import LlamaConfig
from nitsum_jax.model import CHUNK_AXIS, ChunkLayout, abstract_params
from nitsum_jax.plans.layout import weight_runs
from nitsum_jax.plans.spec import Plan


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    num_pages: int  # KV pages per lane
    page_size: int
    max_batch: int
    max_prefill: int


def chunk_bytes(cfg: LlamaConfig, num_chunks: int, weights: str = "bf16") -> tuple[int, int, int]:
    """(bytes of one chunk's weights, bytes of the replicated weights, bytes of one chunk's weights
    that a run of chunks holds once) - per device copy. fp8 weights count one byte a value plus
    their float32 scales; a chunk of wo or w_down needs all of its scale (`plans.weights.chunk_slice`),
    and one buffer of a run's chunks (`model.LayerGroup`) holds it once."""
    full = abstract_params(cfg, weights=weights)
    rep = sum(a.size * a.dtype.itemsize for a in (full.attn_norm, full.mlp_norm, full.final_norm))
    per_chunk = shared = 0
    for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "embed", "lm_head"):
        for a in jax.tree.leaves(getattr(full.chunks[0], name)):  # an array, or an fp8 weight's two
            n = a.size
            if name in ("wk", "wv") and cfg.num_kv_heads < num_chunks:
                n = n // cfg.num_kv_heads  # one (replicated) kv head per chunk
            elif a.shape[CHUNK_AXIS[name]] > 1:
                n = n // num_chunks
            elif name in ("wo", "w_down"):
                shared += n * a.dtype.itemsize
            per_chunk += n * a.dtype.itemsize
    return per_chunk, rep, shared


def run_bytes(cfg: LlamaConfig, num_chunks: int, chunks: int, weights: str = "bf16") -> int:
    """Bytes of one device's run of `chunks` chunks (its layer buffers and vocabulary tables)."""
    per_chunk, _, shared = chunk_bytes(cfg, num_chunks, weights)
    return chunks * per_chunk - (chunks - 1) * shared if chunks else 0


def lane_kv_bytes_per_device(cfg: LlamaConfig, layout: ChunkLayout, budget: MemoryBudget) -> int:
    heads_per_device = layout.slots * max(1, cfg.num_kv_heads // layout.num_chunks)
    return (2 * cfg.num_layers * heads_per_device * budget.num_pages * budget.page_size * cfg.head_dim
            * jnp.dtype(cfg.jnp_dtype).itemsize)


def lane_workspace_bytes(cfg: LlamaConfig, tp: int, budget: MemoryBudget) -> int:
    """Peak activations of the largest step, an estimate: the prefill chunk's hidden states,
    q/k/v and ffn intermediates, plus fp32 logits of the largest decode batch."""
    tokens = max(budget.max_prefill, budget.max_batch)
    per_token = 4 * (3 * cfg.dim + (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim // tp
                     + 3 * cfg.ffn_dim // tp)
    attn_scores = 4 * cfg.num_heads // tp * budget.max_prefill * budget.max_prefill
    logits = 4 * budget.max_batch * cfg.vocab_size * 2
    return tokens * per_token + attn_scores + logits


def memory_report(cfg: LlamaConfig, plans: tuple[Plan, ...], layouts: dict[tuple[int, ...], ChunkLayout],
                  budget: MemoryBudget, weights_format: str = "bf16") -> dict:
    c = next(iter(layouts.values())).num_chunks
    per_chunk, rep, _ = chunk_bytes(cfg, c, weights_format)
    runs = weight_runs(layouts).runs
    shared_weights = {d: sum(run_bytes(cfg, c, len(run), weights_format) for run in rs) + rep
                      for d, rs in runs.items()}
    kv, work = {}, {}
    for devices, layout in layouts.items():
        for d in devices:
            kv[d] = kv.get(d, 0) + lane_kv_bytes_per_device(cfg, layout, budget)
            work[d] = max(work.get(d, 0), lane_workspace_bytes(cfg, layout.tp, budget))
    per_plan = {}
    for plan in plans:
        weights = {d: run_bytes(cfg, c, c // lane.tp, weights_format) + rep for lane in plan.lanes for d in lane.devices}
        per_plan[plan.name] = {"weights_per_device": weights, "weights_total": sum(weights.values())}
    largest = max(p["weights_total"] for p in per_plan.values())
    total = sum(shared_weights.values())
    return {
        "weights_format": weights_format,
        "num_chunks": c,
        "chunk_bytes": per_chunk,
        "plans": per_plan,
        "devices": {d: {"weights": shared_weights[d], "kv": kv.get(d, 0), "workspace": work.get(d, 0),
                        "total": shared_weights[d] + kv.get(d, 0) + work.get(d, 0)} for d in sorted(runs)},
        "plan_set_weights_total": total,
        "largest_plan_weights_total": largest,
        "weight_overhead": total / largest,
    }


def check_fits(report: dict, device_bytes: int) -> None:
    """Refuse a plan set whose weights + KV + workspace exceed a device's memory."""
    from nitsum_jax.plans.spec import PlanError

    for d, use in report["devices"].items():
        if use["total"] > device_bytes:
            raise PlanError(f"device {d} needs {use['total'] / 2**30:.2f} GiB (weights {use['weights'] / 2**30:.2f}, "
                            f"KV {use['kv'] / 2**30:.2f}, workspace {use['workspace'] / 2**30:.2f}) but has "
                            f"{device_bytes / 2**30:.2f} GiB; use fewer KV pages, more TP or fewer lanes per device")
