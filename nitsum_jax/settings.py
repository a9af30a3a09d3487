"""Every `NITSUM_*` environment knob in one typed, validated object, read once at start-up.

`Settings.from_env()` reads and checks every variable (a bad value is refused with its name,
the value and what is accepted; an unknown `NITSUM_*` name is warned about, as a typo guard).
`settings()` is the process's copy, read the first time it is asked for and kept: components
take their values from it when they are built (a plan set, its lanes, the KV mover), so no
step reads the environment while it is traced or served. Components also take an explicit
`settings=` argument, for tests and tools that need other values than the environment's.
`python -m nitsum_jax.settings --markdown` prints the table of docs/settings.md.

A low layer: imports nothing of the project.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import math
import os
import typing
import warnings
from typing import Callable, Mapping

PREFIX = "NITSUM_"
# Read by the test suite itself, not by the library: known, so not warned about.
OUTSIDE_LIBRARY = ("NITSUM_SOAK_REQUESTS",)


class SettingsError(ValueError):
    """A `NITSUM_*` variable holds a value it does not accept."""


class UnknownSettingWarning(UserWarning):
    """A `NITSUM_*` variable that no setting reads (a typo, or a knob that was removed)."""


class ProfileWindow(typing.NamedTuple):
    """Seconds [start_s, start_s + length_s) of each benchmark run traced into out_dir."""

    out_dir: str
    start_s: float
    length_s: float


# -- parsers: str -> value, ValueError when the text is not accepted ----------------------------
def _choice(*values: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in values:
            raise ValueError(raw)
        return raw
    return parse


def _accepted_choices(values: tuple[str, ...]) -> str:
    if len(values) == 2:
        return f"{values[0]} or {values[1]}"
    return f"one of {', '.join(values[:-1])} or {values[-1]}"


def _whole(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        if not raw.isdigit() or int(raw) < minimum:
            raise ValueError(raw)
        return int(raw)
    return parse


def _seconds(raw: str) -> float:
    value = float(raw)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(raw)
    return value


def _bool(true: str, false: str) -> Callable[[str], bool]:
    def parse(raw: str) -> bool:
        if raw not in (true, false):
            raise ValueError(raw)
        return raw == true
    return parse


def _existing_file(raw: str) -> str:
    if not os.path.isfile(raw):
        raise ValueError(raw)
    return raw


def _bearer_key(raw: str) -> str:
    if not raw.isprintable() or any(c.isspace() for c in raw):
        raise ValueError("a key with spaces or control characters")
    return raw


def _typed_option(value: str) -> bool | int | str:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        return int(value)
    except ValueError:
        return value


def _xla_options(raw: str) -> tuple[tuple[str, bool | int | str], ...]:
    options = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not name or not sep:
            raise ValueError(item)
        options.append((name, _typed_option(value)))
    return tuple(options)


def _profile_window(raw: str) -> ProfileWindow:
    out_dir, *window = raw.split(":")
    if not out_dir or len(window) not in (0, 2):
        raise ValueError(raw)
    start_s, length_s = (float(x) for x in window) if window else (5.0, 2.0)
    if not (start_s >= 0 and length_s > 0):
        raise ValueError(raw)
    return ProfileWindow(out_dir, start_s, length_s)


def _knob(default, parse: Callable[[str], object], accepted: str, doc: str, *, secret: bool = False):
    """A field of `Settings`: its variable is NITSUM_<FIELD NAME>; `accepted` ends the error
    message of a bad value and fills the docs table."""
    return dataclasses.field(default=default, repr=not secret,
                             metadata={"parse": parse, "accepted": accepted, "doc": doc, "secret": secret})


_ATTENTION = ("auto", "kernel", "paged", "interpret", "reference")
_MOVE_COPY = ("auto", "kernel", "xla", "interpret")
_TRANSPORT = ("auto", "direct", "packed")
_DIRECT_MODE = ("push", "pull", "split")
_WAIT = ("spin", "block")


@dataclasses.dataclass(frozen=True)
class Settings:
    """One field per `NITSUM_*` variable; the defaults are what an unset variable means."""

    attention: str = _knob(
        "auto", _choice(*_ATTENTION), _accepted_choices(_ATTENTION),
        "paged-attention implementation of the model steps: auto is kernel on GPU and the "
        "plain-JAX reference elsewhere; kernel runs decode steps through the fused decode kernel "
        "(RoPE, KV write and attention in one) and other steps through the paged-attention kernel; "
        "paged runs every step through the paged-attention kernel (RoPE and the KV write as XLA "
        "ops: the earlier decode path, to compare); interpret runs kernel in Pallas interpret mode")
    move_copy: str = _knob(
        "auto", _choice(*_MOVE_COPY), _accepted_choices(_MOVE_COPY),
        "how KV-move programs copy pages: auto is kernel (Pallas page copies) on GPU, xla "
        "(gather / scatter) elsewhere; interpret runs the kernels in Pallas interpret mode")
    move_pieces: int = _knob(
        1, _whole(1), "a whole number >= 1",
        "a packed KV move is sent in up to this many pieces of pages, so the copy of one may "
        "overlap the transfer of the next; PlanSet(move_pieces=) overrides")
    move_sync: bool | None = _knob(
        None, _bool("1", "0"), "0 or 1 (unset: chosen per move)",
        "whether the host waits for a packed move's gather before sending it")
    move_transport: str = _knob(
        "auto", _choice(*_TRANSPORT), _accepted_choices(_TRANSPORT),
        "KV moves between lanes: direct copies GPU to GPU in one pass, packed gathers, sends and "
        "scatters; auto takes direct where its kernel builds; PlanSet(move_transport=) overrides")
    move_direct_mode: str = _knob(
        "push", _choice(*_DIRECT_MODE), _accepted_choices(_DIRECT_MODE),
        "which GPU runs the direct move kernel: the source (push), the destination (pull) or both "
        "halves (split)")
    move_engine_runs: int = _knob(
        4, _whole(0), "a whole number (0: never the copy engines)",
        "a direct move whose pages form at most this many runs of adjacent pages goes by the "
        "copy engines instead of the kernel")
    move_wait: str = _knob(
        "spin", _choice(*_WAIT), _accepted_choices(_WAIT),
        "how the host waits for a direct move's streams: poll them (spin) or block")
    xla_options: bool = _knob(
        True, _bool("on", "off"), "on or off",
        "compile the model steps on GPU with the project's XLA options (off: XLA's defaults)")
    xla_extra_options: tuple[tuple[str, bool | int | str], ...] = _knob(
        (), _xla_options, "name=value,... (true / false / integers are typed)",
        "more XLA options for the model steps on GPU, for experiments (bench/gpu_step.py)")
    nvrtc: str | None = _knob(
        None, _existing_file, "the path of an existing file",
        "the libnvrtc shared library to load before the CUDA wheels' and the system's")
    gil_switch_s: float = _knob(
        0.0005, _seconds, "seconds > 0",
        "the interpreter's thread switch interval while lanes run on accelerators, so a lane "
        "whose step finished gets the GIL back soon")
    chain_steps: int | None = _knob(
        None, _whole(0), "a whole number (unset: 64 for one-GPU lanes on accelerators, else 0)",
        "at most this many decode steps dispatched ahead of their predecessor's tokens, per lane")
    bench_profile: ProfileWindow | None = _knob(
        None, _profile_window, "DIR or DIR:START:SECONDS (default window 5:2)",
        "trace that window of each benchmark run with jax.profiler into DIR/<config>-<n> "
        "(read as each run starts; diagnostics: a traced run's figures are not benchmark figures)")
    api_key: str | None = _knob(
        None, _bearer_key, "a key without spaces or control characters",
        "the bearer key the clients (nitsum-jax client, bench --target) send by default",
        secret=True)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Every variable of `environ` (None: `os.environ`) read and checked; an empty value counts
        as unset. Raises SettingsError naming each bad variable, its value and what it accepts."""
        environ = os.environ if environ is None else environ
        values, errors = {}, []
        for f in dataclasses.fields(cls):
            name = variable(f.name)
            raw = environ.get(name, "")
            if raw == "":
                continue
            try:
                values[f.name] = f.metadata["parse"](raw)
            except ValueError:
                shown = "<hidden>" if f.metadata["secret"] else repr(raw)
                errors.append(f"{name}={shown}; expected {f.metadata['accepted']}")
        if errors:
            raise SettingsError("\n".join(errors))
        _warn_unknown(environ)
        return cls(**values)


