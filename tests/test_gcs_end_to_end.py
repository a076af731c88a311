"""gs:// end to end against a real GCS server on 127.0.0.1 (fake-gcs-server): training on data in a bucket into a
workdir in a bucket (bare ids, and tokenised text with its tokenizer), SIGKILL and resume with exactly the losses
of an uninterrupted run, generation, init_from and the converter, all through gs:// paths."""

import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import huginn_tokenizer
import test_id_corpora
import train_config
import xla_env
from rdlm import checkpoint_io, generate, metrics, storage
from rdlm.data import tokenizer as tokenizer_lib
from rdlm.train import train_and_evaluate

pytestmark = pytest.mark.slow
REPO = pathlib.Path(__file__).resolve().parents[1]


def _parquet(url, rows, row_group_size=16):
    with storage.atomic_write(url) as f:
        pq.write_table(pa.table({"input_ids": rows}), f, row_group_size=row_group_size)


def _run(args, home, **kwargs):
    """`python -m ...` from the repository root, with the emulator's settings (inherited) and its own HOME."""
    env = {**os.environ, "HOME": str(home), "XLA_FLAGS": xla_env.xla_flags(8),
           "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _finish(proc, timeout=900):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def _losses(workdir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in metrics.read_metrics(workdir) if "loss" in row}


def test_bare_ids_from_a_bucket_into_a_bucket_survive_sigkill_with_the_same_losses(gcs_server, gcs_bucket, tmp_path):
    docs = test_id_corpora.id_documents(96)
    _parquet(f"{gcs_bucket}/huginn-dataset/part-0.parquet", docs[:48])
    _parquet(f"{gcs_bucket}/huginn-dataset/part-1.parquet", docs[48:])

    def train(workdir):
        return _run(["rdlm.train", "--config=tests/train_config_cli.py", f"--workdir={gcs_bucket}/{workdir}",
                     f"--config.data.paths={gcs_bucket}/huginn-dataset/*.parquet", "--config.data.source=parquet",
                     "--config.data.bos_id=1", "--config.data.eos_id=2", "--config.data.pad_id=0",
                     "--config.data.eval_documents=8", "--config.train.num_steps=12"], tmp_path)

    _finish(train("straight"))
    killed = train("killed")
    deadline = time.monotonic() + 600
    while f"killed/checkpoints/6/commit_success.txt" not in gcs_server.object_names(gcs_bucket):
        assert killed.poll() is None, killed.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint 6 within 600 s"
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not any(n.startswith("killed/checkpoints/12/") for n in gcs_server.object_names(gcs_bucket))
    _finish(train("killed"))
    expected, got = _losses(f"{gcs_bucket}/straight"), _losses(f"{gcs_bucket}/killed")
    assert sorted(got) == sorted(expected) == list(range(1, 13))
    assert got == expected  # the same batches and the same arithmetic: equal to the bit
    assert any(n.startswith("killed/tensorboard/events.out.tfevents.") for n in gcs_server.object_names(gcs_bucket))


@pytest.fixture(scope="module")
def text_run(gcs_server, tmp_path_factory):
    """A short run on tokenised text in a bucket, its tokenizer in the bucket too, into a gs:// workdir."""
    bucket = gcs_server.create_bucket("text")
    lines = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400)]
    tok = tokenizer_lib.train_tokenizer(lines, vocab_size=300)
    tok.save(f"{bucket}/corpus/tokenizer.model")
    _parquet(f"{bucket}/corpus/code.parquet", [tok.encode(line) for line in lines])
    config = train_config.small_config(tmp_path_factory.mktemp("cache"), **{
        "data.source": "parquet", "data.paths": f"{bucket}/corpus/*.parquet",
        "data.tokenizer": f"{bucket}/corpus/tokenizer.model", "data.eval_documents": 16})
    result = train_and_evaluate(config, f"{bucket}/run")
    return bucket, result


