"""Per-token adaptive exit criteria (spec section 4.5), evaluated per row inside jit.

Each criterion compares the current iteration with the previous one and says, per row, whether
the recurrence may stop. Distribution criteria read the next-token distribution at the block's
last position; latent criteria average over the block's real positions (the reference's reduce).
The criterion is checked, and its state updated, after iterations min_steps, min_steps + C, ... (C:
check_every), so each check compares with the previous check; a token exits only at a check.
"""

import dataclasses
import math
import numbers

import flax
import jax
import jax.numpy as jnp

# Defaults are the paper's / Feb-2025 release values (spec 4.5); the reference's current `auto`
# differs for kl (1e-3) and minp-kl (1e-5).
DEFAULT_THRESHOLDS = {
    "kl": 5e-4,
    "minp-kl": 1e-6,
    "entropy-diff": 1e-3,
    "latent-diff": 0.03,
    "cosine": 1e-3,
    "argmax-stability": 5,
}
CRITERIA = tuple(DEFAULT_THRESHOLDS)
_USES_LOGITS = ("kl", "minp-kl", "entropy-diff", "argmax-stability")
# Iterations between checks when SamplerOptions.check_every is 0. A logit criterion's check runs the
# coda and the full-vocabulary head; a latent criterion's is a norm of the state and costs nothing.
# Measured on the main job's model in docs/performance.md.
DEFAULT_CHECK_EVERY = {name: 3 if name in _USES_LOGITS else 1 for name in CRITERIA}
_EPS = 1e-12


@flax.struct.dataclass
class ExitState:
    prev: jax.Array  # previous log-probs [B, V], entropy [B], state [B, S, D] or argmax [B]
    count_B: jax.Array  # consecutive iterations with an unchanged argmax (argmax-stability)


@dataclasses.dataclass(frozen=True)
class ExitCriterion:
    """A named criterion and its threshold; hashable. Compiled samplers specialise on the name only."""

    name: str
    threshold: float | int

    @property
    def uses_logits(self) -> bool:
        return self.name in _USES_LOGITS

    def init(self, state_BSD, vocab_size: int) -> ExitState:
        B = state_BSD.shape[0]
        count = jnp.zeros((B,), jnp.int32)
        if self.name in ("kl", "minp-kl"):
            return ExitState(jnp.full((B, vocab_size), -math.log(vocab_size), jnp.float32), count)
        if self.name == "entropy-diff":
            return ExitState(jnp.full((B,), 100.0, jnp.float32), count)
        if self.name == "argmax-stability":
            return ExitState(jnp.full((B,), -1, jnp.int32), count)
        return ExitState(state_BSD.astype(jnp.float32), count)

    def update(self, carry: ExitState, logits_BV, state_BSD, valid_BS, threshold):
        """(new carry, value [B], exit [B]) after one iteration; `threshold` may be traced."""
        if self.name in ("kl", "minp-kl"):
            logp = jax.nn.log_softmax(logits_BV, axis=-1) if self.name == "kl" else _minp_log_probs(logits_BV)
            value = jnp.sum(jnp.exp(carry.prev) * (carry.prev - logp), axis=-1)  # KL(prev || now)
            return ExitState(logp, carry.count_B), value, value < threshold
        if self.name == "entropy-diff":
            p = jax.nn.softmax(logits_BV, axis=-1)
            entropy = -jnp.sum(p * jnp.log(p + 1e-10), axis=-1)
            value = jnp.abs(entropy - carry.prev)
            return ExitState(entropy, carry.count_B), value, value < threshold
        if self.name == "argmax-stability":
            top = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
            count = jnp.where(top == carry.prev, carry.count_B + 1, 0)
            return ExitState(top, count), count.astype(jnp.float32), count >= threshold
        s = state_BSD.astype(jnp.float32)
        if self.name == "latent-diff":
            per_pos = jnp.linalg.norm(s - carry.prev, axis=-1) / (jnp.linalg.norm(s, axis=-1) + _EPS)
        else:  # cosine
            dot = jnp.sum(s * carry.prev, axis=-1)
            per_pos = 1.0 - dot / (jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(carry.prev, axis=-1) + _EPS)
        w = valid_BS.astype(jnp.float32)
        value = jnp.sum(per_pos * w, axis=-1) / jnp.maximum(jnp.sum(w, axis=-1), 1.0)
        return ExitState(s, carry.count_B), value, value < threshold


def _minp_log_probs(logits_BV):
    """Probabilities below 0.1 x the max are set to 1/V, then renormalised (the reference's minp-kl)."""
    p = jax.nn.softmax(logits_BV, axis=-1)
    p = jnp.where(p < 0.1 * jnp.max(p, axis=-1, keepdims=True), 1.0 / logits_BV.shape[-1], p)
    return jnp.log(p / jnp.sum(p, axis=-1, keepdims=True))


def make_criterion(name: str | None, threshold=None) -> ExitCriterion | None:
    """The criterion `name` with `threshold` (None: the default), or None for no adaptive exit."""
    if name is None or name == "none":
        if threshold is not None:
            raise ValueError(
                f"exit_threshold={threshold!r} was given without an exit_criterion; pass one of {CRITERIA}."
            )
        return None
    if name not in DEFAULT_THRESHOLDS:
        raise ValueError(f"Unknown exit_criterion {name!r}; choose one of {CRITERIA} or None.")
    if threshold is None:
        return ExitCriterion(name, DEFAULT_THRESHOLDS[name])
    if name == "argmax-stability":
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Integral) or threshold < 0:
            raise ValueError(
                f"exit_threshold={threshold!r} for 'argmax-stability' must be a non-negative int "
                "(iterations the argmax must stay unchanged)."
            )
        return ExitCriterion(name, int(threshold))
    real = isinstance(threshold, numbers.Real) and not isinstance(threshold, bool)
    if not real or not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"exit_threshold={threshold!r} for {name!r} must be a finite non-negative float.")
    return ExitCriterion(name, float(threshold))


def parse_exit(spec: str) -> ExitCriterion | None:
    """'kl', 'kl:5e-4' or 'argmax-stability:3' (the CLI's --exit) as a criterion."""
    name, _, value = spec.partition(":")
    if not value:
        return make_criterion(name or None)
    try:
        threshold = int(value) if name == "argmax-stability" else float(value)
    except ValueError:
        raise ValueError(f"--exit={spec!r}: threshold {value!r} is not a number.") from None
    return make_criterion(name, threshold)


def check_exit_flags(exit: str, check_every: int, exit_in_prefill: bool) -> None:
    """The command-line settings of an exit criterion need the criterion (`--exit`) itself."""
    if check_every and not exit:
        raise ValueError("--check_every needs an --exit criterion.")
    if not exit_in_prefill and not exit:
        raise ValueError("--noexit_in_prefill needs an --exit criterion.")
