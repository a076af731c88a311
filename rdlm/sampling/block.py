"""One block of tokens through the model with the KV cache: prelude, adaptive recurrence, coda, head.

A block is the prompt (prefill), one new token per row (decoding) or a few tokens per row
(speculative verification). Every row runs up to `num_steps` iterations; with an exit criterion a
row stops on its own and stays frozen (its state and its last KV entry no longer change) while the
others continue, and the loop ends when every row has stopped.
"""

import functools

import flax
import jax
import jax.numpy as jnp

from rdlm.model import RecurrentLM
from rdlm.sampling.cache import KV, KVCache
from rdlm.sampling.exits import ExitCriterion, ExitState
from rdlm.sampling.options import Knobs


@flax.struct.dataclass
class BlockResult:
    cache: KVCache
    logits: jax.Array  # float32 [B, V] at `logits_at`, or [B, S, V]
    state_BSD: jax.Array  # each position's final (raw) state s_r
    steps_B: jax.Array  # iterations each row ran


@flax.struct.dataclass
class _Carry:
    i: jax.Array
    state_BSD: jax.Array
    last_kv: KV  # each active row's newest core (k, v), [Lc, B, S, H, K]
    active_B: jax.Array
    steps_B: jax.Array
    exit_state: ExitState | None
    cache: KVCache


def head(apply, cache: KVCache, state_BSD, positions_BS, segment_BS, start_B, fresh: bool, window, logits_at_B=None):
    """Coda + head: (cache with the block's coda entries, logits at `logits_at` [B, V] or everywhere [B, S, V]).

    For a long block that needs only one position's logits, the coda runs over the block without the
    head, and then once more for that single position against the entries just written.
    """
    past = None if fresh else cache.coda
    mask = None if fresh else cache.past_mask(start_B, positions_BS, window)
    S = state_BSD.shape[1]
    if logits_at_B is None or S == 1:
        logits, _, kv = apply(state_BSD, positions_BS, segment_BS, past, mask, method=RecurrentLM.decode)
        cache = cache.write_coda(kv, positions_BS)
        return cache, (logits if logits_at_B is None else logits[:, 0])
    _, _, kv = apply(state_BSD, positions_BS, segment_BS, past, mask, return_logits=False, method=RecurrentLM.decode)
    cache = cache.write_coda(kv, positions_BS)
    pos_B1 = jnp.take_along_axis(positions_BS, logits_at_B[:, None], axis=1)
    state_B1D = jnp.take_along_axis(state_BSD, logits_at_B[:, None, None], axis=1)
    mask = cache.past_mask(pos_B1[:, 0], pos_B1, window)
    logits, _, _ = apply(state_B1D, pos_B1, jnp.ones_like(pos_B1), cache.coda, mask, method=RecurrentLM.decode)
    return cache, logits[:, 0]


def run_block(
    model: RecurrentLM,
    params,
    cache: KVCache,
    tokens_BS,
    start_B,
    valid_BS,
    init_BSD,
    active_B,
    *,
    num_steps: int,
    exit: ExitCriterion | None = None,
    knobs: Knobs | None = None,
    fresh: bool = False,
    logits_at_B=None,
) -> BlockResult:
    """Runs row b's tokens at positions start_B[b] + [0, S), attending to its cached slots below start_B[b].

    `fresh` (prefill) skips the cache reads. Rows with active_B False do no iterations. With `exit`,
    `knobs` give its threshold and min_steps; distribution criteria are judged at `logits_at_B`
    (default: the last position).
    """
    cfg = model.config
    apply = functools.partial(model.apply, {"params": params})
    B, S = tokens_BS.shape
    window = cfg.attention_window
    positions_BS = start_B[:, None].astype(jnp.int32) + jnp.arange(S, dtype=jnp.int32)[None]
    segment_BS = valid_BS.astype(jnp.int32)
    mask = None if fresh else cache.past_mask(start_B, positions_BS, window)

    def past(kv):
        return None if fresh else kv

    embedded, kv = apply(tokens_BS, positions_BS, segment_BS, past(cache.prelude), mask, method=RecurrentLM.embed)
    cache = cache.write_prelude(kv, positions_BS)
    state = init_BSD.astype(cfg.compute_dtype)
    kv_shape = (cfg.n_layers_in_recurrent_block, B, S, cfg.n_heads, cfg.head_dim)
    exit_at = jnp.full((B,), S - 1, jnp.int32) if logits_at_B is None else logits_at_B

    def cond(c: _Carry):
        return (c.i < num_steps) & jnp.any(c.active_B)

    def body(c: _Carry):
        slot = c.i % c.cache.slots
        new, kv = apply(c.state_BSD, embedded, positions_BS, segment_BS, past(c.cache.core_slot(slot)), mask,
                        method=RecurrentLM.iterate)
        act = c.active_B
        state_BSD = jnp.where(act[:, None, None], new, c.state_BSD)
        last_kv = tuple(jnp.where(act[None, :, None, None, None], n, o) for n, o in zip(kv, c.last_kv))
        cache = c.cache.write_core(slot, last_kv, positions_BS)
        steps = c.steps_B + act.astype(jnp.int32)
        exit_state, active = c.exit_state, act
        if exit is not None:
            logits = None
            if exit.uses_logits:
                cache, logits = head(apply, cache, state_BSD, positions_BS, segment_BS, start_B, fresh, window, exit_at)
            exit_state, _, stop = exit.update(c.exit_state, logits, state_BSD, valid_BS, knobs.exit_threshold)
            active = act & ~(stop & (steps >= knobs.min_steps))
        return _Carry(c.i + 1, state_BSD, last_kv, active, steps, exit_state, cache)

    zeros_kv = (jnp.zeros(kv_shape, cfg.compute_dtype), jnp.zeros(kv_shape, cfg.compute_dtype))
    exit_state = None if exit is None else exit.init(state, cfg.vocab_size)
    carry = _Carry(jnp.int32(0), state, zeros_kv, active_B, jnp.zeros((B,), jnp.int32), exit_state, cache)
    carry = jax.lax.while_loop(cond, body, carry)
    cache = carry.cache
    if exit is not None or num_steps < cache.depth:
        cache = cache.fill_skipped(carry.last_kv, carry.steps_B, positions_BS)
    cache, logits = head(apply, cache, carry.state_BSD, positions_BS, segment_BS, start_B, fresh, window, logits_at_B)
    return BlockResult(cache=cache, logits=logits, state_BSD=carry.state_BSD, steps_B=carry.steps_B)
