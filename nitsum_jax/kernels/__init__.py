"""Hand-written device kernels, each beside the plain-JAX reference it must match."""

from nitsum_jax.kernels.dispatch import paged_attention
from nitsum_jax.kernels.paged_attention import paged_attention_kernel

__all__ = ["paged_attention", "paged_attention_kernel"]
