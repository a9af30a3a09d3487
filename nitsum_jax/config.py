"""Model configuration: one frozen, hashable dataclass, so it can be a static `jit` argument.

Presets carry the real shapes of published Llama checkpoints (weights are random unless a
checkpoint is loaded). `LlamaConfig.from_hf` reads a Hugging Face `config.json` in both the
Llama 3.x layout (`rope_theta` / `rope_scaling` at the top level) and the transformers 5
layout (`rope_parameters`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


# dtype names a config may give -> the JAX dtype's name (JAX is imported only when one is asked for)
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


class ConfigError(ValueError):
    """A configuration value is missing, unsupported or out of range."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int
    max_seq_len: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_dim",
                     "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                              f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def jnp_dtype(self):
        import jax.numpy as jnp

        return getattr(jnp, DTYPES[self.dtype])

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config keys: {sorted(unknown)}")
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        return cls(**d)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "LlamaConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "LlamaConfig":
        """Build from a Hugging Face Llama `config.json` dict; `source` names it in errors."""
        archs = hf.get("architectures") or ["LlamaForCausalLM"]
        if hf.get("model_type", "llama") != "llama" or "LlamaForCausalLM" not in archs:
            raise ConfigError(f"{source}: unsupported architecture model_type={hf.get('model_type')!r} "
                              f"architectures={archs}; expected model_type 'llama' / LlamaForCausalLM")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {hf['hidden_act']!r} unsupported; expected 'silu'")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ConfigError(f"{source}: {flag}=true is unsupported; Llama checkpoints have no biases")
        try:
            dim, heads = hf["hidden_size"], hf["num_attention_heads"]
            # transformers 5 nests rope settings under `rope_parameters`; Llama 3.x files keep
            # `rope_theta` and `rope_scaling` at the top level.
            rope = dict(hf.get("rope_parameters") or {})
            theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
            scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
            rope_scaling = None
            if scaling:
                kind = scaling.get("rope_type", scaling.get("type"))
                if kind == "llama3":
                    rope_scaling = RopeScaling(
                        factor=float(scaling["factor"]),
                        low_freq_factor=float(scaling["low_freq_factor"]),
                        high_freq_factor=float(scaling["high_freq_factor"]),
                        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
                elif kind not in (None, "default"):
                    raise ConfigError(f"{source}: rope_type {kind!r} unsupported; expected 'llama3' or 'default'")
            eos = hf.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "bfloat16"}.get(
                str(hf.get("torch_dtype", hf.get("dtype", "bfloat16"))), "bfloat16")
            return cls(
                vocab_size=hf["vocab_size"], dim=dim, num_layers=hf["num_hidden_layers"], num_heads=heads,
                num_kv_heads=hf.get("num_key_value_heads", heads), head_dim=hf.get("head_dim") or dim // heads,
                ffn_dim=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
                rope_theta=float(theta), rope_scaling=rope_scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dtype=dtype,
                bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids)
        except KeyError as e:
            raise ConfigError(f"{source}: missing required key {e.args[0]!r}") from None


_LLAMA31_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=8192)
_LLAMA32_SCALING = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=8192)

PRESETS: dict[str, LlamaConfig] = {
    # Small enough for CPU tests; 8 KV heads so that TP up to 8 shards heads evenly.
    # Vocabulary = the byte-level tokenizer's 256 bytes + 3 specials, padded to 264.
    "tiny": LlamaConfig(vocab_size=264, dim=128, num_layers=2, num_heads=8, num_kv_heads=8, head_dim=16,
                        ffn_dim=256, max_seq_len=1024, rope_theta=10000.0, norm_eps=1e-5,
                        tie_embeddings=False, dtype="float32", bos_token_id=256, eos_token_ids=(257,)),
    "llama-3.2-1b": LlamaConfig(vocab_size=128256, dim=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                                head_dim=64, ffn_dim=8192, max_seq_len=131072, rope_theta=500000.0,
                                rope_scaling=_LLAMA32_SCALING, tie_embeddings=True, dtype="bfloat16",
                                bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
    "llama-3.1-8b": LlamaConfig(vocab_size=128256, dim=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                                head_dim=128, ffn_dim=14336, max_seq_len=131072, rope_theta=500000.0,
                                rope_scaling=_LLAMA31_SCALING, dtype="bfloat16",
                                bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
    "llama-3.1-70b": LlamaConfig(vocab_size=128256, dim=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                                 head_dim=128, ffn_dim=28672, max_seq_len=131072, rope_theta=500000.0,
                                 rope_scaling=_LLAMA31_SCALING, dtype="bfloat16",
                                 bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
}


def preset(name: str) -> LlamaConfig:
    """The config of a named preset ("tiny", "llama-3.2-1b", "llama-3.1-8b", "llama-3.1-70b"); ConfigError otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
