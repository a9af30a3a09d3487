"""Write the example notebooks from the cells below, without outputs (`python notebooks/make_notebooks.py`).

Edit the cells here, not the .ipynb files, so the notebooks stay reviewable and output-free;
tests/test_notebooks.py checks that the stored notebooks match this script and runs them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(text: str):
    return new_markdown_cell(text.strip())


def code(text: str):
    return new_code_cell(text.strip())


PRIORITY_LANES = [
    md("""
# Priority lanes: static TP against adaptive lanes

This notebook plays one seeded workload to two engines on 8 CPU devices and compares them:
**static** (one tensor-parallel lane, TP8, over every device, serving both classes in priority
order) and **adaptive** (a plan set whose controller switches between layouts at step
boundaries). The model is the embedded `tiny` one (random weights, no download), and the
workload is small, so the whole notebook runs in about a minute on a 2-core machine.

On host devices that share two cores lanes cannot really run side by side: this checks the
machinery and shows how to read a bench, it does not measure speed (GPU figures live in
BENCHMARKS.md).
"""),
    md("""
JAX fixes its device count when it starts, so the first step, before anything imports JAX,
asks for 8 host devices.
"""),
    code("""
import nitsum_jax as nj

nj.use_host_devices(8)

import dataclasses

import jax
import matplotlib.pyplot as plt
import pandas as pd

print(jax.device_count(), "devices:", jax.devices())
"""),
    md("""
The plan set: `static` is one TP8 lane for every class; `mixed` reserves a TP4 lane for `high`
and gives `low` the other four devices; `burst` lets both TP4 lanes take `low` work. The three
plans use only two lane shapes (devices 0-7, 0-3 and 4-7), so start-up compiles three lanes.
The shape grid is small too: one decode batch size, one prefill chunk, sequences up to 64 tokens.
"""),
    code("""
PLANS = "static: all=tp8@0-7; mixed: high=tp4@0-3, low=tp4@4-7; burst: high+low=tp4@0-3, low=tp4@4-7"
GRID = nj.BucketGrid(decode_batch=(8,), prefill_len=(16,), max_seq_len=64, min_move_pages=8)

for plan in nj.parse_plans(PLANS):
    print(plan)
"""),
    md("""
The workload has two phases drawn from fixed seeds: first a burst of `low` requests (more than
the lanes hold at once, so they queue), then a steadier mix of `high` and `low`. Both engines
get exactly these requests at exactly these times.
"""),
    code("""
burst = nj.poisson_workload(60.0, num_requests=40, high_fraction=0.0, prompt_len="4-16", output_len="16-40",
                            seed=0, id_prefix="burst-")
mix = nj.poisson_workload(16.0, num_requests=40, high_fraction=0.5, prompt_len="4-16", output_len="16-40",
                          seed=1, id_prefix="mix-")
shift = burst.duration_s + 0.5  # the mixed phase starts half a second after the burst's last arrival
requests = burst.requests + tuple(dataclasses.replace(r, arrival_s=round(r.arrival_s + shift, 6))
                                  for r in mix.requests)
workload = nj.Workload(requests, {"kind": "two-phase", "rate_rps": len(requests) / requests[-1].arrival_s,
                                  "num_requests": len(requests), "seed": 0})

arrivals = pd.DataFrame(workload.to_records())
arrivals["phase"] = arrivals["request_id"].str.split("-").str[0]
arrivals.groupby(["phase", "priority_class"]).agg(
    requests=("request_id", "size"), first_s=("arrival_s", "min"), last_s=("arrival_s", "max"),
    mean_prompt=("prompt_len", "mean"), mean_output=("output_len", "mean")).round(2)
"""),
    md("""
`run_bench` builds and compiles each configuration in turn (start-up is reported, not measured),
warms it with one request per class, then sends the requests in real time and collects every
token's arrival. The controller's hysteresis is shortened (`hold_s`, `min_dwell_s`) so that it
can act within this few-second run. The result is plain dicts and lists (what `results.json` holds).
"""),
    code("""
