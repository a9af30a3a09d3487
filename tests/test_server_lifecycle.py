"""Server life cycle: NOT_SERVING until the engine is warm, an open server without a keys file,
the keys file's rules, and `nitsum-jax serve` over TLS draining on SIGTERM (a subprocess)."""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from nitsum_jax.server.client import GenerateError, NitsumClient
from nitsum_jax.server.tenants import AccessError, Tenants, TenantsFileError, TokenBucket, key_sha256


def test_health_is_not_serving_and_calls_unavailable_until_the_engine_is_warm(tiny_cfg, tiny_params, caplog):
    from nitsum_jax.engine import Engine
    from nitsum_jax.plans import BucketGrid, parse_plans
    from nitsum_jax.server.app import NitsumServer
    from nitsum_jax.tokenizer import TextTokenizer

    release = threading.Event()

    def build_engine():
        release.wait(120)
        return Engine(tiny_cfg, tiny_params, parse_plans("solo: all=tp1@0"), tokenizer=TextTokenizer.byte_level(),
                      num_pages=16, page_size=8, grid=BucketGrid(decode_batch=(1,), prefill_len=(16,), max_seq_len=32))

    with caplog.at_level("WARNING", logger="nitsum_jax.server"):
        server = NitsumServer(build_engine, host="127.0.0.1", port=0).start()
    try:
        assert "OPEN" in caplog.text  # no keys file: said at start-up
        with NitsumClient(f"127.0.0.1:{server.port}") as c:
            assert c.health() == "NOT_SERVING"
            with pytest.raises(GenerateError) as error:
                c.generate(prompt_token_ids=[256, 1, 2], max_tokens=2)
            assert error.value.code == grpc.StatusCode.UNAVAILABLE and "starting" in error.value.details
            release.set()
            c.wait_serving(timeout=300)
            result = c.generate("Hi", max_tokens=3)  # open server: no key needed, default class
            assert result.finish_reason in ("stop", "length") and result.served_by == ("solo", result.served_by[1], 1)
    finally:
        release.set()
        server.wait_ready(300)
        server.drain(grace_s=5)


def test_keys_file_rules_name_the_tenant_and_field(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text('[[tenant]]\nname = "acme"\nkey_sha256 = "abc123"\nclasses = ["low"]\n')
    with pytest.raises(TenantsFileError, match=r"'acme'.*key_sha256 must be 64 hex digits"):
        Tenants.load(path, ["high", "low"])
    path.write_text(f'[[tenant]]\nname = "acme"\nkey_sha256 = "{key_sha256("k")}"\nclasses = ["gold"]\n')
    with pytest.raises(TenantsFileError, match=r"'acme'.*classes \['gold'\].*\['high', 'low'\]"):
        Tenants.load(path, ["high", "low"])
    path.write_text(f'[[tenant]]\nname = "acme"\nkey_sha256 = "{key_sha256("k")}"\nclasses = ["low"]\n'
                    'tokens_per_minute = 0\n')
    with pytest.raises(TenantsFileError, match="tokens_per_minute must be an integer >= 1, got 0"):
        Tenants.load(path, ["high", "low"])


def test_bearer_key_is_matched_by_its_hash_only(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text(f'[[tenant]]\nname = "acme"\nkey_sha256 = "{key_sha256("s3cret").upper()}"\nclasses = ["low"]\n')
    tenants = Tenants.load(path, ["high", "low"])
    assert tenants.authenticate("Bearer s3cret").name == "acme"
    for header in ("Bearer s3cret2", "Basic s3cret", "s3cret", None):
        with pytest.raises(AccessError) as error:
            tenants.authenticate(header)
        assert error.value.code == "UNAUTHENTICATED"


def test_token_bucket_refills_at_its_rate():
    now = [0.0]
    bucket = TokenBucket(60, clock=lambda: now[0])  # one token a second
    assert bucket.take(50) is None
    assert bucket.take(20) == pytest.approx(10.0)  # 10 there, 10 more in 10 s
    now[0] = 10.0
    assert bucket.take(20) is None
    bucket.give_back(1000)
    assert bucket.level == 60  # never more than a minute's worth


def _self_signed_cert(folder):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


def test_serve_over_tls_drains_on_sigterm(tmp_path):
    cert, key = _self_signed_cert(tmp_path)
    command = [sys.executable, "-m", "nitsum_jax.cli", "--devices", "2", "serve", "--plans", "solo: all=tp2@0-1",
               "--host", "127.0.0.1", "--port", "0", "--tls-cert", str(cert), "--tls-key", str(key),
               "--num-pages", "80", "--page-size", "8", "--max-seq-len", "512", "--decode-batch", "1,4",
               "--prefill-len", "16", "--grace-s", "120"]
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        seen = []
        while not (found := re.search(r"listening on 127\.0\.0\.1:(\d+) \(TLS\)", seen[-1] if seen else "")):
            seen.append(proc.stdout.readline())
            assert seen[-1], "".join(seen)  # the server exited before listening
        port = int(found.group(1))
        assert any("OPEN" in line for line in seen)  # no keys file: said at start-up
        c = NitsumClient(f"127.0.0.1:{port}", tls_ca=str(cert), server_name="localhost")
        c.wait_serving(timeout=300)
        # Long enough (hundreds of steps) that the drain outlasts the health polls below.
        long_call = c.stream(prompt_token_ids=[256, 5, 9, 14], max_tokens=480, temperature=0.8, seed=1,
                             stop_token_ids=[])
        events = iter(long_call)
        assert next(events).token_ids  # in flight
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while c.health() == "SERVING" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.health() == "NOT_SERVING"
        with pytest.raises(GenerateError) as refused:
            c.generate(prompt_token_ids=[256, 1], max_tokens=2)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE and "draining" in refused.value.details
        rest = list(events)  # the call in flight finishes within the grace period
        assert rest[-1].finish_reason in ("stop", "length")
        c.close()
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert "draining" in out and "stopped" in out
        log = "".join(seen) + out  # progress between "listening" and SERVING, in one format, no third-party noise
        assert re.search(r"INFO nitsum_jax\.serve: building the engine: random weights of tiny", log), log
        assert "INFO nitsum_jax.serve: engine warm: plans solo, static" in log
        assert not re.search(r"INFO (absl|orbax)|Unable to initialize backend", log), log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
