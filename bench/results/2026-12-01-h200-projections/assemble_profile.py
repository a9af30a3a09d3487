"""The llama-3.1-8b profile of the projections, assembled from figures already measured on H200s
and recorded in the tree (each row names its source; nothing here is measured anew).

Run from the repository root: `python bench/results/2026-12-01-h200-projections/assemble_profile.py`.
Writes profile-8b-h200.json beside this file. No 70B figure was ever measured (BENCHMARKS.md,
"70B on 8 GPUs: not run"), so there is no 70B profile.
"""

import json
from pathlib import Path

from nitsum_jax.config import preset
from nitsum_jax.sim import profile as P

HERE = Path(__file__).parent
RESULTS = HERE.parent
CONTEXT = 1024  # every decode figure below was measured at this context

SOURCES = {
    "h200x1-37ba152": {"card": "NVIDIA H200", "devices": 1, "date": "2026-12-01", "commit": "37ba152",
                       "how": "BENCHMARKS.md, 'Decode roofline', 'Latest: TP1 on 1x H200': python bench/gpu_step.py "
                              "--tps 1 --impls kernel, one-chunk plan set (no raw file in the tree)"},
    "h200x2-e22aecc": {"card": "NVIDIA H200", "devices": 2, "date": "2026-11-27", "commit": "e22aecc",
                       "how": "bench/results/2026-11-27-h200x2-decode-roofline/gpu_step_2chunk_scan_e22aecc.json "
                              "(two-chunk plan set, impl kernel)"},
    "h200x4-4chunk": {"card": "NVIDIA H200", "devices": 4, "date": "2026-11-27", "commit": "not recorded (fd9b8e0)",
                      "how": "bench/results/2026-11-27-h200x4-decode-roofline/gpu_step_4chunk.json "
                             "(four-chunk plan set, impl kernel)"},
    "h200x4-26d3098": {"card": "NVIDIA H200", "devices": 4, "date": "2026-11-27", "commit": "26d3098",
                       "how": "bench/results/2026-11-27-h200x4-kv-moves/gpu_moves_{1024,4096}_26d3098.json, "
                              "direct-push transport"},
    "h200x4-ef68eaa": {"card": "NVIDIA H200", "devices": 4, "date": "2026-11-27", "commit": "ef68eaa",
                       "how": "bench/results/2026-11-27-h200x4-headline/tp1set-24-28rps-ef68eaa/results.json, "
                              "switch_probe.switch_ms_median (switch without KV moves)"},
    "stand-in-prefill": {"card": "NVIDIA H200", "devices": 0, "date": "2026-12-01", "commit": None,
                         "how": "NOT MEASURED: no prefill chunk of the 8B shape was ever timed on a GPU. A chunk of "
                                "T tokens is taken as the same lane's measured decode step of batch T (same matmul "
                                "rows) at context 1024, where batch T was measured; beyond, the model holds the "
                                "largest measured batch's time (an underestimate). Replace with `nitsum-jax "
                                "profile` on the GPUs."},
}

TP1_ONE_CHUNK = {1: 7.09, 8: 6.58, 32: 7.55, 64: 8.66, 128: 11.25, 256: 17.38}  # ms, BENCHMARKS.md


def decode_rows(path: Path, source: str) -> dict[int, dict[int, float]]:
    data = json.loads(path.read_text())
    assert data["context"] == CONTEXT, path
    out: dict[int, dict[int, float]] = {}
    for row in data["rows"]:
        if row["impl"] == "kernel":
            out.setdefault(row["tp"], {})[row["batch"]] = row["step_ms"]
    return out


def add_lane(profile: dict, tp: int, chunks: int, by_batch: dict[int, float], source: str) -> None:
    entry = P.lane_entry(profile, tp, chunks)
    entry["decode"] = [{"batch": b, "context": CONTEXT, "ms": ms, "source": source} for b, ms in sorted(by_batch.items())]
    entry["prefill"] = [{"tokens": b, "context": CONTEXT, "ms": ms, "source": "stand-in-prefill"}
                        for b, ms in sorted(by_batch.items()) if b >= 8]


def moves(profile: dict) -> None:
    for tokens in (1024, 4096):
        data = json.loads((RESULTS / f"2026-11-27-h200x4-kv-moves/gpu_moves_{tokens}_26d3098.json").read_text())
        for name, m in data["moves"].items():
            transport, _, pair = name.partition(" ")
            if transport != "direct-push":
                continue
            src, dst = (P_lane(x) for x in pair.split("->"))
            profile["moves"].append({"src_tp": src[0], "dst_tp": dst[0], "shared_device": bool(src[1] & dst[1]),
                                     "tokens": tokens, "GB_per_s": m["GB_per_s"], "source": "h200x4-26d3098"})


def P_lane(name: str) -> tuple[int, set[int]]:
    from nitsum_jax.plans.spec import parse_lane

    spec = parse_lane(f"all={name}")
    return spec.tp, set(spec.devices)


def main() -> None:
    cfg = preset("llama-3.1-8b")
    from nitsum_jax.kv import kv_bytes_per_page

    profile = P.empty_profile(P.model_shape(cfg), kv_bytes_per_page(cfg, 1), "gpu", None)
    profile["sources"] = SOURCES
    add_lane(profile, 1, 1, TP1_ONE_CHUNK, "h200x1-37ba152")
    two = decode_rows(RESULTS / "2026-11-27-h200x2-decode-roofline/gpu_step_2chunk_scan_e22aecc.json", "h200x2-e22aecc")
    add_lane(profile, 1, 2, two[1], "h200x2-e22aecc")
    add_lane(profile, 2, 2, two[2], "h200x2-e22aecc")
    four = decode_rows(RESULTS / "2026-11-27-h200x4-decode-roofline/gpu_step_4chunk.json", "h200x4-4chunk")
    add_lane(profile, 1, 4, four[1], "h200x4-4chunk")
    add_lane(profile, 4, 4, four[4], "h200x4-4chunk")
    moves(profile)
    headline = json.loads((RESULTS / "2026-11-27-h200x4-headline/tp1set-24-28rps-ef68eaa/results.json").read_text())
    profile["switch_ms"] = {"ms": headline["configs"]["adaptive"]["switch_probe"]["switch_ms_median"],
                            "source": "h200x4-ef68eaa"}
    P.save(profile, HERE / "profile-8b-h200.json")
    print(f"wrote {HERE / 'profile-8b-h200.json'}: lanes {sorted(profile['lanes'])}, {len(profile['moves'])} moves")


if __name__ == "__main__":
    main()
