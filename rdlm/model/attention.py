"""Masks and the attention kernel: plain XLA softmax attention, or cuDNN flash attention on GPU."""

import jax
import jax.numpy as jnp

# Finite, so that a fully masked row gives a uniform (and ignored) distribution instead of NaN.
_MASKED = -1e30


def self_mask(segment_ids_BS: jax.Array, window: int | None) -> jax.Array:
    """[B, S, S] bool: causal, within one segment (document or padding), optionally a local window."""
    S = segment_ids_BS.shape[1]
    idx = jnp.arange(S)
    distance_SS = idx[:, None] - idx[None, :]
    allowed_SS = distance_SS >= 0
    if window is not None:
        allowed_SS &= distance_SS < window
    return allowed_SS[None] & (segment_ids_BS[:, :, None] == segment_ids_BS[:, None, :])


def _xla_attention(q_BSHK, k_BSHK, v_BSHK, mask_BSS, past):
    scale = q_BSHK.shape[-1] ** -0.5
    logits_BHSS = jnp.einsum("bshk,bthk->bhst", q_BSHK, k_BSHK, preferred_element_type=jnp.float32) * scale
    logits_BHSS = jnp.where(mask_BSS[:, None], logits_BHSS, _MASKED)
    if past is None:
        probs = jax.nn.softmax(logits_BHSS, axis=-1).astype(v_BSHK.dtype)
        return jnp.einsum("bhst,bthk->bshk", probs, v_BSHK)
    past_BHST = jnp.einsum("bshk,bthk->bhst", q_BSHK, past.k_BTHK, preferred_element_type=jnp.float32) * scale
    past_BHST = jnp.where(past.mask_BST[:, None], past_BHST, _MASKED)
    T = past_BHST.shape[-1]
    probs = jax.nn.softmax(jnp.concatenate([past_BHST, logits_BHSS], axis=-1), axis=-1).astype(v_BSHK.dtype)
    return jnp.einsum("bhst,bthk->bshk", probs[..., :T], past.v_BTHK) + jnp.einsum(
        "bhst,bthk->bshk", probs[..., T:], v_BSHK
    )


def attend(q_BSHK, k_BSHK, v_BSHK, mask_BSS, past, impl: str):
    """Softmax attention of queries over their own keys (masked) and, when decoding, cached keys."""
    if impl == "cudnn" and past is None:
        if jax.default_backend() != "gpu":
            raise ValueError("model.attention_impl='cudnn' needs a GPU; use 'xla' on CPU/TPU.")
        return jax.nn.dot_product_attention(q_BSHK, k_BSHK, v_BSHK, mask=mask_BSS[:, None], implementation="cudnn")
    return _xla_attention(q_BSHK, k_BSHK, v_BSHK, mask_BSS, past)
