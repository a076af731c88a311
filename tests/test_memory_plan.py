"""Memory plan: per-device bytes that match a real sharded state, re-exec onto fake devices, clear errors."""

import json
import os
import pathlib
import subprocess
import sys
import time

import flax.linen as nn
import jax
import pytest

import train_config  # noqa: F401  (puts the repo root on sys.path for `configs`)
from configs import tiny
from rdlm import memory_plan, optim, sharding, state as state_lib
from rdlm.model import RecurrentLM
from rdlm.train import model_config_from

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tiny_config(mesh=(2, 4, 1), batch_size=8):
    config = tiny.get_config()
    config.mesh.shape = mesh
    config.train.batch_size = batch_size
    return config


def _bytes_per_device(tree) -> dict:
    """Bytes each device holds of a tree of real (sharded) arrays, measured from their shards."""
    held = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


@pytest.fixture(scope="module")
def tiny_plan():
    return memory_plan.plan(_tiny_config())


def test_state_bytes_equal_the_shards_of_a_real_initialised_state(tiny_plan):
    config = _tiny_config()
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.check_rules(config.mesh.rules, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        model = RecurrentLM(model_config_from(config))
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
    p = tiny_plan
    step_bytes = 4
    assert p["argument_bytes"] == p["param_bytes"] + p["opt_state_bytes"] + step_bytes + p["batch_bytes"]
    assert p["alias_bytes"] == p["param_bytes"] + p["opt_state_bytes"] + step_bytes
    assert p["temp_bytes"] > 0
    assert p["total_bytes"] == p["argument_bytes"] + p["output_bytes"] - p["alias_bytes"] + p["temp_bytes"] + p[
        "generated_code_bytes"
    ]
    # 8 sequences over data x fsdp = 8 devices: one sequence each, no accumulation.
    assert (p["grad_accum_steps"], p["per_device_micro_batch"], p["mesh"]) == (1, 1, {"data": 2, "fsdp": 4, "tensor": 1})
    assert p["batch_bytes"] == 5 * 4 * _tiny_config().data.seq_len


@pytest.mark.parametrize(
    "config, per_device_batch, message",
    [
        (_tiny_config(mesh=(3, 1, 1)), 1, r"mesh.shape=\(3, 1, 1\) has 3 devices but 8 are present"),
        (_tiny_config(batch_size=12), 1, r"train.batch_size=12 is not a multiple of --per_device_batch=1 x 8 devices"),
        (_tiny_config(mesh=(1, 1, 8)), 1, r"params/.* has a dimension of \d+ that does not split 8 ways over mesh axes"),
    ],
)
def test_bad_mesh_or_batch_is_one_sentence(config, per_device_batch, message):
    with pytest.raises(ValueError, match=message):
        memory_plan.plan(config, per_device_batch=per_device_batch)


def _cli(*args, timeout=600):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    env.pop(memory_plan._REEXEC_ENV, None)
    return subprocess.run(
        [sys.executable, "-m", "rdlm.memory_plan", *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


def test_more_devices_than_present_reexecs_onto_fake_cpu_devices():
    # One real CPU device here; the error names the 4 devices that only the re-executed process has.
    out = _cli("--config=configs/tiny.py", "--devices=4", "--mesh=3,1,1")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "error: mesh.shape=(3, 1, 1) has 3 devices but 4 are present; make the product match or use -1 for one axis."
    )


def test_missing_config_is_one_sentence():
    out = _cli("--devices=1")
    assert out.stderr.strip().splitlines()[-1] == "error: --config is required, e.g. --config=configs/3b5.py."


@pytest.mark.slow
def test_3b5_on_8_devices_within_5_minutes():
    start = time.perf_counter()
    out = _cli("--config=configs/3b5.py", "--devices=8", "--json")
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr[-2000:]
    p = json.loads(out.stdout.strip().splitlines()[-1])
    assert elapsed < 300
    assert p["devices"] == 8 and p["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert p["parameters"] == 3_564_976_800 and p["note"] == memory_plan.CPU_NOTE
    # float32 master weights split 8 ways (norm scales replicated), Adam's two moments the same again.
    assert 4 * p["parameters"] / 8 <= p["param_bytes"] < 1.01 * 4 * p["parameters"] / 8
    assert p["opt_state_bytes"] == pytest.approx(2 * p["param_bytes"], rel=1e-3)
    assert (p["global_batch"], p["grad_accum_steps"], p["per_device_micro_batch"]) == (4096, 512, 1)
    assert p["temp_bytes"] > 0 and p["total_bytes"] > p["param_bytes"] + p["opt_state_bytes"]
