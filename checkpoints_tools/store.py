"""Our checkpoint format: a folder with `nitsum_config.json`, `tokenizer.json` and an Orbax
`params/` tree. Writes are atomic (a temporary sibling folder renamed at the end); reads restore
straight into the requested shardings, so a lane loads only its own shards."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import logging
import tempfile
import time
from pathlib import Path
from typing import Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from nitsum_jax.config import LlamaConfig
from nitsum_jax.model import Params, abstract_params, declare, map_decls, param_count
from nitsum_jax.quant import weights_format as params_format
from nitsum_jax.tokenizer import TOKENIZER_FILE, TextTokenizer

log = logging.getLogger("checkpoints_tools")

CONFIG_FILE = "nitsum_config.json"
PARAMS_DIR = "params"


class CheckpointError(ValueError):
    """A checkpoint or source folder is missing, malformed or does not match its config."""


@contextlib.contextmanager
def atomic_dir(dst: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `dst`; rename it to `dst` only if the block succeeds."""
    dst = Path(dst).absolute()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst}: destination exists and is not empty; choose a new folder")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield tmp
        # mkdtemp makes it drwx------ (private while partial); the finished folder gets the usual mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_checkpoint(dst: Path, cfg: LlamaConfig, params: Params, tokenizer_json: Path | None = None,
                     tokenizer: TextTokenizer | None = None) -> Path:
    """Write config, tokenizer and params (NumPy or jax arrays) to a new folder `dst`."""
    with atomic_dir(dst) as tmp:
        cfg.save(tmp / CONFIG_FILE)
        if tokenizer_json is not None:
            shutil.copyfile(tokenizer_json, tmp / TOKENIZER_FILE)
        elif tokenizer is not None:
            tokenizer.save(tmp)
        t0 = time.monotonic()
        log.info("writing %d parameters to %s", param_count(cfg), dst)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / PARAMS_DIR, params)
        checkpointer.wait_until_finished()
        log.info("wrote %s in %.1fs", dst, time.monotonic() - t0)
    return Path(dst)


def read_config(directory: Path) -> LlamaConfig:
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint folder not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; is {directory} a nitsum-jax checkpoint "
                              f"(made by `nitsum-ckpt convert-hf` or `nitsum-ckpt init`)?")
    try:
        return LlamaConfig.load(path)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def stored_arrays(directory: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Name -> (shape, dtype) of every stored array, read from Orbax metadata (no data loaded)."""
    path = Path(directory).absolute() / PARAMS_DIR
    if not path.is_dir():
        raise CheckpointError(f"{path}: parameter folder not found")
    tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k, simple=True, separator="."): (tuple(m.shape), np.dtype(m.dtype))
            for k, m in flat if m is not None}


def expected_arrays(cfg: LlamaConfig, weights: str = "bf16") -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(cfg, weights=weights))[0]
    return {jax.tree_util.keystr(k, simple=True, separator="."): tuple(a.shape) for k, a in flat}


def stored_format(stored: dict[str, tuple[tuple[int, ...], np.dtype]]) -> str:
    """"fp8" when the linear weights are stored as fp8 values and scales (`nitsum_jax.quant`)."""
    return "fp8" if "chunks.0.wq.scale" in stored else "bf16"


def checkpoint_format(directory: Path) -> str:
    """The weight format of a checkpoint, from its Orbax metadata (no data read)."""
    return stored_format(stored_arrays(directory))


def check_against_config(directory: Path, cfg: LlamaConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    stored = stored_arrays(directory)
    expected = expected_arrays(cfg, stored_format(stored))
    for name, shape in expected.items():
        if name not in stored:
            raise CheckpointError(f"{Path(directory) / PARAMS_DIR}: array {name!r} missing; "
                                  f"expected shape {shape} from {CONFIG_FILE}")
        if stored[name][0] != shape:
            raise CheckpointError(f"{Path(directory) / PARAMS_DIR}: array {name!r} has shape {stored[name][0]}, "
                                  f"expected {shape} from {CONFIG_FILE}")
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise CheckpointError(f"{Path(directory) / PARAMS_DIR}: unexpected arrays {extra} for "
                              f"tie_embeddings={cfg.tie_embeddings}")
    return stored


def load_params(directory: Path, cfg: LlamaConfig, shardings: Params | None = None) -> Params:
    """Restore params into `shardings` (a Params tree of `jax.sharding.Sharding`), default one
    device. An fp8 checkpoint restores as fp8 (`Fp8Weight`s); its `shardings` must be of that form."""
    weights = stored_format(check_against_config(directory, cfg))
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = map_decls(lambda _: device, declare(cfg, weights))
    elif params_format(shardings) != weights:
        raise CheckpointError(f"{directory}: stores {weights} weights but the shardings given are for "
                              f"{params_format(shardings)} weights")
    target = abstract_params(cfg, shardings, weights)
    t0 = time.monotonic()
    log.info("loading %d parameters (%s, %s weights) from %s", param_count(cfg), cfg.dtype, weights, directory)
    params = ocp.StandardCheckpointer().restore(Path(directory).absolute() / PARAMS_DIR, target)
    log.info("loaded %s in %.1fs", directory, time.monotonic() - t0)
    return params


def load_tokenizer(directory: Path, cfg: LlamaConfig) -> TextTokenizer | None:
    if not (Path(directory) / TOKENIZER_FILE).is_file():
        return None
    return TextTokenizer.from_dir(directory, cfg.bos_token_id, cfg.eos_token_ids)


def describe(directory: Path) -> dict:
    """What `nitsum-ckpt inspect` prints: config, parameter count, bytes, dtypes."""
    cfg = read_config(directory)
    stored = check_against_config(directory, cfg)
    total_bytes = sum(int(np.prod(s)) * d.itemsize for s, d in stored.values())
    dtypes = sorted({str(d) for _, d in stored.values()})
    return {
        "path": str(Path(directory).absolute()),
        "config": cfg.to_dict(),
        "parameters": param_count(cfg),
        "bytes": total_bytes,
        "dtypes": dtypes,
        "weights": stored_format(stored),
        "tokenizer": (Path(directory) / TOKENIZER_FILE).is_file(),
        "arrays": {k: {"shape": list(s), "dtype": str(d)} for k, (s, d) in sorted(stored.items())},
    }
