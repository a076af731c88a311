"""Checkpoints that go bad after they were written: the newest is named and passed over for the previous complete one,
the rotation never deletes the last verified step first, and a corrupt --checkpoint is one sentence. Real Orbax steps,
local and on the GCS emulator."""

import itertools
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fault_report
from rdlm import checkpoint, checkpoint_io, checkpoint_manifest, cli, orbax_steps, storage
from rdlm.model.config import ModelConfig
from rdlm.state import TrainState

CORPUS = {"source": "builtin", "fingerprint": None}


def _state(step: int, width: int = 4) -> TrainState:
    rng = np.random.default_rng(step)
    params = {"w": jnp.asarray(rng.normal(size=(64, width)), jnp.float32), "b": jnp.asarray(rng.normal(size=(width,)))}
    opt = {"mu": jax.tree.map(lambda x: x * 0.5, params), "count": jnp.int32(step)}
    return TrainState(step=jnp.int32(step), params=params, opt_state=opt)


def _abstract(state: TrainState):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    return abstract, jax.tree.map(lambda _: device, abstract)


def _save(workdir, steps=(3, 6), keep: int = 3) -> None:
    ckpts = checkpoint.Checkpoints(workdir, keep=keep, async_save=True)
    for step in steps:
        ckpts.save(_state(step), {"step": step}, {"train": {"seed": 0}}, ModelConfig.preset("tiny"), CORPUS)
    ckpts.close()


def _same(a: TrainState, b: TrainState) -> bool:
    return all(np.asarray(x).tobytes() == np.asarray(y).tobytes()
               for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))))


def _file(step_dir, role: str) -> str:
    """A file of a step, relative to it: the largest params data file, the data iterator's, or Orbax's metadata."""
    files = storage.list_files(step_dir)
    if role == "params":
        return max((n for n in files if n.startswith("params/") and "/d/" in n), key=files.get)
    if role == "opt_state":
        return max((n for n in files if n.startswith("opt_state/") and "/d/" in n), key=files.get)
    return {"data_iter": "data_iter/process_0-of-1.json", "metadata": "_CHECKPOINT_METADATA",
            "config": "config/metadata", "corpus": "corpus/metadata"}.get(role, role)


def damage(path, mode: str) -> None:
    """Truncates, deletes or garbles one file (local or gs://) as a failing disk or a careless hand would."""
    path = storage.path(path)
    data = storage.read_bytes(path)
    if mode == "deleted":
        path.unlink()
    elif mode == "truncated":
        storage.write_bytes(path, data[: len(data) // 2])
    else:
        middle = len(data) // 2
        storage.write_bytes(path, data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 8]) + data[middle + 8:])


def _fall_back(workdir, role: str, mode: str, caplog) -> None:
    ckpts = checkpoint.Checkpoints(workdir, keep=3)
    name = _file(ckpts.step_dir(6), role)
    damage(ckpts.step_dir(6) / name, mode)
    with caplog.at_level(logging.WARNING):
        step, state, data_state = ckpts.restore_latest(*_abstract(_state(3)))
    ckpts.close()
    assert step == 3 and data_state == {"step": 3} and _same(state, _state(3))
    warning = next(m for m in caplog.messages if "is corrupt" in m)
    assert warning.startswith(f"Checkpoint {storage.path(workdir) / 'checkpoints' / '6'} is corrupt: ")
    assert name in warning and warning.endswith("falling back to the previous complete checkpoint.")
    moved = storage.list_files(storage.path(workdir) / checkpoint.CORRUPT_SUBDIR)  # kept for inspection
    manifests = [n for n in moved if n.endswith(checkpoint_manifest.MANIFEST_FILE)]
    assert len(manifests) == 1 and re.fullmatch(r"6-\d{8}T\d{6}/" + checkpoint_manifest.MANIFEST_FILE, manifests[0])
    assert checkpoint.Checkpoints(workdir, keep=3).steps() == [3]
    fault_report.record(f"newest checkpoint: a file {mode}", 1, 1, "0 steps (fell back, named step and file)")


@pytest.mark.parametrize("role, mode", [("params", "garbled"), ("opt_state", "truncated"), ("data_iter", "deleted")])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_complete_one(tmp_path, role, mode, caplog):
    _save(tmp_path)
    _fall_back(tmp_path, role, mode, caplog)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["truncated", "deleted", "garbled"])
