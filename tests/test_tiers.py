"""Any number of priority tiers, from configuration: a classes file, three and four tiers served
end to end on 8 host devices with exact tokens, and a plan switch with three tiers."""

import numpy as np
import pytest

from nitsum_jax.engine import Engine
from nitsum_jax.generate import Generator
from nitsum_jax.plans import BucketGrid, default_plans
from nitsum_jax.sampling import SamplingParams
from nitsum_jax.scheduler import by_rank, load_classes
from nitsum_jax.scheduler.classes import ClassesError, parse_classes
from server_helpers import wait_for

GRID = BucketGrid(decode_batch=(1, 4), prefill_len=(16,), max_seq_len=64, min_move_pages=8)

FOUR_TIERS = """
[[class]]
name = "realtime"
rank = 0
ttft_s = 0.3
tpot_s = 0.04

[[class]]
name = "interactive"
rank = 1
ttft_s = 1.0
tpot_s = 0.1

[[class]]
name = "standard"
rank = 2
ttft_s = 5.0
tpot_s = 0.3
max_queue = 64

[[class]]
name = "batch"
rank = 3
ttft_s = 60
tpot_s = 1.0
aging_s = 10
"""


def test_a_classes_file_defines_tiers_in_rank_order(tmp_path):
    path = tmp_path / "classes.toml"
    path.write_text(FOUR_TIERS)
    classes = load_classes(path)
    assert [c.name for c in by_rank(classes)] == ["realtime", "interactive", "standard", "batch"]
    assert classes["standard"].max_queue == 64 and classes["batch"].aging_s == 10.0
    assert classes["realtime"].tpot_target_s == 0.04


@pytest.mark.parametrize("text, message", [
    ("[[class]]\nname = 'a'\nrank = 0\nttft_s = 1\n", "missing field 'tpot_s'"),
    ("[[class]]\nname = 'a'\nrank = -1\nttft_s = 1\ntpot_s = 1\n", "rank -1 must be >= 0"),
    ("[[class]]\nname = 'a'\nrank = 0\nttft_s = 0\ntpot_s = 1\n", "ttft_s = 0 must be > 0"),
    ("[[class]]\nname = 'all'\nrank = 0\nttft_s = 1\ntpot_s = 1\n", "not 'all'"),
    ("[[class]]\nname = 'a'\nrank = 0\nttft_s = 1\ntpot_s = 1\ncolour = 2\n", "unknown field 'colour'"),
    ("[[class]]\nname = 'a'\nrank = 'x'\nttft_s = 1\ntpot_s = 1\n", "rank = 'x' must be a int"),
    ("[[class]]\nname = 'a'\nrank = 0\nttft_s = 1\ntpot_s = 1\n[[class]]\nname = 'a'\nrank = 1\nttft_s = 1\n"
     "tpot_s = 1\n", "defined twice"),
    ("x = 1", "no \\[\\[class\\]\\] tables"),
])
def test_a_bad_classes_file_is_refused_naming_the_field(text, message):
    with pytest.raises(ClassesError, match=message):
        parse_classes(text, "classes.toml")


def prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [[256] + [int(t) for t in rng.integers(0, 256, size=int(rng.integers(3, 14)))] for _ in range(n)]


def solo_tokens(cfg, params, prompt, sampling):
    solo = Generator(cfg, params, page_size=8, max_batch=1, prefill_chunk=16, max_seq_len=64)
    return solo.generate([prompt], sampling)[0].token_ids


@pytest.mark.parametrize("num_tiers", [3, 4])
def test_every_tier_gets_its_solo_tokens_across_plan_switches(tiny_cfg, tiny_params, num_tiers):
    classes = {name: c for name, c in parse_classes(FOUR_TIERS).items()
               if c.rank < num_tiers}
    tiers = tuple(c.name for c in by_rank(classes))
    plans = default_plans(8, tiny_cfg, tiers)
    assert plans[1].lanes[0].classes == (tiers[0],)  # mixed: a lane kept for the most urgent tier
    eng = Engine(tiny_cfg, tiny_params, plans, classes=classes, num_pages=48, page_size=8, grid=GRID,
                 initial_plan="static")
    sampling = SamplingParams(max_tokens=12, ignore_eos=True)
    try:
        items = [(p, tiers[i % num_tiers]) for i, p in enumerate(prompts(3 * num_tiers))]
        handles = []
        for i, (prompt, tier) in enumerate(items):
            handles.append(eng.submit(prompt, sampling, priority_class=tier))
            if i in (num_tiers, 2 * num_tiers):  # mid-run, with sequences on their lanes
                target = "mixed" if i == num_tiers else "burst"
                eng.switch_plan(target, reason="test")
                wait_for(lambda: eng.plan_name == target, timeout=120.0)
        results = [h.result(timeout=300) for h in handles]
        for (prompt, _), got in zip(items, results):
            assert got.token_ids == solo_tokens(tiny_cfg, tiny_params, prompt, sampling)
        stats = eng.stats()
        assert set(stats["classes"]) == set(tiers) and set(stats["queue"]) == set(tiers)
        assert [s["to_plan"] for s in stats["plan_switches"]] == ["mixed", "burst"]
    finally:
        eng.close()


def test_a_plan_naming_an_unknown_tier_is_refused_at_start(tiny_cfg, tiny_params):
    from nitsum_jax.plans import PlanError, parse_plans

    classes = parse_classes(FOUR_TIERS)
    with pytest.raises(PlanError, match="unknown class 'high'"):
        Engine(tiny_cfg, tiny_params, parse_plans("a: high=tp1@0, all=tp1@1"), classes=classes, grid=GRID)


def test_bench_serves_the_tiers_of_a_classes_file_by_the_class_mix(tmp_path):
    import subprocess
    import sys
    import json

    path = tmp_path / "tiers.toml"
    path.write_text(FOUR_TIERS)
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "nitsum_jax.cli", "--devices", "2", "bench", "--classes", str(path),
                    "--class-mix", "realtime=0.25,interactive=0.25,standard=0.25,batch=0.25", "--configs", "static",
                    "--num-requests", "16", "--prompt-len", "4-8", "--output-len", "4-8", "--no-switch-probe",
                    "--no-progress", "--out", str(out)], check=True, capture_output=True, timeout=600)
    results = json.loads((out / "results.json").read_text())
    per_class = results["configs"]["static"]["classes"]
    assert set(per_class) <= {"realtime", "interactive", "standard", "batch"} and len(per_class) >= 3
    assert sum(c["completed"] for c in per_class.values()) == 16
    # the report's title gives the tiers' mix, not the unused --high-fraction
    heading = (out / "report.md").read_text().splitlines()[2]
    assert "25% realtime" in heading and "25% batch" in heading and "high" not in heading
