"""One block of tokens through the model with the KV cache: prelude, adaptive recurrence, coda, head.

A block is the prompt (prefill), one new token per row (decoding) or a few tokens per row
(speculative verification). Every row runs up to `num_steps` iterations; with an exit criterion a
row stops on its own at a check (every `knobs.check_every` iterations) and stays frozen (its state
and its last KV entry no longer change) while the others continue, and the loop ends when every row
has stopped. A logit criterion runs the coda and the head only at checks; a latent one never does.
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
    logits: jax.Array | None  # float32 [B, S, V] (None when not asked for)
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
    # Logit criteria only: the head's output at the latest check, the coda (k, v) it computed, and
    # whether that check came after the latest iteration (then the final head is not run again).
    logits: jax.Array | None
    coda_kv: KV | None
    checked_last: jax.Array | None
    cache: KVCache
    past_core: KV | None  # the cache's core slot of the current iteration (None in prefill)


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
    want_logits: bool = True,
) -> BlockResult:
    """Runs row b's tokens at positions start_B[b] + [0, S), attending to its cached slots below start_B[b].

    `fresh` (prefill) skips the cache reads. Rows with active_B False do no iterations. With `exit`,
    `knobs` give its threshold, min_steps and check_every; distribution criteria read each row's last
    valid position.
    """
    cfg = model.config
    apply = functools.partial(model.apply, {"params": params})
    B, S = tokens_BS.shape
    positions_BS = start_B[:, None].astype(jnp.int32) + jnp.arange(S, dtype=jnp.int32)[None]
    segment_BS = valid_BS.astype(jnp.int32)
    mask = None if fresh else cache.past_mask(start_B, positions_BS, cfg.attention_window)

    def past(kv):
        return None if fresh else kv

    def head(cache, state_BSD, with_logits: bool):
        logits, _, kv = apply(state_BSD, positions_BS, segment_BS, past(cache.coda_kv), mask,
                              return_logits=with_logits, method=RecurrentLM.decode)
        return cache.write_coda(kv, positions_BS), logits

    embedded, kv = apply(tokens_BS, positions_BS, segment_BS, past(cache.prelude_kv), mask, method=RecurrentLM.embed)
    cache = cache.write_prelude(kv, positions_BS)
    state = init_BSD.astype(cfg.compute_dtype)
    head_in_loop = exit is not None and exit.uses_logits
    last_B = jnp.maximum(jnp.sum(valid_BS, axis=1, dtype=jnp.int32) - 1, 0)  # each row's last real position
    coda_past = past(cache.coda_kv)  # the loop writes no coda entries: the final head does

    def head_logits(state_BSD):
        logits, _, kv = apply(state_BSD, positions_BS, segment_BS, coda_past, mask, method=RecurrentLM.decode)
        return logits, kv

    def cond(c: _Carry):
        return (c.i < num_steps) & jnp.any(c.active_B)

    def body(c: _Carry):
        slot = c.i % c.cache.slots
        new, kv = apply(c.state_BSD, embedded, positions_BS, segment_BS, c.past_core, mask, method=RecurrentLM.iterate)
        act = c.active_B
        state_BSD = jnp.where(act[:, None, None], new, c.state_BSD)
        last_kv = tuple(jnp.where(act[None, :, None, None, None], n, o) for n, o in zip(kv, c.last_kv))
        cache = c.cache.write_core(slot, last_kv, positions_BS)
        # The next iteration's slot is read here, after the write: the layers then read a small carried
        # copy, and the write can update the cache in place (reads of the cache inside the layers would
        # make XLA copy the whole cache every iteration). This token's own entries are masked anyway.
        past_core = past(cache.core_slot((c.i + 1) % cache.slots))
        steps = c.steps_B + act.astype(jnp.int32)
        exit_state, active, logits, coda_kv, checked_last = c.exit_state, act, c.logits, c.coda_kv, c.checked_last
        if exit is not None:
            n = c.i + 1  # iterations run by every active row
            check = (n >= knobs.min_steps) & ((n - knobs.min_steps) % knobs.check_every == 0)
            if head_in_loop:  # the coda and the head run only at a check (lax.cond runs one branch)

                def checked(_):
                    out, kv = head_logits(state_BSD)
                    last_BV = jnp.take_along_axis(out, last_B[:, None, None], axis=1)[:, 0]
                    es, _, stop = exit.update(c.exit_state, last_BV, state_BSD, valid_BS, knobs.exit_threshold)
                    return es, stop, out, kv

                def unchecked(_):
                    return c.exit_state, jnp.zeros((B,), bool), c.logits, c.coda_kv

                exit_state, stop, logits, coda_kv = jax.lax.cond(check, checked, unchecked, None)
                checked_last = check
            else:  # a latent criterion is a few norms: computed every iteration, kept at checks
                updated, _, stop = exit.update(c.exit_state, None, state_BSD, valid_BS, knobs.exit_threshold)
                exit_state = jax.tree.map(lambda u, o: jnp.where(check, u, o), updated, c.exit_state)
                stop = stop & check
            active = act & ~stop
        return _Carry(c.i + 1, state_BSD, last_kv, active, steps, exit_state, logits, coda_kv, checked_last, cache,
                      past_core)

    kv_shape = (cfg.n_layers_in_recurrent_block, B, S, cfg.n_heads, cfg.head_dim)
    zeros_kv = (jnp.zeros(kv_shape, cfg.compute_dtype), jnp.zeros(kv_shape, cfg.compute_dtype))
    exit_state = None if exit is None else exit.init(state, cfg.vocab_size)
    logits = coda_kv = checked_last = None
    if head_in_loop:
        coda_shape = (cfg.n_layers_in_coda, B, S, cfg.n_heads, cfg.head_dim)
        logits = jnp.zeros((B, S, cfg.vocab_size), jnp.float32)
        coda_kv = (jnp.zeros(coda_shape, cfg.compute_dtype), jnp.zeros(coda_shape, cfg.compute_dtype))
        checked_last = jnp.zeros((), bool)
    carry = _Carry(jnp.int32(0), state, zeros_kv, active_B, jnp.zeros((B,), jnp.int32), exit_state, logits, coda_kv,
                   checked_last, cache, past(cache.core_slot(0)))
    carry = jax.lax.while_loop(cond, body, carry)
    cache = carry.cache
    if exit is not None or not isinstance(num_steps, int) or num_steps < cache.depth:  # a traced r may be < depth
        cache = cache.fill_skipped(carry.last_kv, carry.steps_B, positions_BS)
    if head_in_loop:  # the latest check's head serves if it came after the last iteration
        logits, kv = jax.lax.cond(carry.checked_last, lambda c: (c.logits, c.coda_kv), lambda c: head_logits(c.state_BSD),
                                  carry)
        cache = cache.write_coda(kv, positions_BS)
    else:
        cache, logits = head(cache, carry.state_BSD, want_logits)
    return BlockResult(cache=cache, logits=logits if want_logits else None, state_BSD=carry.state_BSD,
                       steps_B=carry.steps_B)
