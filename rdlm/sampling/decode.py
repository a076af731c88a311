"""Autoregressive sampling: a jitted prefill, then a jitted lax.while_loop over a preallocated KV cache.

    out = generate(config, params, [[1, 5, 9], [1, 7]], max_new_tokens=16, num_steps=32)
    out.tokens           # [B, P + 16]: each row's prompt, its new tokens, then pad
    out.steps_per_token  # [B, 16]: core iterations each new token used (0 after a row ended)
    out.prompt_steps     # [B]: core iterations of each prompt (fewer than 32 when an exit stops it)

`Sampler(config, options)` holds the compiled functions; calling it again with the same shapes
reuses them (generate() keeps a few Samplers around for the same reason).
"""

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np

from rdlm.model import RecurrentLM, recurrence
from rdlm.model.config import ModelConfig
from rdlm.model.layers import unstack_layers
from rdlm.sampling import logits as logits_lib
from rdlm.sampling.block import run_block
from rdlm.sampling.cache import KVCache
from rdlm.sampling.exits import ExitCriterion
from rdlm.sampling.options import Knobs, SamplerOptions
from rdlm.sampling.prompts import prepare_prompts


@flax.struct.dataclass
class GenerateOutput:
    tokens: jax.Array  # [B, P + max_new_tokens] int32: prompt (right-padded rows), new tokens, pad
    steps_per_token: jax.Array  # [B, max_new_tokens] int32 core iterations per new token; 0 = not generated
    prompt_lengths: jax.Array  # [B] int32
    prompt_steps: jax.Array | None = None  # [B] int32 core iterations of each row's prompt (sequential sampler)

    def new_tokens(self) -> list[list[int]]:
        """Each row's generated tokens (through its stop token, if it emitted one)."""
        tokens, steps, lengths = (np.asarray(x) for x in (self.tokens, self.steps_per_token, self.prompt_lengths))
        counts = (steps > 0).sum(axis=1)
        return [tokens[b, lengths[b] : lengths[b] + counts[b]].tolist() for b in range(tokens.shape[0])]


@flax.struct.dataclass
class SamplingState:
    cache: KVCache
    tokens_BN: jax.Array  # [B, P + max_new] output buffer
    prompt_lengths_B: jax.Array
    lengths_B: jax.Array  # tokens of each row whose KV is cached; the row's next input sits at this position
    last_token_B: jax.Array  # each row's newest token (its KV is not cached yet)
    num_new_B: jax.Array  # new tokens emitted per row
    done_B: jax.Array  # the row emitted a stop token or its max_new_tokens
    steps_BM: jax.Array  # [B, max_new] iterations per new token
    prompt_steps_B: jax.Array  # iterations the prompt ran (fewer than num_steps only with an exit in prefill)
    state_BD: jax.Array  # final state of each row's newest position (continuous chain-of-thought)
    rng: jax.Array


def emit(st: SamplingState, knobs: Knobs, tokens_BK, count_B, steps_BK) -> SamplingState:
    """Appends the first count_B[b] of tokens_BK[b] to each live row, through a stop token, within budget."""
    B, K = tokens_BK.shape
    N, M = st.tokens_BN.shape[1], st.steps_BM.shape[1]
    k_K = jnp.arange(K)
    want = (k_K[None] < count_B[:, None]) & ~st.done_B[:, None] & (st.num_new_B[:, None] + k_K[None] < M)
    stop = logits_lib.is_stop(tokens_BK, knobs.stop_tokens) & want
    keep = want & ((jnp.cumsum(stop, axis=1) - stop) == 0)
    b_B1 = jnp.arange(B)[:, None]
    new_index = st.num_new_B[:, None] + k_K[None]
    tokens_BN = st.tokens_BN.at[b_B1, jnp.where(keep, st.prompt_lengths_B[:, None] + new_index, N)].set(
        tokens_BK, mode="drop"
    )
    steps_BM = st.steps_BM.at[b_B1, jnp.where(keep, new_index, M)].set(steps_BK, mode="drop")
    num_new = st.num_new_B + keep.sum(axis=1, dtype=jnp.int32)
    done = st.done_B | jnp.any(stop & keep, axis=1) | (num_new >= M)
    return st.replace(tokens_BN=tokens_BN, steps_BM=steps_BM, num_new_B=num_new, done_B=done)


def initial_states(config: ModelConfig, init_scale: float, rng, shape):
    return recurrence.initial_state(config, rng, shape, init_scale)


@functools.partial(jax.jit, static_argnames=("config", "num_steps", "kv_share", "init_scale", "max_new_tokens",
                                             "extra_length", "exit"))
