"""TPU splash attention (a Pallas flash-attention kernel) as the `model.attention_impl='splash'` backend.

Causal, optionally within a local window, and masked to each query's own segment (packed documents
and padding) through the kernel's segment ids. On a TPU the kernel is compiled by Mosaic; on any
other backend it runs in Pallas interpret mode, which is exact but slow (for tests only).
Under a multi-device mesh the kernel runs per shard (`jax.shard_map`): batch and heads split as the
logical-axis rules split activations, the sequence stays whole.
"""

import functools

import flax.linen as nn
import jax
from absl import logging
from jax.experimental.pallas.ops.tpu import splash_attention as sa

BLOCKS = (512, 256, 128)  # query/key tiles, largest first (512 is MaxText's default; the kernel needs x128)
_SPEC = ("activation_batch", "activation_length", "heads", "head_dim")


def block_size(seq_len: int) -> int:
    """The largest tile of BLOCKS that divides `seq_len` (one clear sentence if none does)."""
    for block in BLOCKS:
        if seq_len % block == 0:
            return block
    raise ValueError(
        f"model.attention_impl='splash' needs a sequence length that is a multiple of {BLOCKS[-1]}; got {seq_len}. "
        "Pad the batch or use attention_impl='xla'."
    )


@functools.lru_cache(maxsize=32)
def _kernel(seq_len: int, num_heads: int, window: int | None, interpret: bool):
    """The splash kernel for one shape and mask (its mask tables are built once, on the host)."""
    shape = (seq_len, seq_len)
    mask = sa.CausalMask(shape) if window is None else sa.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    b = block_size(seq_len)
    blocks = sa.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b,
        block_q_dq=b, block_kv_dq=b,
    )
    multi = sa.MultiHeadMask([mask] * num_heads)
    with jax.ensure_compile_time_eval():  # concrete mask tables, even when first built inside a trace
        return sa.make_splash_mha(multi, head_shards=1, q_seq_shards=1, block_sizes=blocks, interpret=interpret)


def _local_attention(q_BSHK, k_BSHK, v_BSHK, segment_ids_BS, window: int | None, interpret: bool):
    B, S, H, K = q_BSHK.shape
    kernel = _kernel(S, H, window, interpret)
    q_BHSK, k_BHSK, v_BHSK = (x.swapaxes(1, 2) for x in (q_BSHK * K**-0.5, k_BSHK, v_BSHK))
    segments = sa.SegmentIds(q=segment_ids_BS, kv=segment_ids_BS)
    out_BHSK = jax.vmap(kernel)(q_BHSK, k_BHSK, v_BHSK, segment_ids=segments)
    return out_BHSK.swapaxes(1, 2)


@functools.cache
def _warn_interpret(backend: str) -> None:
    logging.warning("attention_impl='splash' runs in Pallas interpret mode on %s: exact but slow.", backend)


def attention(q_BSHK, k_BSHK, v_BSHK, segment_ids_BS, window: int | None, *, interpret: bool | None = None):
    """Softmax attention [B, S, H, K] of each query over the causal keys of its segment (and window)."""
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
        if interpret:
            _warn_interpret(jax.default_backend())
    block_size(q_BSHK.shape[1])
    fn = functools.partial(_local_attention, window=window, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q_BSHK, k_BSHK, v_BSHK, segment_ids_BS)
    spec = nn.logical_to_mesh_axes(_SPEC)
    if spec[1] is not None:
        raise ValueError("model.attention_impl='splash' needs the sequence unsharded (activation_length -> None).")
    segment_spec = jax.sharding.PartitionSpec(spec[0], None)
    return jax.shard_map(fn, in_specs=(spec, spec, spec, segment_spec), out_specs=spec, check_vma=False)(
        q_BSHK, k_BSHK, v_BSHK, segment_ids_BS
    )