def variable(field_name: str) -> str:
    """The environment variable of a `Settings` field."""
    return PREFIX + field_name.upper()


def _warn_unknown(environ: Mapping[str, str]) -> None:
    known = [variable(f.name) for f in dataclasses.fields(Settings)]
    for name in sorted(environ):
        if name.startswith(PREFIX) and name not in known and name not in OUTSIDE_LIBRARY:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            warnings.warn(f"{name} is not a nitsum-jax setting{hint}; see docs/settings.md",
                          UnknownSettingWarning, stacklevel=3)


@functools.cache
def settings() -> Settings:
    """The process's settings: read from the environment the first time, then kept."""
    return Settings.from_env()


def reload_settings() -> Settings:
    """Read the environment again (tests, tools that change it between start-ups)."""
    settings.cache_clear()
    return settings()


def markdown() -> str:
    """docs/settings.md: one row per variable, from the dataclass (tests check it is current)."""
    lines = ["# Settings", "",
             "Every `NITSUM_*` environment variable nitsum-jax reads. They are read once, when the",
             "process first builds a component (`nitsum_jax.settings.settings()`), and each is checked:",
             "a bad value stops start-up with an error naming the variable, the value and what it",
             "accepts; an unknown `NITSUM_*` name is warned about. An empty value counts as unset.",
             "Components built with `settings=` take those values instead of the environment's.",
             "Generated by `python -m nitsum_jax.settings --markdown`.", "",
             "| variable | type | default | accepted | what it does |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(Settings):
        default = "unset" if f.default is None or f.default == () else f"`{f.default}`"
        if isinstance(f.default, bool):
            default = "`on`" if f.default else "`off`"
        cells = (f"`{variable(f.name)}`", f"`{f.type}`", default, f.metadata["accepted"], f.metadata["doc"])
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nitsum_jax.settings",
                                     description="The NITSUM_* settings: their table, or the values in effect.")
    parser.add_argument("--markdown", action="store_true", help="print the table of docs/settings.md")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(), end="")
        return
    for f in dataclasses.fields(Settings):
        value = getattr(settings(), f.name)
        shown = "<hidden>" if f.metadata["secret"] and value is not None else value
        print(f"{variable(f.name)}={shown}")


if __name__ == "__main__":
    main()