def test_tokenised_text_from_a_bucket_then_generate_and_init_from_the_bucket(gcs_server, text_run, tmp_path):
    bucket, result = text_run
    assert sorted(_losses(f"{bucket}/run")) == [1, 2, 3, 4, 5, 6] and len(result["val_loss"]) == 2
    names = gcs_server.object_names(bucket)
    assert {"run/tokenizer.model", "run/metrics.jsonl", "run/recurrence_scaling.json", "run/recurrence_scaling.png",
            "run/checkpoints/3/commit_success.txt", "run/checkpoints/6/commit_success.txt"} <= set(names)

    local = tmp_path / "run"  # the same objects, fetched with the server's own API
    gcs_server.download(f"{bucket}/run", local)
    cli = _finish(_run(["rdlm.generate", f"--checkpoint={bucket}/run", "--prompt=def f3(x):", "--num_steps=4",
                        "--max_new_tokens=6", "--init_scale=0"], tmp_path))
    expected = generate.generate_text(str(local), "def f3(x):", num_steps=4, max_new_tokens=6, init_scale=0.0)
    assert cli.startswith(expected.text + "\n") and f"{[4] * len(expected.new_ids)}" in cli

    config = train_config.small_config(tmp_path / "cache", **{"train.num_steps": 0, "eval.final_num_steps": (),
                                                               "init_from": f"{bucket}/run"})
    train_and_evaluate(config, f"{bucket}/init")
    _, source = checkpoint_io.load_params(str(local))
    _, copied = checkpoint_io.load_params(f"{bucket}/init")
    for a, b in zip(jax.tree.leaves(source), jax.tree.leaves(copied)):
        np.testing.assert_array_equal(a, b)


def test_convert_the_fixture_into_a_bucket_then_generate_and_convert_back(gcs_server, gcs_bucket, huginn_tiny_dir,
                                                                          tmp_path):
    _finish(_run(["rdlm.interop.convert", "to-orbax", "tests/fixtures/huginn-tiny/checkpoint",
                  f"{gcs_bucket}/huginn"], tmp_path))
    huginn_tokenizer.write(tmp_path / "tokenizer.json")
    storage.copy(tmp_path / "tokenizer.json", f"{gcs_bucket}/tokenizer.json")
    words = "w5 w17 w3 w250"
    cli = _finish(_run(["rdlm.generate", f"--checkpoint={gcs_bucket}/huginn", f"--tokenizer={gcs_bucket}/tokenizer.json",
                        f"--prompt={words}", "--num_steps=4", "--max_new_tokens=6", "--init_scale=0"], tmp_path))
    expected = generate.generate_text(str(huginn_tiny_dir / "checkpoint"), words, num_steps=4, max_new_tokens=6,
                                      init_scale=0.0, tokenizer=str(tmp_path / "tokenizer.json"))
    assert cli.startswith(expected.text + "\n") and expected.new_ids

    _finish(_run(["rdlm.interop.convert", "to-hf", f"{gcs_bucket}/huginn", f"{gcs_bucket}/hf"], tmp_path))
    back = tmp_path / "hf"
    gcs_server.download(f"{gcs_bucket}/hf", back)
    _, original = checkpoint_io.load_params(huginn_tiny_dir / "checkpoint")
    _, converted = checkpoint_io.load_params(back)
    for a, b in zip(jax.tree.leaves(original), jax.tree.leaves(converted)):
        np.testing.assert_array_equal(a, b)


def _readme_convert_then_generate() -> list[list[str]]:
    """The README's huginn-0125 commands (to-orbax, then generate), as argument lists."""
    block = (REPO / "README.md").read_text().split("# Hugging Face checkpoint", 1)[1].split("```", 1)[0]
    commands = [line for line in block.replace("\\\n", " ").splitlines() if line.startswith("python -m")][:2]
    assert "to-orbax path/to/huginn-0125 checkpoints/huginn-0125" in commands[0] and "--chat" in commands[1]
    return [shlex.split(c) for c in commands]


@pytest.mark.parametrize("where", ["local", "gs"])
def test_the_readme_convert_then_generate_commands_run_as_written(where, request, huginn_tiny_dir, tmp_path):
    hf = tmp_path / "path" / "to" / "huginn-0125"
    shutil.copytree(huginn_tiny_dir / "checkpoint", hf)
    huginn_tokenizer.write(hf / "tokenizer.json")
    commands = _readme_convert_then_generate()
    if where == "gs":
        bucket = request.getfixturevalue("gcs_bucket")
        for path in hf.iterdir():
            storage.copy(path, f"{bucket}/path/to/huginn-0125/{path.name}")
        commands = [[a.replace("path/to/", f"{bucket}/path/to/").replace("checkpoints/", f"{bucket}/checkpoints/")
                     for a in c] for c in commands]
    env = {**os.environ, "HOME": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    outputs = [subprocess.run([sys.executable, *c[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900) for c in commands]
    for out in outputs:
        assert out.returncode == 0, out.stderr[-3000:]
    flags = dict(a[2:].split("=", 1) for a in commands[1] if a.startswith("--") and "=" in a)
    expected = generate.generate_text(str(hf), flags["prompt"], chat=True, num_steps=int(flags["num_steps"]),
                                      exit=flags["exit"])
    assert outputs[1].stdout.startswith(expected.text + "\n") and expected.new_ids
    assert f"steps per token (mean {sum(expected.steps_per_token) / len(expected.steps_per_token):.2f})" in outputs[1].stdout
