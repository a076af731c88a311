"""Scale-out: the same losses on every mesh, parameter shardings, restore anywhere, two real processes."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import train_config
import xla_env
from rdlm import checkpoint, metrics, optim, sharding, state as state_lib
from rdlm.model import RecurrentLM
from rdlm.program import model_config_from
from rdlm.train import train_and_evaluate

REPO = pathlib.Path(__file__).resolve().parents[1]
# (2, 2, 2) splits data, parameters and heads at once; the pure data and pure fsdp meshes run under slow.
MESHES = [pytest.param((8, 1, 1), marks=pytest.mark.slow), pytest.param((1, 8, 1), marks=pytest.mark.slow), (2, 2, 2)]


def _tiny(cache_dir, **overrides):
    """The tests' small model and data sliver (tests/train_config.py), five steps of batch 16."""
    return train_config.small_config(cache_dir, **{
        "train.num_steps": 5, "train.batch_size": 16, "checkpoint.every_steps": 1000, "eval.final_num_steps": (),
        **overrides,
    })


def _losses(workdir):
    return [row["loss"] for row in metrics.read_metrics(workdir) if "loss" in row]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory, cache_dir):
    workdir = tmp_path_factory.mktemp("one")
    train_and_evaluate(_tiny(cache_dir, **{"mesh.shape": (1, 1, 1)}), str(workdir), devices=jax.devices()[:1])
    return _losses(workdir)


@pytest.mark.parametrize("mesh", MESHES)
def test_tiny_losses_match_one_device(one_device_losses, tmp_path, cache_dir, mesh):
    train_and_evaluate(_tiny(cache_dir, **{"mesh.shape": mesh}), str(tmp_path))
    losses = _losses(tmp_path)
    assert len(losses) == 5
    np.testing.assert_allclose(losses, one_device_losses, rtol=1e-5)


def _abstract(config, mesh_shape):
    config.mesh.shape = mesh_shape
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.check_rules(config.mesh.rules, mesh)
    model = RecurrentLM(model_config_from(config))
    tx = optim.make_optimizer(config, accumulate=False)
    abstract, shardings = state_lib.abstract_state(model, tx, mesh, rules, config.data.seq_len)
    return mesh, rules, model, tx, abstract, shardings


def test_parameter_partition_specs(cache_dir):
    *_, shardings = _abstract(_tiny(cache_dir), (2, 2, 2))
    params = shardings.params
    assert params["wte"]["embedding"].spec == P("tensor", "fsdp")
    core = params["core"]["core_block"]["layers"]
    assert core["attn"]["wqkv"].spec == P(None, "fsdp", None, "tensor", None)
    assert core["attn"]["wo"].spec == P(None, "tensor", None, "fsdp")
    assert core["mlp"]["fc"].spec == P(None, "fsdp", None, "tensor")
    assert core["mlp"]["proj"].spec == P(None, "tensor", "fsdp")
    assert core["norm_1"]["scale"].spec == P(None, None)
    assert params["core"]["adapter"].spec == P("tensor", "fsdp")
    moments = jax.tree.leaves(shardings.opt_state, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
    assert any(s.spec == P("tensor", "fsdp") for s in moments)  # Adam's moments follow their params.
    assert shardings.step.spec == P()


def test_checkpoint_restores_on_other_meshes(tmp_path, cache_dir):
    config = _tiny(cache_dir, **{"train.num_steps": 1, "mesh.shape": (8, 1, 1)})
    train_and_evaluate(config, str(tmp_path))
    saved = checkpoint.Checkpoints(tmp_path, keep=1, async_save=False)
    reference = None
    for mesh_shape, devices in (((8, 1, 1), None), ((2, 2, 2), None), ((1, 1, 1), jax.devices()[:1])):
        cfg = _tiny(cache_dir)
        cfg.mesh.shape = mesh_shape
        mesh = sharding.make_mesh(cfg.mesh, devices)
        rules = sharding.check_rules(cfg.mesh.rules, mesh)
        model = RecurrentLM(model_config_from(cfg))
        tx = optim.make_optimizer(cfg, accumulate=False)
        abstract, shardings = state_lib.abstract_state(model, tx, mesh, rules, cfg.data.seq_len)
        state, _ = saved.restore(1, abstract, shardings)
        wte = state.params["wte"]["embedding"]
        assert wte.sharding == shardings.params["wte"]["embedding"]
        values = jax.tree.map(np.asarray, state.params)
        if reference is None:
            reference = values
        for a, b in zip(jax.tree.leaves(values), jax.tree.leaves(reference)):
            np.testing.assert_array_equal(a, b)
    saved.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, cache_dir):
    """Two `python -m rdlm.train` processes (4 CPU devices each, gloo collectives) vs one with 8."""
    base = [
        sys.executable, "-m", "rdlm.train", "--config=tests/train_config_cli.py", f"--config.data.cache_dir={cache_dir}",
        "--config.train.num_steps=4", "--config.checkpoint.every_steps=2", "--config.mesh.shape=(2,2,2)",
    ]
    env8 = {**os.environ, "XLA_FLAGS": xla_env.xla_flags(8), "JAX_PLATFORMS": "cpu"}
    subprocess.run(base + [f"--workdir={tmp_path / 'one'}"], cwd=REPO, env=env8, check=True, capture_output=True, timeout=600)
    env4 = {**os.environ, "XLA_FLAGS": xla_env.xla_flags(4), "JAX_PLATFORMS": "cpu"}
    port = _free_port()
    procs = [
        subprocess.Popen(
            base + [f"--workdir={tmp_path / 'two'}", f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
            cwd=REPO, env=env4, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=1e-5)
    step_dir = tmp_path / "two" / "checkpoints" / "4"
    assert sorted(p.name for p in (step_dir / "data_iter").glob("*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
    assert (step_dir / "_CHECKPOINT_METADATA").exists()
    steps = sorted(int(p.name) for p in (tmp_path / "two" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4]
