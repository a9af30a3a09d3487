"""`nitsum-jax` and `nitsum-ckpt` tried as a new user would: help texts, option order, exit codes
and messages, no tracebacks. Client calls go to a real server on loopback."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nitsum_jax.cli import HelpFormatter, build_parser, main

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("generate", "plans", "serve", "client", "api-key")


def run_cli(*args, stdout=subprocess.PIPE, **kwargs) -> subprocess.CompletedProcess:
    env = os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "nitsum_jax.cli", *map(str, args)], cwd=REPO, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=300, env=env, **kwargs)


def subcommands(parser):
    [sub] = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return sub.choices


def options_without_a_shown_default(parser) -> list[str]:
    formatter = HelpFormatter(parser.prog)
    missing = []
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "devices"):
            continue
        if not action.help or "%(default)" not in formatter._get_help_string(action):
            missing.append(action.option_strings[-1])
    return missing


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_text_with_its_default(command):
    parser = subcommands(build_parser())[command]
    assert options_without_a_shown_default(parser) == []
    assert "(default: " in parser.format_help()


@pytest.mark.parametrize("command", ["convert-hf", "init", "inspect"])
def test_every_nitsum_ckpt_option_has_help_text_with_its_default(command):
    from checkpoints_tools.cli import build_parser as ckpt_parser

    assert options_without_a_shown_default(subcommands(ckpt_parser())[command]) == []


def test_context_limits_are_shown_in_help():
    commands = subcommands(build_parser())
    for command, limit in (("generate", 1024), ("serve", 256)):
        text = " ".join(commands[command].format_help().split())  # help lines unwrapped
        assert re.search(rf"--max-seq-len MAX_SEQ_LEN context limit: .{{0,80}}\(default: {limit}\)", text), text


@pytest.mark.parametrize("argv, devices", [
    (["plans", "--devices", "8"], 8), (["--devices", "4", "plans"], 4), (["serve", "--devices", "2"], 2),
    (["client", "--devices", "2", "hi"], 2), (["generate", "--devices", "1"], 1)])
def test_devices_is_accepted_before_or_after_the_subcommand(argv, devices):
    assert build_parser().parse_args(argv).devices == devices


def test_serve_switches_plans_unless_static():
    parser = build_parser()
    assert parser.parse_args(["serve"]).static is False
    assert parser.parse_args(["serve", "--static"]).static is True


def test_plans_json_into_a_closed_pipe_exits_quietly():
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte, as `| head` is after its lines
    try:
        result = run_cli("--devices", "8", "plans", "--preset", "tiny", "--json", stdout=write)
    finally:
        os.close(write)
    assert "BrokenPipeError" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 141


def test_plans_memory_error_names_the_flag_that_fixes_it(capsys):
    code = main(["plans", "--devices", "8", "--preset", "llama-3.1-70b", "--device-memory-gib", "80"])
    err = capsys.readouterr().err
    assert code == 2 and "needs" in err and "--kv-pages" in err and "(now 4096)" in err
    fix = int(err.split("--kv-pages ")[1].split()[0])
    assert main(["plans", "--devices", "8", "--preset", "llama-3.1-70b", "--device-memory-gib", "80",
                 "--kv-pages", str(fix)]) == 0


# -- client ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv, words", [
    (["client", "--max-tokens", "0", "hi"], ["--max-tokens must be >= 1, got 0"]),
    (["client"], ["give a prompt", "--token-ids"]),
])
def test_client_refuses_bad_arguments_before_calling(capsys, argv, words):
    assert main(argv + ["--target", f"127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def test_client_health_of_a_dead_server_is_one_error_line_and_exit_1():
    result = run_cli("client", "--health", "--target", f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert result.returncode == 1
    assert result.stderr.startswith("nitsum-jax: error: ") and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_client_health_not_serving_exits_1(capsys):
    from nitsum_jax.server.app import NitsumServer

    release = threading.Event()

    def never_ready():  # health stays NOT_SERVING while the engine "builds"
        release.wait(60)
        raise RuntimeError("no engine in this test")

    server = NitsumServer(never_ready, host="127.0.0.1", port=0).start()
    try:
        assert main(["client", "--health", "--target", f"127.0.0.1:{server.port}"]) == 1
        assert capsys.readouterr().out.strip() == "NOT_SERVING"
    finally:
        release.set()
        server.ready.wait(60)
        server.stop()


@pytest.fixture(scope="module")
def server(tiny_cfg, tiny_params):
    from nitsum_jax.engine import Engine
    from nitsum_jax.plans import BucketGrid, parse_plans
    from nitsum_jax.server.app import NitsumServer
    from nitsum_jax.tokenizer import TextTokenizer

    def build_engine():
        return Engine(tiny_cfg, tiny_params, parse_plans("solo: all=tp1@0"), tokenizer=TextTokenizer.byte_level(),
                      num_pages=64, page_size=8, grid=BucketGrid(decode_batch=(1, 2), prefill_len=(16,),
                                                                 max_seq_len=512))

    srv = NitsumServer(build_engine, host="127.0.0.1", port=0).start()
    assert srv.wait_ready(timeout=600)
    yield srv
    srv.drain(grace_s=5)


def test_client_prints_who_served_in_words_not_a_tuple(server):
    result = run_cli("client", "--target", f"127.0.0.1:{server.port}", "--max-tokens", "3", "Hi")
    assert result.returncode == 0, result.stderr
    assert re.search(r"served by lane \S+ \(tp1\) of plan solo\]", result.stdout), result.stdout
    assert "('" not in result.stdout


def test_ctrl_c_while_streaming_cancels_quietly_and_exits_130(server):
    env = os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nitsum_jax.cli", "client", "--target",
                             f"127.0.0.1:{server.port}", "--token-ids", "256,5,9,14", "--max-tokens", "480",
                             "--temperature", "0.8", "--seed", "1"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.read(1)  # the first streamed text: the client is in its stream loop
        assert server.gate.in_flight == 1  # streaming
        # Hold the engine's lock so no more tokens come (the tiny model could otherwise finish all
        # 480 before the signal lands): the client is then waiting in its stream when interrupted.
        with server.gate.engine._lock:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and b"Traceback" not in err, err.decode()
    deadline = time.monotonic() + 30
    while server.gate.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.gate.in_flight == 0 and not server.gate.handles  # the server's request was cancelled
