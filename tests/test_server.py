"""The gRPC server on loopback (tiny model, 8 host devices), called through real stubs.

One server (and one engine) serves the whole module, with a keys file of three tenants.
"""

import threading
import time

import grpc
import pytest

from nitsum_jax.engine import Engine
from nitsum_jax.plans import BucketGrid, parse_plans
from nitsum_jax.sampling import SamplingParams
from nitsum_jax.scheduler import PriorityClass, default_classes
from nitsum_jax.server.app import NitsumServer
from nitsum_jax.server.client import GenerateError, NitsumClient
from nitsum_jax.server.tenants import Tenants
from nitsum_jax.tokenizer import TextTokenizer
from server_helpers import metrics_page, prompt, tenants_toml, wait_pages_idle

GRID = BucketGrid(decode_batch=(1, 4), prefill_len=(16,), max_seq_len=64, min_move_pages=8)
PLANS = "mixed: high=tp4@0-3, low=tp2@4-5, low=tp2@6-7"
KEYS = {"gold": "gold-key-7f3a", "basic": "basic-key-91c2", "metered": "metered-key-55d0"}


def classes():
    # "bulk" never gets a queue slot (max_queue=0): every request of it meets a full queue.
    return default_classes() | {"bulk": PriorityClass("bulk", rank=2, ttft_target_s=60, tpot_target_s=1,
                                                      max_queue=0)}


@pytest.fixture(scope="module")
def server(tiny_cfg, tiny_params, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "tenants.toml"
    keys_file.write_text(tenants_toml(KEYS))
    assert KEYS["gold"] not in keys_file.read_text()  # only hashes are stored

    def build_engine():
        return Engine(tiny_cfg, tiny_params, parse_plans(PLANS), classes=classes(),
                      tokenizer=TextTokenizer.byte_level(), num_pages=32, page_size=8, grid=GRID)

    srv = NitsumServer(build_engine, host="127.0.0.1", port=0, tenants=Tenants.load(keys_file, classes()),
                       default_class="low", model_name="preset:tiny", metrics_port=0,
                       tenant_labels=True).start()
    assert srv.wait_ready(timeout=600)
    yield srv
    srv.drain(grace_s=10)


@pytest.fixture(scope="module")
def engine(server):
    return server.gate.engine


def client(server, tenant="gold"):
    return NitsumClient(f"127.0.0.1:{server.port}", api_key=KEYS[tenant] if tenant else None)


def status_of(call_fn):
    with pytest.raises(GenerateError) as info:
        call_fn()
    return info.value


# -- streaming and output ------------------------------------------------------------------

def test_greedy_stream_equals_the_engines_output(server, engine):
    ids = prompt(1)
    expected = engine.submit(ids, SamplingParams(max_tokens=12), priority_class="high").result(timeout=120)
    with client(server) as c:
        events = list(c.stream(prompt_token_ids=ids, priority="high", max_tokens=12))
    tokens = [t for e in events[:-1] for t in e.token_ids]
    assert all(len(e.token_ids) == 1 for e in events[:-1])  # streamed token by token
    assert tokens == expected.token_ids
    final = events[-1]
    assert final.finish_reason == expected.finish_reason
    assert final.usage == (len(ids), len(expected.token_ids))
    assert "".join(e.text for e in events) == expected.text
    plan, lane, tp = final.served_by
    assert plan == "mixed" and lane and tp == 4  # high runs on the TP4 lane of "mixed"


def test_text_prompt_is_tokenized_and_text_streams_back(server, engine):
    expected = engine.submit("Priority lanes", SamplingParams(max_tokens=10), priority_class="low").result(timeout=120)
    with client(server, "basic") as c:
        result = c.generate("Priority lanes", max_tokens=10)  # no priority metadata: the default class
    assert result.token_ids == expected.token_ids
    assert result.text == expected.text
    assert result.prompt_tokens == expected.prompt_tokens
    assert result.served_by[0] == "mixed" and result.served_by[2] == 2  # a TP2 "low" lane


def test_seeded_sampling_reproduces(server):
    with client(server) as c:
        a = c.generate(prompt_token_ids=prompt(2), max_tokens=10, temperature=0.9, top_k=50, seed=11)
        b = c.generate(prompt_token_ids=prompt(2), max_tokens=10, temperature=0.9, top_k=50, seed=11)
    assert a.token_ids == b.token_ids and a.finish_reason in ("stop", "length")


# -- statuses --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, words", [
    (dict(priority="urgent"), ["x-nitsum-priority", "'urgent'", "high", "low"]),
    (dict(temperature=-1.0), ["temperature", "-1", "[0, 100]"]),
    (dict(top_p=1.5), ["top_p", "1.5", "(0, 1]"]),
    (dict(top_k=999), ["top_k", "999", "[0, 264]"]),
    (dict(prompt_token_ids=[]), ["prompt is empty"]),
    (dict(prompt_token_ids=[256, 7, 999]), ["prompt_token_ids", "999", "[0, 264)"]),
    (dict(max_tokens=60), ["max_tokens (60)", "68", "context limit 64"]),
    (dict(prompt="hi"), ["either prompt", "prompt_token_ids", "not both"]),
], ids=["unknown-class", "temperature", "top_p", "top_k", "empty-prompt", "token-outside-vocab", "over-context",
        "prompt-and-ids"])
