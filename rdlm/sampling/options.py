"""The frozen, hashable sampler options, split into what compiled code specialises on and traced knobs.

A compiled sampler is specialised on `options.static()` (and shapes); the exit threshold, min_steps,
check_every, the stop tokens and the pad id travel as `Knobs` arrays, so changing them does not recompile.
"""

import dataclasses
import functools
import math
import numbers

import flax
import jax
import jax.numpy as jnp

from rdlm.sampling.exits import DEFAULT_CHECK_EVERY, DEFAULT_THRESHOLDS, ExitCriterion, make_criterion


@flax.struct.dataclass
class Knobs:
    exit_threshold: jax.Array  # float32 scalar
    min_steps: jax.Array  # int32 scalar: iterations before a token may exit (at least 1)
    check_every: jax.Array  # int32 scalar: the criterion is checked after iterations min_steps + j * check_every
    stop_tokens: jax.Array  # int32 [8k], padded with -1 so that a few more stops reuse the compiled code
    pad_id: jax.Array  # int32 scalar


def _check_int(name: str, value, low: int):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}.")


def _check_float(name: str, value, low: float, high: float = math.inf, open_low: bool = False):
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if not ok or value < low or value > high or (open_low and value == low):
        bound = f"> {low}" if open_low else f">= {low}"
        upper = f" and <= {high}." if high < math.inf else "."
        raise ValueError(f"{name}={value!r} must be a float {bound}{upper}")


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """How tokens are produced; a Sampler compiles once per (options, shapes)."""

    num_steps: int = 32  # core iterations per token (the reference's num_steps / r)
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    stop_tokens: tuple[int, ...] = ()  # a row ends after emitting one of these; later tokens are pad
    pad_id: int = 0  # fills the output after a row's end
    init_scale: float = 1.0  # std multiplier of the random initial state (drawn per token); 0 = zero state
    exit: ExitCriterion | None = None  # per-token adaptive exit (see rdlm.sampling.exits)
    min_steps: int = 0  # iterations a token runs before it may exit (reference: first check after min_steps + 1)
    # Check the exit criterion every C iterations (the reference's check_criterion_every_n_steps); 0 = the
    # criterion's default (DEFAULT_CHECK_EVERY): a logit criterion's check runs the coda and the head.
    check_every: int = 0
    kv_share: int | None = None  # core KV slots per token (None: one per iteration)
    continuous: bool = False  # start each token's state from the previous token's final raw state s_r
    # The prompt's iterations stop by the exit criterion as well (checked on the prompt block as a whole:
    # its last position's distribution, or its mean latent change), as in the reference, whose
    # `do_not_exit_in_prefill` defaults to False. False runs the prompt at full depth.
    exit_in_prefill: bool = True

    def __post_init__(self):
        _check_int("num_steps", self.num_steps, 1)
        _check_float("temperature", self.temperature, 0.0)
        if self.top_k is not None:
            _check_int("top_k", self.top_k, 1)
        if self.top_p is not None:
            _check_float("top_p", self.top_p, 0.0, 1.0, open_low=True)
        if self.min_p is not None:
            _check_float("min_p", self.min_p, 0.0, 1.0)
        for t in self.stop_tokens:
            _check_int("stop token", t, 0)
        _check_int("pad_id", self.pad_id, 0)
        _check_float("init_scale", self.init_scale, 0.0)
        _check_int("min_steps", self.min_steps, 0)
        _check_int("check_every", self.check_every, 0)
        if self.min_steps > self.num_steps:
            raise ValueError(f"min_steps={self.min_steps} exceeds num_steps={self.num_steps}.")
        if self.kv_share is not None:
            _check_int("kv_share", self.kv_share, 1)
            if self.kv_share > self.num_steps:
                raise ValueError(
                    f"kv_share={self.kv_share} exceeds num_steps={self.num_steps}; use None for a full cache."
                )

    @classmethod
    def build(cls, *, stop_tokens=(), exit_criterion=None, exit_threshold=None, **fields) -> "SamplerOptions":
        """Options from generate()-style arguments (a criterion name and threshold, any iterable of stops)."""
        if isinstance(stop_tokens, numbers.Integral):
            stop_tokens = (stop_tokens,)
        stop_tokens = tuple(stop_tokens)
        for t in stop_tokens:
            _check_int("stop token", t, 0)
        stops = tuple(sorted({int(t) for t in stop_tokens}))
        return cls(stop_tokens=stops, exit=make_criterion(exit_criterion, exit_threshold), **fields)

    def static(self) -> "SamplerOptions":
        """These options without the knob values: the key compiled code is specialised on. Without an exit,
        exit_in_prefill changes nothing, so both values share one key."""
        exit = None if self.exit is None else ExitCriterion(self.exit.name, DEFAULT_THRESHOLDS[self.exit.name])
        return dataclasses.replace(self, exit=exit, min_steps=0, check_every=0, stop_tokens=(), pad_id=0,
                                   exit_in_prefill=self.exit_in_prefill or exit is None)

    @property
    def check_interval(self) -> int:
        """Iterations between exit checks: check_every, or the criterion's default for 0."""
        if self.check_every:
            return self.check_every
        return 1 if self.exit is None else DEFAULT_CHECK_EVERY[self.exit.name]

    @property
    def uses_rng(self) -> bool:
        """Whether tokens or initial states are random (else the decode loop never splits its key)."""
        return self.temperature > 0 or (self.init_scale > 0 and not self.continuous)

    def knobs(self) -> Knobs:
        return _knobs(self)

    def check_vocab(self, vocab_size: int) -> None:
        for name, ids in (("stop token", self.stop_tokens), ("pad_id", (self.pad_id,))):
            for t in ids:
                if t >= vocab_size:
                    raise ValueError(f"{name} {t} is outside the model's vocabulary (vocab_size={vocab_size}).")


@functools.lru_cache(maxsize=64)
def _knobs(options: SamplerOptions) -> Knobs:
    """The options' knob arrays, made once per options (a host-to-device copy each costs more than a token)."""
    threshold = 0.0 if options.exit is None else float(options.exit.threshold)
    stops = options.stop_tokens
    width = 8 * math.ceil(max(len(stops), 1) / 8)
    return Knobs(
        exit_threshold=jnp.asarray(threshold, jnp.float32),
        min_steps=jnp.asarray(max(options.min_steps, 1), jnp.int32),
        check_every=jnp.asarray(options.check_interval, jnp.int32),
        stop_tokens=jnp.asarray(stops + (-1,) * (width - len(stops)), jnp.int32),
        pad_id=jnp.asarray(options.pad_id, jnp.int32),
    )
