"""The parallel (diffusion-forcing) sampler of Geiping et al. 2025b; the reference's generate_diffusion_style.

After a full-depth prefill, each row keeps a window of up to W in-flight positions after its frozen
prefix. Every forward pass embeds the window's current tokens, runs `inner_steps` core iterations on
all of them at once (against the frozen prefix's cache), decodes them, and:
- updates each in-flight position's input token to its predecessor's new prediction,
- starts one new position at the window's end (headway 1) while the window has room,
- freezes the longest leading run of positions that are done: latent change over the pass below
  `exit_threshold` (or `num_steps` iterations reached), and - beyond the first - fed this pass with
  the token that is now fixed, so every frozen cache entry was computed from the final tokens.
A frozen position's prediction becomes the next fixed token. The cache keeps one core slot per
token (the latest iteration, the reference's `compress-s4` for huginn), since in-flight positions sit
at different depths. Noise mixing and embedding EMA of the reference are not implemented.
"""

import functools
import math

import flax
import jax
import jax.numpy as jnp

from rdlm.model import RecurrentLM
from rdlm.model.config import ModelConfig
from rdlm.sampling import logits as logits_lib
from rdlm.sampling.decode import GenerateOutput, SamplingState, emit, initial_states, prefill_for
from rdlm.sampling.options import Knobs, SamplerOptions
from rdlm.sampling.prompts import prepare_prompts


@flax.struct.dataclass
class ParallelOutput(GenerateOutput):
    passes: jax.Array = None  # forward passes after the prefill (each: inner_steps iterations of the window)


@flax.struct.dataclass
class _Wave:
    base: SamplingState  # lengths_B = frozen prefix; last_token_B = the fixed token of window position 0
    tokens_BW: jax.Array  # input token of each in-flight position
    state_BWD: jax.Array
    iters_BW: jax.Array  # core iterations each in-flight position has run
    width_B: jax.Array  # in-flight positions
    passes: jax.Array


def _shift_left(x, shift_B, fill):
    """x [B, W, ...] with row b moved left by shift_B[b], `fill` entering at the end."""
    W = x.shape[1]
    idx_BW = jnp.arange(W)[None] + shift_B[:, None]
    idx = idx_BW.reshape(idx_BW.shape + (1,) * (x.ndim - 2))
    moved = jnp.take_along_axis(x, jnp.minimum(idx, W - 1), axis=1)
    return jnp.where(idx < W, moved, fill)


