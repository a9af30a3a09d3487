"""The usage ledger behind a real server on loopback, gRPC and HTTP on one engine: for a mixed
load of two tenants and three tiers, with cancels and deadlines, the ledger's counts and tokens
equal what the clients saw, and each row names the API it came through."""

import json
import threading
import time

import httpx
import pytest

from nitsum_jax.engine import Engine
from nitsum_jax.plans import BucketGrid, parse_plans
from nitsum_jax.scheduler import PriorityClass
from nitsum_jax.server.app import NitsumServer
from nitsum_jax.server.client import GenerateError, NitsumClient
from nitsum_jax.server.http.server import HttpServer
from nitsum_jax.server.tenants import Tenants, key_sha256
from nitsum_jax.usage import list_requests, open_ro, usage_report
from server_helpers import prompt

LONG = 40  # max_tokens of the calls that are cancelled or run into their deadline
KEYS = {"acme": "acme-key-3b1e", "beta": "beta-key-c07d"}
TIERS = {"realtime": PriorityClass("realtime", rank=0, ttft_target_s=0.5, tpot_target_s=0.05),
         "standard": PriorityClass("standard", rank=1, ttft_target_s=5.0, tpot_target_s=0.5),
         "batch": PriorityClass("batch", rank=2, ttft_target_s=60.0, tpot_target_s=2.0)}


@pytest.fixture(scope="module")
def server(tiny_cfg, tiny_params, tmp_path_factory):
    folder = tmp_path_factory.mktemp("usage-server")
    keys = folder / "tenants.toml"
    keys.write_text("".join(f'[[tenant]]\nname = "{name}"\nkey_sha256 = "{key_sha256(key)}"\n'
                            f'classes = {json.dumps(list(TIERS))}\n\n' for name, key in KEYS.items()))

    def build_engine():
        return Engine(tiny_cfg, tiny_params, parse_plans("solo: all=tp1@0"), classes=TIERS, num_pages=32,
                      page_size=8, grid=BucketGrid(decode_batch=(1, 4), prefill_len=(16,), max_seq_len=64))

    srv = NitsumServer(build_engine, host="127.0.0.1", port=0, tenants=Tenants.load(keys, TIERS),
                       default_class="standard", usage_db=str(folder / "usage.db"))
    http = HttpServer(srv, host="127.0.0.1", port=0, model_name="tiny", default_class="standard").start()
    srv.stop_hooks.append(http.stop)
    srv.start()
    assert srv.wait_ready(timeout=600)
    srv.http_port = http.port
    yield srv, folder / "usage.db"
    srv.drain(grace_s=10)


def one_call(target, tenant, tier, seed, kind, seen, deadline_s):
    """One call of `kind` ("complete", "cancel" after the first token, "deadline" after `deadline_s`),
    sent with request id `call-<seed>`; appends what the client saw: (tenant, tier, status, prompt
    tokens, tokens received or None, kind, request id)."""
    rid = f"call-{seed}"
    with NitsumClient(target, api_key=KEYS[tenant]) as client:
        ids = prompt(seed, n=6 + seed % 7)
        if kind == "complete":
            r = client.generate(prompt_token_ids=ids, priority=tier, max_tokens=3 + seed % 5, request_id=rid)
            seen.append((tenant, tier, "OK", r.prompt_tokens, len(r.token_ids), kind, rid))
        elif kind == "cancel":
            stream = client.stream(prompt_token_ids=ids, priority=tier, max_tokens=LONG, request_id=rid)
            got = len(next(iter(stream)).token_ids)
            stream.cancel()
            seen.append((tenant, tier, "CANCELLED", len(ids), got, kind, rid))
        else:
            try:
                r = client.generate(prompt_token_ids=ids, priority=tier, max_tokens=LONG, timeout=deadline_s,
                                    request_id=rid)
                seen.append((tenant, tier, "OK", r.prompt_tokens, len(r.token_ids), kind, rid))
            except GenerateError as e:
                seen.append((tenant, tier, e.code.name, len(ids), None, kind, rid))


