"""Optimizers and learning-rate schedules as optax transformations.

The paper's optimizer is the reference's `ELLISAdam` with `atan_adam`, `update_clipping` and
`running_init` on (recpre/optim.py, `_single_tensor_modded_adamw`, lines 907-1035). Per tensor and
step t (1-based), with g the globally clipped gradient:

    m, v = (g, g**2) if running_init and t == 1 else (m, v)       # lines 825-830
    m = b1 * m + (1 - b1) * g;  v = b2 * v + (1 - b2) * g**2       # lines 969-970
    v = max(v, 1e-6**2)        # line 975, only with update_clipping; in place, so kept in state
    clip = max(1, sqrt(mean(g**2 / v)))      # per tensor, new v (line 975)
    u = atan2(m, sqrt(v / (1 - b2**t))) / ((1 - b1**t) * clip)     # lines 976-984, 1015
    p = p * (1 - lr_t / peak_lr * wd) - lr_t * u                   # lines 1011, 1019

Bias correction still applies at t = 1 under running init (so the first step is atan(sqrt(1 - b2))
/ (1 - b1) ~ 2.2 lr per coordinate), and the first-moment correction multiplies the atan2 output
instead of entering it. Weight decay is decoupled and scaled by the schedule, not by lr itself;
here it is `add_decayed_weights(wd / peak_lr)` ahead of the learning-rate scaling, which is the
same update.

Fine-tuning can freeze parameters (`optim.freeze`): they get no update, no optimizer state and no
weight decay, so they stay bit-identical, and the gradient clip sees only the trained ones.
"""

import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adam_atan2", "adamw")
SCHEDULES = ("warmup_constant", "wsd", "cosine")
DECAY_SHAPES = ("linear", "1-sqrt")

# Parameters under this key are stacked layers [L, ...] (the model's nn.scan over a stage).
STACKED_LAYERS_KEY = "layers"
# Names of the decayed matrices in rdlm's model (kernel: any plain flax Dense).
DECAYED = ("kernel", "embedding", "adapter", "wqkv", "wo", "fc", "proj")

# optim.freeze shorthands: the regex (over '/'-joined parameter paths) each name stands for.
FREEZE_GROUPS = {"prelude": r"^prelude/", "core": r"^core/", "coda": r"^(coda|ln_f)/", "embedding": r"^wte/"}

# The reference's default `eps`; with atan2 it is only the floor of v under update clipping.
_V_FLOOR_EPS = 1e-6