results = nj.run_bench(configs=("static", "adaptive"), workloads=[workload], plans=PLANS, num_devices=8,
                       grid=GRID, num_pages=32, page_size=8, progress=False,
                       engine_kwargs={"hold_s": 0.25, "min_dwell_s": 0.5})

for name, config in results["configs"].items():
    print(f"{name:>9}: start-up {config['startup_s']:.1f} s, run {config['span_s']:.1f} s, "
          f"{config['completed']}/{config['sent']} completed, {config['plan_switches']} plan switches")
"""),
    md("""
Every request ends with tokens or a clear status, and both configurations saw the same requests:
the notebook checks both before reading any figure.
"""),
    code("""
for name, counts in results["counts"].items():
    assert counts["completed"] + counts["rejected"] + counts["failed"] == counts["sent"] == len(requests), counts
assert results["request_ids"]["same_across_configs"]
results["counts"]
"""),
    md("""
`to_frames` turns the result into pandas DataFrames: `runs` (one row per configuration),
`classes` (one per configuration and class) and `requests` (one per request). The table shows
latency percentiles in milliseconds and the share of requests that met their class's SLO
(TTFT and time per output token targets).
"""),
    code("""
frames = nj.to_frames(results)
table = frames["classes"].set_index(["config", "class"])
ms = [f"{m}_{q}_s" for m in ("ttft", "tpot", "e2e") for q in ("p50", "p99")]
(table[ms] * 1000).round(1).rename(columns=lambda c: c.replace("_s", "_ms")).join(
    table[["sent", "completed", "throughput_rps", "goodput_rps", "slo_attainment"]].round(3))
"""),
    code("""
frames["runs"].set_index("config")[["throughput_rps", "output_tokens_per_s", "goodput_rps", "slo_attainment",
                                    "device_busy_fraction", "plan_switches", "kv_moves", "preemptions"]].round(3)
"""),
    md("""
Latency CDFs per class: solid lines are `high`, dashed `low`, one colour per configuration; the
dotted verticals are the classes' targets. A curve further left is faster.
"""),
    code("""
fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
for ax, metric in zip(axes, ("ttft", "tpot", "e2e")):
    nj.plot_latency_cdf(ax, results, metric)
fig.tight_layout()
plt.show()
"""),
    md("""
The plan in force over time: the static engine stays on `static`; the adaptive controller can
move to `burst` while `low` work queues and no `high` work waits, and to `mixed` once `high`
requests arrive (arrival ticks of each class are drawn under the steps). Where it goes depends
on measured timings, so a rerun may differ.
"""),
    code("""
fig, ax = plt.subplots(figsize=(12, 3.5))
nj.plot_plan_timeline(ax, results)
fig.tight_layout()
plt.show()

pd.DataFrame(results["configs"]["adaptive"]["plan_switch_log"],
             columns=["time", "from_plan", "to_plan", "reason", "duration_s", "moved", "recomputed"])
"""),
    md("""
Underneath `run_bench` is the engine, usable on its own: build it from a preset (or
`checkpoint=DIR`) with a plan set, classes and a shape grid, submit requests with a priority
class, stream their tokens and read its statistics. Here: one TP8 lane, and classes with
their own targets.
"""),
    code("""
classes = {"high": nj.PriorityClass("high", rank=0, ttft_target_s=0.2, tpot_target_s=0.05),
           "low": nj.PriorityClass("low", rank=1, ttft_target_s=5.0, tpot_target_s=0.5)}
engine = nj.Engine.build(preset="tiny", plans="static: all=tp8@0-7", num_devices=8, classes=classes,
                         grid=GRID, num_pages=32, page_size=8)
try:
    handle = engine.submit("Priority lanes", nj.SamplingParams(max_tokens=8, seed=0), priority_class="high")
    streamed = list(handle)  # token ids, as they are made
    completion = handle.result()
    print("streamed:", streamed, "finish:", completion.finish_reason)  # random weights: the text is noise
    print([c.token_ids for c in engine.generate(["a", "b"], nj.SamplingParams(max_tokens=4), priority_class="low")])
    stats = engine.stats()
finally:
    engine.close()
