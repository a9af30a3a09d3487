"""Where a model comes from: a checkpoint folder, or a preset with random weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from nitsum_jax.config import LlamaConfig, preset
from nitsum_jax.model import Params, init_params
from nitsum_jax.quant import with_weights
from nitsum_jax.tokenizer import TextTokenizer


@dataclasses.dataclass
class LoadedModel:
    cfg: LlamaConfig
    params: Params
    tokenizer: TextTokenizer | None
    name: str


def load_model(checkpoint: str | Path | None = None, preset_name: str = "tiny", seed: int = 0,
               dtype: str | None = None, shardings: Params | None = None, weights: str = "auto") -> LoadedModel:
    """Load `checkpoint` if given, else random weights for `preset_name` (seeded). `weights`
    ("auto", "bf16", "fp8"): quantize the linear weights to fp8, or upcast an fp8 checkpoint's;
    "auto" keeps them as stored."""
    if checkpoint is not None:
        from checkpoints_tools.store import load_params, load_tokenizer, read_config

        cfg = read_config(Path(checkpoint))
        params = with_weights(load_params(Path(checkpoint), cfg, shardings), weights)
        return LoadedModel(cfg, params, load_tokenizer(Path(checkpoint), cfg), str(checkpoint))
    cfg = preset(preset_name)
    if dtype:
        cfg = cfg.replace(dtype={"bf16": "bfloat16", "fp32": "float32"}.get(dtype, dtype))
    params = with_weights(init_params(cfg, jax.random.key(seed)), weights)
    if shardings is not None:
        params = jax.device_put(params, shardings)
    tokenizer = TextTokenizer.byte_level() if preset_name == "tiny" else None
    return LoadedModel(cfg, params, tokenizer, f"preset:{preset_name}")