class ScaleByAdamAtan2State(NamedTuple):
    """Step count (int32 scalar array) and the two moment trees."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam_atan2(
    b1: float = 0.9,
    b2: float = 0.95,
    *,
    update_clipping: bool = True,
    running_init: bool = True,
) -> optax.GradientTransformation:
    """The reference's Adam-atan2 direction, without learning rate or weight decay."""

    def init_fn(params):
        return ScaleByAdamAtan2State(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params),
            nu=optax.tree.zeros_like(params),
        )

    def update_fn(updates, state, params=None):
        del params
        first = state.count == 0
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        bias_correction1 = 1 - b1**t
        bias_correction2 = 1 - b2**t

        def first_moment(g, m):
            g = g.astype(m.dtype)
            m = jnp.where(first, g, m) if running_init else m
            return b1 * m + (1 - b1) * g

        def second_moment(g, v):
            g = g.astype(v.dtype)
            v = jnp.where(first, g * g, v) if running_init else v
            v = b2 * v + (1 - b2) * g * g
            return jnp.maximum(v, _V_FLOOR_EPS**2) if update_clipping else v

        def direction(path, g, m, v):
            g = g.astype(m.dtype)
            # The reference clips per torch tensor, i.e. per layer: stacked [L, ...] params reduce per slice.
            axes = tuple(range(1, g.ndim)) if STACKED_LAYERS_KEY in _path_names(path) else None
            ratio = jnp.mean(g * g / v, axis=axes, keepdims=axes is not None)
            clip = jnp.maximum(jnp.sqrt(ratio), 1.0) if update_clipping else 1.0
            u = jnp.arctan2(m, jnp.sqrt(v) / jnp.sqrt(bias_correction2))
            return u / (bias_correction1 * clip)

        mu = jax.tree.map(first_moment, updates, state.mu)
        nu = jax.tree.map(second_moment, updates, state.nu)
        updates = jax.tree_util.tree_map_with_path(direction, updates, mu, nu)
        return updates, ScaleByAdamAtan2State(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def adam_atan2(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.95,
    *,
    update_clipping: bool = True,
    running_init: bool = True,
) -> optax.GradientTransformation:
    """ELLISAdam with `atan_adam` (no weight decay): the direction above times -learning_rate."""
    return optax.chain(
        scale_by_adam_atan2(b1, b2, update_clipping=update_clipping, running_init=running_init),
        optax.scale_by_learning_rate(learning_rate),
    )


def _path_names(path) -> list[str]:
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
    return names


def _decays(path, _) -> bool:
    names = _path_names(path)
    leaf, modules = names[-1], [m.lower() for m in names[:-1]]
    if leaf == "scale" or leaf.endswith("bias"):
        return False
    if any("norm" in m or m.startswith("ln_") for m in modules):
        return False
    if leaf in DECAYED:
        return True
    raise ValueError(
        f"weight_decay_mask: parameter '{'/'.join(names)}' is neither a matrix {DECAYED} (decayed) "
        "nor a norm scale or bias (not decayed); name it accordingly or extend the rule in "
        "rdlm/optim.py."
    )


def weight_decay_mask(params: Any) -> Any:
    """True for matrices (`DECAYED`); False for norm scales, biases (qk_bias) and norm modules.

    Works on concrete or abstract (`jax.ShapeDtypeStruct`) parameter trees, since only paths count.
    """
    return jax.tree_util.tree_map_with_path(_decays, params)


def freeze_labels(params: Any, freeze: str) -> Any:
    """'frozen' or 'trained' per parameter: `freeze` is comma-separated FREEZE_GROUPS names or regexes, each
    searched in the parameter's '/'-joined path (e.g. prelude/layers/attn/wqkv); each must match something."""
    patterns = [FREEZE_GROUPS.get(p.strip(), p.strip()) for p in freeze.split(",") if p.strip()]
    paths = ["/".join(_path_names(path)) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for given, pattern in zip([p.strip() for p in freeze.split(",") if p.strip()], patterns):
        try:
            matched = any(re.search(pattern, path) for path in paths)
        except re.error as e:
            raise ValueError(f"optim.freeze: {given!r} is not a valid regular expression ({e}).") from None
        if not matched:
            raise ValueError(
                f"optim.freeze: {given!r} matches no parameter; use {', '.join(FREEZE_GROUPS)} or a regex over names "
                f"like {paths[0]}."
            )
    frozen = [any(re.search(p, path) for p in patterns) for path in paths]
    if all(frozen):
        raise ValueError(f"optim.freeze={freeze!r} freezes every parameter; leave some to train.")
    labels = iter("frozen" if f else "trained" for f in frozen)
    return jax.tree.map(lambda _: next(labels), params)


def _check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not supported; use one of {', '.join(allowed)}.")


def make_schedule(config) -> optax.Schedule:
    """The learning rate at each optimizer step, from `config.optim.schedule`.

    Steps are counted like the reference's `get_lr(step)` (train.py lines 831-852), which gets the
    1-based step: the first update uses peak/warmup_steps and step warmup_steps - 1 reaches peak.
    """
    o = config.optim
    _check_choice("config.optim.schedule", o.schedule, SCHEDULES)
    peak, warmup, num_steps = float(o.lr), int(o.warmup_steps), int(config.train.num_steps)
    if peak <= 0:
        raise ValueError(f"config.optim.lr must be positive, got {o.lr}.")
    if warmup < 0:
        raise ValueError(f"config.optim.warmup_steps must be >= 0, got {warmup}.")
    min_ratio = float(o.min_lr_ratio)

    def warm(step):
        return jnp.minimum(1.0, step / warmup) if warmup > 0 else 1.0

    if o.schedule == "warmup_constant":

        def schedule(count):
            return peak * warm(count + 1.0)

    elif o.schedule == "wsd":
        _check_choice("config.optim.decay_shape", o.decay_shape, DECAY_SHAPES)
        if not 0 <= o.decay_fraction <= 1:
            raise ValueError(
                f"config.optim.decay_fraction must be in [0, 1], got {o.decay_fraction}."
            )
        decay_steps = round(o.decay_fraction * num_steps)
        decay_start = num_steps - decay_steps

        def schedule(count):
            step = count + 1.0
            frac = jnp.clip((step - decay_start) / max(decay_steps, 1), 0.0, 1.0)
            left = 1 - frac if o.decay_shape == "linear" else 1 - jnp.sqrt(frac)
            return peak * warm(step) * (min_ratio + (1 - min_ratio) * left)

    else:
        if num_steps <= warmup:
            raise ValueError(
                f"config.train.num_steps ({num_steps}) must exceed config.optim.warmup_steps "
                f"({warmup}) for the cosine schedule."
            )

        def schedule(count):
            step = count + 1.0
            frac = jnp.clip((step - warmup) / (num_steps - warmup), 0.0, 1.0)
            left = 0.5 * (1 + jnp.cos(math.pi * frac))
            return peak * warm(step) * (min_ratio + (1 - min_ratio) * left)

    return schedule


def make_optimizer(config, *, accumulate: bool = True) -> optax.GradientTransformation:
    """Global-norm clipping, then the chosen optimizer, masked decoupled weight decay and schedule, on the
    parameters `config.optim.freeze` leaves trained (the others get zero updates).

    The weight-decay mask is computed from each tree's paths (`weight_decay_mask`). `config.optim.weight_decay` is the fraction
    of each decayed weight removed per step at peak lr (the reference's decoupled convention) for
    both optimizers. With `accumulate` and `config.train.grad_accum_steps > 1` the result is wrapped
    in `optax.MultiSteps` (mean of the micro-batch gradients, one update every k calls); pass
    `accumulate=False` when the train step accumulates itself.
    """
    o = config.optim
    _check_choice("config.optim.name", o.name, OPTIMIZERS)
    schedule = make_schedule(config)
    if o.name == "adam_atan2":
        direction = scale_by_adam_atan2(
            o.b1, o.b2, update_clipping=o.update_clipping, running_init=o.running_init
        )
    else:
        direction = optax.scale_by_adam(o.b1, o.b2, eps=o.eps)
    chain = [
        optax.clip_by_global_norm(o.grad_clip) if o.grad_clip else optax.identity(),
        direction,
        optax.add_decayed_weights(o.weight_decay / o.lr, weight_decay_mask)
        if o.weight_decay
        else optax.identity(),
        optax.scale_by_learning_rate(schedule),
    ]
    optimizer = optax.chain(*chain)
    freeze = str(o.get("freeze", ""))
    if freeze.strip():
        optimizer = optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()},
                                          lambda params: freeze_labels(params, freeze))
    if not accumulate:
        return optimizer
    k = int(config.train.grad_accum_steps)
    if k < 1:
        raise ValueError(f"config.train.grad_accum_steps must be >= 1 to accumulate in the optimizer, got {k}.")
    if k > 1:
        return optax.MultiSteps(optimizer, every_k_schedule=k).gradient_transformation()
    return optimizer
