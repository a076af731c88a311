"""Next-token choice from logits: greedy, or temperature sampling with top-k / top-p / min-p filters."""

import jax
import jax.numpy as jnp

_NEG = -1e30


def filtered_logits(logits_BV, temperature: float, top_k: int | None, top_p: float | None, min_p: float | None):
    """Temperature-scaled logits with the tokens outside the filters set to a large negative value."""
    x = logits_BV.astype(jnp.float32) / temperature
    if top_k is not None and top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, top_k)[0][..., -1:]
        x = jnp.where(x < kth, _NEG, x)
    if min_p is not None:
        p = jax.nn.softmax(x, axis=-1)
        x = jnp.where(p < min_p * jnp.max(p, axis=-1, keepdims=True), _NEG, x)
    if top_p is not None:
        sorted_x = jnp.sort(x, axis=-1)[..., ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_x, axis=-1), axis=-1)
        # The smallest logit still inside the nucleus: keep tokens until the mass before them reaches top_p.
        keep = (cum - jax.nn.softmax(sorted_x, axis=-1)) < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_x, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < cutoff, _NEG, x)
    return x


def choose(rng, logits_BV, temperature: float, top_k=None, top_p=None, min_p=None):
    """int32 tokens [B...] from logits [B..., V]; greedy when temperature == 0."""
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    x = filtered_logits(logits_BV, temperature, top_k, top_p, min_p)
    return jax.random.categorical(rng, x, axis=-1).astype(jnp.int32)


def is_stop(tokens, stop_tokens):
    """Bool array: the token is one of `stop_tokens` (an int array, possibly empty)."""
    if stop_tokens.shape[0] == 0:
        return jnp.zeros(tokens.shape, bool)
    return jnp.any(tokens[..., None] == stop_tokens, axis=-1)
