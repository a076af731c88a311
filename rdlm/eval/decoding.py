"""Token-by-token evaluation with the KV cache: greedy generation and teacher-forced scoring at a traced r.

Both run rdlm.sampling's cached block (`run_block`): each row's context but its last token is
prefilled at full depth, then each step feeds one token, with an optional adaptive exit per token,
and reads the next-token distribution. Generation appends the greedy token until a stop id or the
budget (with an exit the engine feeds the prompt one token at a time too, so every prompt token
exits on its own); scoring feeds given tokens instead and
records their log-probabilities (the engine starts it from the first token, so that with an exit
every token's compute is adaptive). The number of iterations r is a traced argument and the cache
holds `depth` slots (the largest r evaluated), so one compiled program serves every r <= depth for
each (batch, context bucket, step bucket).

Every position's random initial state comes from (seed, the request's own seed, its position), so
a request scores the same in any batch, bucket or order.
"""

import functools

import flax
import jax
import jax.numpy as jnp

from rdlm.model import RecurrentLM, recurrence
from rdlm.model.config import ModelConfig
from rdlm.model.layers import unstack_layers
from rdlm.sampling.block import run_block
from rdlm.sampling.cache import KVCache
from rdlm.sampling.exits import DEFAULT_THRESHOLDS, ExitCriterion
from rdlm.sampling.options import Knobs, SamplerOptions


def position_noise(config: ModelConfig, key, seeds_B, positions_BS, init_scale: float):
    """Initial states [B, S, D]: the reference's draw, keyed by (key, row seed, position)."""
    if init_scale == 0:
        return jnp.zeros((*positions_BS.shape, config.n_embd), config.compute_dtype)

    def one(seed, position):
        k = jax.random.fold_in(jax.random.fold_in(key, seed), position)
        return recurrence.initial_state(config, k, (config.n_embd,), init_scale)

    return jax.vmap(jax.vmap(one, in_axes=(None, 0)))(seeds_B, positions_BS)


@flax.struct.dataclass
class _Loop:
    cache: KVCache
    j: jax.Array  # steps taken
    lengths_B: jax.Array  # tokens cached per row; the next input sits at this position
    last_B: jax.Array  # each row's next input token
    done_B: jax.Array
    tokens_BM: jax.Array  # the emitted (or forced) token of each step
    logp_BM: jax.Array  # its log-probability
    greedy_BM: jax.Array  # whether it was the argmax
    steps_BM: jax.Array  # core iterations the step used (0: row already done)


def static_exit(exit: ExitCriterion | None) -> ExitCriterion | None:
    """The criterion compiled code specialises on (its name; the threshold travels as a knob)."""
    return None if exit is None else ExitCriterion(exit.name, DEFAULT_THRESHOLDS[exit.name])


def knobs_for(exit: ExitCriterion | None, stop_ids) -> Knobs:
    """The sampler's knobs for this exit and these stop ids: the exit is checked as rdlm.generate checks it."""
    return SamplerOptions(exit=exit, stop_tokens=tuple(int(t) for t in stop_ids)).knobs()


@functools.partial(jax.jit, static_argnames=("config", "depth", "exit", "init_scale"))
def run(params, context_BP, context_len_B, forced_BM, forced_len_B, steps_len_B, seeds_B, key, num_steps,
        knobs: Knobs, *, config: ModelConfig, depth: int, exit: ExitCriterion | None, init_scale: float) -> _Loop:
    """Prefill each row's context (right-padded, length >= 1), then take up to steps_len_B[b] steps.

    Row b's first forced_len_B[b] steps feed forced_BM[b] (and score those tokens); its later steps
    are greedy, the row ending at a stop id (knobs.stop_tokens), which it emits.
    """
    model = RecurrentLM(config)
    per_layer = unstack_layers(params)  # what the one-token steps read, as rdlm.sampling's decode loop does
    B, P = context_BP.shape
    M = forced_BM.shape[1]
    cache = KVCache.create(config, B, P + M, depth)
    positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    init = position_noise(config, key, seeds_B, positions_BP, init_scale)
    out = run_block(model, params, cache, context_BP, jnp.zeros((B,), jnp.int32),
                    positions_BP < (context_len_B - 1)[:, None], init, jnp.ones((B,), bool),
                    num_steps=num_steps, fresh=True, want_logits=False)
    last = jnp.take_along_axis(context_BP, (context_len_B - 1)[:, None], axis=1)[:, 0]
    zeros = jnp.zeros((B, M), jnp.int32)
    loop = _Loop(out.cache, jnp.int32(0), context_len_B - 1, last, steps_len_B <= 0, zeros,
                 jnp.zeros((B, M), jnp.float32), jnp.zeros((B, M), bool), zeros)

    def step(s: _Loop) -> _Loop:
        live = ~s.done_B
        init = position_noise(config, key, seeds_B, s.lengths_B[:, None], init_scale)
        o = run_block(model, per_layer, s.cache, s.last_B[:, None], s.lengths_B, jnp.ones((B, 1), bool), init, live,
                      num_steps=num_steps, exit=exit, knobs=knobs)
        logp_BV = jax.nn.log_softmax(o.logits[:, -1].astype(jnp.float32), axis=-1)
        best = jnp.argmax(logp_BV, axis=-1).astype(jnp.int32)
        forced = s.j < forced_len_B
        token = jnp.where(forced, forced_BM[:, jnp.minimum(s.j, M - 1)], best)
        record = lambda buf, value: buf.at[:, s.j].set(jnp.where(live, value, buf[:, s.j]))  # noqa: E731
        stop = jnp.any(token[:, None] == knobs.stop_tokens[None, :], axis=-1) & ~forced
        ended = (s.j + 1 >= steps_len_B) | stop
        return s.replace(
            cache=o.cache,
            j=s.j + 1,
            lengths_B=s.lengths_B + live.astype(jnp.int32),
            last_B=jnp.where(live, token, s.last_B),
            done_B=s.done_B | (live & ended),
            tokens_BM=record(s.tokens_BM, token),
            logp_BM=record(s.logp_BM, jnp.take_along_axis(logp_BV, token[:, None], axis=1)[:, 0]),
            greedy_BM=record(s.greedy_BM, best == token),
            steps_BM=record(s.steps_BM, o.steps_B),
        )

    return jax.lax.while_loop(lambda s: (s.j < M) & jnp.any(~s.done_B), step, loop)
