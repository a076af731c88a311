"""RecurrentLM: embed, prelude, recurrent core, coda, shared final norm and tied head."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rdlm.model import recurrence
from rdlm.model.config import ModelConfig
from rdlm.model.layers import ACT_BSD, BlockStack, RMSNorm, logical_param, trunc_normal


@flax.struct.dataclass
class RecurrentLMOutput:
    logits: jax.Array | None  # [B, S, V] float32
    latents: jax.Array  # [B, S, D] ln_f(s_r), the reference's `latent_states`
    state: jax.Array  # [B, S, D] s_r itself (continuous chain-of-thought starts from it)
    prev_state: jax.Array  # [B, S, D] s_{r-1} (s_0 when r = 0), for convergence diagnostics


class Embedder(nn.Module):
    """The token embedding, scaled by sqrt(D) on the way in and reused as the output head."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.embedding = logical_param(
            self, "embedding", trunc_normal(cfg.init_std), (cfg.vocab_size, cfg.n_embd), ("vocab", "embed"), cfg.weight_dtype
        )

    def encode(self, input_ids_BS):
        x_BSD = jnp.take(self.embedding, input_ids_BS, axis=0).astype(self.config.compute_dtype)
        return x_BSD * jnp.asarray(self.config.embed_scale, self.config.compute_dtype)

    def lookup(self, input_ids_BS):
        """Unscaled rows of the table (what `input_embeds` replaces)."""
        return jnp.take(self.embedding, input_ids_BS, axis=0)

    def decode(self, x_BSD):
        table = self.embedding.astype(self.config.compute_dtype)
        return jnp.einsum("bsd,vd->bsv", x_BSD, table, preferred_element_type=jnp.float32)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


