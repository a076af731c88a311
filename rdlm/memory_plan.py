"""Per-device memory of the train step on a mesh, from the compiler alone: nothing is allocated.

    python -m rdlm.memory_plan --config=configs/3b5.py --devices=64 --mesh=2,32,1

The real `make_train_step` and optimizer are lowered and compiled from abstract shapes with the run's
shardings; parameter and optimizer bytes come from those shardings, the rest from
`compiled.memory_analysis()`. With more `--devices` than this machine has, the planner re-runs itself
on that many fake CPU devices, so the numbers are the CPU compiler's estimates for that device count.
By default each device holds one sequence per micro-batch (`--per_device_batch=1`): the config's global
batch is kept and `train.grad_accum_steps` is derived; `--per_device_batch=0` uses the config as is.
"""

import json
import math
import os
import re
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import flags
from ml_collections import config_flags

from rdlm import cli, optim, sharding, state as state_lib, steps
from rdlm.model import RecurrentLM
from rdlm.train import model_config_from

GIB = 2**30
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")  # rdlm.data.pipeline's batches
_REEXEC_ENV = "RDLM_MEMORY_PLAN_DEVICES"
CPU_NOTE = (
    "Estimates from the CPU compiler for the same number of devices; "
    "TPU/GPU compilers fuse and schedule differently."
)

# Own flag set: importing rdlm.train defines its flags (--config, --workdir) in the global one.
FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config, e.g. configs/3b5.py.", flag_values=FLAGS)
flags.DEFINE_string(
    "mesh", "", "Mesh shape (data, fsdp, tensor), e.g. 1,-1,1; default: config.mesh.shape.", flag_values=FLAGS
)
flags.DEFINE_integer(
    "devices", 0, "Devices to plan for (fake CPU ones if more than present); 0 = all.", flag_values=FLAGS
)
flags.DEFINE_integer(
    "per_device_batch", 1, "Sequences per device per micro-batch; sets train.grad_accum_steps (0: as configured).",
    flag_values=FLAGS,
)
flags.DEFINE_bool("json", False, "Print one JSON line instead of the table.", flag_values=FLAGS)


def per_device_bytes(abstract, shardings) -> int:
    """Bytes one device holds of a tree of abstract arrays under their NamedShardings."""
    sizes = jax.tree.map(lambda x, s: math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize, abstract, shardings)
    return sum(jax.tree.leaves(sizes))


def _grad_accum_steps(config, ways: int, per_device_batch: int) -> int:
    batch = config.train.batch_size
    if per_device_batch <= 0:
        return config.train.grad_accum_steps
    micro = per_device_batch * ways
    if batch % micro:
        raise ValueError(
            f"train.batch_size={batch} is not a multiple of --per_device_batch={per_device_batch} x {ways} "
            f"devices on the data axes = {micro}; change one of them."
        )
    return batch // micro


def plan(config, devices=None, per_device_batch: int = 1) -> dict:
    """Compiles the train step for `config.mesh` on `devices` (default: all) and returns bytes per device."""
    devices = list(jax.devices() if devices is None else devices)
    sharding.resolve_shape(config.mesh.shape, len(devices))
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.check_rules(config.mesh.rules, mesh)
    ways = math.prod(mesh.shape[a] for a in sharding.data_axes(rules))
    accum = _grad_accum_steps(config, ways, per_device_batch)
    if accum < 1 or config.train.batch_size % accum:
        raise ValueError(
            f"train.batch_size={config.train.batch_size} must be a multiple of train.grad_accum_steps={accum}."
        )
    micro = config.train.batch_size // accum
    sharding.check_batch(micro, mesh, rules, "train.batch_size / train.grad_accum_steps")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        model_config = model_config_from(config)
        model = RecurrentLM(model_config)
        tx = optim.make_optimizer(config, accumulate=False)
        seq_len = config.data.seq_len
        abstract, shardings = state_lib.abstract_state(model, tx, mesh, rules, seq_len)
        sharding.check_divisible(abstract, shardings)
        rows = (accum, micro) if accum > 1 else (micro,)
        dtypes = {k: jnp.float32 if k == "weights" else jnp.int32 for k in BATCH_KEYS}
        batch = {k: jax.ShapeDtypeStruct((*rows, seq_len), dtype) for k, dtype in dtypes.items()}
        batch_sharding = sharding.batch_sharding(mesh, rules, leading_dims=len(rows) - 1)
        schedule = optim.make_schedule(config)
        step = jax.jit(
            steps.make_train_step(model, tx, schedule, config.recurrence, jax.random.key(0), accum),
            in_shardings=(shardings, batch_sharding),
            out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0,
        )
        start = time.perf_counter()
        lowered = step.lower(abstract, batch)
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
        compiled_at = time.perf_counter()
    memory = compiled.memory_analysis()
    batch_shardings = jax.tree.map(lambda _: batch_sharding, batch)
    out = {
        "devices": len(devices),
        "platform": devices[0].platform,
        "mesh": dict(mesh.shape),
        "parameters": sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params)),
        "global_batch": config.train.batch_size,
        "grad_accum_steps": accum,
        "per_device_micro_batch": micro // ways,
        "seq_len": seq_len,
        "param_bytes": per_device_bytes(abstract.params, shardings.params),
        "opt_state_bytes": per_device_bytes(abstract.opt_state, shardings.opt_state),
        "batch_bytes": per_device_bytes(batch, batch_shardings),
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "generated_code_bytes": memory.generated_code_size_in_bytes,
        "lower_seconds": round(lowered_at - start, 2),
        "compile_seconds": round(compiled_at - lowered_at, 2),
    }
    if out["platform"] == "cpu":
        out["note"] = CPU_NOTE
    # Peak: inputs, outputs not written in place of a donated input, temporaries and the program.
    live = ("argument_bytes", "output_bytes", "temp_bytes", "generated_code_bytes")
    out["total_bytes"] = sum(out[k] for k in live) - out["alias_bytes"]
    return out


