"""The gRPC server tried as an attacker would (loopback, tiny model, 8 host devices): calls that
stall after their headers, duplicate headers, oversized stop rules, scrape floods, calls cancelled
in the instant after they are sent, and a drain that cuts requests off.

Each attack is bounded (a few dozen calls) and each test also measures a gold tenant's `high`
request under the attack against the same request unattacked, in the same run: the ratios are
printed (`-s`) and recorded in RELIABILITY.md; no test asserts on time.
"""

import re
import statistics
import threading
import time
import urllib.request

import grpc
import pytest

from nitsum_jax.engine import Engine
from nitsum_jax.plans import BucketGrid, parse_plans
from nitsum_jax.sampling import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
from nitsum_jax.scheduler import default_classes
from nitsum_jax.server._proto import serving_pb2 as pb
from nitsum_jax.server.app import NitsumServer
from nitsum_jax.server.client import GenerateError, NitsumClient
from nitsum_jax.server.tenants import Tenants, key_sha256
from nitsum_jax.tokenizer import TextTokenizer
from server_helpers import prompt, wait_pages_idle

GRID = BucketGrid(decode_batch=(1, 4, 8), prefill_len=(16,), max_seq_len=64)
PLANS = "mixed: high=tp4@0-3, low=tp2@4-5, low=tp2@6-7"
KEYS = {"gold": "gold-key-a1", "basic": "basic-key-b2", "metered": "metered-key-c3", "flood": "flood-key-d4"}
WORKERS = 24  # Serving calls at once: small, so that a flood of stalled calls would fill it
BASIC_CALLS = 4  # basic's max_concurrent_calls
MESSAGE_TIMEOUT_S = 3.0
GENERATE = "/nitsum.v1.Serving/Generate"
FIGURES: dict[str, float] = {}  # attack -> high's median latency under it / unattacked


