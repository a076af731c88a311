"""Per-device memory of the train step as a table, on as many (fake) devices as asked: nothing is allocated.

    python -m rdlm.memory_plan --config=configs/3b5.py --devices=64 --mesh=2,32,1

The numbers are those of `python -m rdlm.train --config=... --dry_run` (both call
`rdlm.program.dry_run`: the real train step, compiled from abstract shapes with the run's shardings
and micro-batches). With more `--devices` than this machine has, the planner re-runs itself on that
many fake CPU devices, so the numbers are the CPU compiler's estimates for that device count.
Micro-batches follow the config (`train.per_device_batch`, `train.grad_accum_steps`); override them
like any field, e.g. `--config.train.per_device_batch=2`.
"""

import json
import os
import re
import sys

import jax
from absl import flags
from ml_collections import config_flags

from rdlm import cli, program

GIB = 2**30
_REEXEC_ENV = "RDLM_MEMORY_PLAN_DEVICES"

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config, e.g. configs/3b5.py.", flag_values=FLAGS)
flags.DEFINE_string(
    "mesh", "", "Mesh shape (data, fsdp, tensor), e.g. 1,-1,1; default: config.mesh.shape.", flag_values=FLAGS
)
flags.DEFINE_integer(
    "devices", 0, "Devices to plan for (fake CPU ones if more than present); 0 = all.", flag_values=FLAGS
)
flags.DEFINE_bool(
    "json", False, "Print one JSON line (as rdlm.train --dry_run does) instead of the table.", flag_values=FLAGS
)


def format_plan(p: dict, config_file: str) -> str:
    """A dry run's result as a table in GiB per device."""
    mesh = " ".join(f"{k}={v}" for k, v in p["mesh"].items())
    lines = [
        f"rdlm memory plan: {config_file}, {p['parameters']:,} parameters, "
        f"mesh {mesh} on {p['devices']} {p['platform']} devices",
        f"batch: {p['global_batch']} sequences x {p['seq_len']} tokens per step = {p['grad_accum_steps']} "
        f"micro-batch(es) of {p['micro_batch']}, {p['per_device_micro_batch']} sequence(s) per device",
    ]
    if p["platform"] == "cpu":
        lines.append(program.CPU_NOTE)
    rows = [
        ("parameters", "param_bytes"), ("optimizer state", "opt_state_bytes"), ("batch", "batch_bytes"),
        ("arguments (compiler)", "argument_bytes"), ("outputs", "output_bytes"),
        ("aliased (donated)", "alias_bytes"),
        ("temporaries", "temp_bytes"), ("generated code", "generated_code_bytes"), ("total", "per_device_bytes"),
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
        result = program.dry_run(config, jax.devices()[:wanted])
    except ValueError as e:
        cli.fail(str(e))
    config_file = config_flags.get_config_filename(FLAGS["config"])
    print(json.dumps(result) if FLAGS.json else format_plan(result, config_file), flush=True)


if __name__ == "__main__":
    cli.expected_failures(main)(sys.argv)
