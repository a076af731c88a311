"""The train state, initialised directly into its shardings so no host holds the whole model."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rdlm import sharding
from rdlm.model import RecurrentLM


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any


def strip_boxes(tree):
    """The arrays of a tree whose leaves may be LogicallyPartitioned (no sharding constraint applied)."""
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
        tree,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )


def _init_params_boxed(model: RecurrentLM, rng, seq_len: int = 8):
    ids = jnp.zeros((1, min(seq_len, model.config.block_size)), jnp.int32)
    return model.init({"params": rng}, ids, num_steps=1, init_scale=0.0)["params"]


def _init_boxed(model: RecurrentLM, tx: optax.GradientTransformation, rng, seq_len: int) -> TrainState:
    """Params and optimizer state with LogicallyPartitioned leaves (they carry the axis names)."""
    params = _init_params_boxed(model, rng, seq_len)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def _abstract_and_shardings(init_boxed, mesh, rules):
    """(unboxed shapes, NamedShardings) of what `init_boxed(rng)` creates, checked to split evenly."""
    boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    abstract = strip_boxes(boxed)
    sharding.check_divisible(abstract, shardings)
    return abstract, shardings


def abstract_state(model, tx, mesh, rules, seq_len: int) -> tuple[TrainState, TrainState]:
    """(shapes of the unboxed state, its NamedShardings), allocating nothing."""
    return _abstract_and_shardings(lambda rng: _init_boxed(model, tx, rng, seq_len), mesh, rules)


def param_shardings(model: RecurrentLM, mesh, rules):
    """NamedShardings of the model's parameters on a mesh (e.g. to load a checkpoint onto it)."""
    return _abstract_and_shardings(lambda rng: _init_params_boxed(model, rng), mesh, rules)[1]


def init_state(model, tx, rng, mesh, rules, seq_len: int, shardings: TrainState | None = None) -> TrainState:
    """A fresh state, each array created on its own shards (`shardings` from abstract_state, if at hand)."""
    if shardings is None:
        _, shardings = abstract_state(model, tx, mesh, rules, seq_len)
    init = jax.jit(lambda r: strip_boxes(_init_boxed(model, tx, r, seq_len)), out_shardings=shardings)
    return init(rng)


def state_from_params(params, tx, shardings: TrainState) -> TrainState:
    """A step-0 state around given (e.g. converted) params, with a fresh optimizer state."""
    params = jax.device_put(params, shardings.params)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params=params, opt_state=opt_state)