@pytest.fixture(scope="module")
def server(tiny_cfg, tiny_params, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "tenants.toml"
    keys_file.write_text(
        f'[[tenant]]\nname = "gold"\nkey_sha256 = "{key_sha256(KEYS["gold"])}"\nclasses = ["high", "low"]\n'
        f'[[tenant]]\nname = "basic"\nkey_sha256 = "{key_sha256(KEYS["basic"])}"\nclasses = ["low"]\n'
        f'max_concurrent_calls = {BASIC_CALLS}\n'
        f'[[tenant]]\nname = "metered"\nkey_sha256 = "{key_sha256(KEYS["metered"])}"\nclasses = ["low"]\n'
        'tokens_per_minute = 400\n'
        f'[[tenant]]\nname = "flood"\nkey_sha256 = "{key_sha256(KEYS["flood"])}"\nclasses = ["low"]\n')

    def build_engine():
        return Engine(tiny_cfg, tiny_params, parse_plans(PLANS), classes=default_classes(),
                      tokenizer=TextTokenizer.byte_level(), num_pages=64, page_size=8, grid=GRID)

    srv = NitsumServer(build_engine, host="127.0.0.1", port=0, tenants=Tenants.load(keys_file, default_classes()),
                       model_name="preset:tiny", metrics_port=0, max_workers=WORKERS,
                       message_timeout_s=MESSAGE_TIMEOUT_S).start()
    assert srv.wait_ready(timeout=600)
    yield srv
    srv.drain(grace_s=10)
    if FIGURES:
        print("attack figures (high latency under attack / unattacked):",
              {k: round(v, 2) for k, v in FIGURES.items()})


def client(srv, tenant="gold"):
    return NitsumClient(f"127.0.0.1:{srv.port}", api_key=KEYS[tenant] if tenant else None)


def high_latency(srv, n=5) -> float:
    """Median seconds of a gold `high` request of 16 tokens (ignore_eos is not in the API, so a
    prompt that runs 16 tokens is used), over `n` in a row."""
    times = []
    with client(srv) as c:
        for i in range(n):
            t0 = time.perf_counter()
            r = c.generate(prompt_token_ids=prompt(900 + i), priority="high", max_tokens=16, timeout=120)
            times.append(time.perf_counter() - t0)
            assert r.finish_reason in ("stop", "length")
    return statistics.median(times)


def record(name: str, baseline: float, attacked: float) -> None:
    FIGURES[name] = attacked / baseline


class StalledCalls:
    """Calls that send their headers and then nothing (their request iterator blocks)."""

    def __init__(self, srv, n: int, metadata, method: str = GENERATE):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
        self.release = threading.Event()
        stub = self.channel.stream_stream(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        self.calls = [stub(self._nothing(), metadata=metadata) for _ in range(n)]

    def _nothing(self):
        self.release.wait(120)
        return
        yield  # a generator that yields no message

    def wait_done(self, count: int, timeout: float = 60) -> list:
        """Wait until `count` calls have ended; their status codes (None: still open)."""
        deadline = time.monotonic() + timeout
        while sum(c.done() for c in self.calls) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return [c.code() if c.done() else None for c in self.calls]

    def close(self):
        for c in self.calls:
            c.cancel()
        self.release.set()
        self.channel.close()


def serving_held(srv) -> int:
    return srv.admission.calls.held.get("serving", 0)


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


# -- calls that stall after their headers -----------------------------------------------------------

def test_stalled_calls_without_a_key_are_refused_at_once_and_gold_high_health_and_info_answer(server):
    baseline = high_latency(server)
    stalled = StalledCalls(server, 3 * WORKERS, metadata=[("x-nitsum-priority", "high")])
    more, done = [], threading.Event()

    def flood():  # more of them while high is measured: 8 batches of 24
        for _ in range(8):
            if not done.is_set():
                more.append(StalledCalls(server, WORKERS, metadata=[]))
    try:
        codes = stalled.wait_done(len(stalled.calls))
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * len(codes)  # none waited for its message
        flooder = threading.Thread(target=flood)
        flooder.start()
        attacked = high_latency(server)
        with client(server) as c:
            assert c.health() == "SERVING" and c.server_info()["current_plan"] == "mixed"
        done.set()
        flooder.join(60)
        for batch in more:
            assert set(batch.wait_done(len(batch.calls))) == {grpc.StatusCode.UNAUTHENTICATED}
    finally:
        stalled.close()
        for batch in more:
            batch.close()
    record(f"stalled calls without a key ({len(stalled.calls) + WORKERS * len(more)})", baseline, attacked)


def test_a_tenant_stalling_calls_is_held_to_its_budget_cut_off_and_others_are_served(server):
    baseline = high_latency(server)
    stalled = StalledCalls(server, 3 * BASIC_CALLS, metadata=[("authorization", f"Bearer {KEYS['basic']}")])
    try:
        codes = stalled.wait_done(2 * BASIC_CALLS)  # those over the budget end at once
        refused = [c for c in codes if c is not None]
        assert refused == [grpc.StatusCode.RESOURCE_EXHAUSTED] * (2 * BASIC_CALLS)
        detail = next(c.details() for c in stalled.calls if c.done())
        assert "'basic'" in detail and f"{BASIC_CALLS} calls in flight" in detail and "max_concurrent_calls" in detail
        assert server.admission.tenant_calls.held.get("basic") == BASIC_CALLS
        attacked = high_latency(server)
        with client(server, None) as c:
            assert c.health() == "SERVING"
        # The admitted ones never send a message: cut off after the message timeout.
        codes = stalled.wait_done(len(stalled.calls), timeout=10 * MESSAGE_TIMEOUT_S)
        assert codes.count(grpc.StatusCode.CANCELLED) == BASIC_CALLS
        assert wait_for(lambda: "basic" not in server.admission.tenant_calls.held and serving_held(server) == 0)
    finally:
        stalled.close()
    record("a tenant's stalled calls (12, budget 4)", baseline, attacked)


def test_stalled_health_calls_cannot_take_the_serving_slots(server):
    from nitsum_jax.server.app import SERVICE_SLOTS

    stalled = StalledCalls(server, SERVICE_SLOTS + 8, metadata=[], method="/grpc.health.v1.Health/Check")
    try:
        codes = stalled.wait_done(8)
        assert [c for c in codes if c is not None] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 8
        with client(server) as c:  # Generate still has all its slots
            assert c.generate(prompt_token_ids=prompt(5), priority="high", max_tokens=4).finish_reason
    finally:
        stalled.close()


# -- headers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("metadata, name", [
    ([("authorization", f"Bearer {KEYS['basic']}"), ("authorization", f"Bearer {KEYS['gold']}")], "authorization"),
    ([("authorization", f"Bearer {KEYS['gold']}"), ("x-nitsum-priority", "low"), ("x-nitsum-priority", "high")],
     "x-nitsum-priority"),
], ids=["authorization", "priority"])
def test_duplicate_headers_are_invalid_argument(server, metadata, name):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        generate = channel.unary_stream(GENERATE, request_serializer=pb.GenerateRequest.SerializeToString,
                                        response_deserializer=pb.GenerateResponse.FromString)
        request = pb.GenerateRequest(prompt_token_ids=prompt(6), sampling=pb.SamplingParams(max_tokens=2))
        with pytest.raises(grpc.RpcError) as error:
            list(generate(request, metadata=metadata, timeout=30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"'{name}' given more than once" in error.value.details()


# -- request size ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, words", [
    (dict(stop_token_ids=[7] * 100_000), ["stop_token_ids has 100000 entries", f"limit {MAX_STOP_TOKEN_IDS}"]),
    (dict(stop=["zz"] * (MAX_STOP_STRINGS + 1)), [f"stop has {MAX_STOP_STRINGS + 1} strings",
                                                  f"limit {MAX_STOP_STRINGS}"]),
    (dict(stop=["z" * (MAX_STOP_STRING_CHARS + 1)]), [f"{MAX_STOP_STRING_CHARS + 1} characters",
                                                      f"limit {MAX_STOP_STRING_CHARS}"]),
    (dict(request_id="r" * 129), ["request_id has 129 characters", "limit 128"]),
], ids=["stop-ids", "stop-strings", "stop-string-length", "request-id"])
def test_oversized_request_lists_and_strings_are_refused_naming_the_limit(server, kwargs, words):
    with client(server, "basic") as c:
        with pytest.raises(GenerateError) as error:
            c.generate(prompt_token_ids=prompt(7), max_tokens=1, **kwargs)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert all(w in error.value.details for w in words), error.value.details


