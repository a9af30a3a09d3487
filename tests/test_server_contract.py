"""The gRPC server against a fake engine that implements the engine contract (no model, no
JAX): tokens, statuses, cancels and server info are the server's own behaviour, in milliseconds."""

import grpc
import pytest

from fake_engine import FakeEngine, expected_tokens
from nitsum_jax.server.app import NitsumServer
from nitsum_jax.server.client import GenerateError, NitsumClient


@pytest.fixture(scope="module")
def fake():
    engine = FakeEngine()
    server = NitsumServer(lambda: engine, host="127.0.0.1", port=0, default_class="low",
                          model_name="fake").start()
    assert server.wait_ready(timeout=60)
    yield engine, server
    server.drain(1.0)


def client(server):
    return NitsumClient(f"127.0.0.1:{server.port}")


def test_a_call_streams_the_engines_tokens_and_ends_with_its_finish_reason(fake):
    engine, server = fake
    with client(server) as c:
        result = c.generate(prompt_token_ids=[256, 7, 9], priority="high", max_tokens=12)
    assert result.token_ids == expected_tokens([256, 7, 9], 12)
    assert result.finish_reason == "length" and result.prompt_tokens == 3
    assert engine.submitted[-1].request.priority_class == "high"


def test_an_unknown_class_is_invalid_argument_and_never_reaches_the_engine(fake):
    engine, server = fake
    before = len(engine.submitted)
    with client(server) as c, pytest.raises(GenerateError) as error:
        c.generate(prompt_token_ids=[256, 1], priority="platinum", max_tokens=4)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and "platinum" in error.value.details
    assert len(engine.submitted) == before


def test_a_prompt_over_the_engines_context_is_refused_naming_the_limit(fake):
    engine, server = fake
    with client(server) as c, pytest.raises(GenerateError) as error:
        c.generate(prompt_token_ids=[256] * 200, max_tokens=100)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and "256" in error.value.details


def test_a_client_cancel_cancels_the_engine_request(fake):
    engine, server = fake
    engine.token_s = 0.05  # slow enough to cancel mid-stream
    try:
        with client(server) as c:
            call = c.stream(prompt_token_ids=[256, 3], max_tokens=200)
            next(iter(call))
            call.cancel()
        handle = engine.submitted[-1]
        assert handle.result(timeout=30).finish_reason == "cancelled"
        assert len(handle.seq.output_ids) < 200
    finally:
        engine.token_s = 0.001


def test_server_info_reads_the_contract(fake):
    engine, server = fake
    with client(server) as c:
        info = c.server_info()
    assert info["plans"] == ["only"] and info["current_plan"] == "only"
    assert [lane["name"] for lane in info["lanes"]] == ["fake@0"] and info["classes"] == ["high", "low"]
