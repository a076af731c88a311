"""Dry run (rdlm.program.dry_run, `rdlm.train --dry_run`, `rdlm.memory_plan`): per-device bytes that match a
real sharded state, micro-batches derived from train.per_device_batch, nothing allocated, clear errors."""

import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import pytest

import train_config
import xla_env
from rdlm import memory_plan, optim, program, sharding, state as state_lib, train
from rdlm.model import RecurrentLM

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB = 2**30


def _tiny_config(mesh=(2, 4, 1), batch_size=16, **train):
    config = train_config.small_config("~/.cache/rdlm")  # a small model: the compiles stay short
    config.mesh.shape = mesh
    config.train.batch_size = batch_size
    config.train.update(train)
    return config


def _bytes_per_device(tree) -> dict:
    """Bytes each device holds of a tree of real (sharded) arrays, measured from their shards."""
    held = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    """`rdlm.train --dry_run` (its main, in this process) with 16 sequences, one per device: 2 micro-batches.

    Returns (the JSON it printed, its stdout, the arrays it left alive, the workdir it was given).
    """
    workdir = tmp_path_factory.mktemp("dry") / "run"
    argv = [
        "rdlm.train", f"--config={REPO / 'tests' / 'train_config_cli.py'}", f"--workdir={workdir}", "--dry_run",
        "--config.mesh.shape=(2,4,1)", "--config.train.batch_size=16", "--config.train.per_device_batch=1",
    ]
    saved_argv, sys.argv = sys.argv, argv  # config_flags reads the --config.* overrides from sys.argv
    before = {id(a) for a in jax.live_arrays()}
    stdout = io.StringIO()
    try:
        train.FLAGS(argv)
        with contextlib.redirect_stdout(stdout):
            train.main([])
    finally:
        train.FLAGS.unparse_flags()
        sys.argv = saved_argv
    created = [a for a in jax.live_arrays() if id(a) not in before]
    return json.loads(stdout.getvalue()), stdout.getvalue(), created, workdir


