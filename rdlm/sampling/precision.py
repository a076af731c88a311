"""Inference in another precision: the model config's compute and storage dtypes, and the params cast to them.

huginn-0125 ships bf16 weights and its model card's benchmarks ran in pure bf16. Norms, RoPE, softmax
and the head's logits stay float32 inside the layers (rdlm.model.layers), as in training.
"""

import jax
import jax.numpy as jnp

from rdlm.model.config import ModelConfig

DTYPES = ("float32", "bfloat16")


def with_dtype(config: ModelConfig, params, dtype: str) -> tuple[ModelConfig, dict]:
    """(config computing and storing in `dtype`, params cast to it); float32 leaves the model as it is."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
    if config.dtype == dtype and config.param_dtype == dtype:
        return config, params
    cast = jnp.dtype(dtype)
    params = jax.tree.map(lambda x: x.astype(cast) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    return config.replace(dtype=dtype, param_dtype=dtype), params
