"""The OpenAI-compatible HTTP API on loopback (tiny model, host devices), driven by the official
`openai` client and by raw HTTP (httpx), beside gRPC on the same engine.

One server (one engine, gRPC and HTTP) serves the module, with a keys file of three tenants;
the drain test runs last, since it stops it.
"""

import json
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nitsum_jax.chat import ChatTemplate
from nitsum_jax.engine import Engine
from nitsum_jax.plans import BucketGrid, parse_plans
from nitsum_jax.sampling import SamplingParams
from nitsum_jax.scheduler import PriorityClass, default_classes
from nitsum_jax.server.app import NitsumServer
from nitsum_jax.server.client import NitsumClient
from nitsum_jax.server.http.server import HttpServer
from nitsum_jax.server.tenants import Tenants
from nitsum_jax.tokenizer import TextTokenizer
from server_helpers import prompt, tenants_toml, wait_for

GRID = BucketGrid(decode_batch=(1, 4), prefill_len=(16,), max_seq_len=96, min_move_pages=8)
PLANS = "mixed: high=tp2@0-1, low=tp2@2-3"
KEYS = {"gold": "gold-key-2b81", "basic": "basic-key-7c04", "metered": "metered-key-e519"}
MODEL = "preset:tiny"
# A ChatML-like template with the constructs real ones use: a loop, a conditional, bos_token.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n"
                 "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
OBJECTIVES = {"realtime": "high", "batch-sheddable": "bulk"}


def classes():
    # "bulk" never gets a queue slot (max_queue=0): every request of it meets a full queue.
    return default_classes() | {"bulk": PriorityClass("bulk", rank=2, ttft_target_s=60, tpot_target_s=1,
                                                      max_queue=0)}


def tenants_file(path):
    path.write_text(tenants_toml(KEYS))
    return path


def start_servers(cfg, params, keys_path):
    """(NitsumServer with gRPC, HttpServer beside it), both on loopback, warm."""
    def build_engine():
        return Engine(cfg, params, parse_plans(PLANS), classes=classes(), tokenizer=TextTokenizer.byte_level(),
                      num_pages=32, page_size=8, grid=GRID)

    grpc_server = NitsumServer(build_engine, host="127.0.0.1", port=0, tenants=Tenants.load(keys_path, classes()),
                               default_class="low", model_name=MODEL)
    http = HttpServer(grpc_server, host="127.0.0.1", port=0, model_name=MODEL,
                      chat_template=ChatTemplate(CHAT_TEMPLATE, special_tokens={"bos_token": "<|begin_of_text|>"}),
                      objectives=OBJECTIVES, default_class="low", max_body_bytes=64 * 1024).start()
    grpc_server.stop_hooks.append(http.stop)
    grpc_server.start()
    assert grpc_server.wait_ready(timeout=600)
    return grpc_server, http


