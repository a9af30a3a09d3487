"""Reliability of the gRPC server in one process (tiny model, 8 host devices): fuzzed input,
`low` overload beside steady `high` traffic, and a lane whose step fails.

See RELIABILITY.md. The soak and the crash of a `nitsum-jax serve` subprocess are in
tests/test_reliability_soak.py.
"""

import re
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nitsum_jax.engine import Engine
from nitsum_jax.plans import BucketGrid, parse_plans
from nitsum_jax.sampling import SamplingParams
from nitsum_jax.scheduler import PriorityClass, default_classes
from nitsum_jax.scheduler.controller import Load, PlanController
from nitsum_jax.server._proto import serving_pb2 as pb
from nitsum_jax.server.app import NitsumServer, workers_for
from nitsum_jax.server.client import GenerateError, NitsumClient
from nitsum_jax.server.tenants import Tenants, key_sha256
from nitsum_jax.tokenizer import TextTokenizer
from server_helpers import metrics_page, prompt, wait_pages_idle

GRID = BucketGrid(decode_batch=(1, 8), prefill_len=(16,), max_seq_len=64)
PLANS = "mixed: high=tp4@0-3, low=tp2@4-5, low=tp2@6-7"
KEYS = {"gold": "gold-key-0a91", "basic": "basic-key-77e2", "metered": "metered-key-3c5d"}
LOW_QUEUE = 96  # low's queue bound: overload must meet it
CALL_TIMEOUT_S = 60.0  # every call has a deadline: a hang fails as DEADLINE_EXCEEDED, never blocks the run
# What a call may end with; anything else (INTERNAL, UNKNOWN, DEADLINE_EXCEEDED: a hang) is a bug.
CLEAR_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
               grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}


def classes():
    return default_classes() | {"low": PriorityClass("low", rank=1, ttft_target_s=10.0, tpot_target_s=0.5,
                                                     max_queue=LOW_QUEUE)}


@pytest.fixture(scope="module")
def server(tiny_cfg, tiny_params, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "tenants.toml"
    keys_file.write_text("".join(
        f'[[tenant]]\nname = "{name}"\nkey_sha256 = "{key_sha256(key)}"\nclasses = {cls}\n{extra}\n'
        for name, key, cls, extra in [("gold", KEYS["gold"], '["high", "low"]', ""),
                                      ("basic", KEYS["basic"], '["low"]', ""),
                                      ("metered", KEYS["metered"], '["low"]', "tokens_per_minute = 50")]))

    def build_engine():
        return Engine(tiny_cfg, tiny_params, parse_plans(PLANS), classes=classes(),
                      tokenizer=TextTokenizer.byte_level(), num_pages=64, page_size=8, grid=GRID)

    # Threads sized as `nitsum-jax serve` sizes them: calls wait in the class queues, not inside grpc.
    srv = NitsumServer(build_engine, host="127.0.0.1", port=0, tenants=Tenants.load(keys_file, classes()),
                       model_name="preset:tiny", metrics_port=0, max_workers=workers_for(classes())).start()
    assert srv.wait_ready(timeout=600)
    yield srv
    srv.drain(grace_s=10)


def client(srv, tenant="gold"):
    return NitsumClient(f"127.0.0.1:{srv.port}", api_key=KEYS[tenant] if tenant else None)


def assert_still_serves(srv):
    with client(srv) as c:
        assert c.health() == "SERVING"
        result = c.generate(prompt_token_ids=prompt(3), priority="high", max_tokens=4, timeout=CALL_TIMEOUT_S)
        assert result.finish_reason in ("stop", "length") and result.token_ids
        assert wait_pages_idle(c) == {lane["name"]: 0 for lane in c.server_info()["lanes"]}


# -- fuzzing -------------------------------------------------------------------------------

def call_raw(channel, request: bytes, metadata) -> tuple[grpc.StatusCode, str]:
    """Generate with the request's bytes as given (no client-side encoding); (status, details)."""
    generate = channel.unary_stream("/nitsum.v1.Serving/Generate", request_serializer=lambda b: b,
                                    response_deserializer=pb.GenerateResponse.FromString)
    messages = []
    try:
        messages = list(generate(request, metadata=metadata, timeout=CALL_TIMEOUT_S))
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    assert messages and messages[-1].finish_reason in ("stop", "length"), messages[-1:]
    return grpc.StatusCode.OK, ""


def assert_clear(code: grpc.StatusCode, details: str):
    assert code in CLEAR_CODES, (code, details)
    if code != grpc.StatusCode.OK:
        assert details.strip(), code  # a status always says why


u32 = st.integers(0, 2**32 - 1)
token_id = st.one_of(st.integers(0, 263), st.integers(264, 300), u32)
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)  # any code point protobuf can carry
ascii_value = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=40)
sampling = st.builds(
    pb.SamplingParams,
    max_tokens=st.one_of(st.integers(0, 70), u32), temperature=st.floats(width=32), top_p=st.floats(width=32),
    top_k=st.one_of(st.integers(0, 300), u32), seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    stop=st.lists(text, max_size=4), stop_token_ids=st.lists(token_id, max_size=4))
