"""The training program a config describes on a mesh: its model, its micro-batches and its jitted train step.

`rdlm.train` runs this program; `dry_run` compiles the very same step from abstract shapes, allocating
nothing, and reports its memory per device (`python -m rdlm.train ... --dry_run` and
`python -m rdlm.memory_plan` both print it).

Micro-batches: `train.batch_size` sequences make one optimizer step. `train.per_device_batch` > 0 puts
that many sequences on each data-parallel device per micro-batch and derives `train.grad_accum_steps`
from the mesh; an explicit `train.grad_accum_steps` > 0 wins over it.
"""

import dataclasses
import math
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from rdlm import optim, sharding, state as state_lib, steps
from rdlm.model import ModelConfig, RecurrentLM

# The arrays of one batch of rdlm.data.pipeline, each [rows, seq_len].
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")
CPU_NOTE = (
    "Estimates from the CPU compiler for the same number of devices; "
    "TPU/GPU compilers fuse and schedule differently."
)


def model_config_from(config: ml_collections.ConfigDict) -> ModelConfig:
    """The ModelConfig of a run: `config.model` plus the recurrence of `config.recurrence`."""
    fields = dict(config.model.to_dict())
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(fields) - known
    if unknown:
        raise ValueError(f"config.model has unknown field(s) {sorted(unknown)}.")
    backprop = config.recurrence.fixed or config.recurrence.backprop
    return ModelConfig(**fields, mean_recurrence=max(config.recurrence.mean, 1), mean_backprop_depth=max(backprop, 1))


@dataclasses.dataclass(frozen=True)
class MicroBatches:
    """How the `batch_size` sequences of one optimizer step split into micro-batches over the mesh."""

    batch_size: int
    grad_accum_steps: int
    data_ways: int  # devices the batch dimension is split over (the data-parallel ways of the mesh)
    per_device_batch: int  # train.per_device_batch as configured (0: not set)
    derived: bool  # grad_accum_steps was derived (train.grad_accum_steps = 0)

    @property
    def micro_batch(self) -> int:
        """Sequences per micro-batch, over all devices."""
        return self.batch_size // self.grad_accum_steps

    @property
    def per_device(self) -> int:
        """Sequences per device per micro-batch."""
        return self.micro_batch // self.data_ways

    def describe(self) -> str:
        origin = (
            f"derived from train.per_device_batch={self.per_device_batch}" if self.derived and self.per_device_batch
            else "one micro-batch: train.per_device_batch is not set" if self.derived
            else "as set in the config"
        )
        return (
            f"train.grad_accum_steps={self.grad_accum_steps} ({origin}): {self.batch_size} sequences per step in "
            f"{self.grad_accum_steps} micro-batch(es) of {self.micro_batch}, {self.per_device} per device on "
            f"{self.data_ways} data-parallel device(s)."
        )


def data_ways(mesh, rules) -> int:
    """Devices the batch dimension is split over."""
    return math.prod(mesh.shape[a] for a in sharding.data_axes(rules))


def micro_batches(config, mesh, rules) -> MicroBatches:
    """The micro-batch layout of `config.train` on `mesh`; one sentence naming the field when it cannot fit."""
    train = config.train
    batch, accum, per_device = int(train.batch_size), int(train.grad_accum_steps), int(train.per_device_batch)
    if batch < 1:
        raise ValueError(f"train.batch_size={batch} must be at least 1.")
    if accum < 0:
        raise ValueError(
            f"train.grad_accum_steps={accum} must be >= 1, or 0 to derive it from train.per_device_batch."
        )
    if per_device < 0:
        raise ValueError(f"train.per_device_batch={per_device} must be >= 1 sequences, or 0 to leave it unset.")
    ways = data_ways(mesh, rules)
    derived = accum == 0
    if derived and per_device:
        micro = per_device * ways
        if batch % micro:
            raise ValueError(
                f"train.batch_size={batch} is not a multiple of train.per_device_batch={per_device} x {ways} "
                f"data-parallel devices = {micro}; change one of them (or set train.grad_accum_steps)."
            )
        accum = batch // micro
    elif derived:
        accum = 1
    if batch % accum:
        raise ValueError(f"train.batch_size={batch} must be a multiple of train.grad_accum_steps={accum}.")
    sharding.check_batch(batch // accum, mesh, rules, "train.batch_size / train.grad_accum_steps")
    layout = MicroBatches(batch, accum, ways, per_device, derived)
    if not derived and per_device and layout.per_device != per_device:
        logging.warning(
            "train.grad_accum_steps=%d is set, so train.per_device_batch=%d is ignored (%d per device).",
            accum, per_device, layout.per_device,
        )
    return layout


def check_config(config, model_config: ModelConfig) -> None:
    """Checks what would otherwise fail deep inside JAX."""
    if config.train.num_steps < 0:
        raise ValueError(f"train.num_steps={config.train.num_steps} must be >= 0.")
    if config.data.seq_len > model_config.block_size:
        raise ValueError(f"data.seq_len={config.data.seq_len} exceeds model.block_size={model_config.block_size}.")
    if config.recurrence.mean < 1 and not config.recurrence.fixed:
        raise ValueError(f"recurrence.mean={config.recurrence.mean} must be >= 1.")


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """What a training run executes on its mesh: built from abstract shapes, nothing allocated yet."""

    model_config: ModelConfig
    model: RecurrentLM
    tx: Any  # optax.GradientTransformation
    schedule: Callable
    abstract: state_lib.TrainState  # shapes of the state
    shardings: state_lib.TrainState  # NamedShardings of the state
    micro: MicroBatches
    batch_sharding: jax.sharding.NamedSharding
    key_sharding: jax.sharding.NamedSharding  # replicated
    train_step: Callable  # jitted `(state, batch, key) -> (state, metrics)`, the state donated

    def key(self, seed: int) -> jax.Array:
        """The run's key for `train_step`: raw key data, replicated over the mesh (an argument, not a constant of
        the program, so that seeds share one compiled step)."""
        data = np.asarray(jax.random.key_data(jax.random.key(seed)))
        return jax.make_array_from_callback(data.shape, self.key_sharding, lambda index: data[index])

    def abstract_key(self) -> jax.ShapeDtypeStruct:
        shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
        return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=self.key_sharding)

    def abstract_batch(self, seq_len: int) -> dict:
        """Shapes of one step's batch (with a leading micro-batch axis when accumulating)."""
        m = self.micro
        rows = (m.grad_accum_steps, m.micro_batch) if m.grad_accum_steps > 1 else (m.micro_batch,)
        dtypes = {k: jnp.float32 if k == "weights" else jnp.int32 for k in BATCH_KEYS}
        return {k: jax.ShapeDtypeStruct((*rows, seq_len), d, sharding=self.batch_sharding) for k, d in dtypes.items()}


