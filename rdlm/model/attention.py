"""Masks and the attention backends: XLA softmax attention, cuDNN flash attention (GPU) or splash (TPU).

The XLA path computes causal self-attention in query blocks: block i only multiplies against the
keys up to its own end (and, with a local window, from the window's start), so the key blocks above
the diagonal are never computed, and heads-major operands keep the batched matmuls efficient on CPU.
"""

import jax
import jax.numpy as jnp

# Finite, so that a fully masked row gives a uniform (and ignored) distribution instead of NaN.
_MASKED = -1e30
# Query blocks of the XLA path: at least this many queries each, and at most _MAX_BLOCKS blocks.
_MIN_BLOCK, _MAX_BLOCKS = 64, 8


def block_mask(segment_ids_BS: jax.Array, window: int | None, rows: slice, cols: slice) -> jax.Array:
    """[B, rows, cols] bool of query positions `rows` against key positions `cols`: causal, within one
    segment (document or padding), optionally within a local window."""
    distance = jnp.arange(rows.start, rows.stop)[:, None] - jnp.arange(cols.start, cols.stop)[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    return allowed[None] & (segment_ids_BS[:, rows, None] == segment_ids_BS[:, None, cols])


def self_mask(segment_ids_BS: jax.Array, window: int | None) -> jax.Array:
    """[B, S, S] bool: causal, within one segment, optionally a local window."""
    S = segment_ids_BS.shape[1]
    return block_mask(segment_ids_BS, window, slice(0, S), slice(0, S))


def query_block(seq_len: int) -> int:
    """Queries per block: one block for short sequences, at most _MAX_BLOCKS blocks for long ones."""
    return max(_MIN_BLOCK, -(-seq_len // _MAX_BLOCKS))


def _softmax_attention(q_BHSK, k_BHTK, v_BHTK, mask_BST):
    """Queries pre-scaled by K^-0.5 (one multiply per query element rather than per score)."""
    logits = jnp.einsum("bhsk,bhtk->bhst", q_BHSK, k_BHTK, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(jnp.where(mask_BST[:, None], logits, _MASKED), axis=-1).astype(v_BHTK.dtype)
    return jnp.einsum("bhst,bhtk->bhsk", probs, v_BHTK)


def _xla_self_attention(q_BSHK, k_BSHK, v_BSHK, segment_ids_BS, window: int | None):
    S = q_BSHK.shape[1]
    q_BSHK = q_BSHK * jnp.asarray(q_BSHK.shape[-1] ** -0.5, q_BSHK.dtype)
    q_BHSK, k_BHSK, v_BHSK = (x.swapaxes(1, 2) for x in (q_BSHK, k_BSHK, v_BSHK))
    block = query_block(S)
    out = []
    for start in range(0, S, block):
        rows = slice(start, min(start + block, S))
        cols = slice(0 if window is None else max(0, start - window + 1), rows.stop)
        mask = block_mask(segment_ids_BS, window, rows, cols)
        out.append(_softmax_attention(q_BHSK[:, :, rows], k_BHSK[:, :, cols], v_BHSK[:, :, cols], mask))
    return jnp.concatenate(out, axis=2).swapaxes(1, 2)


def _xla_attention_with_past(q_BSHK, k_BSHK, v_BSHK, mask_BSS, past):
    """Queries over cached keys (past.mask_BST) and their own keys (mask_BSS), in one softmax."""
    scale = q_BSHK.shape[-1] ** -0.5
    logits_BHSS = jnp.einsum("bshk,bthk->bhst", q_BSHK, k_BSHK, preferred_element_type=jnp.float32) * scale
    logits_BHSS = jnp.where(mask_BSS[:, None], logits_BHSS, _MASKED)
    past_BHST = jnp.einsum("bshk,bhkt->bhst", q_BSHK, past.k_BHKT, preferred_element_type=jnp.float32) * scale
    past_BHST = jnp.where(past.mask_BST[:, None], past_BHST, _MASKED)
    T = past_BHST.shape[-1]
    probs = jax.nn.softmax(jnp.concatenate([past_BHST, logits_BHSS], axis=-1), axis=-1).astype(v_BSHK.dtype)
    return jnp.einsum("bhst,bhtk->bshk", probs[..., :T], past.v_BHTK) + jnp.einsum(
        "bhst,bthk->bshk", probs[..., T:], v_BSHK
    )


def attend(q_BSHK, k_BSHK, v_BSHK, segment_ids_BS, window: int | None, past, impl: str):
    """Softmax attention of queries over their own keys (causal, same segment, window) and cached keys.

    Decoding (`past` given) always runs the XLA path; the flash backends serve the full-sequence passes.
    """
    if past is not None:
        return _xla_attention_with_past(q_BSHK, k_BSHK, v_BSHK, self_mask(segment_ids_BS, window), past)
    if impl == "splash":
        from rdlm.model import splash  # imports Pallas only when selected

        return splash.attention(q_BSHK, k_BSHK, v_BSHK, segment_ids_BS, window)
    if impl == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError(
                f"model.attention_impl='cudnn' needs a GPU (this backend is {jax.default_backend()}); use 'xla' or, "
                "on TPU, 'splash'."
            )
        if q_BSHK.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"model.attention_impl='cudnn' needs model.dtype bfloat16 or float16; got {q_BSHK.dtype}.")
        mask = self_mask(segment_ids_BS, window)[:, None]
        return jax.nn.dot_product_attention(q_BSHK, k_BSHK, v_BSHK, mask=mask, implementation="cudnn")
    return _xla_self_attention(q_BSHK, k_BSHK, v_BSHK, segment_ids_BS, window)