# Mostly-valid requests too, so that OK and the streaming path are reached, not only the checks.
plausible_sampling = st.builds(
    pb.SamplingParams, max_tokens=st.integers(1, 40), temperature=st.sampled_from([0.0, 0.7, 1.5]),
    top_p=st.sampled_from([0.0, 0.5, 1.0]), top_k=st.integers(0, 50), seed=st.integers(0, 2**32 - 1),
    stop=st.lists(text.filter(bool), max_size=2), stop_token_ids=st.lists(st.integers(0, 263), max_size=2))
request = st.builds(
    pb.GenerateRequest, request_id=text,
    prompt=st.one_of(st.just(""), text, st.text(max_size=1).map(lambda c: c * 3000)),
    prompt_token_ids=st.one_of(st.just([]), st.lists(st.integers(0, 263), min_size=1, max_size=30),
                               st.lists(token_id, max_size=3000)),
    sampling=st.one_of(sampling, plausible_sampling))
priority = st.one_of(st.none(), st.sampled_from(["high", "low", "", "HIGH", "bulk"]), ascii_value)
authorization = st.one_of(
    st.none(), st.sampled_from([f"Bearer {k}" for k in KEYS.values()]), ascii_value.map(lambda k: f"Bearer {k}"),
    ascii_value, st.sampled_from(["Bearer", "Bearer ", "Basic Z29sZDprZXk=", f"bearer {KEYS['gold']}"]))
binary_metadata = st.lists(st.tuples(st.sampled_from(["x-nitsum-priority-bin", "authorization-bin", "x-fuzz-bin"]),
                                     st.binary(max_size=64)), max_size=2)


def metadata_of(priority_value, auth, extra):
    md = [] if auth is None else [("authorization", auth)]
    md += [] if priority_value is None else [("x-nitsum-priority", priority_value)]
    return md + list(extra)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=request, priority_value=priority, auth=authorization, extra=binary_metadata)
def test_fuzzed_generate_calls_end_with_a_clear_status(server, request, priority_value, auth, extra):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        code, details = call_raw(channel, request.SerializeToString(), metadata_of(priority_value, auth, extra))
    event(code.name)  # --hypothesis-show-statistics: how often each status came
    assert_clear(code, details)


def _utf8_breaking(message: bytes) -> st.SearchStrategy:
    """The message with a length-delimited field appended whose bytes are not UTF-8: string
    fields 1 (request_id), 2 (prompt); in protobuf the last occurrence wins."""
    bad = st.binary(min_size=1, max_size=32).map(lambda b: b"\xff" + b)
    return st.tuples(st.sampled_from([0x0a, 0x12]), bad).map(lambda fb: message + bytes([fb[0], len(fb[1])]) + fb[1])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.one_of(st.binary(max_size=200),
                     _utf8_breaking(pb.GenerateRequest(prompt_token_ids=[256, 5], sampling=pb.SamplingParams(
                         max_tokens=2)).SerializeToString())))
def test_undecodable_requests_are_invalid_argument_not_internal(server, raw):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        code, details = call_raw(channel, raw, [("authorization", f"Bearer {KEYS['gold']}")])
    assert_clear(code, details)
    try:
        pb.GenerateRequest.FromString(raw)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid nitsum.v1.GenerateRequest" in details


@pytest.mark.parametrize("size, code, words", [
    (3_000_000, grpc.StatusCode.INVALID_ARGUMENT, ["prompt tokens (3000001)", "context limit 64"]),  # parsed, refused by length
    (5_000_000, grpc.StatusCode.RESOURCE_EXHAUSTED, ["larger than max"]),  # over grpc's 4 MiB message limit
])
def test_huge_prompts_are_refused_with_a_clear_status(server, size, code, words):
    with client(server) as c:
        with pytest.raises(GenerateError) as error:
            c.generate("x" * size, priority="low", max_tokens=2, timeout=CALL_TIMEOUT_S)
    assert error.value.code == code
    assert all(w in error.value.details for w in words), error.value.details