def test_bad_requests_are_invalid_argument_naming_field_value_and_limit(server, kwargs, words):
    kwargs = {"prompt_token_ids": prompt(3)} | kwargs
    with client(server) as c:
        error = status_of(lambda: c.generate(**kwargs))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    for word in words:
        assert word in error.details


@pytest.mark.parametrize("tenant", [None, "wrong"])
def test_missing_or_unknown_key_is_unauthenticated(server, tenant):
    c = NitsumClient(f"127.0.0.1:{server.port}", api_key="not-a-key" if tenant else None)
    with c:
        error = status_of(lambda: c.generate(prompt_token_ids=prompt(4), max_tokens=2))
        info_error = status_of(lambda: c.server_info())
    assert error.code == info_error.code == grpc.StatusCode.UNAUTHENTICATED
    assert ("unknown API key" if tenant else "authorization") in error.details


def test_low_tier_key_cannot_claim_high(server):
    with client(server, "basic") as c:
        error = status_of(lambda: c.generate(prompt_token_ids=prompt(5), priority="high", max_tokens=2))
        assert c.generate(prompt_token_ids=prompt(5), priority="low", max_tokens=2).finish_reason
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert "'basic'" in error.details and "'high'" in error.details and "['low']" in error.details


def test_tenant_over_its_token_rate_is_resource_exhausted(server):
    with client(server, "metered") as c:  # 40 tokens per minute: 8 prompt + 30 max_tokens fits once
        c.generate(prompt_token_ids=prompt(6), max_tokens=30)
        error = status_of(lambda: c.generate(prompt_token_ids=prompt(6), max_tokens=30))
        too_big = status_of(lambda: c.generate(prompt_token_ids=prompt(6), max_tokens=50))
    assert error.code == too_big.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "'metered'" in error.details and "38 tokens" in error.details and "limit 40" in error.details
    assert "58 tokens" in too_big.details and "limit 40" in too_big.details


def test_full_class_queue_is_resource_exhausted(server):
    with client(server) as c:
        error = status_of(lambda: c.generate(prompt_token_ids=prompt(7), priority="bulk", max_tokens=2))
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "'bulk'" in error.details and "bound 0" in error.details


# -- cancel and deadline ---------------------------------------------------------------------

def requests_with_code(server, code):
    return sum(s.value for m in server.metrics.requests.collect() for s in m.samples
               if s.name == "nitsum_requests_total" and s.labels["code"] == code)


@pytest.fixture(scope="module")
def long_request(engine):
    """A prompt whose greedy output runs the full 56 tokens (no EOS), and how long that took."""
    for seed in range(100, 120):
        ids = prompt(seed)
        t0 = time.perf_counter()
        out = engine.submit(ids, SamplingParams(max_tokens=56), priority_class="low").result(timeout=120)
        if out.finish_reason == "length":
            return ids, time.perf_counter() - t0
    pytest.fail("no prompt of the tiny model ran 56 tokens without EOS")


def test_client_cancel_stops_the_request_and_frees_its_pages(server, long_request):
    cancelled_before = requests_with_code(server, "CANCELLED")
    with client(server) as c:
        call = c.stream(prompt_token_ids=long_request[0], priority="low", max_tokens=56)
        first = next(iter(call))
        assert first.token_ids
        call.cancel()
        assert wait_pages_idle(c) == {lane["name"]: 0 for lane in c.server_info()["lanes"]}
    deadline = time.monotonic() + 30
    while requests_with_code(server, "CANCELLED") == cancelled_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert requests_with_code(server, "CANCELLED") == cancelled_before + 1


