"""Trace replay and synthetic arrivals: the Splitwise CSV as it is, JSONL traces, rescaling, classes."""

import json

import numpy as np
import pytest

from nitsum_jax.bench.trace import load_trace
from nitsum_jax.bench.workload import parse_class_mix, poisson_workload

SPLITWISE = "/work/shared/traces/splitwise_code.csv"


def test_splitwise_csv_is_read_with_its_own_column_names():
    w = load_trace(SPLITWISE, with_ids=False, seed=3)
    assert len(w.requests) == 8819
    first = w.requests[0]
    assert (first.arrival_s, first.prompt_len, first.output_len) == (0.0, 4808, 10)
    arrivals = [r.arrival_s for r in w.requests]
    assert arrivals == sorted(arrivals)
    assert w.params["prompt_tokens_median"] == 1469 and w.params["output_tokens_median"] == 13
    assert 0.25 < w.params["class_mix"]["high"] < 0.35  # classes by the seeded 30% share


def test_classes_drawn_by_share_are_the_same_for_a_seed_and_differ_across_seeds():
    a = load_trace(SPLITWISE, with_ids=False, seed=1, limit=500)
    b = load_trace(SPLITWISE, with_ids=False, seed=1, limit=500)
    c = load_trace(SPLITWISE, with_ids=False, seed=2, limit=500)
    classes = lambda w: [r.priority_class for r in w.requests]  # noqa: E731
    assert classes(a) == classes(b) and classes(a) != classes(c)


def test_target_rate_rescales_arrivals_to_that_mean_rate():
    w = load_trace(SPLITWISE, with_ids=False, target_rate=7.5, limit=2000)
    assert w.params["rate_rps"] == pytest.approx(7.5, rel=1e-3)
    slow = load_trace(SPLITWISE, with_ids=False, time_scale=2.0, limit=2000)
    base = load_trace(SPLITWISE, with_ids=False, limit=2000)
    assert slow.requests[-1].arrival_s == pytest.approx(2 * base.requests[-1].arrival_s, rel=1e-6)


def test_jsonl_trace_keeps_its_class_column_and_accepts_aliases(tmp_path):
    rows = [{"arrived_at": 5.0, "prompt_tokens": 30, "output_tokens": 4, "priority_class": "mid"},
            {"timestamp": 4.0, "num_prefill_tokens": 12, "num_decode_tokens": 9, "class": "high"}]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    w = load_trace(path, seed=0)
    assert [(r.arrival_s, r.priority_class, r.prompt_len, r.output_len) for r in w.requests] == [
        (0.0, "high", 12, 9), (1.0, "mid", 30, 4)]
    assert len(w.requests[0].prompt_ids) == 12  # ids drawn for the real engine


def test_bad_row_names_the_line_and_the_accepted_columns(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("arrived_at,num_prefill_tokens\n0.0,12\n")
    with pytest.raises(ValueError, match=r"t.csv:2: .*no output column.*num_decode_tokens"):
        load_trace(path)
    with pytest.raises(ValueError, match="target rate must be > 0"):
        load_trace(SPLITWISE, target_rate=0)


def test_gamma_arrivals_have_the_asked_burstiness_and_mean_rate():
    w = poisson_workload(4.0, num_requests=20000, burstiness=4.0, with_ids=False, seed=5)
    gaps = np.diff([r.arrival_s for r in w.requests])
    assert gaps.mean() == pytest.approx(0.25, rel=0.05)
    assert (gaps.std() / gaps.mean()) ** 2 == pytest.approx(4.0, rel=0.1)
    timed = poisson_workload(4.0, duration_s=50.0, burstiness=4.0, with_ids=False, seed=5)
    assert max(r.arrival_s for r in timed.requests) < 50.0


def test_class_mix_draws_any_tiers_and_refuses_bad_shares():
    w = poisson_workload(5.0, num_requests=3000, class_mix=parse_class_mix("a=0.2,b=0.5,c=0.3"), with_ids=False)
    counts = {c: sum(r.priority_class == c for r in w.requests) / 3000 for c in "abc"}
    assert counts == pytest.approx({"a": 0.2, "b": 0.5, "c": 0.3}, abs=0.03)
    with pytest.raises(ValueError, match="sum to 1"):
        parse_class_mix("a=0.2,b=0.2")
    with pytest.raises(ValueError, match="CLASS=SHARE"):
        parse_class_mix("a0.2")
