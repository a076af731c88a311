"""The parallel (diffusion-forcing) sampler of Geiping et al. 2025b; the reference's generate_diffusion_style.

After a full-depth prefill, each row keeps a wavefront of up to `window` in-flight positions after its
committed prefix. Every forward pass embeds the wavefront's current tokens, runs `inner_steps` core
iterations on all of them at once (against the committed prefix's cache), decodes them, and then:
- freezes, each on its own, every position whose latent changed by less than `freeze_threshold`
  (relative norm) over the pass, or that has run `num_steps` iterations, and that was fed this pass
  the token its predecessor now predicts; a position that is not, thaws;
- commits the frozen positions at the front (`commit="leading"`), or everything up to the last frozen
  one of the front positions fed their final token (`commit="last"`, the reference's rule); committed
  predictions become tokens and leave the wavefront, and every committed cache entry was computed
  from the committed tokens;
- feeds every other position its predecessor's new prediction and starts one new position at the
  end while the wavefront has room (`headway` of them, the reference default 1).
Batch-1 decoding reads every weight once per pass whatever the wavefront's width, so a pass costs
little more than one sequential iteration block, and a token costs about one pass instead of
`num_steps` iterations.

The follow-up paper's two stabilisers are options: `ema_embeds` mixes each position's prelude output
with that of the previous pass (e = (1 - a) e_new + a e_old), and `state_noise` mixes its state with
a fresh initial state before each pass, damped by the iterations it has run (n / (1 + iterations)).
The cache keeps one core slot per token (the latest iteration, the reference's `compress-s4` for
huginn), since in-flight positions sit at different depths.
"""

import dataclasses
import functools
import math

import flax
import jax
import jax.numpy as jnp

from rdlm.model import RecurrentLM
from rdlm.model.config import ModelConfig
from rdlm.model.layers import unstack_layers
from rdlm.sampling import logits as logits_lib
from rdlm.sampling.decode import GenerateOutput, SamplingState, emit, initial_states, prefill_for
from rdlm.sampling.options import Knobs, SamplerOptions
from rdlm.sampling.prompts import prepare_prompts

COMMIT_RULES = ("leading", "last")


@dataclasses.dataclass(frozen=True)
class ParallelSettings:
    """The wavefront's settings (hashable; a compiled sampler is specialised on them)."""

    inner_steps: int = 4  # core iterations per forward pass (the reference's inner_recurrence)
    freeze_threshold: float = 0.03  # latent change over a pass below which a position freezes
    # In-flight positions (the reference's max_wavefront, 128). A position commits about one pass after the one
    # before it, so a wider wavefront only adds work per pass (on 2 CPU cores; docs/performance.md); None:
    # num_steps / inner_steps + 1, room for positions that need every iteration.
    window: int | None = 3
    commit: str = "leading"  # COMMIT_RULES
    ema_embeds: float = 0.0  # weight of the previous pass's prelude output (the reference: 0.1)
    state_noise: float = 0.0  # initial-state mixing before a pass, / (1 + iterations) (the reference: 0.5)
    headway: int = 1  # new positions started per pass while there is room (each fed the newest prediction)

    def check(self, num_steps: int) -> None:
        s = self
        if isinstance(s.inner_steps, bool) or not isinstance(s.inner_steps, int) or not 1 <= s.inner_steps <= num_steps:
            raise ValueError(f"inner_steps={s.inner_steps!r} must be an int in [1, num_steps={num_steps}].")
        if not isinstance(s.freeze_threshold, (int, float)) or not s.freeze_threshold >= 0:
            raise ValueError(f"freeze_threshold={s.freeze_threshold!r} must be a non-negative float.")
        if s.window is not None and (isinstance(s.window, bool) or not isinstance(s.window, int) or s.window < 1):
            raise ValueError(f"window={s.window!r} must be an int >= 1 (or None).")
        if isinstance(s.headway, bool) or not isinstance(s.headway, int) or s.headway < 1:
            raise ValueError(f"headway={s.headway!r} must be an int >= 1.")
        if s.commit not in COMMIT_RULES:
            raise ValueError(f"commit={s.commit!r} is not one of {COMMIT_RULES}.")
        for name in ("ema_embeds", "state_noise"):
            value = getattr(s, name)
            if not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name}={value!r} must be a float in [0, 1).")

    def window_for(self, num_steps: int) -> int:
        return math.ceil(num_steps / self.inner_steps) + 1 if self.window is None else self.window

    def describe(self, num_steps: int | None = None) -> dict:
        out = dataclasses.asdict(self)
        if num_steps is not None:
            out["window"] = self.window_for(num_steps)
        return out