def prefill(params, prompt_BP, lengths_B, rng, knobs: Knobs, *, config: ModelConfig, num_steps: int,
            kv_share: int | None, init_scale: float, max_new_tokens: int, extra_length: int = 0,
            exit: ExitCriterion | None = None) -> SamplingState:
    """Caches every prompt token but each row's last in a fresh cache of P + max_new + extra slots.

    The last prompt token becomes the row's newest token: the decode loop feeds it and emits the
    first new token, so prefill needs no head and is shared by every sampler with these settings.
    The prompt runs num_steps iterations, or, with `exit`, until the criterion (with `knobs`' threshold,
    min_steps and check_every) stops each row's prompt block.
    """
    model = RecurrentLM(config)
    B, P = prompt_BP.shape
    cache = KVCache.create(config, B, P + max_new_tokens + extra_length, num_steps, kv_share)
    rng, k_init, k_next = jax.random.split(rng, 3)
    init = initial_states(config, init_scale, k_init, (B, P, config.n_embd))
    out = run_block(model, params, cache, prompt_BP, jnp.zeros((B,), jnp.int32),
                    jnp.arange(P)[None] < (lengths_B - 1)[:, None], init, jnp.ones((B,), bool),
                    num_steps=num_steps, exit=exit, knobs=knobs, fresh=True, want_logits=False)
    valid_BP = jnp.arange(P)[None] < lengths_B[:, None]
    tokens_BN = jnp.full((B, P + max_new_tokens), knobs.pad_id, jnp.int32)
    return SamplingState(
        cache=out.cache,
        tokens_BN=tokens_BN.at[:, :P].set(jnp.where(valid_BP, prompt_BP, knobs.pad_id)),
        prompt_lengths_B=lengths_B,
        lengths_B=lengths_B - 1,
        last_token_B=jnp.take_along_axis(prompt_BP, (lengths_B - 1)[:, None], axis=1)[:, 0],
        num_new_B=jnp.zeros((B,), jnp.int32),
        done_B=jnp.zeros((B,), bool),
        steps_BM=jnp.zeros((B, max_new_tokens), jnp.int32),
        prompt_steps_B=out.steps_B,
        state_BD=initial_states(config, init_scale, k_next, (B, config.n_embd)),
        rng=rng,
    )


def prefill_for(options: SamplerOptions, knobs: Knobs, config: ModelConfig, params, prompt_BP, lengths_B, rng, *,
                max_new_tokens: int, extra_length: int = 0, kv_share: int | None = None) -> SamplingState:
    """`prefill` with the options' settings. The cache gets 8k spare slots (k >= 1, enough for `extra_length`),
    so plain, speculative and parallel samplers of one shape share the compiled prefill."""
    exit = options.exit if options.exit_in_prefill else None
    return prefill(params, prompt_BP, lengths_B, rng, knobs, config=config, num_steps=options.num_steps,
                   kv_share=kv_share, init_scale=options.init_scale, max_new_tokens=max_new_tokens,
                   extra_length=8 * math.ceil(max(extra_length, 1) / 8), exit=exit)


def decode_step(model: RecurrentLM, options: SamplerOptions, knobs: Knobs, params,
                st: SamplingState) -> SamplingState:
    """Feeds each live row's newest token and emits the next one."""
    cfg = model.config
    B, D = st.state_BD.shape
    if options.uses_rng:
        rng, k_init, k_tok = jax.random.split(st.rng, 3)
    else:  # greedy from fixed initial states: no key is used (a split is a threefry loop per token)
        rng = k_init = k_tok = st.rng
    if options.continuous:
        init = st.state_BD[:, None]
    else:
        init = initial_states(cfg, options.init_scale, k_init, (B, 1, D))
    live = ~st.done_B
    out = run_block(model, params, st.cache, st.last_token_B[:, None], st.lengths_B, jnp.ones((B, 1), bool), init,
                    live, num_steps=options.num_steps, exit=options.exit, knobs=knobs)
    token_B = logits_lib.choose(k_tok, out.logits[:, -1], options.temperature, options.top_k, options.top_p,
                                options.min_p)
    st = st.replace(
        cache=out.cache,
        lengths_B=st.lengths_B + live.astype(jnp.int32),
        last_token_B=token_B,
        state_BD=out.state_BSD[:, 0],
        rng=rng,
    )
    return emit(st, knobs, token_B[:, None], jnp.ones((B,), jnp.int32), out.steps_B[:, None])