def format_plan(p: dict, config_file: str) -> str:
    """The plan as a table in GiB per device."""
    mesh = " ".join(f"{k}={v}" for k, v in p["mesh"].items())
    lines = [
        f"rdlm memory plan: {config_file}, {p['parameters']:,} parameters, "
        f"mesh {mesh} on {p['devices']} {p['platform']} devices",
        f"batch: {p['global_batch']} sequences x {p['seq_len']} tokens per step = {p['grad_accum_steps']} "
        f"micro-batch(es) of {p['per_device_micro_batch']} sequence(s) per device",
    ]
    if p["platform"] == "cpu":
        lines.append(CPU_NOTE)
    rows = [
        ("parameters", "param_bytes"), ("optimizer state", "opt_state_bytes"), ("batch", "batch_bytes"),
        ("arguments (compiler)", "argument_bytes"), ("outputs", "output_bytes"),
        ("aliased (donated)", "alias_bytes"),
        ("temporaries", "temp_bytes"), ("generated code", "generated_code_bytes"), ("total", "total_bytes"),
    ]
    lines.append(f"{'per device':<24}{'GiB':>10}")
    lines += [f"  {name:<22}{p[key] / GIB:>10.3f}" for name, key in rows]
    lines.append(f"lowering {p['lower_seconds']:.1f} s, compiling {p['compile_seconds']:.1f} s")
    return "\n".join(lines)


def _mesh_shape(text: str, num_axes: int) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != num_axes:
        raise ValueError(f"--mesh={text} must be {num_axes} comma-separated sizes (data, fsdp, tensor), e.g. 1,-1,1.")
    return shape


def _reexec_with_devices(n: int) -> None:
    """Replaces this process with one that sees `n` fake CPU devices (XLA_FLAGS is read at start-up)."""
    if os.environ.get(_REEXEC_ENV) == str(n):
        cli.fail(f"asked for {n} fake CPU devices but got {jax.device_count()}; check XLA_FLAGS.")
    xla_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    xla_flags = f"{xla_flags} --xla_force_host_platform_device_count={n}".strip()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags, **{_REEXEC_ENV: str(n)})
    os.execve(sys.executable, [sys.executable, "-m", "rdlm.memory_plan", *sys.argv[1:]], env)


def main(argv: list[str]) -> None:
    cli.parse_flags(argv, FLAGS, usage=__doc__, required={"config": "configs/3b5.py"})
    config = _CONFIG.value
    present = jax.device_count()
    wanted = FLAGS.devices or present
    if wanted > present:
        _reexec_with_devices(wanted)
    try:
        if FLAGS.mesh:
            config.mesh.shape = _mesh_shape(FLAGS.mesh, len(config.mesh.axis_names))
        result = plan(config, jax.devices()[:wanted], FLAGS.per_device_batch)
    except ValueError as e:
        cli.fail(str(e))
    config_file = config_flags.get_config_filename(FLAGS["config"])
    print(json.dumps(result) if FLAGS.json else format_plan(result, config_file), flush=True)


if __name__ == "__main__":
    main(sys.argv)