def test_stop_rules_are_charged_to_the_tenants_token_rate(server):
    stop_ids = list(range(MAX_STOP_TOKEN_IDS))  # 8 prompt + 2 max_tokens + 256 = 266 tokens of 400 a minute
    with client(server, "metered") as c:
        c.generate(prompt_token_ids=prompt(8), max_tokens=2, stop_token_ids=stop_ids)
        with pytest.raises(GenerateError) as error:
            c.generate(prompt_token_ids=prompt(8), max_tokens=2, stop_token_ids=stop_ids)
    assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "266 tokens" in error.value.details and "stop rules" in error.value.details


def _high_latency_beside_low_load(srv, **low_kwargs) -> float:
    """high_latency while 8 threads keep low requests of 40 tokens running."""
    done, errors = threading.Event(), []

    def low_load():
        with client(srv, "gold") as c:
            while not done.is_set():
                try:
                    c.generate(prompt_token_ids=prompt(9), priority="low", max_tokens=40, **low_kwargs)
                except GenerateError as e:
                    errors.append(e)
    threads = [threading.Thread(target=low_load) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        return high_latency(srv)
    finally:
        done.set()
        for t in threads:
            t.join(60)
        assert not errors


def test_high_keeps_its_latency_beside_low_requests_with_the_largest_stop_rules(server):
    # The control is the same low load without stop rules: on a CPU-only machine any low load
    # slows high (the lanes share the cores); what the stop rules add is the gap between the two.
    # Stop rules that never match, so that both loads make exactly the same (greedy) tokens.
    stop = [chr(0x4e00 + i) * MAX_STOP_STRING_CHARS for i in range(MAX_STOP_STRINGS)]  # not byte-level text
    with client(server) as c:
        made = set(c.generate(prompt_token_ids=prompt(9), priority="low", max_tokens=40).token_ids)
    unused = [t for t in range(256) if t not in made]
    stop_ids = (unused * MAX_STOP_TOKEN_IDS)[:MAX_STOP_TOKEN_IDS]
    baseline = high_latency(server)
    plain = _high_latency_beside_low_load(server)
    attacked = _high_latency_beside_low_load(server, stop=stop, stop_token_ids=stop_ids)
    record("8 low streams without stop rules (control)", baseline, plain)
    record("8 low streams with the largest stop rules", baseline, attacked)


# -- metrics ---------------------------------------------------------------------------------------

def test_metrics_listen_on_the_server_host_and_name_no_tenant_by_default(server):
    assert server.metrics._http.server_address[0] == "127.0.0.1"
    with client(server) as c:
        c.generate(prompt_token_ids=prompt(10), priority="high", max_tokens=2)
    page = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    assert 'nitsum_prompt_tokens_total{class="high",tenant="all"}' in page
    assert all(name not in page for name in KEYS)


SCRAPER = """
import sys, threading, urllib.request
url, n = sys.argv[1], int(sys.argv[2])
def scrape():
    for _ in range(n):
        urllib.request.urlopen(url, timeout=30).read()
threads = [threading.Thread(target=scrape) for _ in range(8)]
[t.start() for t in threads]
print("scraping", flush=True)
[t.join() for t in threads]
"""


def test_a_scrape_flood_reads_the_engine_once_per_snapshot_and_high_keeps_its_latency(server):
    import subprocess
    import sys

    baseline = high_latency(server)
    collector = server.metrics.engine_collector
    # The scrapers run in another process, as a real one would: their own Python work does not
    # compete with the server's for this process's interpreter lock.
    scrapers = subprocess.Popen([sys.executable, "-c", SCRAPER, f"http://127.0.0.1:{server.metrics_port}/metrics",
                                 "2000"], stdout=subprocess.PIPE, text=True)
    try:
        assert scrapers.stdout.readline().strip() == "scraping"
        t0, before, renders = time.monotonic(), collector.snapshots, server.metrics.page.renders
        attacked = high_latency(server)
        elapsed = time.monotonic() - t0
        reads, renders = collector.snapshots - before, server.metrics.page.renders - renders
    finally:
        scrapers.kill()
        scrapers.wait(30)
    assert reads <= elapsed / collector._snapshot_s + 2  # one engine read per snapshot period (+ the edges)
    assert 0 < renders <= elapsed / server.metrics.page.max_age_s + 2  # one page per PAGE_S, not one per scrape
    record("8-thread /metrics scrape flood", baseline, attacked)


# What `promtool check metrics` refuses (its promlint rules), checked on the parsed exposition.
UNIT_PREFIXES = ("milliseconds", "microseconds", "nanoseconds", "minutes", "hours", "kilobytes", "megabytes",
                 "gigabytes", "percent")


def lint(page: str) -> list[str]:
    from prometheus_client.parser import text_string_to_metric_families

    problems = []
    for family in text_string_to_metric_families(page):
        name = family.name
        if not family.documentation.strip():
            problems.append(f"{name}: no help text")
        if not re.fullmatch(r"[a-z_:][a-z0-9_:]*", name):
            problems.append(f"{name}: not snake_case")
        if family.type in ("gauge", "unknown") and name.endswith(("_total", "_count", "_sum", "_bucket")):
            problems.append(f"{name}: a {family.type} must not end in _total, _count, _sum or _bucket")
        if family.type == "counter":
            bad = [s.name for s in family.samples if not s.name.endswith(("_total", "_created"))]
            problems += [f"{n}: a counter's samples end in _total" for n in bad]
        problems += [f"{name}: use base units, not {u}" for u in UNIT_PREFIXES if u in name.split("_")]
    return problems


def test_the_metrics_exposition_is_lint_clean(server):
    with client(server) as c:  # every family has samples: a request of each class has run
        c.generate(prompt_token_ids=prompt(13), priority="high", max_tokens=3)
        c.generate(prompt_token_ids=prompt(14), priority="low", max_tokens=3)
    page = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    assert "nitsum_kv_pages_capacity{" in page and "nitsum_requests_total{" in page
    assert lint(page) == []


# -- cancels and drain -----------------------------------------------------------------------------

def test_calls_cancelled_in_the_instant_after_sending_leave_nothing_behind(server):
    baseline = high_latency(server)
    with client(server, "flood") as c:
        for i in range(150):
            call = c.stream(prompt_token_ids=prompt(11 + i % 5), priority="low", max_tokens=40)
            call.cancel()
        attacked = high_latency(server)
        assert wait_for(lambda: server.gate.in_flight == 0)
        assert not server.gate.handles  # nothing a drain would find and cancel
        assert wait_pages_idle(c) == {lane["name"]: 0 for lane in c.server_info()["lanes"]}
    assert wait_for(lambda: serving_held(server) == 0)  # the last call's slot is released as it ends
    record("150 calls cancelled right after sending", baseline, attacked)


def test_reflection_v1_lists_the_services(server):
    from grpc_reflection.v1alpha import reflection_pb2

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        info = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                     request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        [reply] = list(info(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30))
        names = {s.name for s in reply.list_services_response.service}
        assert {"nitsum.v1.Serving", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} <= names
        [reply] = list(info(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="grpc.reflection.v1.ServerReflection")]), timeout=30))
        assert reply.file_descriptor_response.file_descriptor_proto


def test_a_drain_that_runs_out_of_time_ends_its_requests_unavailable(tiny_cfg, tiny_params):
    def build_engine():
        return Engine(tiny_cfg, tiny_params, parse_plans("solo: all=tp1@0"), tokenizer=TextTokenizer.byte_level(),
                      num_pages=64, page_size=8, grid=BucketGrid(decode_batch=(1, 4), prefill_len=(16,),
                                                                 max_seq_len=512))

    srv = NitsumServer(build_engine, host="127.0.0.1", port=0).start()
    assert srv.wait_ready(timeout=600)
    with NitsumClient(f"127.0.0.1:{srv.port}") as c:
        streams = [c.stream(prompt_token_ids=prompt(12 + i), max_tokens=480) for i in range(3)]
        firsts = [next(iter(s)) for s in streams]  # every stream has started
        assert all(f.token_ids for f in firsts)
        srv.drain(grace_s=0.0)
        outcomes = []
        for s in streams:
            try:
                list(s)
                outcomes.append("OK")
            except GenerateError as e:
                outcomes.append((e.code, e.details))
    cut = [o for o in outcomes if o != "OK"]
    assert cut, outcomes  # 480 tokens cannot all be made in no grace time
    for code, details in cut:
        assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details and "retry" in details