def test_server_serves_after_fuzzing_and_metrics_labels_stay_bounded(server):
    # Runs after the fuzz tests above (file order): random x-nitsum-priority values must not
    # become label values (one time series each would grow the registry without bound).
    assert_still_serves(server)
    labels = set(re.findall(r'nitsum_requests_total\{class="([^"]*)"', metrics_page(server)))
    assert labels and labels <= {"high", "low", "unknown"}, labels


# -- overload ------------------------------------------------------------------------------

def _measure_low_capacity(srv, max_tokens: int) -> float:
    """Completed low requests per second with every low slot busy (closed loop, no queueing)."""
    slots = 2 * max(GRID.decode_batch)  # two low lanes
    done = []

    def worker(i):
        with client(srv) as c:
            for j in range(3):
                c.generate(prompt_token_ids=prompt(1000 + 10 * i + j), priority="low", max_tokens=max_tokens,
                           timeout=CALL_TIMEOUT_S)
                done.append(time.perf_counter())

    t0 = time.perf_counter()
    with ThreadPoolExecutor(slots) as pool:
        list(pool.map(worker, range(slots)))
    return len(done) / (max(done) - t0)


def test_low_overload_is_queued_or_refused_and_high_keeps_its_lead(server):
    max_tokens, seconds = 16, 6.0
    capacity = _measure_low_capacity(server, max_tokens)
    low_rate, high_interval = 3 * capacity, 0.25
    outcomes = {"high": [], "low": []}  # (status name, ttft_s or None)
    lock = threading.Lock()
    rng = np.random.default_rng(7)

    shared = client(server)

    def one(cls, seed):
        c = shared
        if True:
            try:
                r = c.generate(prompt_token_ids=prompt(seed), priority=cls, max_tokens=max_tokens,
                               timeout=CALL_TIMEOUT_S)
                outcome = ("OK", r.ttft_s) if r.finish_reason in ("stop", "length") else ("NO_FINISH", None)
            except GenerateError as e:
                outcome = (e.code.name, None)
        with lock:
            outcomes[cls].append(outcome)

    before = metrics_page(server)
    sent = {"high": 0, "low": 0}
    with ThreadPoolExecutor(512) as pool:
        t0 = time.perf_counter()
        next_low, next_high = t0, t0
        while (now := time.perf_counter()) < t0 + seconds:
            if now >= next_low:
                pool.submit(one, "low", 5000 + sent["low"])
                sent["low"] += 1
                next_low += rng.exponential(1 / low_rate)  # Poisson arrivals at 3x capacity
            if now >= next_high:
                pool.submit(one, "high", 9000 + sent["high"])
                sent["high"] += 1
                next_high += high_interval  # a steady rate
            time.sleep(max(0.0, min(next_low, next_high) - time.perf_counter()))
    shared.close()
    statuses = {cls: {s: sum(1 for o in outcomes[cls] if o[0] == s) for s in {o[0] for o in outcomes[cls]}}
                for cls in outcomes}
    high_ttft = [t for s, t in outcomes["high"] if s == "OK"]
    low_ttft = [t for s, t in outcomes["low"] if s == "OK"]
    print(f"\noverload: low capacity {capacity:.1f} req/s, offered {low_rate:.1f} req/s for {seconds:.0f}s; "
          f"sent {sent}; statuses {statuses}; high TTFT p50/p90 {np.percentile(high_ttft, 50):.3f}/"
          f"{np.percentile(high_ttft, 90):.3f}s; low TTFT p50 {statistics.median(low_ttft):.3f}s")
    # high: every request completes.
    assert statuses["high"] == {"OK": sent["high"]}
    # low: completed or refused with RESOURCE_EXHAUSTED, nothing else and nothing lost.
    assert set(statuses["low"]) <= {"OK", "RESOURCE_EXHAUSTED"}, statuses["low"]
    assert sum(statuses["low"].values()) == sent["low"]
    assert statuses["low"].get("RESOURCE_EXHAUSTED", 0) > 0 and statuses["low"].get("OK", 0) > 0
    # high's first tokens come well before low's (no absolute timing: machines are noisy).
    assert np.percentile(high_ttft, 90) < statistics.median(low_ttft)
    # The server counted every call once, with the status the client saw.
    after = metrics_page(server)
    for cls, counts in statuses.items():
        for status, n in counts.items():
            series = f'nitsum_requests_total{{class="{cls}",code="{status}"}}'
            assert _value(after, series) - _value(before, series) == n, series
    with client(server) as c:
        assert wait_pages_idle(c) == {lane["name"]: 0 for lane in c.server_info()["lanes"]}


def _value(page: str, series: str) -> float:
    m = re.search(re.escape(series) + r" ([0-9.e+]+)", page)
    return float(m.group(1)) if m else 0.0