@flax.struct.dataclass
class ParallelOutput(GenerateOutput):
    passes: jax.Array = None  # forward passes after the prefill (each: inner_steps iterations of the wavefront)


@flax.struct.dataclass
class _Wave:
    base: SamplingState  # lengths_B = committed prefix; last_token_B = the committed token of wavefront position 0
    tokens_BW: jax.Array  # input token of each in-flight position
    embeds_BWD: jax.Array  # each position's (mixed) prelude output of the previous pass (ema_embeds)
    state_BWD: jax.Array
    iters_BW: jax.Array  # core iterations each in-flight position has run
    frozen_BW: jax.Array  # the position is frozen: its state no longer changes
    width_B: jax.Array  # in-flight positions
    passes: jax.Array


def _shift_left(x, shift_B, fill):
    """x [B, W, ...] with row b moved left by shift_B[b], `fill` entering at the end."""
    B, W = x.shape[:2]
    fill = jnp.asarray(fill, x.dtype)
    if B == 1:  # one dynamic slice; a gather costs several times more on CPU
        padded = jnp.concatenate([x, jnp.broadcast_to(fill, x.shape)], axis=1)
        return jax.lax.dynamic_slice_in_dim(padded, shift_B[0], W, axis=1)
    idx_BW = jnp.arange(W)[None] + shift_B[:, None]
    idx = idx_BW.reshape(idx_BW.shape + (1,) * (x.ndim - 2))
    moved = jnp.take_along_axis(x, jnp.minimum(idx, W - 1), axis=1)
    return jnp.where(idx < W, moved, fill)