def test_ledger_counts_and_tokens_equal_what_the_clients_saw(server):
    srv, db = server
    target, seen = f"127.0.0.1:{srv.port}", []
    with NitsumClient(target, api_key=KEYS["acme"]) as client:
        start = time.perf_counter()
        r = client.generate(prompt_token_ids=prompt(1), priority="batch", max_tokens=40)
        # Half of a solo generation: under the load below it passes mid-generation, and it is long
        # enough for the server to have authenticated the call (one that expires before has no tenant).
        deadline_s = max((time.perf_counter() - start) / 2, 0.25)
    seen.append(("acme", "batch", "OK", r.prompt_tokens, len(r.token_ids), "complete", None))
    calls = [(tenant, tier, 100 + i, ("complete", "complete", "cancel", "deadline")[i % 4])
             for i, (tenant, tier) in enumerate((t, c) for t in KEYS for c in TIERS for _ in range(4))]
    threads = [threading.Thread(target=one_call, args=(target, *call, seen, deadline_s)) for call in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(seen) == len(calls) + 1
    over_http = []
    for i, (tenant, tier) in enumerate((t, c) for t in KEYS for c in TIERS):
        reply = httpx.post(f"http://127.0.0.1:{srv.http_port}/v1/completions", timeout=120,
                           headers={"Authorization": f"Bearer {KEYS[tenant]}"},
                           json={"prompt": prompt(300 + i, n=5), "max_tokens": 2 + i % 3, "temperature": 0,
                                 "ignore_eos": True, "priority": tier})
        assert reply.status_code == 200, reply.text
        usage = reply.json()["usage"]
        over_http.append((tenant, tier, "OK", usage["prompt_tokens"], usage["completion_tokens"], "complete", None))
    seen += over_http
    assert srv.gate.wait_idle(30)  # every call settled on the server: its row recorded
    srv.usage.close()  # writes every queued row (drain would too)
    conn = open_ro(db)
    try:
        rows = list_requests(conn)
    finally:
        conn.close()
    assert len(rows) == len(seen)
    assert sorted((r["tenant"], r["tier"], r["prompt_tokens"], r["completion_tokens"]) for r in rows
                  if r["api"] == "http") == sorted(s[:2] + s[3:5] for s in over_http)
    assert sum(r["api"] == "grpc" for r in rows) == len(seen) - len(over_http)
    # Each gRPC call against its own row (the server's id is the client's, then "@<n>").
    by_id = {r["request_id"].split("@")[0]: r for r in rows if r["request_id"].startswith("call-")}
    assert sorted(by_id) == sorted(s[6] for s in seen if s[6] is not None)
    for tenant, tier, status, prompt_tokens, got, kind, rid in (s for s in seen if s[6] is not None):
        row = by_id[rid]
        assert (row["tenant"], row["tier"], row["api"], row["prompt_tokens"]) == (tenant, tier, "grpc", prompt_tokens)
        if status == "OK":  # the client read every token: the row is the same
            assert (row["status"], row["completion_tokens"]) == ("OK", got), (rid, dict(row))
        elif row["status"] == "OK":
            # Ended early for the client, but the server had already finished the call (all LONG
            # tokens, or a stop token) when the cancel or the deadline reached it: a race the
            # ledger settles as the server saw it.
            assert row["finish_reason"] in ("length", "stop"), (rid, dict(row))
            assert (got or 0) <= row["completion_tokens"] <= LONG, (rid, dict(row))
            assert row["finish_reason"] == "stop" or row["completion_tokens"] == LONG, (rid, dict(row))
        else:
            # A call past its deadline may reach the server as the client's cancel first.
            assert (row["status"], row["finish_reason"]) in {("CANCELLED", "cancelled"),
                                                               ("DEADLINE_EXCEEDED", "deadline")}, (rid, dict(row))
            assert kind == "deadline" or row["status"] == "CANCELLED", (rid, dict(row))
            # A cancel came after the first token; the engine may have made more the client never read.
            assert row["completion_tokens"] >= (got or 0), (rid, dict(row))
    assert any(s[2] == "CANCELLED" for s in seen) and all(s[4] >= 1 for s in seen if s[2] == "CANCELLED")
    report = {(g["tenant"], g["tier"]): g for g in usage_report(db)}
    for tenant in KEYS:
        for tier in TIERS:
            mine = [s for s in seen if s[:2] == (tenant, tier)]
            assert report[(tenant, tier)]["requests"] == len(mine)
            assert report[(tenant, tier)]["prompt_tokens"] == sum(s[3] for s in mine)
