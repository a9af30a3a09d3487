"""Small random Hugging Face Llama models saved with `save_pretrained`: the parity reference."""

from __future__ import annotations

from pathlib import Path

from nitsum_jax.tokenizer import TextTokenizer

VOCAB = 264  # the byte-level tokenizer's size


def make_hf_llama(dst: Path, *, tie: bool, seed: int = 0, num_layers: int = 2):
    """GQA (8 heads over 2 kv heads), llama3 rope scaling, fp32, safetensors; returns the torch model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=num_layers,
        num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=256, eos_token_id=257,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
        rope_theta=10000.0, torch_dtype="float32")
    model = LlamaForCausalLM(config).eval()
    # Default init leaves norms at exactly one; perturb them so a missed norm weight shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(dst, safe_serialization=True)
    TextTokenizer.byte_level().save(dst)
    return model
