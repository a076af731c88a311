"""The recurrent core, its initial state, and how many times it runs.

One core iteration is s <- R(A @ [s, e]): the adapter A mixes the state with the prelude's output e,
then the core's sandwich blocks R run. Training runs n iterations without gradient (n traced, so one
program serves every n) and then k with gradient under remat (truncated backprop, section 3.2).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from rdlm.model.config import ModelConfig
from rdlm.model.layers import BlockStack, logical_param, remat_policy, trunc_normal


class CoreIteration(nn.Module):
    """One pass through the recurrent block; returns the new state and the core layers' (k, v)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, state_BSD, embedded_BSD, positions_BS, segment_ids_BS, past_kv=None, past_mask=None):
        cfg = self.config
        D = cfg.n_embd
        adapter = logical_param(self, "adapter", trunc_normal(cfg.init_std), (2 * D, D), ("adapter", "embed"), cfg.weight_dtype)
        x_BS2D = jnp.concatenate([state_BSD, embedded_BSD.astype(state_BSD.dtype)], axis=-1)
        x_BSD = jnp.einsum("bse,ed->bsd", x_BS2D, adapter.astype(cfg.compute_dtype))
        # Rematerialised per layer as well as per iteration (run_with_grad), so a backward pass holds
        # one layer's attention at a time.
        core = BlockStack(cfg, cfg.n_layers_in_recurrent_block, remat=True, name="core_block")
        return core(x_BSD, positions_BS, segment_ids_BS, past_kv, past_mask)


def initial_state(config: ModelConfig, rng, shape, init_scale: float):
    """The reference's draw: truncated normal (+-3 sigma), sigma = sqrt(2/(5D)) * init_scale, times sqrt(D)."""
    if init_scale == 0:
        return jnp.zeros(shape, config.compute_dtype)
    std = config.init_std * init_scale
    draw = jax.random.truncated_normal(rng, -3.0, 3.0, shape, jnp.float32) * std * config.embed_scale
    return draw.astype(config.compute_dtype)


def run_no_grad(core: CoreIteration, state, embedded, positions, segment_ids, num_steps):
    """`num_steps` (traced or int) iterations under stop_gradient; returns (s_n, s_{n-1}).

    With zero steps the state passes through untouched, so gradient reaches an explicit s_0.
    """
    if isinstance(num_steps, int) and num_steps == 0:
        return state, state
    embedded_sg = jax.lax.stop_gradient(embedded)

    def cond(mdl, carry):
        return carry[0] < num_steps

    def body(mdl, carry):
        i, s, _ = carry
        s_new, _ = mdl(s, embedded_sg, positions, segment_ids)
        return i + 1, s_new, s

    start = jax.lax.stop_gradient(state)
    _, last, prev = nn.while_loop(cond, body, core, (jnp.int32(0), start, start))
    ran = num_steps > 0
    return (
        jnp.where(ran, jax.lax.stop_gradient(last), state),
        jnp.where(ran, jax.lax.stop_gradient(prev), state),
    )


def run_with_grad(core: CoreIteration, state, prev, embedded, positions, segment_ids, num_steps, max_steps: int):
    """Up to `max_steps` iterations with gradient, each rematerialised in the backward pass.

    `num_steps` may be traced (then at most `max_steps`): the first max_steps - num_steps
    iterations of the scan leave the state unchanged.
    """
    traced = not isinstance(num_steps, int)

    def body(mdl, carry, j):
        s, s_prev = carry
        s_new, _ = mdl(s, embedded, positions, segment_ids)
        if traced:
            active = j >= max_steps - num_steps
            s_new, s = jnp.where(active, s_new, s), jnp.where(active, s, s_prev)
        return (s_new, s), None

    body = nn.remat(body, policy=remat_policy(core.config.remat_policy), prevent_cse=False)
    scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False}, length=max_steps)
    (state, prev), _ = scan(core, (state, prev), jnp.arange(max_steps))
    return state, prev


def sample_num_steps(rng, step, mean_recurrence: int, backprop_depth: int, sigma: float = 0.5):
    """The paper's per-step depth: tau ~ N(log rbar - sigma^2/2, sigma), r = Poisson(e^tau) + 1.

    Returns (n, k) = (max(r - kbar, 0), min(kbar, r)) as int32 scalars. The rng is folded with the
    step, so every host draws the same r for a step.
    """
    key_tau, key_poisson = jax.random.split(jax.random.fold_in(rng, step))
    mu = math.log(mean_recurrence) - sigma**2 / 2
    tau = mu + sigma * jax.random.normal(key_tau, (), jnp.float32)
    r = jax.random.poisson(key_poisson, jnp.exp(tau), (), jnp.int32) + 1
    return jnp.maximum(r - backprop_depth, 0), jnp.minimum(backprop_depth, r)
