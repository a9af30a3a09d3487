"""Hugging Face Llama folder -> our checkpoint, streamed tensor by tensor.

The stacked target arrays are allocated once (in the target dtype) and each safetensors
tensor is read, checked, transposed into place and dropped, so the model is never held twice.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from checkpoints_tools.store import CheckpointError, write_checkpoint
from nitsum_jax.config import ConfigError, LlamaConfig
from nitsum_jax.model import declare, map_decls
from nitsum_jax.quant import CONTRACTED, Fp8Weight, numpy_quantize
from nitsum_jax.tokenizer import TOKENIZER_FILE

NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
# Tensors a Hugging Face folder may carry that the model derives itself (older transformers saved them).
DERIVED_SUFFIXES = (".rotary_emb.inv_freq",)
log = logging.getLogger("checkpoints_tools")


def _open(f: Path):
    """`safe_open`, a damaged file being a `CheckpointError` naming it (safetensors raises its own
    SafetensorError, or OSError on a short read)."""
    try:
        return safe_open(f, framework="numpy")
    except Exception as e:  # noqa: BLE001 - safetensors_rust.SafetensorError is not importable by name
        raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None


def _read(handle, f: Path, name: str) -> np.ndarray:
    try:
        return handle.get_tensor(name)
    except Exception as e:  # noqa: BLE001 - as in `_open`: a truncated or damaged file
        raise CheckpointError(f"{f}: tensor {name!r} cannot be read ({e})") from None


def read_hf_config(src: Path) -> LlamaConfig:
    path = Path(src) / "config.json"
    if not Path(src).is_dir():
        raise CheckpointError(f"{src}: source folder not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; expected a Hugging Face Llama folder")
    try:
        return LlamaConfig.from_hf(json.loads(path.read_text()), source=str(path))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def tensor_files(src: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index when sharded."""
    src = Path(src)
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = {name: src / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in {index.name} but not found")
        return files
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{src}: no *.safetensors files (and no model.safetensors.index.json)")
    files: dict[str, Path] = {}
    for f in shards:
        with _open(f) as handle:
            for name in handle.keys():
                files[name] = f
    return files


def _hf_layout(cfg: LlamaConfig):
    """(hf tensor name, our array name, layer index or None, hf shape, transform to our shape)."""
    D, N, K, H, F, V = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    # HF Linear weights are [out, in]; ours are [in, out] with heads split out.
    yield "model.embed_tokens.weight", "embed", None, (V, D), lambda w: w
    yield "model.norm.weight", "final_norm", None, (D,), lambda w: w
    if not cfg.tie_embeddings:
        yield "lm_head.weight", "lm_head", None, (V, D), lambda w: w.T
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", "attn_norm", i, (D,), lambda w: w
        yield p + "self_attn.q_proj.weight", "wq", i, (N * H, D), lambda w: w.T.reshape(D, N, H)
        yield p + "self_attn.k_proj.weight", "wk", i, (K * H, D), lambda w: w.T.reshape(D, K, H)
        yield p + "self_attn.v_proj.weight", "wv", i, (K * H, D), lambda w: w.T.reshape(D, K, H)
        yield p + "self_attn.o_proj.weight", "wo", i, (D, N * H), lambda w: w.T.reshape(N, H, D)
        yield p + "post_attention_layernorm.weight", "mlp_norm", i, (D,), lambda w: w
        yield p + "mlp.gate_proj.weight", "w_gate", i, (F, D), lambda w: w.T
        yield p + "mlp.up_proj.weight", "w_up", i, (F, D), lambda w: w.T
        yield p + "mlp.down_proj.weight", "w_down", i, (D, F), lambda w: w.T


def _check_tokenizer(src: Path, cfg: LlamaConfig) -> Path | None:
    path = Path(src) / TOKENIZER_FILE
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        size = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # the library raises a bare Exception on malformed files
        raise CheckpointError(f"{path}: cannot be read by `tokenizers` ({e})") from None
    if size > cfg.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {size} tokens but config.json vocab_size is "
                              f"{cfg.vocab_size}; they must match (tokenizer <= vocab_size)")
    return path