pd.DataFrame(stats["classes"]).T
"""),
]


PLAN_EXPLORER = [
    md("""
# Plan explorer: plan sets and their memory per device

A plan is a partition of a node's devices into lanes (tensor-parallel meshes), each serving some
priority classes; a plan set is the plans compiled at start-up. This notebook lists the default
plan set of real model shapes (Llama 3.1 8B and 70B) on 4 and 8 devices with the memory each
device needs, then writes, checks and breaks custom plans. Everything is computed from shapes:
no weights are allocated and nothing is compiled, so it runs in seconds on a laptop.
"""),
    code("""
import tempfile
from pathlib import Path

import pandas as pd

import nitsum_jax as nj

GIB = 2**30
PRESETS = ["llama-3.1-8b", "llama-3.1-70b"]
DEVICE_COUNTS = [4, 8]
"""),
    md("""
The two presets' shapes: the TP degree of a lane must divide the attention heads, and past the
number of KV heads (8 here) the KV heads are replicated.
"""),
    code("""
pd.DataFrame({name: {"layers": cfg.num_layers, "dim": cfg.dim, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
                     "ffn_dim": cfg.ffn_dim, "vocab": cfg.vocab_size, "dtype": cfg.dtype}
              for name in PRESETS for cfg in [nj.preset(name)]}).T
"""),
    md("""
The default plan set for a device count: `static` (one lane over every device), `mixed` (`high`
on the first half, `low` lanes of a quarter each on the rest) and `burst` (quarter lanes serving
`low`, the first also `high`). One row per lane; both presets get the same set (their head
counts divide every degree up to 8), so the 8B rows are shown.
"""),
    code("""
lanes = pd.DataFrame([
    {"preset": name, "devices": n, "plan": plan.name, "lane": str(lane), "tp": lane.tp,
     "lane_devices": list(lane.devices), "classes": "+".join(lane.classes)}
    for name in PRESETS for n in DEVICE_COUNTS for plan in nj.default_plans(n, nj.preset(name)) for lane in plan.lanes])
assert lanes[lanes.preset == "llama-3.1-8b"].drop(columns="preset").reset_index(drop=True).equals(
    lanes[lanes.preset == "llama-3.1-70b"].drop(columns="preset").reset_index(drop=True))
lanes[lanes.preset == "llama-3.1-8b"].drop(columns="preset").set_index(["devices", "plan"])
"""),
    md("""
Memory per device for each preset and device count, from `nj.plan_memory` (the report of
`nitsum-jax plans`): weights, KV pages (here 1024 pages of 16 tokens per lane) and an estimate
of the step workspace. A device that several plans use keeps one buffer per weight chunk, so
the whole plan set costs the weights of its largest plan (`weight_overhead` 1.00x).
"""),
    code("""
BUDGET = {"num_pages": 1024, "page_size": 16, "max_batch": 64, "max_prefill": 512}

rows, overhead = [], {}
for name in PRESETS:
    for n in DEVICE_COUNTS:
        report = nj.plan_memory(name, None, n, **BUDGET)
        overhead[(name, n)] = report["weight_overhead"]
        for device, use in report["devices"].items():
            rows.append({"preset": name, "devices": n, "device": device,
                         **{f"{k}_gib": use[k] / GIB for k in ("weights", "kv", "workspace", "total")}})
memory = pd.DataFrame(rows).set_index(["preset", "devices", "device"]).round(2)
print({k: round(v, 3) for k, v in overhead.items()})
memory
"""),
    md("""
The largest per-device total against a device's memory: 70B on 4 devices needs more than an
80 GiB H100 holds, on 8 it fits.
"""),
    code("""
peak = memory.groupby(["preset", "devices"])["total_gib"].max().to_frame("max_total_gib")
peak["fits_80_gib"] = peak["max_total_gib"] <= 80
peak
"""),
    md("""
A custom plan in the compact form: plans separated by `;`, lanes by `,`, each lane
`CLASSES=tpN@DEVICES` (`all` serves every class, classes join with `+`, devices are `a-b` or
`a.b.c`). Here 8 devices: a latency plan with a TP4 `high` lane, and a throughput plan of TP2
lanes. `parse_plans` reads the text and `validate_plans` checks it against the model and the
device count.
"""),
    code("""
