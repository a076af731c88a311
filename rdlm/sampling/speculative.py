"""Self-speculative decoding (spec section 4.7): draft with few iterations, verify with many in one pass.

Each round, every live row drafts `lookahead` tokens one by one at `draft_steps` iterations, then
feeds [its newest token, drafts 1..d-1] as one block at `num_steps` iterations. Drafts are kept
while the verifier agrees (greedy: its argmax equals the draft; otherwise p(draft) >= threshold x
max p), and the verifier's own token replaces the first rejected draft. The verifier's block
overwrites the drafts' cache slots with full-depth entries and later reads only slots below each
row's accepted length, so greedy output equals plain greedy decoding at `num_steps`.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from rdlm.model import RecurrentLM
from rdlm.model.config import ModelConfig
from rdlm.sampling import logits as logits_lib
from rdlm.sampling.block import run_block
from rdlm.sampling.decode import GenerateOutput, SamplingState, emit, initial_states, prefill_for
from rdlm.sampling.options import Knobs, SamplerOptions
from rdlm.sampling.prompts import prepare_prompts


@flax.struct.dataclass
class SpeculativeOutput(GenerateOutput):
    drafted: jax.Array = None  # [B] drafted tokens
    accepted: jax.Array = None  # [B] drafted tokens the verifier accepted
    rounds: jax.Array = None  # draft-and-verify rounds

    @property
    def acceptance_rate(self) -> float:
        return float(np.sum(self.accepted) / max(int(np.sum(self.drafted)), 1))


@flax.struct.dataclass
class _SpecState:
    base: SamplingState
    drafted_B: jax.Array
    accepted_B: jax.Array
    rounds: jax.Array


class SpeculativeSampler:
    """The compiled draft/verify loop; greedy output equals plain greedy at `options.num_steps`."""

    def __init__(self, config: ModelConfig, options: SamplerOptions, *, draft_steps: int, lookahead: int,
                 verification_threshold: float = 1.0):
        options.check_vocab(config.vocab_size)
        if options.exit is not None or options.continuous:
            raise ValueError("Speculative decoding runs fixed depths; drop exit_criterion and continuous.")
        for name, value in (("draft_steps", draft_steps), ("lookahead", lookahead)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1.")
        if not isinstance(verification_threshold, (int, float)) or not 0 < verification_threshold:
            raise ValueError(
                f"verification_threshold={verification_threshold!r} must be a float > 0 (>= 1: argmax match)."
            )
        self.config, self.options, self.static = config, options, options.static()
        self.draft_steps, self.lookahead, self.threshold = draft_steps, lookahead, float(verification_threshold)
        self.model = RecurrentLM(config)
        self.decode = jax.jit(self._decode, donate_argnums=2)

    def prefill(self, params, knobs, prompt_BP, lengths_B, rng, *, max_new_tokens: int) -> _SpecState:
        st = prefill_for(self.static, knobs, self.config, params, prompt_BP, lengths_B, rng,
                         max_new_tokens=max_new_tokens, extra_length=self.lookahead, kv_share=self.static.kv_share)
        return _SpecState(st, jnp.zeros_like(st.lengths_B), jnp.zeros_like(st.lengths_B), jnp.zeros((), jnp.int32))

    def _decode(self, params, knobs, sp: _SpecState) -> _SpecState:
        body = functools.partial(self._round, params, knobs)
        return jax.lax.while_loop(lambda s: jnp.any(~s.base.done_B), body, sp)

    def _round(self, params, knobs: Knobs, sp: _SpecState) -> _SpecState:
        opts, d, cfg = self.static, self.lookahead, self.config
        st = sp.base
        B = st.lengths_B.shape[0]
        live = ~st.done_B
        rng, k_draft, k_init, k_fix = jax.random.split(st.rng, 4)
        sample = functools.partial(logits_lib.choose, temperature=opts.temperature, top_k=opts.top_k,
                                   top_p=opts.top_p, min_p=opts.min_p)

        def draft_one(k, carry):
            cache, token_B, drafts_Bd = carry
            init = initial_states(cfg, opts.init_scale, jax.random.fold_in(k_init, k), (B, 1, cfg.n_embd))
            out = run_block(self.model, params, cache, token_B[:, None], st.lengths_B + k, jnp.ones((B, 1), bool),
                            init, live, num_steps=self.draft_steps)
            nxt = sample(jax.random.fold_in(k_draft, k), out.logits[:, -1])
            return out.cache, nxt, drafts_Bd.at[:, k].set(nxt)

        carry = (st.cache, st.last_token_B, jnp.zeros((B, d), jnp.int32))
        cache, _, drafts_Bd = jax.lax.fori_loop(0, d, draft_one, carry)
        inputs_Bd = jnp.concatenate([st.last_token_B[:, None], drafts_Bd[:, :-1]], axis=1)
        init = initial_states(cfg, opts.init_scale, jax.random.fold_in(k_init, d), (B, d, cfg.n_embd))
        out = run_block(self.model, params, cache, inputs_Bd, st.lengths_B, jnp.ones((B, d), bool), init, live,
                        num_steps=opts.num_steps)
        logits_BdV = out.logits
        if self.threshold >= 1:
            ok_Bd = jnp.argmax(logits_BdV, axis=-1) == drafts_Bd
        else:
            p_BdV = jax.nn.softmax(logits_BdV, axis=-1)
            p_draft = jnp.take_along_axis(p_BdV, drafts_Bd[..., None], axis=-1)[..., 0]
            ok_Bd = p_draft >= self.threshold * jnp.max(p_BdV, axis=-1)
        accepted_B = jnp.sum(jnp.cumprod(ok_Bd, axis=1), axis=1).astype(jnp.int32)
        fix_at_B = jnp.minimum(accepted_B, d - 1)
        fix_B = sample(k_fix, jnp.take_along_axis(logits_BdV, fix_at_B[:, None, None], axis=1)[:, 0])
        new_Bd = jnp.where(jnp.arange(d)[None] < accepted_B[:, None], drafts_Bd, fix_B[:, None])
        count_B = jnp.where(live, jnp.minimum(accepted_B + 1, d), 0)
        newest_B = jnp.take_along_axis(new_Bd, jnp.maximum(count_B - 1, 0)[:, None], axis=1)[:, 0]
        st = st.replace(
            cache=out.cache,
            lengths_B=st.lengths_B + count_B,
            last_token_B=jnp.where(live, newest_B, st.last_token_B),
            rng=rng,
        )
        st = emit(st, knobs, new_Bd, count_B, jnp.full((B, d), opts.num_steps, jnp.int32))
        return _SpecState(
            base=st,
            drafted_B=sp.drafted_B + d * live.astype(jnp.int32),
            accepted_B=sp.accepted_B + jnp.where(live, accepted_B, 0),
            rounds=sp.rounds + 1,
        )

    def __call__(self, params, prompt_ids, *, max_new_tokens: int, prompt_lengths=None,
                 rng=None) -> SpeculativeOutput:
        knobs = self.options.knobs()
        ids, lengths, rng = prepare_prompts(self.config, prompt_ids, prompt_lengths, max_new_tokens, rng,
                                            pad_id=self.options.pad_id)
        sp = self.prefill(params, knobs, ids, lengths, rng, max_new_tokens=max_new_tokens)
        sp = self.decode(params, knobs, sp)
        st = sp.base
        return SpeculativeOutput(tokens=st.tokens_BN, steps_per_token=st.steps_BM,
                                 prompt_lengths=st.prompt_lengths_B, drafted=sp.drafted_B, accepted=sp.accepted_B,
                                 rounds=sp.rounds)


@functools.lru_cache(maxsize=8)
def _cached(config, options, draft_steps, lookahead, threshold) -> SpeculativeSampler:
    return SpeculativeSampler(config, options, draft_steps=draft_steps, lookahead=lookahead,
                              verification_threshold=threshold)


def generate_speculative(
    config: ModelConfig,
    params,
    prompt_ids,
    *,
    max_new_tokens: int,
    draft_steps: int = 4,
    num_steps: int = 32,
    lookahead: int = 8,
    verification_threshold: float = 1.0,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    stop_tokens=(),
    rng=None,
    init_scale: float = 1.0,
    kv_share: int | None = None,
    prompt_lengths=None,
    pad_id: int = 0,
) -> SpeculativeOutput:
    """Drafts `lookahead` tokens at `draft_steps` iterations and verifies them at `num_steps` in one pass.

    `out.acceptance_rate` is the share of drafted tokens the verifier kept. steps_per_token reports
    the verifier's depth.
    """
    options = SamplerOptions.build(
        num_steps=num_steps, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        stop_tokens=stop_tokens, pad_id=pad_id, init_scale=init_scale, kv_share=kv_share,
    )
    sampler = _cached(config, options, draft_steps, lookahead, verification_threshold)
    return sampler(params, prompt_ids, max_new_tokens=max_new_tokens, prompt_lengths=prompt_lengths, rng=rng)
