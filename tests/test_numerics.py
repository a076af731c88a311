"""Non-finite steps and loss spikes: checked inside the jitted step (no host sync), skipped or stopped on the host,
and never written to a checkpoint."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fault_report
import train_config
from rdlm import checkpoint, fault_hooks, metrics, numerics, sharding
from rdlm import program as program_lib
from rdlm import state as state_lib
from rdlm.model.config import ModelConfig


def _batch(config, seed: int) -> dict:
    rows, seq = config.train.batch_size, config.data.seq_len
    ids = np.random.default_rng(seed).integers(3, config.model.vocab_size, (rows, seq + 1)).astype(np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "positions": np.tile(np.arange(seq, dtype=np.int32), (rows, 1)),
            "segment_ids": np.ones((rows, seq), np.int32), "weights": np.ones((rows, seq), np.float32)}


def _program(tmp_path):
    config = train_config.small_config(tmp_path)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    return config, mesh, sharding.check_rules(config.mesh.rules, mesh)


def test_the_step_checks_finiteness_on_the_device_without_a_host_callback(tmp_path):
    """Traced from abstract shapes (nothing compiled): the guard is a lax.cond around the update, in one program."""
    config, mesh, rules = _program(tmp_path)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        program = program_lib.build(config, mesh, rules)
        batch = program.abstract_batch(config.data.seq_len)
        jaxpr, (_, out) = jax.make_jaxpr(program.train_step, return_shape=True)(program.abstract, batch, program.abstract_key())
    text = str(jaxpr)
    assert "cond[" in text and "callback" not in text
    assert out["finite"].shape == () and out["finite"].dtype == jnp.int32


@pytest.mark.slow
def test_a_nonfinite_step_applies_no_update_inside_the_jitted_step(monkeypatch, tmp_path):
    config, mesh, rules = _program(tmp_path)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        program = program_lib.build(config, mesh, rules)
        state = state_lib.init_state(program.model, program.tx, jax.random.key(0), mesh, rules, config.data.seq_len,
                                     program.shardings)
        monkeypatch.setenv(fault_hooks.NAN_STEPS, "1")
        poisoned = fault_hooks.poison_batch(1, _batch(config, 0))  # the data-path hook the fault tests use
        assert np.isnan(poisoned["weights"]).all()
        before = jax.device_get((state.params, state.opt_state))
        key = program.key(0)
        state, out = program.train_step(state, poisoned, key)  # the state is donated: compare with the host copy
        assert int(out["finite"]) == 0 and np.isnan(float(out["loss"])) and int(state.step) == 1
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get((state.params, state.opt_state)))):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
        state, out = program.train_step(state, _batch(config, 1), key)
        assert int(out["finite"]) == 1 and np.isfinite(float(out["loss"])) and int(state.step) == 2
        after = jax.device_get(state.params)
        assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[0]), jax.tree.leaves(after)))
    fault_report.record("NaN batch (in-jit check, update not applied)", 1, 1, "1 update (the NaN batch's, by design)")


def _monitor(tmp_path, **overrides):
    config = train_config.small_config(tmp_path, **overrides)
    writer = metrics.MetricsWriter(tmp_path / "run")
    return numerics.StepMonitor(config, writer, tmp_path / "run"), writer


def test_loss_spikes_are_events_in_metrics_and_tensorboard(tmp_path):
    monitor, writer = _monitor(tmp_path, **{"log.loss_spike_factor": 3.0, "log.loss_spike_window": 20})
    for step in range(1, 21):
        monitor.observe(step, 2.0 + 0.01 * (step % 3), 1.0, True, {})
    monitor.observe(21, 6.5, 1.0, True, {})  # 3.2x the running mean
    monitor.observe(22, 5.0, 1.0, True, {})  # 2.3x: not a spike
    writer.close()
    spikes = [r for r in metrics.read_metrics(tmp_path / "run") if "loss_spike" in r]
    assert [(r["step"], r["loss_spike"]) for r in spikes] == [(21, 6.5)]
    assert spikes[0]["loss_running_mean"] == pytest.approx(2.0 + 0.01 * sum(s % 3 for s in range(1, 21)) / 20)
    assert {(tag, step) for tag, step, _ in metrics.read_events(tmp_path / "run" / "tensorboard")} == {
        ("loss_spike", 21), ("loss_running_mean", 21)}


def test_skip_counts_nonfinite_steps_and_names_their_batch(tmp_path, caplog):
    monitor, writer = _monitor(tmp_path, **{"train.max_consecutive_nonfinite": 2})
    data_state = {"streams": [{"parent": {"next_index": 7}, "offset": 3}]}
    monitor.observe(4, float("nan"), float("nan"), False, data_state)
    monitor.observe(5, 3.0, 1.0, True, {})
    monitor.observe(6, float("inf"), float("nan"), False, data_state)
    saved = tmp_path / "run" / "nonfinite" / "step_4.process_0.json"
    assert json.loads(saved.read_text())["data_iter_state"] == data_state
    assert any(f"step 4 is not finite (loss nan, gradient norm nan)" in m and str(saved) in m for m in caplog.messages)
    with pytest.raises(FloatingPointError, match=r"^2 steps in a row were not finite \(train.max_consecutive_nonfinite=2\)"):
        monitor.observe(7, float("nan"), 1.0, False, data_state)
    writer.close()
    rows = [r for r in metrics.read_metrics(tmp_path / "run") if "nonfinite_step" in r]
    assert [(r["step"], r["nonfinite_steps"]) for r in rows] == [(4, 1), (6, 2), (7, 3)]


def test_stop_ends_the_run_with_one_sentence_naming_step_and_batch(tmp_path):
    monitor, writer = _monitor(tmp_path, **{"train.on_nonfinite": "stop"})
    with pytest.raises(FloatingPointError) as stopped:
        monitor.observe(9, float("nan"), float("inf"), False, {"streams": []})
    writer.close()
    saved = tmp_path / "run" / "nonfinite" / "step_9.process_0.json"
    assert str(stopped.value) == (
        "train.on_nonfinite='stop': step 9 is not finite (loss nan, gradient norm inf) and its update was not applied; "
        "its batch is batch 9 of this run's data order (train.seed=0), read from the data-iterator state saved in "
        f"{saved}; the run stops, and no checkpoint holds a non-finite value. Lower optim.lr, inspect that batch, "
        "or set train.on_nonfinite='skip'."
    )
    with pytest.raises(ValueError, match=r"train.on_nonfinite='ignore' is not one of \('skip', 'stop'\)"):
        _monitor(tmp_path, **{"train.on_nonfinite": "ignore"})


def test_checkpoints_refuse_nonfinite_values(tmp_path):
    ckpts = checkpoint.Checkpoints(tmp_path, keep=2, async_save=False)
    finite = {"w": jnp.ones((4,)), "b": jnp.zeros((2,))}
    state = state_lib.TrainState(step=jnp.int32(3), params=finite, opt_state={"mu": jnp.full((4,), jnp.nan)})
    with pytest.raises(FloatingPointError, match=r"^Refusing to save step 3 to .*: its parameters or optimizer state "
                                                 "hold non-finite values; the checkpoints already there are kept.$"):
        ckpts.save(state, {}, {}, ModelConfig.preset("tiny"), {"source": "builtin", "fingerprint": None})
    assert ckpts.steps() == [] and not list((tmp_path / "checkpoints").iterdir())
    ckpts.close()