def wait_pages_idle(engine, timeout=60.0) -> dict[str, int]:
    """Poll the engine's lanes until none holds KV pages (a request leaves at a step boundary);
    lane -> pages used when idle or at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        used = {lane["name"]: lane["kv_pages_used"] for lane in engine.lanes_info()}
        if not any(used.values()) or time.monotonic() > deadline:
            return used
        time.sleep(0.05)


@pytest.fixture(scope="module")
def servers(tiny_cfg, tiny_params, tmp_path_factory):
    grpc_server, http = start_servers(tiny_cfg, tiny_params, tenants_file(tmp_path_factory.mktemp("keys") / "t.toml"))
    yield grpc_server, http
    grpc_server.drain(grace_s=10)


@pytest.fixture(scope="module")
def engine(servers):
    return servers[0].gate.engine


@pytest.fixture(scope="module")
def base_url(servers):
    return f"http://127.0.0.1:{servers[1].port}"


def client(base_url, tenant="gold", **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEYS[tenant] if tenant else "none", max_retries=0,
                         **kwargs)


def post(base_url, path, body, tenant="gold", **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEYS[tenant]}", **kwargs.pop("headers", {})}
    return httpx.post(f"{base_url}{path}", json=body, headers=headers, timeout=120, **kwargs)


def error_of(reply: httpx.Response) -> dict:
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def requests_counted(base_url, tier, code) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics").text):
        for sample in family.samples:
            if sample.name == "nitsum_requests_total" and sample.labels == {"class": tier, "code": code}:
                return sample.value
    return 0.0


# -- completions and chat through the openai client -----------------------------------------

def test_completion_equals_the_engines_greedy_output(base_url, engine):
    expected = engine.submit("Priority lanes", SamplingParams(max_tokens=10), priority_class="low").result(120)
    reply = client(base_url).completions.create(model=MODEL, prompt="Priority lanes", max_tokens=10, temperature=0)
    choice = reply.choices[0]
    assert choice.text == expected.text and choice.finish_reason == expected.finish_reason
    assert reply.object == "text_completion" and reply.model == MODEL
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (expected.prompt_tokens,
                                                                          len(expected.token_ids))
    assert reply.usage.total_tokens == expected.prompt_tokens + len(expected.token_ids)


def test_streamed_completion_joins_to_the_whole_one_and_ends_with_usage(base_url):
    ids = prompt(3, n=10)
    whole = client(base_url).completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    chunks = list(client(base_url).completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0,
                                                      stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_continuous_usage_puts_the_count_so_far_in_every_chunk(base_url):
    body = {"prompt": prompt(11, n=8), "max_tokens": 10, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEYS['gold']}"}) as reply:
        events = [json.loads(line[6:]) for line in reply.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert counts == sorted(counts) and counts[-1] == 10 and len(counts) >= 2
    assert all(e["usage"]["prompt_tokens"] == 8 for e in events)

def test_a_repeated_prompt_reports_cached_tokens_for_its_tenant_and_none_for_another(base_url):
    text = "a shared system prompt for agents: " * 2  # several full pages of 8 tokens, within the 96-token context
    body = {"prompt": text, "max_tokens": 2, "temperature": 0, "priority": "low"}
    reply = post(base_url, "/v1/completions", body, tenant="gold")
    assert reply.status_code == 200, reply.text
    first = reply.json()["usage"]
    again = post(base_url, "/v1/completions", body, tenant="gold").json()["usage"]
    other = post(base_url, "/v1/completions", body, tenant="basic").json()["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["prompt_tokens_details"]["cached_tokens"] >= 8 * (again["prompt_tokens"] // 8 - 1)
    assert other["prompt_tokens_details"]["cached_tokens"] == 0  # tenants never share cached pages


def test_greedy_tokens_over_http_equal_the_grpc_ones(base_url, servers):
    ids = prompt(4, n=12)
    with NitsumClient(f"127.0.0.1:{servers[0].port}", api_key=KEYS["gold"]) as grpc_client:
        over_grpc = grpc_client.generate(prompt_token_ids=ids, priority="high", max_tokens=16)
    reply = client(base_url).completions.create(model=MODEL, prompt=ids, max_tokens=16, temperature=0, logprobs=0,
                                                extra_body={"priority": "high"})
    tokenizer = TextTokenizer.byte_level()
    assert reply.choices[0].logprobs.tokens == [tokenizer.decode([t]) for t in over_grpc.token_ids]
    assert reply.choices[0].text == over_grpc.text
    assert reply.usage.completion_tokens == len(over_grpc.token_ids)
    assert all(lp <= 0 for lp in reply.choices[0].logprobs.token_logprobs)


def test_chat_renders_the_template_and_streams_deltas(base_url, engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a lane."}]
    rendered = ChatTemplate(CHAT_TEMPLATE, special_tokens={"bos_token": "<|begin_of_text|>"}).render(messages)
    ids = engine.tokenizer.encode(rendered, add_bos=False)
    expected = engine.submit(ids, SamplingParams(max_tokens=9), priority_class="low").result(120)
    reply = client(base_url).chat.completions.create(model=MODEL, messages=messages, max_tokens=9, temperature=0)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == len(ids) == expected.prompt_tokens
    chunks = list(client(base_url).chat.completions.create(model=MODEL, messages=messages, max_tokens=9,
                                                           temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_chat_logprobs_are_the_chosen_tokens(base_url):
    reply = client(base_url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=6, temperature=0, logprobs=True)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert all(c.logprob <= 0 and c.top_logprobs == [] for c in content)


def test_seeded_sampling_reproduces(base_url):
    kwargs = dict(model=MODEL, prompt=prompt(5), max_tokens=10, temperature=0.9, top_p=0.95, seed=17,
                  extra_body={"top_k": 40})
    a, b = (client(base_url).completions.create(**kwargs) for _ in range(2))
    assert a.choices[0].text == b.choices[0].text


def test_models_lists_the_served_model(base_url):
    assert [m.id for m in client(base_url).models.list()] == [MODEL]


# -- errors as the openai client's exception types ------------------------------------------

@pytest.mark.parametrize("kwargs, param, words", [
    (dict(temperature=-1.0), "temperature", ["temperature", "-1", "[0, 100]"]),
    (dict(top_p=1.5), "top_p", ["top_p", "1.5", "(0, 1]"]),
    (dict(max_tokens=200), "max_tokens", ["max_tokens (200)", "context limit 96"]),
    (dict(prompt=[256, 9999]), "prompt", ["9999", "[0, 264)"]),
    (dict(n=2), "n", ["n must be 1", "2"]),
    (dict(logprobs=3), "logprobs", ["logprobs", "3", "0 or null"]),
    (dict(presence_penalty=0.5), "presence_penalty", ["presence_penalty", "not supported", "0.5"]),
    (dict(extra_body={"priority": 7}), "priority", ["priority 7", "0 (high)", "1 (low)", "2 (bulk)"]),
    (dict(extra_body={"priority": "urgent"}), "priority", ["'urgent'", "high", "low"]),
])
def test_bad_fields_are_bad_requests_naming_field_value_and_limit(base_url, kwargs, param, words):
    args = dict(model=MODEL, prompt="x", max_tokens=4, temperature=0) | kwargs
    with pytest.raises(openai.BadRequestError) as info:
        client(base_url).completions.create(**args)
    assert info.value.status_code == 400 and info.value.body["param"] == param
    for word in words:
        assert word in info.value.message


def test_unknown_model_is_not_found(base_url):
    with pytest.raises(openai.NotFoundError) as info:
        client(base_url).completions.create(model="gpt-9", prompt="x", max_tokens=2)
    assert "gpt-9" in info.value.message and MODEL in info.value.message


def test_a_wrong_key_is_unauthenticated(base_url):
    bad = openai.OpenAI(base_url=f"{base_url}/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert "unknown API key" in info.value.message


def test_a_tier_the_tenant_may_not_claim_is_forbidden(base_url):
    with pytest.raises(openai.PermissionDeniedError) as info:
        client(base_url, "basic").completions.create(model=MODEL, prompt="x", max_tokens=2,
                                                     extra_body={"priority": "high"})
    assert "'basic'" in info.value.message and "'high'" in info.value.message and "['low']" in info.value.message


def test_over_the_token_rate_is_rate_limited_with_retry_after(base_url):
    c = client(base_url, "metered")
    c.completions.create(model=MODEL, prompt=prompt(6, n=10), max_tokens=20, temperature=0)  # 30 of its 40/min
    with pytest.raises(openai.RateLimitError) as info:
        c.completions.create(model=MODEL, prompt=prompt(7, n=10), max_tokens=20, temperature=0)
    assert "tokens_per_minute limit 40" in info.value.message
    assert int(info.value.response.headers["Retry-After"]) >= 1


def test_a_full_tier_queue_is_rate_limited_with_retry_after(base_url):
    reply = post(base_url, "/v1/completions", {"prompt": "x", "max_tokens": 2, "priority": "bulk"})
    assert reply.status_code == 429 and reply.headers["Retry-After"] == "1"
    assert error_of(reply)["code"] == "queue_full"


def test_chat_without_a_template_names_the_missing_template(base_url, servers, monkeypatch):
    monkeypatch.setattr(servers[1].admission, "chat_template", None)
    with pytest.raises(openai.BadRequestError) as info:
        client(base_url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert "no chat template" in info.value.message and "--chat-template" in info.value.message


# -- raw HTTP: bodies the client library would never send ------------------------------------

def test_malformed_json_is_a_bad_request(base_url):
    reply = httpx.post(f"{base_url}/v1/completions", content=b'{"prompt": "x", ',
                       headers={"Authorization": f"Bearer {KEYS['gold']}", "Content-Type": "application/json"})
    assert reply.status_code == 400 and error_of(reply)["code"] == "json_invalid"


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "x", "max_tokens": "8"}, "max_tokens", ["valid integer", '"8"']),
    ({"prompt": "x", "temperature": True}, "temperature", ["valid number", "true"]),
    ({"prompt": 42}, "prompt", ["42"]),
    ({"prompt": "x", "max_tokns": 8}, "max_tokns", ["unknown field 'max_tokns'"]),
    ({"max_tokens": 8}, "prompt", ["'prompt' is required"]),
])
def test_wrong_types_unknown_and_missing_fields_are_named(base_url, body, param, words):
    reply = post(base_url, "/v1/completions", body)
    error = error_of(reply)
    assert reply.status_code == 400 and error["param"] == param and error["type"] == "invalid_request_error"
    for word in words:
        assert word in error["message"]


def test_an_oversized_body_is_refused_413(base_url):
    big = {"prompt": "x" * (80 * 1024), "max_tokens": 2}
    reply = post(base_url, "/v1/completions", big)
    assert reply.status_code == 413 and "65536 bytes" in error_of(reply)["message"]
    chunked = httpx.post(f"{base_url}/v1/completions", content=iter([json.dumps(big).encode()]),
                         headers={"Authorization": f"Bearer {KEYS['gold']}", "Content-Type": "application/json"})
    assert chunked.status_code == 413 and error_of(chunked)["code"] == "body_too_large"


# -- tiers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("body, headers, tier", [
    ({"priority": 0}, {}, "high"),
    ({"priority": "high"}, {}, "high"),
    ({}, {"x-nitsum-priority": "high"}, "high"),
    ({}, {"x-llm-d-inference-objective": "realtime"}, "high"),
    ({}, {"x-gateway-inference-objective": "low"}, "low"),  # an objective named as a tier maps to it
    ({"priority": "low"}, {"x-nitsum-priority": "high"}, "low"),  # the body wins
    ({}, {}, "low"),  # the server's default
])
def test_the_tier_comes_from_body_header_or_objective(base_url, body, headers, tier):
    reply = post(base_url, "/v1/completions", {"prompt": "x", "max_tokens": 2} | body, headers=headers)
    assert reply.status_code == 200 and reply.headers["x-nitsum-tier"] == tier


def test_an_unknown_objective_is_a_bad_request_showing_the_table(base_url):
    reply = post(base_url, "/v1/completions", {"prompt": "x", "max_tokens": 2},
                 headers={"x-llm-d-inference-objective": "premium"})
    error = error_of(reply)
    assert reply.status_code == 400 and error["param"] == "x-llm-d-inference-objective"
    assert "'premium'" in error["message"] and "realtime" in error["message"]


def test_an_objective_does_not_lift_a_tenant_past_its_tiers(base_url):
    reply = post(base_url, "/v1/completions", {"prompt": "x", "max_tokens": 2}, tenant="basic",
                 headers={"x-llm-d-inference-objective": "realtime"})
    assert reply.status_code == 403 and error_of(reply)["type"] == "permission_error"


def test_a_bad_slo_header_is_a_bad_request(base_url):
    reply = post(base_url, "/v1/completions", {"prompt": "x", "max_tokens": 2}, headers={"x-llm-d-slo-ttft-ms": "-5"})
    assert reply.status_code == 400 and error_of(reply)["param"] == "x-llm-d-slo-ttft-ms"


def test_a_stricter_slo_header_is_recorded_against_its_tier(base_url):
    def recorded() -> float:
        families = text_string_to_metric_families(httpx.get(f"{base_url}/metrics").text)
        return sum(s.value for f in families for s in f.samples
                   if s.name == "nitsum_request_slo_total" and s.labels["tier"] == "low"
                   and s.labels["target"] == "ttft")

    before = recorded()
    reply = post(base_url, "/v1/completions", {"prompt": "x", "max_tokens": 2}, headers={"x-llm-d-slo-ttft-ms": "900"})
    assert reply.status_code == 200
    wait_for(lambda: recorded() == before + 1)  # low's own TTFT target is 10 s: 0.9 s is stricter


# -- disconnects, metrics, health ------------------------------------------------------------

def test_a_client_that_disconnects_mid_stream_cancels_and_frees_its_pages(base_url, engine):
    before = requests_counted(base_url, "low", "CANCELLED")
    body = {"prompt": prompt(8, n=16), "max_tokens": 80, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEYS['gold']}"}) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert any(lane["kv_pages_used"] > 0 for lane in engine.lanes_info())
    wait_for(lambda: requests_counted(base_url, "low", "CANCELLED") == before + 1)
    assert not any(wait_pages_idle(engine).values())
    cancelled = [h for h in engine.recent() if h.request.finish_reason == "cancelled"]
    assert cancelled and len(cancelled[-1].output_ids) < 80


def test_every_metrics_line_parses_and_the_gateway_gauges_are_there(base_url):
    post(base_url, "/v1/completions", {"prompt": "x", "max_tokens": 3})
    text = httpx.get(f"{base_url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}  # raises on a malformed line
    for line in text.splitlines():
        assert line.startswith("#") or list(text_string_to_metric_families(line + "\n"))
    for name in ("nitsum_num_requests_waiting", "nitsum_num_requests_running", "nitsum_kv_cache_usage_perc"):
        assert families[name].type == "gauge" and len(families[name].samples) == 1
        assert {s.labels["tier"] for s in families[f"{name}_by_tier"].samples} == {"high", "low", "bulk"}
    assert 0.0 <= families["nitsum_kv_cache_usage_perc"].samples[0].value <= 1.0
    assert families["nitsum_requests"].samples  # the gRPC path's metrics share the page


def test_a_running_request_shows_in_the_gateway_gauges(base_url, servers, engine, monkeypatch):
    """The gauges are scraped on the lane's own thread, inside the engine lock, right after a step
    streamed a token of the request: the only moment a request of the quick tiny model is sure to
    be running, with no timing. The lock is re-entrant, so the scrape's `engine.stats()` reads."""
    gate, registry = servers[0].gate, servers[0].metrics.registry
    sample = lambda name, **labels: registry.get_sample_value(name, labels)  # noqa: E731
    names = [("nitsum_num_requests_running", {}), ("nitsum_num_requests_running_by_tier", {"tier": "low"}),
             ("nitsum_num_requests_running_by_tier", {"tier": "high"}), ("nitsum_num_requests_waiting", {}),
             ("nitsum_kv_cache_usage_perc_by_tier", {"tier": "low"}),
             ("nitsum_kv_cache_usage_perc_by_tier", {"tier": "high"})]
    seen: dict = {}
    stream = engine._stream

    def stream_then_scrape(emitted):
        emitted = list(emitted)
        stream(emitted)
        if seen:
            return
        with gate.idle:
            running = [h for h in gate.handles if h is not None and h.finish_time is None]
        if any(entry.request.priority_class == "low" and len(entry.seq.output_ids) < 70 for entry, _ in emitted) \
                and len(running) == 1:  # the gateway knows the request, and it has tokens to go
            seen.update({(name, tuple(labels.items())): sample(name, **labels) for name, labels in names})

    monkeypatch.setattr(engine, "_stream", stream_then_scrape)
    body = {"prompt": prompt(9, n=16), "max_tokens": 80, "ignore_eos": True, "temperature": 0}
    assert post(base_url, "/v1/completions", body).status_code == 200
    monkeypatch.undo()
    assert seen, "no step streamed a token of the request while the gateway held it"
    value = lambda name, **labels: seen[(name, tuple(labels.items()))]  # noqa: E731
    assert value("nitsum_num_requests_running") == 1
    assert value("nitsum_num_requests_running_by_tier", tier="low") == 1
    assert value("nitsum_num_requests_running_by_tier", tier="high") == 0
    assert value("nitsum_num_requests_waiting") == 0
    assert 0 < value("nitsum_kv_cache_usage_perc_by_tier", tier="low") <= 1
    assert value("nitsum_kv_cache_usage_perc_by_tier", tier="high") == 0
    wait_pages_idle(engine)