class RecurrentLM(nn.Module):
    """The recurrent-depth LM of Geiping et al. 2025 (huginn-0125) as a linen module.

    `num_steps` is an int n (n iterations, no gradient), a pair (n, k) (n without gradient, n may be
    traced, then k with gradient; a traced k runs a masked scan of length mean_backprop_depth), or
    None (mean_recurrence iterations, as the reference's eval mode). The initial state is
    `init_state` if given, zero if `init_scale == 0`, else drawn from the 'state' rng.
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.wte = Embedder(cfg)
        self.prelude = BlockStack(cfg, cfg.n_layers_in_prelude, remat=True)
        self.core = recurrence.CoreIteration(cfg)
        self.coda = BlockStack(cfg, cfg.n_layers_in_coda, remat=True)
        self.ln_f = RMSNorm(cfg)

    def __call__(
        self,
        input_ids=None,
        *,
        input_embeds=None,
        num_steps: Any = None,
        init_state=None,
        init_scale: float = 1.0,
        positions=None,
        segment_ids=None,
        attention_mask=None,
        return_logits: bool = True,
    ) -> RecurrentLMOutput:
        if input_embeds is not None:
            input_ids = jnp.zeros(input_embeds.shape[:2], jnp.int32) if input_ids is None else input_ids
        elif input_ids is None:
            raise ValueError("Pass input_ids (or input_embeds).")
        input_ids, positions, segment_ids = self.prepare_inputs(input_ids, positions, segment_ids, attention_mask)
        n, k = self.split_num_steps(num_steps)
        embedded, _ = self.embed(input_ids, positions, segment_ids, input_embeds=input_embeds)
        if init_state is None:
            state = self.initial_state(embedded.shape, init_scale)
        else:
            if tuple(init_state.shape) != tuple(embedded.shape):
                raise ValueError(f"init_state has shape {tuple(init_state.shape)}; expected {tuple(embedded.shape)}.")
            state = init_state.astype(self.config.compute_dtype)
        if self.is_initializing():
            self.core(state, embedded, positions, segment_ids)
        state, prev = recurrence.run_no_grad(self.core, state, embedded, positions, segment_ids, n)
        if not (isinstance(k, int) and k == 0):
            max_k = k if isinstance(k, int) else self.config.mean_backprop_depth
            state, prev = recurrence.run_with_grad(self.core, state, prev, embedded, positions, segment_ids, k, max_k)
        logits, latents, _ = self.decode(state, positions, segment_ids, return_logits=return_logits)
        return RecurrentLMOutput(logits=logits, latents=latents, state=state, prev_state=prev)

    def prepare_inputs(self, input_ids, positions, segment_ids, attention_mask):
        """Validates ids and fills in positions/segment ids (from an HF-style attention_mask if given)."""
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}.")
        B, S = input_ids.shape
        if S > cfg.block_size:
            raise ValueError(
                f"Sequence length {S} exceeds the positions table (block_size={cfg.block_size}); shorten the input."
            )
        if _is_concrete(input_ids) and input_ids.size:
            lo, hi = int(np.min(np.asarray(input_ids))), int(np.max(np.asarray(input_ids)))
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(
                    f"Token ids must lie in [0, {cfg.vocab_size}); got ids from {lo} to {hi}. "
                    "Check that the tokenizer matches the model."
                )
        if attention_mask is not None:
            mask = jnp.asarray(attention_mask).astype(jnp.int32)
            segment_ids = mask if segment_ids is None else segment_ids
            positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0) if positions is None else positions
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        elif _is_concrete(positions) and np.size(positions) and int(np.max(np.asarray(positions))) >= cfg.block_size:
            raise ValueError(
                f"Position {int(np.max(np.asarray(positions)))} exceeds the positions table (block_size={cfg.block_size})."
            )
        if segment_ids is None:
            segment_ids = jnp.ones((B, S), jnp.int32)
        return input_ids, jnp.asarray(positions), jnp.asarray(segment_ids)

    def split_num_steps(self, num_steps):
        """(n, k) from an int, a pair, or None; negative counts are an error."""
        if num_steps is None:
            return self.config.mean_recurrence, 0
        if isinstance(num_steps, (tuple, list)):
            if len(num_steps) != 2:
                raise ValueError(f"num_steps must be an int or a pair (n, k); got {num_steps!r}.")
            n, k = num_steps
        else:
            n, k = num_steps, 0
        for name, value in (("n", n), ("k", k)):
            if _is_concrete(value) and np.ndim(value) == 0 and int(value) < 0:
                raise ValueError(f"num_steps must be non-negative; got {name}={int(value)}.")
        if not isinstance(k, int) and _is_concrete(k) and int(k) > self.config.mean_backprop_depth:
            raise ValueError(f"A traced k={int(k)} exceeds mean_backprop_depth={self.config.mean_backprop_depth}.")
        return n, k

    def initial_state(self, shape, init_scale: float = 1.0):
        if init_scale == 0:
            return recurrence.initial_state(self.config, None, shape, 0.0)
        if not self.has_rng("state"):
            raise ValueError(
                "A random initial state needs an rng: pass rngs={'state': key} to apply, or init_scale=0.0, "
                "or init_state=..."
            )
        return recurrence.initial_state(self.config, self.make_rng("state"), shape, init_scale)

    def embed(self, input_ids, positions, segment_ids, past_kv=None, past_mask=None, input_embeds=None):
        """Prelude output e [B, S, D] and the prelude layers' stacked (k, v).

        `input_embeds` replaces the table lookup and is scaled by sqrt(D) as the reference does.
        """
        if input_embeds is None:
            x = self.wte.encode(input_ids)
        else:
            x = jnp.asarray(input_embeds, self.config.compute_dtype) * jnp.asarray(self.config.embed_scale, self.config.compute_dtype)
        x = nn.with_logical_constraint(x, ACT_BSD)
        return self.prelude(x, positions, segment_ids, past_kv, past_mask)

    def iterate(self, state, embedded, positions, segment_ids, past_kv=None, past_mask=None):
        """One core iteration: (new state, the core layers' stacked (k, v))."""
        return self.core(state, embedded, positions, segment_ids, past_kv, past_mask)

    def decode(self, state, positions, segment_ids, past_kv=None, past_mask=None, return_logits: bool = True):
        """ln_f -> coda -> ln_f -> tied head: (logits float32 or None, latents, the coda's (k, v))."""
        latents = self.ln_f(state)
        y, kv = self.coda(latents, positions, segment_ids, past_kv, past_mask)
        logits = self.wte.decode(self.ln_f(y)) if return_logits else None
        return logits, latents, kv
