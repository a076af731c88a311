"""Training end to end: files that must exist and read back, exact resume, init_from, clear errors."""

import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import train_config
import xla_env
from rdlm import checkpoint, checkpoint_io, metrics
from rdlm.data import builtin, pipeline
from rdlm.train import train_and_evaluate

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cache_dir):
    workdir = tmp_path_factory.mktemp("run")
    result = train_and_evaluate(train_config.small_config(cache_dir), str(workdir))
    return workdir, result


def _losses(workdir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in metrics.read_metrics(workdir) if "loss" in row}


def test_run_writes_checkpoint_metrics_tensorboard_and_results(full_run, cache_dir):
    workdir, result = full_run
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
    config, params = checkpoint_io.load_params(workdir)
    assert config.n_embd == 32 and jax.tree.leaves(params)[0].ndim >= 1
    losses = _losses(workdir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(np.isfinite(list(losses.values())))
    events = metrics.read_events(workdir / "tensorboard")
    tags = {tag for tag, _, _ in events}
    assert {step for tag, step, _ in events if tag == "loss"} == {1, 2, 3, 4, 5, 6}
    assert {"loss", "lr", "grad_norm", "num_steps", "token_correlation", "state_change", "mfu"} <= tags
    saved = json.loads((workdir / "recurrence_scaling.json").read_text())
    assert saved["num_steps"] == [1, 4] and len(saved["val_loss"]) == 2 and len(saved["accuracy"]) == 2
    assert saved == json.loads(json.dumps(result))
    assert all(0.0 <= a <= 1.0 for a in saved["accuracy"])
    assert (workdir / "recurrence_scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The run keeps the tokenizer it trained with, and each checkpoint the fingerprint of its corpus.
    config = train_config.small_config(cache_dir)
    trained_with = pipeline.load_tokenizer(config)
    assert checkpoint.load_run_tokenizer(workdir).model_proto == trained_with.model_proto
    assert (workdir / "tokenizer.model").read_bytes() == trained_with.model_proto
    saved = checkpoint.Checkpoints(workdir, keep=3).corpus(6)
    assert saved["source"] == "builtin" and len(saved["fingerprint"]) == 16
    assert saved["fingerprint"] == pipeline.builtin_corpus(config).fingerprint


def test_resume_sees_the_same_batches_and_losses(full_run, tmp_path, cache_dir):
    reference = _losses(full_run[0])
    first = train_config.small_config(cache_dir, **{"train.num_steps": 3, "eval.final_num_steps": ()})
    train_and_evaluate(first, str(tmp_path))
    # A half-written step (what a kill during a save leaves) must never be taken for a complete one.
    (tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp-123").mkdir()
    # A resume reads its data with the run's saved tokenizer only: this config would train another one.
    second = train_config.small_config(cache_dir, **{"eval.final_num_steps": (), "data.builtin.vocab_size": 400})
    train_and_evaluate(second, str(tmp_path))
    resumed = _losses(tmp_path)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-6), step


def test_init_from_loads_params_only(full_run, tmp_path, cache_dir):
    source = full_run[0]
    config = train_config.small_config(cache_dir, **{"train.num_steps": 0, "eval.final_num_steps": (), "init_from": str(source)})
    train_and_evaluate(config, str(tmp_path))
    _, original = checkpoint_io.load_params(source)
    _, copied = checkpoint_io.load_params(tmp_path)
    for a, b in zip(jax.tree.leaves(original), jax.tree.leaves(copied)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"data.source": "arrayrecord", "data.paths": "/no/such/*.arrayrecord"}, FileNotFoundError, "matches no file"),
        ({"train.batch_size": 6}, ValueError, r"train.batch_size / train.grad_accum_steps=6 does not divide over the data axes"),
        ({"train.per_device_batch": 3}, ValueError,
         r"^train.batch_size=8 is not a multiple of train.per_device_batch=3 x 8 data-parallel devices = 24; "),
        ({"model.vocab_size": 256}, ValueError, "The tokenizer has 448 tokens but model.vocab_size is 256"),
        ({"mesh.shape": (3, 1, 1)}, ValueError, r"mesh.shape=\(3, 1, 1\) has 3 devices but 8 are present"),
        ({"mesh.rules": (("activation_batch", "nope"),)}, ValueError, "maps 'activation_batch' to mesh axis 'nope'"),
    ],
)
def test_bad_input_gets_one_clear_sentence(tmp_path, cache_dir, overrides, error, message):
    with pytest.raises(error, match=message):
        train_and_evaluate(train_config.small_config(cache_dir, **overrides), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_unknown_config_key_on_the_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rdlm.train", "--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.train.nope=1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: --config.train.nope is not a config field; see configs/base.py for the fields."


def _cli(workdir, cache_dir, *extra):
    args = [
        sys.executable, "-m", "rdlm.train", "--config=tests/train_config_cli.py", f"--workdir={workdir}",
        f"--config.data.cache_dir={cache_dir}", *extra,
    ]
    env = {**os.environ, "XLA_FLAGS": xla_env.xla_flags(8), "JAX_PLATFORMS": "cpu"}
    return args, env


def _wait_for_step(workdir, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = (workdir / "checkpoints" / str(step))
        if done.exists() and (done / "_CHECKPOINT_METADATA").exists():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stderr.read()}")
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint {step} within {timeout}s")


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path, cache_dir):
    args, env = _cli(tmp_path, cache_dir, "--config.train.num_steps=100000", "--config.checkpoint.every_steps=2")
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(tmp_path, 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
    steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    last = max(steps)
    assert last >= 2 and (tmp_path / "checkpoints" / str(last) / "_CHECKPOINT_METADATA").exists()
    assert max(_losses(tmp_path)) >= last
    shutil.rmtree(tmp_path / "checkpoints")


def test_gradient_accumulation_matches_one_large_batch(tmp_path, cache_dir, caplog):
    """Two micro-batches of 8 rows give the update of one batch of 16 (zero initial state, same r); the two come
    from train.per_device_batch = 1 on 8 devices."""
    overrides = {"train.num_steps": 3, "train.batch_size": 16, "eval.final_num_steps": (), "recurrence.init_scale": 0.0,
                 "checkpoint.every_steps": 100}
    train_and_evaluate(train_config.small_config(cache_dir, **overrides), str(tmp_path / "one"))
    accumulated = train_config.small_config(cache_dir, **overrides, **{"train.per_device_batch": 1})
    with caplog.at_level(logging.INFO):
        train_and_evaluate(accumulated, str(tmp_path / "two"))
    assert (
        "train.grad_accum_steps=2 (derived from train.per_device_batch=1): 16 sequences per step in 2 micro-batch(es) "
        "of 8, 1 per device on 8 data-parallel device(s)." in caplog.messages
    )
    np.testing.assert_allclose(list(_losses(tmp_path / "two").values()), list(_losses(tmp_path / "one").values()), rtol=2e-5)
    _, one = checkpoint_io.load_params(tmp_path / "one")
    _, two = checkpoint_io.load_params(tmp_path / "two")
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
        np.testing.assert_allclose(a, b, rtol=0, atol=5e-5)  # Adam amplifies float noise on tiny gradients


def test_resume_on_another_builtin_corpus_is_refused(full_run, tmp_path, cache_dir):
    """The saved run trained on this interpreter's stdlib; its resume points the code documents at another
    directory of real files (as another Python's stdlib would be) and is refused before anything is restored."""
    workdir = tmp_path / "run"
    shutil.copytree(full_run[0], workdir)
    stdlib = builtin.code_root(builtin.BuiltinSpec.from_config(train_config.small_config(cache_dir).data))
    code = tmp_path / "code"
    for name in ("json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py"):
        (code / name).parent.mkdir(parents=True, exist_ok=True)
        (code / name).write_bytes((stdlib / name).read_bytes())
    saved = checkpoint.Checkpoints(workdir, keep=3).corpus(6)["fingerprint"]
    resumed = train_config.small_config(cache_dir, **{"data.builtin.code_dir": str(code), "train.num_steps": 9})
    with pytest.raises(ValueError) as refused:
        train_and_evaluate(resumed, str(workdir))
    # What the resume saw: the other directory's files, tokenized with the run's saved tokenizer.
    here = pipeline.builtin_corpus(
        train_config.small_config(
            cache_dir, **{"data.builtin.code_dir": str(code), "data.tokenizer": str(workdir / "tokenizer.model")}
        )
    ).fingerprint
    assert here != saved
    assert str(refused.value) == (
        f"Refusing to resume: {workdir / 'checkpoints' / '6'} was trained on the built-in corpus with fingerprint "
        f"{saved}, but here it has fingerprint {here} (the code files, i.e. this interpreter's stdlib or "
        "data.builtin.code_dir, or the data.builtin settings differ); resume where the corpus is the same, "
        "or start a new --workdir."
    )
    # Nothing saved is lost.
    assert checkpoint.Checkpoints(workdir, keep=3).latest_step() == 6
    assert (workdir / "tokenizer.model").read_bytes() == (full_run[0] / "tokenizer.model").read_bytes()
