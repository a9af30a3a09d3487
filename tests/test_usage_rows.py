"""Ledger rows: the TTFT/TPOT figures and verdicts, and rows made from real engine requests
(completed, cancelled, past their deadline) that read back from the ledger unchanged."""

import threading

import numpy as np
import pytest

from nitsum_jax.scheduler import PriorityClass
from nitsum_jax.usage import (UsageLedger, UsageRow, is_server_error, load, refused_row, request_latency,
                              row_from_handle, slo_verdict)

HIGH = PriorityClass("high", rank=0, ttft_target_s=0.5, tpot_target_s=0.05)


def test_tpot_is_the_time_after_the_first_token_over_the_tokens_after_it():
    assert request_latency(10.0, 10.25, 11.25, 5) == (0.25, 0.25)
    assert request_latency(10.0, 10.25, 10.25, 1) == (0.25, None)  # one token: no TPOT
    assert request_latency(10.0, None, 12.0, 0) == (None, None)


@pytest.mark.parametrize("ttft, tpot, waited, verdict", [
    (0.5, 0.05, 3.0, (True, True)),  # on the targets is within them
    (0.51, 0.01, 3.0, (False, True)),
    (0.1, 0.06, 3.0, (True, False)),
    (0.1, None, 0.1, (True, None)),  # one token: no TPOT verdict
    (None, None, 0.3, (None, None)),  # ended with no token before the TTFT target passed: no verdict
    (None, None, 0.7, (False, None)),  # waited past the target with no token: a TTFT miss
])
def test_verdicts_against_the_tiers_targets(ttft, tpot, waited, verdict):
    assert slo_verdict(ttft, tpot, waited, HIGH) == verdict


@pytest.mark.parametrize("status, reason, fault", [
    ("OK", "stop", False), ("CANCELLED", "cancelled", False), ("DEADLINE_EXCEEDED", "deadline", False),
    ("RESOURCE_EXHAUSTED", None, False), ("INVALID_ARGUMENT", None, False), ("429", None, False),
    ("INTERNAL", "error", True), ("UNAVAILABLE", None, True), (503, None, True), ("200", "error", True),
])
def test_server_errors_are_the_servers_faults_only(status, reason, fault):
    assert is_server_error(status, reason) is fault


def test_a_row_names_a_bad_api_or_token_count():
    good = refused_row("r1", HIGH, tenant="acme", api="grpc", status="RESOURCE_EXHAUSTED", arrival=0.0,
                       prompt_tokens=3, wall_offset=0.0)
    fields = {f: getattr(good, f) for f in UsageRow.__dataclass_fields__}
    with pytest.raises(ValueError, match=r"api 'rest' is not one of \('grpc', 'http'\)"):
        UsageRow(**{**fields, "api": "rest"})
    with pytest.raises(ValueError, match="cached_tokens 4 exceeds prompt_tokens 3"):
        UsageRow(**{**fields, "cached_tokens": 4})
    with pytest.raises(ValueError, match="completion_tokens -1 is negative"):
        UsageRow(**{**fields, "completion_tokens": -1})


@pytest.fixture(scope="module")
def engine():
    from nitsum_jax.engine import Engine
    from nitsum_jax.plans import BucketGrid

    eng = Engine.build(preset="tiny", plans="solo: all=tp1@0", num_devices=1, num_pages=32, page_size=8,
                       grid=BucketGrid(decode_batch=(1,), prefill_len=(16,), max_seq_len=64))
    yield eng
    eng.close()


def prompt(seed: int, n: int = 9) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(1, 250, size=n)]


def test_a_completed_requests_row_has_its_tokens_lane_and_the_engines_latencies(engine, tmp_path):
    from nitsum_jax.sampling import SamplingParams

    # The only "low" request of this engine: its stats' p50 are this request's own figures.
    handle = engine.submit(prompt(1), SamplingParams(max_tokens=6, ignore_eos=True), priority_class="low")
    done = handle.result(timeout=120)
    with UsageLedger(tmp_path / "usage.db") as ledger:
        row = row_from_handle(handle, engine.classes["low"], tenant="acme", api="grpc", status="OK",
                              wall_offset=ledger.wall_offset)
        ledger.record(row)
    stats = engine.stats()["classes"]["low"]
    assert (row.ttft_s, row.tpot_s) == (stats["ttft_p50_s"], stats["tpot_p50_s"])
    assert (row.prompt_tokens, row.completion_tokens) == (done.prompt_tokens, len(done.token_ids)) == (9, 6)
    assert (row.plan, row.lane, row.tp) == handle.served_by == ("solo", "tp1@0", 1)
    assert (row.finish_reason, row.status, row.server_error) == ("length", "OK", False)
    assert row.first_token_time - row.arrival_time == pytest.approx(row.ttft_s, abs=1e-6)  # epoch float ulp
    assert row.finish_time == handle.finish_time + ledger.wall_offset
    assert (row.ttft_met, row.tpot_met) == slo_verdict(row.ttft_s, row.tpot_s, handle.finish_time -
                                                       handle.request.arrival, engine.classes["low"])
    stored = load(tmp_path / "usage.db").iloc[0]
    for field in ("request_id", "tenant", "tier", "lane", "prompt_tokens", "completion_tokens", "ttft_s", "tpot_s",
                  "finish_time", "ttft_target_s"):
        assert stored[field] == getattr(row, field), field


def test_a_cancelled_requests_row_counts_the_tokens_it_streamed(engine):
    from nitsum_jax.sampling import SamplingParams

    handle = engine.submit(prompt(2), SamplingParams(max_tokens=50, ignore_eos=True), priority_class="high")
    first = threading.Event()

    def cancel_after_first_token():
        for _ in handle:
            first.set()
            handle.cancel()

    reader = threading.Thread(target=cancel_after_first_token)
    reader.start()
    assert first.wait(120)
    handle.result(timeout=120)
    reader.join(30)
    row = row_from_handle(handle, engine.classes["high"], tenant="beta", api="http", status=499,
                          wall_offset=0.0)
    assert row.finish_reason == "cancelled" and row.status == "499" and not row.server_error
    assert 1 <= row.completion_tokens == len(handle.seq.output_ids) < 50
    assert row.first_token_time is not None and row.ttft_s == handle.first_token_time - handle.request.arrival


def test_a_request_past_its_deadline_before_any_token_has_no_ttft(engine):
    from nitsum_jax.sampling import SamplingParams

    handle = engine.submit(prompt(3), SamplingParams(max_tokens=8), priority_class="high", deadline_s=0.0)
    handle.result(timeout=120)
    row = row_from_handle(handle, engine.classes["high"], tenant="acme", api="grpc", status="DEADLINE_EXCEEDED",
                          wall_offset=0.0)
    assert row.finish_reason == "deadline" and row.completion_tokens == 0
    assert (row.ttft_s, row.tpot_s, row.tpot_met, row.server_error) == (None, None, None, False)
