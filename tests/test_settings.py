"""Every NITSUM_* variable is read into one typed `Settings`, checked by name, read once, and
never read while a step is traced; docs/settings.md is the table the dataclass generates."""

import collections.abc
import dataclasses
import os
import pathlib
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

from nitsum_jax.kernels import peer_pages
from nitsum_jax.model import StepInput, forward
from nitsum_jax.kv import allocate_kv_cache
from nitsum_jax.plans import BucketGrid, PlanSet, parse_plans
from nitsum_jax.settings import (ProfileWindow, Settings, SettingsError, UnknownSettingWarning, markdown,
                                 reload_settings, settings, variable)

ROOT = pathlib.Path(__file__).resolve().parent.parent
ALL_VARIABLES = {variable(f.name) for f in dataclasses.fields(Settings)}
# One refused value per variable (a new knob must add one here: see the coverage test below).
BAD = {
    "NITSUM_ATTENTION": "triton", "NITSUM_MOVE_COPY": "nccl", "NITSUM_MOVE_PIECES": "0",
    "NITSUM_MOVE_SYNC": "yes", "NITSUM_MOVE_TRANSPORT": "rdma", "NITSUM_MOVE_DIRECT_MODE": "sideways",
    "NITSUM_MOVE_ENGINE_RUNS": "-1", "NITSUM_MOVE_WAIT": "sleep", "NITSUM_XLA_OPTIONS": "true",
    "NITSUM_XLA_EXTRA_OPTIONS": "xla_gpu_enable_triton_gemm", "NITSUM_NVRTC": "/nonexistent/libnvrtc.so",
    "NITSUM_GIL_SWITCH_S": "-0.001", "NITSUM_CHAIN_STEPS": "sixty-four", "NITSUM_BENCH_PROFILE": "/tmp/trace:5",
    "NITSUM_API_KEY": "two words",
}


@pytest.fixture(autouse=True)
def fresh_process_settings():
    """Tests here change the process's copy; later tests read the environment afresh."""
    yield
    settings.cache_clear()


def test_unset_or_empty_variables_mean_the_defaults():
    assert Settings.from_env({}) == Settings()
    assert Settings.from_env({name: "" for name in ALL_VARIABLES}) == Settings()
    assert Settings().attention == "auto" and Settings().move_engine_runs == peer_pages.ENGINE_RUNS == 4
    assert Settings().gil_switch_s == 0.0005 and Settings().chain_steps is None


def test_every_variable_is_read_into_its_type(tmp_path):
    library = tmp_path / "libnvrtc.so.13"
    library.write_bytes(b"\x7fELF")
    read = Settings.from_env({
        "NITSUM_ATTENTION": "interpret", "NITSUM_MOVE_COPY": "xla", "NITSUM_MOVE_PIECES": "3",
        "NITSUM_MOVE_SYNC": "0", "NITSUM_MOVE_TRANSPORT": "packed", "NITSUM_MOVE_DIRECT_MODE": "split",
        "NITSUM_MOVE_ENGINE_RUNS": "0", "NITSUM_MOVE_WAIT": "block", "NITSUM_XLA_OPTIONS": "off",
        "NITSUM_XLA_EXTRA_OPTIONS": "xla_a=true, xla_b=12,xla_c=fast", "NITSUM_NVRTC": str(library),
        "NITSUM_GIL_SWITCH_S": "0.002", "NITSUM_CHAIN_STEPS": "16", "NITSUM_BENCH_PROFILE": f"{tmp_path}:1.5:0.25",
        "NITSUM_API_KEY": "k-7f3a"})
    assert read == Settings(attention="interpret", move_copy="xla", move_pieces=3, move_sync=False,
                            move_transport="packed", move_direct_mode="split", move_engine_runs=0, move_wait="block",
                            xla_options=False, xla_extra_options=(("xla_a", True), ("xla_b", 12), ("xla_c", "fast")),
                            nvrtc=str(library), gil_switch_s=0.002, chain_steps=16,
                            bench_profile=ProfileWindow(str(tmp_path), 1.5, 0.25), api_key="k-7f3a")
    assert Settings.from_env({"NITSUM_MOVE_SYNC": "1"}).move_sync is True
    assert Settings.from_env({"NITSUM_BENCH_PROFILE": "/tmp/p"}).bench_profile == ProfileWindow("/tmp/p", 5.0, 2.0)


def test_every_variable_has_a_refused_value_in_these_tests():
    assert set(BAD) == ALL_VARIABLES


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_value_is_refused_naming_the_variable_the_value_and_what_it_accepts(name):
    field = next(f for f in dataclasses.fields(Settings) if variable(f.name) == name)
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({name: BAD[name]})
    shown = "<hidden>" if name == "NITSUM_API_KEY" else repr(BAD[name])
    assert str(refused.value) == f"{name}={shown}; expected {field.metadata['accepted']}"
    assert isinstance(refused.value, ValueError)


def test_every_bad_variable_is_named_in_one_error():
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"NITSUM_MOVE_WAIT": "sleep", "NITSUM_CHAIN_STEPS": "-4", "NITSUM_ATTENTION": "auto"})
    assert str(refused.value).splitlines() == [
        "NITSUM_MOVE_WAIT='sleep'; expected spin or block",
        "NITSUM_CHAIN_STEPS='-4'; expected a whole number (unset: 64 for one-GPU lanes on accelerators, else 0)"]


def test_the_api_key_is_kept_out_of_reprs_and_errors():
    assert "s3cret" not in repr(Settings(api_key="s3cret"))
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"NITSUM_API_KEY": "s3cret\n"})
    assert "s3cret" not in str(refused.value)