class Sampler:
    """The compiled decode loop for one (model config, static options); reuse it to avoid recompiling.

    Calls may pass other `options` with the same `static()` part (another exit threshold, min_steps,
    check_every, stop tokens or pad id): they run on the same compiled code. The prefill is one module-level jit
    shared by all samplers.
    """

    def __init__(self, config: ModelConfig, options: SamplerOptions):
        options.check_vocab(config.vocab_size)
        self.config, self.options, self.static = config, options, options.static()
        self.model = RecurrentLM(config)
        self.decode = jax.jit(self._decode, donate_argnums=2)

    def prefill(self, params, knobs, prompt_BP, lengths_B, rng, *, max_new_tokens: int) -> SamplingState:
        return prefill_for(self.static, knobs, self.config, params, prompt_BP, lengths_B, rng,
                           max_new_tokens=max_new_tokens, kv_share=self.static.kv_share)

    def _decode(self, params, knobs, st: SamplingState) -> SamplingState:
        step = functools.partial(decode_step, self.model, self.static, knobs, unstack_layers(params))
        return jax.lax.while_loop(lambda s: jnp.any(~s.done_B), step, st)

    def knobs(self, options: SamplerOptions) -> Knobs:
        if options.static() != self.static:
            raise ValueError("These options differ from the Sampler's beyond exit_threshold, min_steps, "
                             "check_every, stop_tokens and pad_id; make a new Sampler for them.")
        options.check_vocab(self.config.vocab_size)
        return options.knobs()

    def run(self, params, prompt_ids, *, max_new_tokens: int, prompt_lengths=None, rng=None,
            options: SamplerOptions | None = None) -> SamplingState:
        """Prefill + decode; returns the final sampling state (cache included)."""
        options = self.options if options is None else options
        knobs = self.knobs(options)
        ids, lengths, rng = prepare_prompts(self.config, prompt_ids, prompt_lengths, max_new_tokens, rng,
                                            pad_id=options.pad_id)
        st = self.prefill(params, knobs, ids, lengths, rng, max_new_tokens=max_new_tokens)
        return self.decode(params, knobs, st)

    def __call__(self, params, prompt_ids, *, max_new_tokens: int, prompt_lengths=None, rng=None,
                 options: SamplerOptions | None = None) -> GenerateOutput:
        st = self.run(params, prompt_ids, max_new_tokens=max_new_tokens, prompt_lengths=prompt_lengths, rng=rng,
                      options=options)
        return GenerateOutput(tokens=st.tokens_BN, steps_per_token=st.steps_BM, prompt_lengths=st.prompt_lengths_B,
                              prompt_steps=st.prompt_steps_B)


@functools.lru_cache(maxsize=8)
def cached_sampler(config: ModelConfig, static: SamplerOptions) -> Sampler:
    """A Sampler per (config, static options), so repeated generate() calls reuse compiled code."""
    return Sampler(config, static)


def generate(
    config: ModelConfig,
    params,
    prompt_ids,
    *,
    max_new_tokens: int,
    num_steps: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    stop_tokens=(),
    rng=None,
    init_scale: float = 1.0,
    exit_criterion: str | None = None,
    exit_threshold=None,
    min_steps: int = 0,
    check_every: int = 0,
    kv_share: int | None = None,
    continuous: bool = False,
    exit_in_prefill: bool = True,
    prompt_lengths=None,
    pad_id: int = 0,
) -> GenerateOutput:
    """Samples max_new_tokens per prompt with num_steps core iterations per token (fewer with an exit criterion).

    prompt_ids: a list of token lists, or a right-padded [B, P] array with prompt_lengths. rng (a
    jax key, default key(0)) drives the random initial states (init_scale > 0) and sampling.
    exit_criterion: one of rdlm.sampling.exits.CRITERIA; exit_threshold None takes its default.
    check_every=C checks it every C iterations (0: the criterion's default, exits.DEFAULT_CHECK_EVERY).
    kv_share=c keeps c core KV slots per token (iteration i writes slot i mod c).
    exit_in_prefill=False runs the prompt at full depth (the reference's do_not_exit_in_prefill=True).
    """
    options = SamplerOptions.build(
        num_steps=num_steps, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        stop_tokens=stop_tokens, pad_id=pad_id, init_scale=init_scale, exit_criterion=exit_criterion,
        exit_threshold=exit_threshold, min_steps=min_steps, check_every=check_every, kv_share=kv_share,
        continuous=continuous, exit_in_prefill=exit_in_prefill,
    )
    options.check_vocab(config.vocab_size)
    sampler = cached_sampler(config, options.static())
    return sampler(params, prompt_ids, max_new_tokens=max_new_tokens, prompt_lengths=prompt_lengths, rng=rng,
                   options=options)