class ParallelSampler:
    """The compiled wavefront loop for one (model config, options, inner_steps, window)."""

    def __init__(self, config: ModelConfig, options: SamplerOptions, *, inner_steps: int = 4,
                 exit_threshold: float = 0.03, window: int | None = None):
        options.check_vocab(config.vocab_size)
        if options.exit is not None or options.kv_share is not None:
            raise ValueError("The parallel sampler freezes on latent change and keeps one KV slot; "
                             "drop exit_criterion and kv_share.")
        R = options.num_steps
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or not 1 <= inner_steps <= R:
            raise ValueError(f"inner_steps={inner_steps!r} must be an int in [1, num_steps={R}].")
        if not isinstance(exit_threshold, (int, float)) or exit_threshold < 0:
            raise ValueError(f"exit_threshold={exit_threshold!r} must be a non-negative float.")
        window = math.ceil(R / inner_steps) + 1 if window is None else window
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window={window!r} must be an int >= 1.")
        self.config, self.options, self.static = config, options, options.static()
        self.inner_steps, self.exit_threshold, self.window = inner_steps, float(exit_threshold), window
        self.model = RecurrentLM(config)
        self.decode = jax.jit(self._decode, donate_argnums=2)
        self._start = jax.jit(self._start_wave)

    def _fresh_states(self, rng, B):
        return initial_states(self.config, self.static.init_scale, rng, (B, self.window, self.config.n_embd))

    def prefill(self, params, knobs, prompt_BP, lengths_B, rng, *, max_new_tokens: int) -> _Wave:
        """The shared prefill (every prompt token but the last, one KV slot), then a window holding the last."""
        st = prefill_for(self.static, knobs, self.config, params, prompt_BP, lengths_B, rng,
                         max_new_tokens=max_new_tokens, extra_length=self.window, kv_share=1)
        return self._start(st)

    def _start_wave(self, st: SamplingState) -> _Wave:
        B, W = st.lengths_B.shape[0], self.window
        rng, k_init = jax.random.split(st.rng)
        tokens = jnp.zeros((B, W), jnp.int32).at[:, 0].set(st.last_token_B)
        return _Wave(st.replace(rng=rng), tokens, self._fresh_states(k_init, B), jnp.zeros((B, W), jnp.int32),
                     jnp.ones((B,), jnp.int32), jnp.zeros((), jnp.int32))

    def _decode(self, params, knobs, wave: _Wave) -> _Wave:
        M = wave.base.steps_BM.shape[1]
        max_passes = M * math.ceil(self.static.num_steps / self.inner_steps) + 1
        body = functools.partial(self._pass, params, knobs)
        return jax.lax.while_loop(lambda w: jnp.any(~w.base.done_B) & (w.passes < max_passes), body, wave)

    def _pass(self, params, knobs: Knobs, wave: _Wave) -> _Wave:
        opts, cfg, W = self.static, self.config, self.window
        apply = functools.partial(self.model.apply, {"params": params})
        st = wave.base
        B = st.lengths_B.shape[0]
        live_B = ~st.done_B
        rng, k_init, k_tok = jax.random.split(st.rng, 3)
        cache = st.cache
        w_W = jnp.arange(W)
        positions_BW = st.lengths_B[:, None] + w_W[None]
        valid_BW = (w_W[None] < wave.width_B[:, None]) & live_B[:, None]
        segment_BW = valid_BW.astype(jnp.int32)
        mask = cache.past_mask(st.lengths_B, positions_BW, cfg.attention_window)
        embedded, kv = apply(wave.tokens_BW, positions_BW, segment_BW, cache.prelude, mask,
                             method=RecurrentLM.embed)
        cache = cache.write_prelude(kv, positions_BW)

        def inner(_, carry):
            cache, state = carry
            state, kv = apply(state, embedded, positions_BW, segment_BW, cache.core_slot(0), mask,
                              method=RecurrentLM.iterate)
            return cache.write_core(0, kv, positions_BW), state

        cache, new_BWD = jax.lax.fori_loop(0, self.inner_steps, inner, (cache, wave.state_BWD))
        state_BWD = jnp.where(valid_BW[..., None], new_BWD, wave.state_BWD)
        iters_BW = wave.iters_BW + self.inner_steps * valid_BW.astype(jnp.int32)
        logits_BWV, _, kv = apply(state_BWD, positions_BW, segment_BW, cache.coda, mask, method=RecurrentLM.decode)
        cache = cache.write_coda(kv, positions_BW)
        guess_BW = logits_lib.choose(k_tok, logits_BWV, opts.temperature, opts.top_k, opts.top_p, opts.min_p)

        s, prev = state_BWD.astype(jnp.float32), wave.state_BWD.astype(jnp.float32)
        change_BW = jnp.linalg.norm(s - prev, axis=-1) / (jnp.linalg.norm(s, axis=-1) + 1e-12)
        converged_BW = (change_BW < self.exit_threshold) & (iters_BW >= knobs.min_steps)
        settled_BW = converged_BW | (iters_BW >= opts.num_steps)
        fed_final_BW = jnp.concatenate([jnp.ones((B, 1), bool), wave.tokens_BW[:, 1:] == guess_BW[:, :-1]], axis=1)
        freeze_BW = settled_BW & fed_final_BW & valid_BW
        frozen_B = jnp.sum(jnp.cumprod(freeze_BW, axis=1), axis=1).astype(jnp.int32)

        frozen_B = jnp.where(live_B, frozen_B, 0)
        st = emit(st.replace(cache=cache, rng=rng), knobs, guess_BW, frozen_B, iters_BW)
        newest_B = jnp.take_along_axis(guess_BW, jnp.maximum(frozen_B - 1, 0)[:, None], axis=1)[:, 0]
        st = st.replace(lengths_B=st.lengths_B + frozen_B,
                        last_token_B=jnp.where(frozen_B > 0, newest_B, st.last_token_B))

        # Next pass's window: position j >= 1 is fed its predecessor's guess, the frozen positions
        # leave from the front, and a new position starts at the end if there is room.
        tokens_BW = jnp.concatenate([wave.tokens_BW[:, :1], guess_BW[:, :-1]], axis=1)
        next_token_B = jnp.take_along_axis(guess_BW, (wave.width_B - 1)[:, None], axis=1)[:, 0]
        tokens_BW = _shift_left(tokens_BW, frozen_B, 0)
        state_BWD = _shift_left(state_BWD, frozen_B, 0.0)
        iters_BW = _shift_left(iters_BW, frozen_B, 0)
        width_B = wave.width_B - frozen_B
        if opts.continuous:
            last_BD = jnp.take_along_axis(new_BWD, (wave.width_B - 1)[:, None, None], axis=1)
            fresh_BWD = jnp.broadcast_to(last_BD, state_BWD.shape)
        else:
            fresh_BWD = self._fresh_states(k_init, B)
        starting_BW = (w_W[None] == width_B[:, None]) & live_B[:, None]
        return _Wave(
            base=st,
            tokens_BW=jnp.where(starting_BW, next_token_B[:, None], tokens_BW),
            state_BWD=jnp.where(starting_BW[..., None], fresh_BWD, state_BWD).astype(wave.state_BWD.dtype),
            iters_BW=jnp.where(starting_BW, 0, iters_BW),
            width_B=width_B + jnp.any(starting_BW, axis=1).astype(jnp.int32),
            passes=wave.passes + 1,
        )

    def __call__(self, params, prompt_ids, *, max_new_tokens: int, prompt_lengths=None,
                 rng=None) -> ParallelOutput:
        knobs = self.options.knobs()
        ids, lengths, rng = prepare_prompts(self.config, prompt_ids, prompt_lengths, max_new_tokens, rng,
                                            pad_id=self.options.pad_id)
        wave = self.prefill(params, knobs, ids, lengths, rng, max_new_tokens=max_new_tokens)
        wave = self.decode(params, knobs, wave)
        st = wave.base
        return ParallelOutput(tokens=st.tokens_BN, steps_per_token=st.steps_BM, prompt_lengths=st.prompt_lengths_B,
                              passes=wave.passes)