def _store(target, value: np.ndarray, name: str, layer: int | None) -> None:
    """Write one converted tensor into its stacked array, quantizing it for an fp8 target (a
    layer's scales are those of its own output channels, so layer by layer is exact)."""
    if isinstance(target, Fp8Weight):
        contracted = tuple(a - 1 for a in CONTRACTED[name])  # the layer axis is not in `value`
        q, scale = numpy_quantize(value, contracted)
        target.q[layer], target.scale[layer] = q, scale
    elif layer is None:
        target[...] = value
    else:
        target[layer] = value


def unused_tensors(files: dict[str, Path], layout: list, cfg: LlamaConfig) -> list[str]:
    """Tensors of the source that the conversion would leave out, by name (derived buffers aside).
    An `lm_head.weight` in a folder whose config ties the embeddings is one: the converted model
    would use `embed_tokens` instead of it."""
    used = {name for name, *_ in layout}
    return sorted(n for n in files if n not in used and not n.endswith(DERIVED_SUFFIXES))


def convert_hf(src: Path, dst: Path, dtype: str | None = None, progress: bool = True,
               allow_unused: bool = False) -> LlamaConfig:
    """Convert a Hugging Face Llama folder at `src` into a new checkpoint folder `dst`. Tensors the
    model does not use are refused by name, or with `allow_unused` left out with a warning.
    `dtype="fp8"`: the linear weights in fp8 with per-output-channel scales, the rest bf16."""
    src = Path(src)
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst}: destination exists and is not empty; choose a new folder")
    cfg = read_hf_config(src)
    weights = "fp8" if dtype == "fp8" else "bf16"
    if dtype == "fp8":
        dtype = "bfloat16"
    if dtype is not None:
        try:
            cfg = cfg.replace(dtype={"bf16": "bfloat16", "fp32": "float32"}.get(dtype, dtype))
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
    tokenizer_json = _check_tokenizer(src, cfg)
    tokenizer_config = _check_tokenizer_config(src)
    files = tensor_files(src)
    np_dtype = NP_DTYPES[cfg.dtype]
    arrays = map_decls(lambda d: np.empty(d.shape, np_dtype if d.dtype is None else jnp.dtype(d.dtype)),
                       declare(cfg, weights))
    layout = list(_hf_layout(cfg))
    unused = unused_tensors(files, layout, cfg)
    if unused:
        tied = " (config.json ties the embeddings: tie_word_embeddings)" if cfg.tie_embeddings else ""
        message = (f"{src}: {len(unused)} tensors the model does not use{tied}: "
                   f"{', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}")
        if not allow_unused:
            raise CheckpointError(f"{message}; pass --allow-unused to convert without them")
        log.warning("%s; left out", message)
    handles: dict[Path, object] = {}
    try:
        for name, ours, layer, hf_shape, to_ours in tqdm(layout, desc="convert", unit="tensor",
                                                                     disable=not progress):
            if name not in files:
                raise CheckpointError(f"{src}: tensor {name!r} not found in any safetensors file "
                                      f"({sorted({f.name for f in files.values()})})")
            f = files[name]
            if f not in handles:
                handles[f] = _open(f).__enter__()
            tensor = _read(handles[f], f, name)
            if tuple(tensor.shape) != hf_shape:
                raise CheckpointError(f"{f}: tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                                      f"{hf_shape} from config.json")
            target = getattr(arrays, ours) if hasattr(arrays, ours) else getattr(arrays.chunks[0], ours)
            value = to_ours(tensor).astype(np_dtype)
            _store(target, value, ours, layer)
            del tensor, value
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    write_checkpoint(dst, cfg, arrays, tokenizer_json=tokenizer_json)
    if tokenizer_config is not None:
        shutil.copyfile(tokenizer_config, dst / tokenizer_config.name)
    return cfg


def _check_tokenizer_config(src: Path) -> Path | None:
    """tokenizer_config.json (its chat_template and special tokens: nitsum_jax/chat.py) if the
    source has one; a template that does not compile fails the conversion before any weight is read."""
    from nitsum_jax.chat import TOKENIZER_CONFIG_FILE, ChatTemplate, ChatTemplateError

    path = Path(src) / TOKENIZER_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        ChatTemplate.from_tokenizer_config(path)
    except ChatTemplateError as e:
        raise CheckpointError(str(e)) from None
    return path