def test_bench_measures_the_http_server_like_the_grpc_one(base_url, tmp_path):
    from nitsum_jax.bench import run_bench

    results = run_bench(configs=("static",), rates=(20.0,), num_requests=8, prompt_len="4-16", output_len="4-12",
                        seed=5, target=base_url, api_key=KEYS["gold"], out_dir=tmp_path, progress=False)
    records = results["requests"]
    assert results["counts"]["server"] == {"sent": 8, "completed": 8, "rejected": 0, "failed": 0}
    assert all(r["output_tokens"] == r["max_tokens"] for r in records)  # ignore_eos: the workload's lengths
    assert all(r["first_token_s"] is not None and r["finish_s"] >= r["first_token_s"] for r in records)
    assert {r["priority_class"] for r in records} <= {"high", "low"}
    assert (tmp_path / "report.md").stat().st_size > 0


@pytest.mark.parametrize("argv, words", [
    (["--no-grpc"], ["--no-grpc needs --http-port"]),
    (["--http-port", "0", "--objective", "realtime=urgent"], ["--objective 'realtime=urgent'", "['high', 'low']"]),
    (["--http-port", "0", "--chat-template", "/no/such/template.jinja"], ["/no/such/template.jinja"]),
])
def test_serve_refuses_bad_http_flags_before_building_an_engine(argv, words, capsys):
    from nitsum_jax.cli import main

    assert main(["serve", "--port", "0", *argv]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err


def test_health_is_503_while_the_engine_starts(tiny_cfg):
    release = threading.Event()

    def never_builds():
        release.wait(60)
        raise RuntimeError("not built in this test")

    server = NitsumServer(never_builds, host="127.0.0.1", port=None)
    http = HttpServer(server, host="127.0.0.1", port=0, model_name=MODEL).start()
    server.stop_hooks.append(http.stop)
    server.start()
    try:
        reply = httpx.get(f"http://127.0.0.1:{http.port}/health")
        assert reply.status_code == 503 and "starting" in reply.json()["reason"]
        refused = httpx.post(f"http://127.0.0.1:{http.port}/v1/completions", json={"prompt": "x"})
        assert refused.status_code == 503 and "starting" in error_of(refused)["message"]
    finally:
        release.set()
        server.stop()


def test_drain_turns_health_503_refuses_new_requests_and_lets_streams_finish(servers, base_url):
    """Runs last: it stops the module's server. A stop hook ahead of HTTP's holds the drain after its
    calls have finished, so /health and a new request can be checked while it drains."""
    hold = threading.Event()
    servers[0].stop_hooks.insert(0, lambda: hold.wait(60))
    assert httpx.get(f"{base_url}/health").status_code == 200
    body = {"prompt": prompt(10, n=16), "max_tokens": 40, "ignore_eos": True, "temperature": 0, "stream": True}
    drain = threading.Thread(target=servers[0].drain, args=(60,))
    try:
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {KEYS['gold']}"}) as reply:
            lines = reply.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            drain.start()
            wait_for(lambda: httpx.get(f"{base_url}/health").status_code == 503)
            assert "draining" in httpx.get(f"{base_url}/health").json()["reason"]
            refused = post(base_url, "/v1/completions", {"prompt": "x", "max_tokens": 2})
            assert refused.status_code == 503 and "draining" in error_of(refused)["message"]
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in "".join(rest)
    finally:
        hold.set()
    drain.join(60)
    assert servers[0].stopped.is_set()