@functools.lru_cache(maxsize=4)
def _cached(config, options, inner_steps, exit_threshold, window) -> ParallelSampler:
    return ParallelSampler(config, options, inner_steps=inner_steps, exit_threshold=exit_threshold, window=window)


def generate_parallel(
    config: ModelConfig,
    params,
    prompt_ids,
    *,
    max_new_tokens: int,
    num_steps: int = 32,
    inner_steps: int = 4,
    exit_threshold: float = 0.03,
    window: int | None = None,
    min_steps: int = 0,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    stop_tokens=(),
    rng=None,
    init_scale: float = 1.0,
    continuous: bool = False,
    prompt_lengths=None,
    pad_id: int = 0,
) -> ParallelOutput:
    """Diffusion-forcing sampling: a new position starts at every pass while earlier ones keep iterating.

    A position freezes once its latent changes by less than `exit_threshold` (relative norm) over a
    pass, or after `num_steps` iterations. window (default ceil(num_steps / inner_steps) + 1) bounds
    the in-flight positions. steps_per_token reports each token's iterations.
    """
    options = SamplerOptions.build(
        num_steps=num_steps, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        stop_tokens=stop_tokens, pad_id=pad_id, init_scale=init_scale, min_steps=min_steps, continuous=continuous,
    )
    sampler = _cached(config, options, inner_steps, exit_threshold, window)
    return sampler(params, prompt_ids, max_new_tokens=max_new_tokens, prompt_lengths=prompt_lengths, rng=rng)