def _leading_run(ok_BW):
    return jnp.sum(jnp.cumprod(ok_BW.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)


class ParallelSampler:
    """The compiled wavefront loop for one (model config, options, settings)."""

    def __init__(self, config: ModelConfig, options: SamplerOptions, settings: ParallelSettings = ParallelSettings()):
        options.check_vocab(config.vocab_size)
        if options.exit is not None or options.kv_share is not None:
            raise ValueError("The parallel sampler freezes on latent change and keeps one KV slot; "
                             "drop exit_criterion and kv_share.")
        settings.check(options.num_steps)
        self.config, self.options, self.static, self.settings = config, options, options.static(), settings
        self.window = settings.window_for(options.num_steps)
        self.model = RecurrentLM(config)
        self.decode = jax.jit(self._decode, donate_argnums=2)
        self._start = jax.jit(self._start_wave)

    def _fresh_states(self, rng, B):
        return initial_states(self.config, self.static.init_scale, rng, (B, self.window, self.config.n_embd))

    def prefill(self, params, knobs, prompt_BP, lengths_B, rng, *, max_new_tokens: int) -> _Wave:
        """The shared prefill (every prompt token but the last, one KV slot), then a wavefront holding the last."""
        st = prefill_for(self.static, knobs, self.config, params, prompt_BP, lengths_B, rng,
                         max_new_tokens=max_new_tokens, extra_length=self.window, kv_share=1)
        return self._start(st)

    def _start_wave(self, st: SamplingState) -> _Wave:
        B, W, D = st.lengths_B.shape[0], self.window, self.config.n_embd
        rng, k_init = jax.random.split(st.rng)
        tokens = jnp.zeros((B, W), jnp.int32).at[:, 0].set(st.last_token_B)
        zeros = jnp.zeros((B, W), jnp.int32)
        return _Wave(st.replace(rng=rng), tokens, jnp.zeros((B, W, D), self.config.compute_dtype),
                     self._fresh_states(k_init, B), zeros, zeros.astype(bool), jnp.ones((B,), jnp.int32),
                     jnp.zeros((), jnp.int32))

    def _decode(self, params, knobs, wave: _Wave) -> _Wave:
        M = wave.base.steps_BM.shape[1]
        max_passes = M * math.ceil(self.static.num_steps / self.settings.inner_steps) + self.window
        body = functools.partial(self._pass, unstack_layers(params), knobs)
        return jax.lax.while_loop(lambda w: jnp.any(~w.base.done_B) & (w.passes < max_passes), body, wave)

    def _pass(self, params, knobs: Knobs, wave: _Wave) -> _Wave:
        opts, cfg, W, s = self.static, self.config, self.window, self.settings
        apply = functools.partial(self.model.apply, {"params": params})
        st = wave.base
        B = st.lengths_B.shape[0]
        live_B = ~st.done_B
        if opts.uses_rng or s.state_noise:
            rng, k_init, k_tok, k_noise = jax.random.split(st.rng, 4)
        else:  # greedy from fixed initial states: no key is used (a split is a threefry loop per pass)
            rng = k_init = k_tok = k_noise = st.rng
        cache = st.cache
        w_W = jnp.arange(W)
        positions_BW = st.lengths_B[:, None] + w_W[None]
        valid_BW = (w_W[None] < wave.width_B[:, None]) & live_B[:, None]
        segment_BW = valid_BW.astype(jnp.int32)
        mask = cache.past_mask(st.lengths_B, positions_BW, cfg.attention_window)
        embedded, kv = apply(wave.tokens_BW, positions_BW, segment_BW, cache.prelude_kv, mask, method=RecurrentLM.embed)
        cache = cache.write_prelude(kv, positions_BW)
        if s.ema_embeds:  # a position started this pass has no previous embedding to mix with
            old = (wave.iters_BW > 0)[..., None]
            embedded = jnp.where(old, (1 - s.ema_embeds) * embedded + s.ema_embeds * wave.embeds_BWD, embedded)
        state_BWD = wave.state_BWD
        if s.state_noise:
            noise = (s.state_noise / (1.0 + wave.iters_BW.astype(jnp.float32)))[..., None].astype(state_BWD.dtype)
            mixed = state_BWD * (1 - noise) + noise * self._fresh_states(k_noise, B)
            state_BWD = jnp.where(wave.frozen_BW[..., None], state_BWD, mixed)

        # Frozen positions keep their state and their cache entries (written at an out-of-range position,
        # which the cache drops).
        running_BW = valid_BW & ~wave.frozen_BW
        state_BWD = jnp.where(running_BW[..., None], state_BWD, wave.state_BWD)
        write_at_BW = jnp.where(running_BW, positions_BW, cache.length)

        def inner(_, carry):
            cache, state = carry
            new, kv = apply(state, embedded, positions_BW, segment_BW, cache.core_slot(0), mask,
                            method=RecurrentLM.iterate)
            return cache.write_core(0, kv, write_at_BW), jnp.where(running_BW[..., None], new, state)

        cache, new_BWD = jax.lax.fori_loop(0, s.inner_steps, inner, (cache, state_BWD))
        iters_BW = wave.iters_BW + s.inner_steps * running_BW.astype(jnp.int32)
        logits_BWV, _, kv = apply(new_BWD, positions_BW, segment_BW, cache.coda_kv, mask, method=RecurrentLM.decode)
        cache = cache.write_coda(kv, positions_BW)
        guess_BW = logits_lib.choose(k_tok, logits_BWV, opts.temperature, opts.top_k, opts.top_p, opts.min_p)

        new32, prev32 = new_BWD.astype(jnp.float32), wave.state_BWD.astype(jnp.float32)
        change_BW = jnp.linalg.norm(new32 - prev32, axis=-1) / (jnp.linalg.norm(new32, axis=-1) + 1e-12)
        converged_BW = (change_BW < s.freeze_threshold) & (iters_BW >= knobs.min_steps)
        fed_final_BW = jnp.concatenate([jnp.ones((B, 1), bool), wave.tokens_BW[:, 1:] == guess_BW[:, :-1]], axis=1)
        # Frozen: converged now or before, or at full depth, and fed the token its predecessor predicts.
        frozen_BW = (converged_BW | wave.frozen_BW | (iters_BW >= opts.num_steps)) & fed_final_BW & valid_BW
        if s.commit == "leading":
            count_B = _leading_run(frozen_BW)
        else:
            fed_B = _leading_run(fed_final_BW & valid_BW)
            last_B = jnp.max(jnp.where(frozen_BW & (w_W[None] < fed_B[:, None]), w_W[None] + 1, 0), axis=1)
            count_B = last_B.astype(jnp.int32)
        count_B = jnp.where(live_B, count_B, 0)
        st = emit(st.replace(cache=cache, rng=rng), knobs, guess_BW, count_B, iters_BW)
        newest_B = jnp.take_along_axis(guess_BW, jnp.maximum(count_B - 1, 0)[:, None], axis=1)[:, 0]
        st = st.replace(lengths_B=st.lengths_B + count_B,
                        last_token_B=jnp.where(count_B > 0, newest_B, st.last_token_B))

        # Next pass's wavefront: position j >= 1 is fed its predecessor's guess, the committed positions
        # leave from the front, and a new position starts at the end if there is room.
        tokens_BW = jnp.concatenate([wave.tokens_BW[:, :1], guess_BW[:, :-1]], axis=1)
        next_token_B = jnp.take_along_axis(guess_BW, (wave.width_B - 1)[:, None], axis=1)[:, 0]
        shift = functools.partial(_shift_left, shift_B=count_B)
        tokens_BW, embeds_BWD = shift(tokens_BW, fill=0), shift(embedded, fill=0)
        state_BWD, iters_BW, frozen_BW = shift(new_BWD, fill=0), shift(iters_BW, fill=0), shift(frozen_BW, fill=False)
        width_B = wave.width_B - count_B
        if opts.continuous:
            last_BD = jnp.take_along_axis(new_BWD, (wave.width_B - 1)[:, None, None], axis=1)
            fresh_BWD = jnp.broadcast_to(last_BD, state_BWD.shape)
        else:
            fresh_BWD = self._fresh_states(k_init, B)
        starting_BW = (w_W[None] >= width_B[:, None]) & (w_W[None] < width_B[:, None] + s.headway) & live_B[:, None]
        return _Wave(
            base=st,
            tokens_BW=jnp.where(starting_BW, next_token_B[:, None], tokens_BW),
            embeds_BWD=embeds_BWD.astype(wave.embeds_BWD.dtype),
            state_BWD=jnp.where(starting_BW[..., None], fresh_BWD, state_BWD).astype(wave.state_BWD.dtype),
            iters_BW=jnp.where(starting_BW, 0, iters_BW),
            frozen_BW=frozen_BW & ~starting_BW,
            width_B=width_B + jnp.sum(starting_BW, axis=1, dtype=jnp.int32),
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


@functools.lru_cache(maxsize=8)
def _cached(config, options, settings) -> ParallelSampler:
    return ParallelSampler(config, options, settings)


def generate_parallel(
    config: ModelConfig,
    params,
    prompt_ids,
    *,
    max_new_tokens: int,
    num_steps: int = 32,
    settings: ParallelSettings | None = None,
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
    **setting_fields,
) -> ParallelOutput:
    """Diffusion-forcing sampling: a new position starts at every pass while earlier ones keep iterating.

    `settings` (or its fields as keywords: inner_steps, freeze_threshold, window, commit, ema_embeds,
    state_noise, headway) shape the wavefront; see ParallelSettings. steps_per_token reports the iterations
    each token's position ran, including those before its input token changed (so it may exceed num_steps).
    """
    if settings is None:
        settings = ParallelSettings(**setting_fields)
    elif setting_fields:
        settings = dataclasses.replace(settings, **setting_fields)
    options = SamplerOptions.build(
        num_steps=num_steps, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        stop_tokens=stop_tokens, pad_id=pad_id, init_scale=init_scale, min_steps=min_steps, continuous=continuous,
    )
    sampler = _cached(config, options, settings)
    return sampler(params, prompt_ids, max_new_tokens=max_new_tokens, prompt_lengths=prompt_lengths, rng=rng)