def test_an_unknown_nitsum_variable_is_warned_about_by_name():
    with pytest.warns(UnknownSettingWarning, match=r"NITSUM_ATENTION is not a nitsum-jax setting "
                                                   r"\(did you mean NITSUM_ATTENTION\?\)"):
        read = Settings.from_env({"NITSUM_ATENTION": "reference", "HOME": "/root"})
    assert read.attention == "auto"  # the typo set nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known names, other prefixes and the test suite's own knob pass quietly
        Settings.from_env({"NITSUM_ATTENTION": "reference", "NITSUMX": "1", "NITSUM_SOAK_REQUESTS": "10"})


def test_the_process_reads_its_settings_once_until_reloaded(monkeypatch):
    monkeypatch.setenv("NITSUM_MOVE_WAIT", "block")
    first = reload_settings()
    monkeypatch.setenv("NITSUM_MOVE_WAIT", "spin")
    assert settings() is first and settings().move_wait == "block"
    assert reload_settings().move_wait == "spin"


def test_a_bad_environment_stops_the_first_component_that_reads_it(monkeypatch):
    monkeypatch.setenv("NITSUM_MOVE_DIRECT_MODE", "sideways")
    settings.cache_clear()
    with pytest.raises(SettingsError, match="NITSUM_MOVE_DIRECT_MODE='sideways'; expected one of push, pull or split"):
        peer_pages.PeerPageMover(jax.devices())  # before any CUDA call


def test_explicit_constructor_arguments_are_checked_like_the_variables():
    with pytest.raises(ValueError, match="direct move mode 'sideways'; expected one of"):
        peer_pages.PeerPageMover(jax.devices(), mode="sideways", settings=Settings())
    with pytest.raises(ValueError, match="engine_runs=-2; expected a whole number"):
        peer_pages.PeerPageMover(jax.devices(), engine_runs=-2, settings=Settings())


class WatchedEnviron(collections.abc.MutableMapping):
    """os.environ that records every NITSUM_* name looked up."""

    def __init__(self, real):
        self.real, self.looked_up = real, []

    def _note(self, key):
        if isinstance(key, str) and key.startswith("NITSUM_"):
            self.looked_up.append(key)

    def __getitem__(self, key):
        self._note(key)
        return self.real[key]

    def __contains__(self, key):
        self._note(key)
        return key in self.real

    def get(self, key, default=None):
        self._note(key)
        return self.real.get(key, default)

    def __setitem__(self, key, value):
        self.real[key] = value

    def __delitem__(self, key):
        del self.real[key]

    def __iter__(self):
        return iter(self.real)

    def __len__(self):
        return len(self.real)

    def copy(self):
        return dict(self.real)


def test_building_and_tracing_a_plan_set_reads_no_environment_variable_of_ours(tiny_cfg, tiny_params, monkeypatch):
    """The settings are read before; compiling every step (tracing the model) looks up no NITSUM_*."""
    monkeypatch.setenv("NITSUM_ATTENTION", "reference")
    process = reload_settings()
    watched = WatchedEnviron(os.environ)
    monkeypatch.setattr(os, "environ", watched)
    plan_set = PlanSet(tiny_cfg, tiny_params, parse_plans("one: all=tp1@0"), num_pages=8, page_size=8,
                       grid=BucketGrid(decode_batch=(1,), prefill_len=(), max_seq_len=32))
    assert watched.looked_up == []
    lane = plan_set.lanes[(0,)]
    assert plan_set.settings is process and lane.settings.attention == "reference"
    monkeypatch.setenv("NITSUM_ATTENTION", "no-such-implementation")  # too late: the steps are built
    tokens, _ = lane.step(np.array([[256]], np.int32), np.zeros(1, np.int32), np.ones(1, np.int32),
                          np.zeros((1, lane.pages_per_seq), np.int32), None)
    assert tokens.shape == (1,)


def test_the_attention_argument_picks_the_implementation_the_trace_holds(tiny_cfg, tiny_params):
    kv = allocate_kv_cache(tiny_cfg, 8, 8)
    rng = np.random.default_rng(0)
    step = StepInput(tokens=rng.integers(0, tiny_cfg.vocab_size, (1, 4), dtype=np.int32),
                     start_pos=np.zeros(1, np.int32), num_new=np.full(1, 4, np.int32),
                     page_table=np.arange(4, dtype=np.int32)[None])

    def traced(attention):
        step_fn = lambda p, k, s: forward(p, k, s, tiny_cfg, attention=attention)  # noqa: E731
        return str(jax.make_jaxpr(step_fn)(tiny_params, kv, step))
    assert "pallas_call" in traced("interpret")
    assert "pallas_call" not in traced("reference")


def test_docs_settings_md_is_the_generated_table():
    assert (ROOT / "docs" / "settings.md").read_text() == markdown()
    assert markdown().count("\n| `NITSUM_") == len(ALL_VARIABLES)


def test_python_m_prints_the_table_and_the_values_in_effect():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NITSUM_MOVE_WAIT": "block", "NITSUM_API_KEY": "s3cret"}
    table = subprocess.run([sys.executable, "-m", "nitsum_jax.settings", "--markdown"], env=env, cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    assert table == markdown()
    values = subprocess.run([sys.executable, "-m", "nitsum_jax.settings"], env=env, cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    assert "NITSUM_MOVE_WAIT=block" in values and "NITSUM_API_KEY=<hidden>" in values
    assert not any("s3cret" in line for line in values)