# -- lane fault ----------------------------------------------------------------------------

FAULT_PLANS = "mixed: high=tp4@0-3, low=tp2@4-5, low=tp2@6-7; spare: high=tp4@0-3, low=tp2@6-7"
FAULTY_LANE = "tp2@4-5"  # in "mixed" only


@pytest.fixture
def fault_server(tiny_cfg, tiny_params):
    plans = parse_plans(FAULT_PLANS)

    def build_engine():
        return Engine(tiny_cfg, tiny_params, plans, tokenizer=TextTokenizer.byte_level(), num_pages=64,
                      page_size=8, grid=GRID, controller=PlanController(plans, "mixed", hold_s=0.2, min_dwell_s=0.5))

    srv = NitsumServer(build_engine, host="127.0.0.1", port=0, model_name="preset:tiny", metrics_port=0).start()
    assert srv.wait_ready(timeout=600)
    yield srv
    srv.drain(grace_s=10)


def test_a_failing_lane_is_marked_unhealthy_left_and_its_requests_complete(fault_server):
    engine = fault_server.gate.engine
    jobs = [(prompt(200 + i, n=6 + i), "low" if i < 8 else "high") for i in range(10)]
    # Greedy outputs of a healthy run (the same engine before the fault).
    expected = [engine.submit(ids, SamplingParams(max_tokens=40), priority_class=cls).result(timeout=120).token_ids
                for ids, cls in jobs]
    assert engine.plan_name == "mixed" and not engine.unhealthy
    streams = [None] * len(jobs)
    first_token = [threading.Event() for _ in jobs]

    def run(i):
        ids, cls = jobs[i]
        with client(fault_server, None) as c:
            events = []
            try:
                for message in c.stream(prompt_token_ids=ids, priority=cls, max_tokens=40, timeout=CALL_TIMEOUT_S):
                    events.append(message)
                    first_token[i].set()
                streams[i] = events
            except GenerateError as e:
                streams[i] = e
            finally:
                first_token[i].set()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for e in first_token:
        assert e.wait(120)
    fault_time = time.monotonic()
    engine.inject_fault(FAULTY_LANE)
    for t in threads:
        t.join(timeout=180)
    # Every request completes with exactly the healthy run's tokens.
    for i, events in enumerate(streams):
        assert not isinstance(events, Exception), (i, events)
        assert [t for e in events for t in e.token_ids] == expected[i], i
        assert events[-1].finish_reason in ("stop", "length")
    lanes_seen = [{e.served_by[1] for e in events if e.served_by} for events in streams]
    moved = [i for i, seen in enumerate(lanes_seen) if FAULTY_LANE in seen and len(seen) > 1]
    assert moved, lanes_seen  # some requests were on the failing lane and finished elsewhere
    assert all(streams[i][-1].served_by[1] != FAULTY_LANE for i in moved)
    # The lane is unhealthy, and out of the plan in force, in GetServerInfo and in the metrics.
    with client(fault_server, None) as c:
        info = c.server_info()
        lane = next(lane for lane in info["lanes"] if lane["name"] == FAULTY_LANE)
        assert not lane["healthy"] and not lane["in_plan"]
        assert info["current_plan"] == "spare"
        assert all(lane["healthy"] for lane in info["lanes"] if lane["name"] != FAULTY_LANE)
        page = metrics_page(fault_server)
        assert f'nitsum_lane_healthy{{lane="{FAULTY_LANE}"}} 0.0' in page
        assert 'nitsum_lane_healthy{lane="tp2@6-7"} 1.0' in page
        assert 'nitsum_current_plan{plan="spare"} 1.0' in page
        # More work of both classes after the fault: the controller never goes back to "mixed".
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: c.generate(prompt_token_ids=prompt(300 + i), max_tokens=8,
                                                         priority="high" if i % 2 else "low",
                                                         timeout=CALL_TIMEOUT_S), range(16)))
        assert all(r.finish_reason in ("stop", "length") and r.served_by[0] == "spare" for r in results)
        assert wait_pages_idle(c) == {lane["name"]: 0 for lane in c.server_info()["lanes"]}
    assert [plan for t, plan in engine.plan_history if t > fault_time] == ["spare"]
    controller = engine.controller
    assert not controller.usable(controller.plans["mixed"])
    for load in (Load({"high": 3, "low": 0}, {"high": 1, "low": 0}, {}), Load({"high": 0, "low": 9}, {}, {}),
                 Load({"high": 0, "low": 0}, {}, {})):
        assert controller.preferred(load)[0] == "spare"
    assert FAULTY_LANE in engine.stats()["unhealthy"]