def test_client_deadline_is_deadline_exceeded_and_frees_its_pages(server, engine, long_request):
    ids, full_run_s = long_request
    with client(server) as c:
        # A quarter of what the whole generation took: the deadline passes mid-generation.
        call = c.stream(prompt_token_ids=ids, priority="low", max_tokens=56, timeout=full_run_s / 4,
                        request_id="deadline-test")
        error = status_of(lambda: list(call))
        assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_pages_idle(c) == {lane["name"]: 0 for lane in c.server_info()["lanes"]}
    # The scheduler held the deadline too (not only the client): the engine request carries it.
    [handle] = [h for h in engine.recent() if h.request.request_id.startswith("deadline-test@")]
    assert handle.request.deadline is not None
    assert handle.request.finish_reason in ("deadline", "cancelled")
    assert len(handle.output_ids) < 56


# -- standard services, info, metrics ----------------------------------------------------------

def test_health_serves_and_reflection_lists_the_services(server):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with client(server, None) as c:  # health and reflection need no key
        assert c.health() == "SERVING" and c.health("nitsum.v1.Serving") == "SERVING"
        database = ProtoReflectionDescriptorDatabase(c.channel)
        services = set(database.get_services())
        assert {"nitsum.v1.Serving", "grpc.health.v1.Health"} <= services
        service = DescriptorPool(database).FindServiceByName("nitsum.v1.Serving")
        generate = service.methods_by_name["Generate"]
        assert generate.server_streaming and generate.output_type.full_name == "nitsum.v1.GenerateResponse"
        assert "served_by" in generate.output_type.fields_by_name


def test_server_info_reports_model_classes_plans_and_lanes(server):
    with client(server, "basic") as c:
        info = c.server_info()
    assert info["model"] == "preset:tiny"
    assert info["classes"] == ["high", "low", "bulk"]  # by rank
    assert info["plans"] == ["mixed"] and info["current_plan"] == "mixed"
    assert sorted((lane["tp"], tuple(lane["devices"])) for lane in info["lanes"]) == [
        (2, (4, 5)), (2, (6, 7)), (4, (0, 1, 2, 3))]
    assert all(lane["kv_pages_total"] == 32 and lane["in_plan"] and lane["healthy"] for lane in info["lanes"])


def test_metrics_page_has_per_class_and_per_tenant_series(server):
    with client(server, "gold") as c:
        c.generate(prompt_token_ids=prompt(10), priority="high", max_tokens=4)
    with client(server, "basic") as c:
        c.generate(prompt_token_ids=prompt(11), priority="low", max_tokens=4)
    page = metrics_page(server)
    for series in ['nitsum_ttft_seconds_bucket{class="high"', 'nitsum_tpot_seconds_count{class="high"}',
                   'nitsum_e2e_seconds_count{class="low"}',
                   'nitsum_prompt_tokens_total{class="high",tenant="gold"} ',
                   'nitsum_completion_tokens_total{class="low",tenant="basic"} ',
                   'nitsum_queue_size{class="high"}', 'nitsum_queue_size{class="low"}',
                   'nitsum_kv_pages_used{lane=', 'nitsum_kv_pages_capacity{lane=', 'nitsum_plan_switches_total ',
                   'nitsum_preemptions_total ', 'nitsum_kv_moves_total ', 'nitsum_current_plan{plan="mixed"} 1.0',
                   'nitsum_requests_total{class="low",code="OK"}']:
        assert series in page, series


# -- load --------------------------------------------------------------------------------------

def test_many_concurrent_clients_of_both_classes_all_finish(server, engine):
    prompts = [prompt(20 + i, n=4 + 3 * i) for i in range(4)]
    expected = [engine.submit(p, SamplingParams(max_tokens=8), priority_class="low").result(timeout=120).token_ids
                for p in prompts]
    results, errors = {}, []

    def worker(i):
        tenant, cls = ("gold", "high") if i % 3 == 0 else ("basic", "low")
        try:
            with client(server, tenant) as c:
                results[i] = c.generate(prompt_token_ids=prompts[i % 4], priority=cls, max_tokens=8)
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append((i, e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 24
    for i, r in results.items():
        assert r.token_ids == expected[i % 4] and r.finish_reason in ("stop", "length")
    with client(server) as c:
        assert wait_pages_idle(c) == {lane["name"]: 0 for lane in c.server_info()["lanes"]}