def test_state_bytes_equal_the_shards_of_a_real_initialised_state(tiny_plan):
    tiny_plan = tiny_plan[0]
    config = _tiny_config()
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.check_rules(config.mesh.rules, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        model = RecurrentLM(program.model_config_from(config))
        tx = optim.make_optimizer(config, accumulate=False)
        state = state_lib.init_state(model, tx, jax.random.key(0), mesh, rules, config.data.seq_len)
    params, opt_state = _bytes_per_device(state.params), _bytes_per_device(state.opt_state)
    assert len(params) == 8 and len(set(params.values())) == 1
    assert tiny_plan["param_bytes"] == max(params.values())
    assert tiny_plan["opt_state_bytes"] == max(opt_state.values())
    # Sharding matters: each device holds well under the whole model (embed is split 4 ways over fsdp).
    whole = sum(x.nbytes for x in jax.tree.leaves(state.params))
    assert whole / 4 <= tiny_plan["param_bytes"] < whole / 2
    assert tiny_plan["parameters"] * 4 == whole


def test_compiler_sees_the_same_arguments_and_the_state_is_donated(tiny_plan):
    p = tiny_plan[0]
    step_bytes, key_bytes = 4, 8  # the step counter; the run's key (2 uint32), an argument of the step
    assert p["argument_bytes"] == p["param_bytes"] + p["opt_state_bytes"] + step_bytes + p["batch_bytes"] + key_bytes
    assert p["alias_bytes"] == p["param_bytes"] + p["opt_state_bytes"] + step_bytes
    assert p["temp_bytes"] > 0
    assert p["per_device_bytes"] == p["argument_bytes"] + p["output_bytes"] - p["alias_bytes"] + p["temp_bytes"] + p[
        "generated_code_bytes"
    ]
    # train.per_device_batch = 1 on data x fsdp = 8 devices: 16 sequences in 2 micro-batches of 8.
    assert (p["grad_accum_steps"], p["micro_batch"], p["per_device_micro_batch"]) == (2, 8, 1)
    assert p["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    # The batch argument has its micro-batch axis: 2 x 1 sequence per device, 5 arrays of 4-byte values.
    assert p["batch_bytes"] == 2 * 5 * 4 * _tiny_config().data.seq_len


def test_dry_run_prints_one_json_line_allocates_nothing_and_writes_nothing(tiny_plan):
    p, stdout, created, workdir = tiny_plan
    assert stdout.count("\n") == 1 and stdout.endswith("}\n")
    assert p["devices"] == 8 and p["per_device_bytes"] > p["param_bytes"] + p["opt_state_bytes"] > 1000
    # A real state would hold param_bytes + opt_state_bytes per device; only the step's rng key may exist.
    assert sum(a.nbytes for a in created) < 64, [(a.shape, a.dtype) for a in created]
    assert not workdir.exists()


def _layout(config):
    mesh = sharding.make_mesh(config.mesh)
    return program.micro_batches(config, mesh, sharding.check_rules(config.mesh.rules, mesh))


@pytest.mark.parametrize(
    "train, expected",
    [
        ({}, (1, 32, 4, True)),  # neither set: one micro-batch
        ({"per_device_batch": 1}, (4, 8, 1, True)),  # 32 sequences, 1 on each of 8 devices: 4 micro-batches
        ({"per_device_batch": 2}, (2, 16, 2, True)),
        ({"per_device_batch": 1, "grad_accum_steps": 2}, (2, 16, 2, False)),  # an explicit value wins
        ({"grad_accum_steps": 4}, (4, 8, 1, False)),
    ],
)
def test_grad_accum_steps_derived_from_per_device_batch(train, expected):
    m = _layout(_tiny_config(batch_size=32, **train))
    assert (m.grad_accum_steps, m.micro_batch, m.per_device, m.derived) == expected
    assert m.data_ways == 8 and m.describe().startswith(f"train.grad_accum_steps={expected[0]} (")


@pytest.mark.parametrize(
    "train, message",
    [
        ({"batch_size": 12, "per_device_batch": 1},
         r"^train.batch_size=12 is not a multiple of train.per_device_batch=1 x 8 data-parallel devices = 8; "),
        ({"batch_size": 32, "per_device_batch": 3},
         r"^train.batch_size=32 is not a multiple of train.per_device_batch=3 x 8 data-parallel devices = 24; "),
        ({"batch_size": 32, "grad_accum_steps": 3},
         r"^train.batch_size=32 must be a multiple of train.grad_accum_steps=3\.$"),
        ({"batch_size": 32, "grad_accum_steps": 8},
         r"^train.batch_size / train.grad_accum_steps=4 does not divide over the data axes \('data', 'fsdp'\) "),
        ({"per_device_batch": -1}, r"^train.per_device_batch=-1 must be >= 1"),
        ({"grad_accum_steps": -2}, r"^train.grad_accum_steps=-2 must be >= 1, or 0 to derive it"),
    ],
)
def test_batch_that_does_not_fit_is_one_sentence(train, message):
    with pytest.raises(ValueError, match=message):
        _layout(_tiny_config(**train))


@pytest.mark.parametrize(
    "config, message",
    [
        (_tiny_config(mesh=(3, 1, 1)), r"mesh.shape=\(3, 1, 1\) has 3 devices but 8 are present"),
        (_tiny_config(mesh=(1, 1, 8)), r"params/.* has a dimension of \d+ that does not split 8 ways over mesh axes"),
    ],
)
def test_bad_mesh_is_one_sentence(config, message):
    with pytest.raises(ValueError, match=message):
        program.dry_run(config)



def _run(module, *args, timeout=600, devices=""):
    env = {**os.environ, "XLA_FLAGS": f"{devices} {xla_env.OPTIMIZATION}".strip(), "JAX_PLATFORMS": "cpu"}
    env.pop(memory_plan._REEXEC_ENV, None)
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def test_more_devices_than_present_reexecs_onto_fake_cpu_devices():
    # One real CPU device here; the error names the 4 devices that only the re-executed process has.
    out = _run("rdlm.memory_plan", "--config=configs/tiny.py", "--devices=4", "--mesh=3,1,1")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "error: mesh.shape=(3, 1, 1) has 3 devices but 4 are present; make the product match or use -1 for one axis."
    )


def test_missing_config_is_one_sentence():
    out = _run("rdlm.memory_plan", "--devices=1")
    assert out.stderr.strip().splitlines()[-1] == "error: --config is required, e.g. --config=configs/3b5.py."


@pytest.mark.slow
def test_3b5_dry_run_on_32_devices():
    """The issue's check: configs/3b5.py as committed, on a v5p-64's 32 chips (README memory table)."""
    out = _run(
        "rdlm.train", "--config=configs/3b5.py", "--workdir=/nonexistent/never-written", "--dry_run",
        devices="--xla_force_host_platform_device_count=32",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    p = json.loads(out.stdout.strip().splitlines()[-1])
    assert p["devices"] == 32 and p["mesh"] == {"data": 1, "fsdp": 32, "tensor": 1}
    assert p["parameters"] == 3_564_976_800 and p["note"] == program.CPU_NOTE
    # train.per_device_batch = 1: 4096 sequences = 128 micro-batches of 32, one per chip.
    layout = (p["global_batch"], p["grad_accum_steps"], p["micro_batch"], p["per_device_micro_batch"])
    assert layout == (4096, 128, 32, 1)
    # float32 master weights split 32 ways (norm scales replicated), Adam's two moments the same again.
    assert 4 * p["parameters"] / 32 <= p["param_bytes"] < 1.01 * 4 * p["parameters"] / 32
    assert p["opt_state_bytes"] == pytest.approx(2 * p["param_bytes"], rel=1e-3)
    # rdlm.memory_plan reported 17.0 GiB per device for this mesh before the dry run replaced it.
    assert p["per_device_bytes"] / GIB == pytest.approx(17.0, rel=0.10)