def test_every_file_of_the_newest_checkpoint_is_checked(tmp_path, mode, caplog):
    """Each file of a step in turn (by its place in the sorted listing: data files are named by content hashes),
    in a fresh save of the same two steps."""

    def files(workdir):
        listed = storage.list_files(storage.path(workdir) / "checkpoints" / "6")
        return sorted(n for n in listed if n != checkpoint_manifest.MANIFEST_FILE)

    # OCDBT's data files vary in number from one save to the next (they follow its writer threads), so each
    # copy's own listing is the one indexed, until a copy has no i-th file.
    for i in itertools.count():
        workdir = tmp_path / f"copy{i}"
        _save(workdir)
        listed = files(workdir)
        if i >= len(listed):
            assert i >= 10, listed  # a step has params, opt_state, data_iter, metadata and more
            break
        caplog.clear()
        _fall_back(workdir, listed[i], mode, caplog)


def test_the_rotation_keeps_the_last_verified_step_until_a_newer_one_is_verified(tmp_path):
    ckpts = checkpoint.Checkpoints(tmp_path, keep=1)
    ckpts.save(_state(3), {"step": 3}, {}, ModelConfig.preset("tiny"), CORPUS)
    ckpts.save(_state(6), {"step": 6}, {}, ModelConfig.preset("tiny"), CORPUS)  # verifies 3, starts 6
    ckpts.manager.wait_until_finished()  # 6 is committed by Orbax, not yet verified by rdlm
    assert ckpts.steps() == [3, 6] and not checkpoint_manifest.has_manifest(ckpts.step_dir(6))
    (ckpts.step_dir(6) / "corpus").rmtree()  # an item lost before verification
    with pytest.raises(ValueError, match=r"lacks the item\(s\) \['corpus'\] after its commit"):
        ckpts.wait()
    assert ckpts.steps() == [3, 6] and checkpoint_manifest.has_manifest(ckpts.step_dir(3))
    ckpts.save(_state(9), {"step": 9}, {}, ModelConfig.preset("tiny"), CORPUS)
    ckpts.close()  # 9 verified: now 3 (and the unverifiable 6, older than the kept one) go
    assert checkpoint.Checkpoints(tmp_path, keep=1).steps() == [9]


def test_a_step_never_verified_is_used_when_it_restores_and_verified_then(tmp_path):
    _save(tmp_path)
    ckpts = checkpoint.Checkpoints(tmp_path, keep=3)
    (ckpts.step_dir(6) / checkpoint_manifest.MANIFEST_FILE).unlink()  # as a kill right after the commit leaves it
    step, state, _ = ckpts.restore_latest(*_abstract(_state(6)))
    assert step == 6 and _same(state, _state(6)) and checkpoint_manifest.has_manifest(ckpts.step_dir(6))
    ckpts.close()


def test_every_step_corrupt_is_one_sentence_and_moves_nothing(tmp_path):
    _save(tmp_path)
    ckpts = checkpoint.Checkpoints(tmp_path, keep=3)
    for step in (3, 6):
        damage(ckpts.step_dir(step) / _file(ckpts.step_dir(step), "params"), "truncated")
    with pytest.raises(cli.Failure) as failed:
        ckpts.restore_latest(*_abstract(_state(3)))
    message = str(failed.value)
    assert message.startswith(f"Every checkpoint in {tmp_path / 'checkpoints'} is corrupt (step 6: ")
    assert "; step 3: " in message and "truncated" in message and "\n" not in message
    assert ckpts.steps() == [3, 6] and not (tmp_path / checkpoint.CORRUPT_SUBDIR).exists()
    ckpts.close()


def test_a_step_of_another_shape_is_a_config_mismatch_not_corruption(tmp_path):
    _save(tmp_path)
    ckpts = checkpoint.Checkpoints(tmp_path, keep=3)
    with pytest.raises(ValueError, match=r"holds parameter \['b'\] with shape \(4,\), but this config's model has \(8,\)"):
        ckpts.restore_latest(*_abstract(_state(6, width=8)))
    assert ckpts.steps() == [3, 6]
    ckpts.close()


def test_a_corrupt_checkpoint_given_to_generate_is_one_sentence(tmp_path):
    _save(tmp_path)
    step_dir = tmp_path / "checkpoints" / "6"
    name = _file(step_dir, "params")
    damage(step_dir / name, "garbled")
    for given in (step_dir, tmp_path):  # a step directory, or the workdir whose newest step it is
        with pytest.raises(orbax_steps.CorruptCheckpoint) as corrupt:
            checkpoint_io.load_params(given)
        assert str(corrupt.value) == (
            f"The checkpoint {step_dir} is corrupt: {step_dir / name} is garbled (its CRC-32 differs from the one "
            "recorded when it was written); pass an earlier step of the run (WORKDIR/checkpoints/<step>) as the "
            "checkpoint, or restore the files.")
    _, params = checkpoint_io.load_params(tmp_path / "checkpoints" / "3")
    assert np.array_equal(params["w"], _state(3).params["w"])


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_on_gcs_falls_back(gcs_bucket, caplog):
    workdir = f"{gcs_bucket}/run"
    _save(workdir)
    _fall_back(workdir, "params", "garbled", caplog)
