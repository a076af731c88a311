"""Huginn's building blocks: RMSNorm, interleaved RoPE, attention, gated MLP and the sandwich block.

Shapes are named in variable suffixes: B batch, S query length, T key length, D width, H heads,
K head dim, F MLP width, L layers of a stage.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from rdlm.model import attention
from rdlm.model.config import ModelConfig

# Logical axis names of the main activations (mapped to mesh axes by the rules in the config).
ACT_BSD = ("activation_batch", "activation_length", "activation_embed")


def trunc_normal(std: float):
    """Normal truncated at +-3 std, drawn like torch's `trunc_normal_(std, a=-3std, b=3std)` (no rescaling)."""

    def init(key, shape, dtype=jnp.float32):
        return (jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32) * std).astype(dtype)

    return init


def logical_param(module: nn.Module, name: str, init, shape, axes: tuple[str, ...], dtype) -> jax.Array:
    """A parameter whose axes carry logical names for sharding."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
    """RMSNorm with the reference's numerics: normalise in float32, cast back, then scale."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        scale = logical_param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",), self.config.weight_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.config.norm_eps)
        return normed.astype(x.dtype) * scale.astype(x.dtype)


def rope_angles(positions_BS: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, S, K/2] of pos * base^(-2i/K), in float32 as the reference's table."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions_BS.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BSHK: jax.Array, cos_BSk: jax.Array, sin_BSk: jax.Array) -> jax.Array:
    """Rotate interleaved pairs (2i, 2i+1) (GPT-J style), in float32, cast back."""
    pairs = x_BSHK.astype(jnp.float32).reshape(*x_BSHK.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos_BSk[:, :, None, :], sin_BSk[:, :, None, :]
    rotated = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return rotated.reshape(x_BSHK.shape).astype(x_BSHK.dtype)


class PastKV(NamedTuple):
    """Cached keys/values a query block attends to besides itself (decoding), with their mask."""

    k_BHKT: jax.Array  # keys as columns, the layout the query's matmul reads without a transpose
    v_BHTK: jax.Array
    mask_BST: jax.Array  # True where query s may see cached key t


class Attention(nn.Module):
    """Causal self-attention: fused QKV, q/k biases before RoPE, no output bias."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BSD, positions_BS, segment_ids_BS, past: PastKV | None = None):
        cfg = self.config
        H, K, D = cfg.n_heads, cfg.head_dim, cfg.n_embd
        wqkv = logical_param(
            self, "wqkv", trunc_normal(cfg.init_std), (D, 3, H, K), ("embed", "qkv", "heads", "head_dim"), cfg.weight_dtype
        )
        # Batch-major output: the weight enters the matmul as stored (a "tbshk" output makes XLA
        # transpose the whole weight on every call, which dominates small-batch decoding).
        qkv_BS3HK = jnp.einsum("bsd,dthk->bsthk", x_BSD, wqkv.astype(cfg.compute_dtype))
        q_BSHK, k_BSHK, v_BSHK = qkv_BS3HK[:, :, 0], qkv_BS3HK[:, :, 1], qkv_BS3HK[:, :, 2]
        if cfg.qk_bias:
            bias = logical_param(
                self, "qk_bias", nn.initializers.zeros, (2, H, K), ("qkv", "heads", "head_dim"), cfg.weight_dtype
            ).astype(cfg.compute_dtype)
            q_BSHK, k_BSHK = q_BSHK + bias[0], k_BSHK + bias[1]
        cos, sin = rope_angles(positions_BS, K, cfg.rope_base)
        q_BSHK, k_BSHK = apply_rope(q_BSHK, cos, sin), apply_rope(k_BSHK, cos, sin)
        out_BSHK = attention.attend(q_BSHK, k_BSHK, v_BSHK, segment_ids_BS, cfg.attention_window, past, cfg.attention_impl)
        wo = logical_param(
            self, "wo", trunc_normal(cfg.out_proj_std), (H, K, D), ("heads", "head_dim", "embed"), cfg.weight_dtype
        )
        y_BSD = jnp.einsum("bshk,hkd->bsd", out_BSHK, wo.astype(cfg.compute_dtype))
        return y_BSD, (k_BSHK, v_BSHK)


class GatedMLP(nn.Module):
    """proj(silu(gate) * up) with gate and up fused in one kernel [D, 2, F]."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BSD):
        cfg = self.config
        D, F = cfg.n_embd, cfg.intermediate_size
        # The reference's training init draws both halves with the base std (see the spec, section 2).
        w_fc = logical_param(self, "fc", trunc_normal(cfg.init_std), (D, 2, F), ("embed", "gate_up", "mlp"), cfg.weight_dtype)
        w_proj = logical_param(self, "proj", trunc_normal(cfg.out_proj_std), (F, D), ("mlp", "embed"), cfg.weight_dtype)
        h_BS2F = jnp.einsum("bsd,dtf->bstf", x_BSD, w_fc.astype(cfg.compute_dtype))
        h_BSF = nn.silu(h_BS2F[:, :, 0]) * h_BS2F[:, :, 1]
        h_BSF = nn.with_logical_constraint(h_BSF, ("activation_batch", "activation_length", "activation_mlp"))
        return jnp.einsum("bsf,fd->bsd", h_BSF, w_proj.astype(cfg.compute_dtype))


class SandwichBlock(nn.Module):
    """x = n2(x + attn(n1(x))); x = n4(x + mlp(n3(x))). Returns the new x and this block's (k, v)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BSD, positions_BS, segment_ids_BS, past_kv=None, past_mask=None):
        cfg = self.config
        past = None if past_kv is None else PastKV(past_kv[0], past_kv[1], past_mask)
        attn_BSD, kv = Attention(cfg, name="attn")(RMSNorm(cfg, name="norm_1")(x_BSD), positions_BS, segment_ids_BS, past)
        x_BSD = RMSNorm(cfg, name="norm_2")(attn_BSD + x_BSD)
        x_BSD = RMSNorm(cfg, name="norm_4")(GatedMLP(cfg, name="mlp")(RMSNorm(cfg, name="norm_3")(x_BSD)) + x_BSD)
        return nn.with_logical_constraint(x_BSD, ACT_BSD), kv


def remat_policy(name: str) -> Any:
    return getattr(jax.checkpoint_policies, name)


def unstack_layers(params):
    """Every stack's stacked parameters {"layers": [L, ...]} as per-layer trees {"layer_0": ..., ...}.

    BlockStack runs such parameters as a Python loop over layers. Split once outside a decode loop,
    the layers' weights are loop invariants; under nn.scan each layer call would copy its slice out.
    """
    if not isinstance(params, Mapping):
        return params
    out = {}
    for name, sub in params.items():
        if name == "layers":
            n = jax.tree.leaves(sub)[0].shape[0]
            out.update({f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], sub) for i in range(n)})
        else:
            out[name] = unstack_layers(sub)
    return out


class BlockStack(nn.Module):
    """`num_layers` sandwich blocks with stacked parameters [L, ...], run under nn.scan.

    `past_kv` (decoding) is the cached (keys [L, B, H, K, T], values [L, B, H, T, K]), stacked or
    as sequences of L per-layer arrays; the stack returns the new keys/values [L, B, S, H, K] of
    every layer. Parameters split by `unstack_layers` run as a Python loop over the layers instead.
    """

    config: ModelConfig
    num_layers: int
    remat: bool = False

    @nn.compact
    def __call__(self, x_BSD, positions_BS, segment_ids_BS, past_kv=None, past_mask=None):
        if "layer_0" in self.variables.get("params", {}):
            kvs = []
            for i in range(self.num_layers):
                past_i = None if past_kv is None else (past_kv[0][i], past_kv[1][i])
                x_BSD, kv = SandwichBlock(self.config, name=f"layer_{i}")(x_BSD, positions_BS, segment_ids_BS, past_i,
                                                                          past_mask)
                kvs.append(kv)
            return x_BSD, tuple(jnp.stack(x) for x in zip(*kvs))
        if past_kv is not None:
            past_kv = tuple(jnp.stack(x) if isinstance(x, (tuple, list)) else x for x in past_kv)
        block = SandwichBlock
        if self.remat:
            block = nn.remat(block, policy=remat_policy(self.config.remat_policy), prevent_cse=False)
        scanned = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
            length=self.num_layers,
            unroll=self.num_layers if self.config.unroll_layers else 1,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        return scanned(self.config, name="layers")(x_BSD, positions_BS, segment_ids_BS, past_kv, past_mask)