def build(config, mesh, rules) -> TrainProgram:
    """The program of `config` on `mesh`; call it under `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`."""
    model_config = model_config_from(config)
    check_config(config, model_config)
    micro = micro_batches(config, mesh, rules)
    model = RecurrentLM(model_config)
    tx = optim.make_optimizer(config, accumulate=False)
    schedule = optim.make_schedule(config)
    abstract, shardings = state_lib.abstract_state(model, tx, mesh, rules, config.data.seq_len)
    accum = micro.grad_accum_steps
    batch_sharding = sharding.batch_sharding(mesh, rules, leading_dims=1 if accum > 1 else 0)
    key_sharding = sharding.replicated(mesh)
    train_step = jax.jit(
        steps.make_train_step(model, tx, schedule, config.recurrence, accum),
        in_shardings=(shardings, batch_sharding, key_sharding),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    return TrainProgram(model_config, model, tx, schedule, abstract, shardings, micro, batch_sharding, key_sharding,
                        train_step)


def per_device_bytes(abstract, shardings) -> int:
    """Bytes one device holds of a tree of abstract arrays under their NamedShardings."""
    sizes = jax.tree.map(lambda x, s: math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize, abstract, shardings)
    return sum(jax.tree.leaves(sizes))


def dry_run(config, devices=None) -> dict:
    """Compiles the train step of `config` on `devices` (default: all) from abstract shapes; bytes per device.

    `per_device_bytes` is the step's peak as the compiler plans it: arguments, outputs not written in
    place of a donated argument, temporaries and the program itself.
    """
    devices = list(jax.devices() if devices is None else devices)
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.check_rules(config.mesh.rules, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        program = build(config, mesh, rules)
        batch = program.abstract_batch(config.data.seq_len)
        start = time.perf_counter()
        lowered = program.train_step.lower(program.abstract, batch, program.abstract_key())
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
        compiled_at = time.perf_counter()
    memory = compiled.memory_analysis()
    micro = program.micro
    out = {
        "devices": len(devices),
        "platform": devices[0].platform,
        "mesh": dict(mesh.shape),
        "parameters": sum(math.prod(x.shape) for x in jax.tree.leaves(program.abstract.params)),
        "global_batch": micro.batch_size,
        "grad_accum_steps": micro.grad_accum_steps,
        "micro_batch": micro.micro_batch,
        "per_device_micro_batch": micro.per_device,
        "seq_len": config.data.seq_len,
        "param_bytes": per_device_bytes(program.abstract.params, program.shardings.params),
        "opt_state_bytes": per_device_bytes(program.abstract.opt_state, program.shardings.opt_state),
        "batch_bytes": per_device_bytes(batch, jax.tree.map(lambda _: program.batch_sharding, batch)),
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "generated_code_bytes": memory.generated_code_size_in_bytes,
        "lower_seconds": round(lowered_at - start, 2),
        "compile_seconds": round(compiled_at - lowered_at, 2),
    }
    live = ("argument_bytes", "output_bytes", "temp_bytes", "generated_code_bytes")
    out["per_device_bytes"] = sum(out[k] for k in live) - out["alias_bytes"]
    if out["platform"] == "cpu":
        out["note"] = CPU_NOTE
    return out