cfg = nj.preset("llama-3.1-8b")
COMPACT = ("static: all=tp8@0-7; "
           "latency: high=tp4@0-3, low=tp4@4-7; "
           "throughput: high+low=tp2@0-1, low=tp2@2-3, low=tp2@4-5, low=tp2@6-7")
custom = nj.parse_plans(COMPACT)
nj.validate_plans(custom, 8, cfg)
for plan in custom:
    print(plan)
"""),
    md("""
The same plans as a TOML file, the form a deployment keeps next to its config: `[[plan]]` tables
with a `name` and a list of `lanes`. `read_plans` takes a path (or the compact text, or None for
the defaults), parses and validates it.
"""),
    code("""
TOML = '''
[[plan]]
name = "static"
lanes = ["all=tp8@0-7"]

[[plan]]
name = "latency"
lanes = ["high=tp4@0-3", "low=tp4@4-7"]

[[plan]]
name = "throughput"
lanes = ["high+low=tp2@0-1", "low=tp2@2-3", "low=tp2@4-5", "low=tp2@6-7"]
'''
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "plans.toml"
    path.write_text(TOML)
    from_toml = nj.read_plans(str(path), 8, cfg)
assert from_toml == custom
print("TOML and compact forms give the same plans")
"""),
    md("""
The custom set's memory per device, checked against 80 GiB devices (`device_memory_gib` raises
`PlanError` when a device does not fit). The TP2 lanes share their weight chunks with the TP4
and TP8 lanes on the same devices.
"""),
    code("""
report = nj.plan_memory(cfg, custom, 8, device_memory_gib=80, **BUDGET)
print(f"weights of the plan set / of its largest plan: {report['weight_overhead']:.2f}x")
pd.DataFrame({d: {k: v / GIB for k, v in use.items()} for d, use in report["devices"].items()}).T.round(2)
"""),
    md("""
What a bad plan gives: a `PlanError` (a `ValueError`) whose message names the plan, the lane and
the rule it breaks. The CLI prints the same message and exits with status 2.
"""),
    code("""
BAD = {
    "device in two lanes": "mixed: high=tp4@0-3, low=tp4@3-6",
    "device outside the node": "wide: all=tp8@4-11",
    "TP degree not a power of two": "odd: all=tp3@0-2",
    "lane count does not match TP": "short: all=tp4@0-2",
    "not CLASSES=tpN@DEVICES": "typo: high=tp4:0-3",
    "duplicate plan name": "a: all=tp8@0-7; a: all=tp4@0-3",
}
errors = {}
for what, text in BAD.items():
    try:
        nj.validate_plans(nj.parse_plans(text), 8, cfg)
    except nj.PlanError as error:
        errors[what] = str(error)
    else:
        raise AssertionError(f"{what}: {text!r} was accepted")
try:
    nj.plan_memory("llama-3.1-70b", None, 4, device_memory_gib=80, **BUDGET)
except nj.PlanError as error:
    errors["does not fit 80 GiB"] = str(error)
else:
    raise AssertionError("70B on 4 devices should not fit 80 GiB")
pd.set_option("display.max_colwidth", None)
pd.Series(errors, name="PlanError").to_frame()
"""),
    md("""
From a shell, `nitsum-jax --devices 8 plans --preset llama-3.1-70b --device-memory-gib 80` prints
the same report (add `--plans plans.toml` or `--plans "static: ..."` for a custom set, `--json` for
machine-readable output).
"""),
]


def build(cells) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"  # stable ids: regenerating gives the same file
    nbformat.validate(nb)
    return nb


NOTEBOOKS = {"priority_lanes.ipynb": PRIORITY_LANES, "plan_explorer.ipynb": PLAN_EXPLORER}


def render(name: str) -> str:
    return nbformat.writes(build(NOTEBOOKS[name]))


def main() -> int:
    for name in NOTEBOOKS:
        (HERE / name).write_text(render(name))
        print(f"wrote {HERE / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
