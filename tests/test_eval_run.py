"""Evaluating a trained run: the same numbers as training's final table, the run's own tokenizer only, tasks
scored during training, the command line, and the EMA checkpoint loading like any other."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from rdlm import metrics
from rdlm.data import builtin, pipeline
from rdlm.data import tokenizer as tokenizer_lib
from rdlm.eval import heldout, runner, tasks

REPO = pathlib.Path(__file__).resolve().parents[1]
# Each test needs the trained run of the `eval_run` fixture (about a minute and a half on 2 cores).
pytestmark = pytest.mark.slow


def test_evaluate_reproduces_the_final_training_table(eval_run):
    workdir, trained, _ = eval_run
    result = runner.evaluate(runner.load_model(str(workdir)), num_steps=(1, 4), tasks=["val", "builtin"])
    for key in ("val_loss", "accuracy", "accuracy_by_difficulty", "accuracy_in_distribution"):
        assert result[key] == trained[key], key
    assert result["val_perplexity"] == pytest.approx(np.exp(trained["val_loss"]).tolist())
    assert all(0.5 < b < 12 for b in result["val_bits_per_byte"])


def test_tasks_are_scored_during_training(eval_run):
    workdir, _, specs = eval_run
    rows = [row for row in metrics.read_metrics(workdir) if "eval/small-parity-choice/acc_r1" in row]
    assert [row["step"] for row in rows] == [3, 6]
    assert {"eval/small-parity-choice/acc_norm_r2", "eval/small-parity-choice/acc_r2"} <= set(rows[0])
    tags = {tag for tag, _, _ in metrics.read_events(workdir / "tensorboard")}
    assert "eval/small-parity-choice/acc_r1" in tags
    # The logged score is rdlm.evaluate's on the final params.
    final = runner.evaluate(runner.load_model(str(workdir)), num_steps=(1,), tasks=[str(specs["parity-choice"])],
                            batch_size=8)
    assert rows[-1]["eval/small-parity-choice/acc_r1"] == pytest.approx(final["tasks"]["small-parity-choice"]["acc"][0])


def _other_tokenizer(vocab_size: int) -> tokenizer_lib.Tokenizer:
    text = ["".join(f"{i:b}={bin(i).count('1') % 2}\n" for i in range(4000)), "print('hello world')\n" * 50]
    return tokenizer_lib.train_tokenizer(text, vocab_size)


def test_evaluation_loads_the_runs_tokenizer_and_never_rebuilds_one(eval_run, tmp_path, monkeypatch):
    workdir, trained, _ = eval_run
    saved = (workdir / "tokenizer.model").read_bytes()
    other = _other_tokenizer(300)
    before = heldout.reasoning_requests(runner.load_model(str(workdir)).run_config, tokenizer_lib.Tokenizer(saved))

    # Change the built-in corpus under the run, and make any rebuild of the corpus or a tokenizer fail.
    stdlib = tmp_path / "stdlib"
    stdlib.mkdir()
    for i in range(3):
        (stdlib / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 40)
    monkeypatch.setattr(builtin.sysconfig, "get_paths", lambda: {"stdlib": str(stdlib)})

    def forbidden(*args, **kwargs):
        raise AssertionError("evaluation rebuilt the built-in corpus or a tokenizer")

    monkeypatch.setattr(builtin, "build", forbidden)
    monkeypatch.setattr(tokenizer_lib, "train_tokenizer", forbidden)
    model = runner.load_model(str(workdir))
    assert model.tokenizer.model_proto == saved
    assert heldout.reasoning_requests(model.run_config, model.tokenizer) == before
    result = runner.evaluate(model, num_steps=(1, 4), tasks=["val", "builtin"])
    assert result["accuracy"] == trained["accuracy"]  # same problems, same ids, same params
    assert result["val_loss"] != trained["val_loss"]  # the validation code is the changed corpus

    # Another real SentencePiece model in the run's place: evaluation's ids follow it.
    assert other.encode("0110100110=") != tokenizer_lib.Tokenizer(saved).encode("0110100110=")
    (workdir / "tokenizer.model").write_bytes(other.model_proto)
    try:
        model = runner.load_model(str(workdir))
        engine = model.engine(batch_size=8)
        assert engine.encode("0110100110=") == [other.bos_id] + other.encode("0110100110=")
        problems = [p for ps in builtin.heldout_problems(model.run_config).values() for p in ps]
        assert heldout.reasoning_requests(model.run_config, model.tokenizer) == [
            ([other.bos_id] + other.encode(p.prompt), other.encode(p.answer)) for p in problems]
        batches = [np.asarray(b["inputs"]) for b in heldout.eval_batches(model.run_config, model.mesh, model.rules,
                                                                           model.tokenizer)]
        for tok, same in ((other, True), (tokenizer_lib.Tokenizer(saved), False)):
            expected = pipeline.make_eval_batches(model.run_config, batch_size=8, tokenizer=tok)
            assert all(np.array_equal(a, e["inputs"]) for a, e in zip(batches, expected)) == same
    finally:
        (workdir / "tokenizer.model").write_bytes(saved)


def test_evaluate_command_writes_results_and_plot(eval_run, tmp_path):
    workdir, trained, specs = eval_run
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "rdlm.evaluate", f"--checkpoint={workdir}", "--num_steps=1,4",
                           f"--tasks=val,builtin,{specs['parity-choice']}", f"--out={out}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "results.json").read_text())
    assert saved["num_steps"] == [1, 4] and saved["exit"] is None
    assert saved["val_loss"] == trained["val_loss"] and saved["accuracy"] == trained["accuracy"]
    assert set(saved["tasks"]["small-parity-choice"]) == {"acc", "acc_norm"}
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header, *rows = proc.stdout.splitlines()[-4:-1]
    assert header.split()[:4] == ["r", "val_loss", "val_ppl", "val_bpb"] and "small-parity-choice/acc_norm" in header
    assert [row.split()[0] for row in rows] == ["1", "4"]


def test_ema_checkpoint_loads_in_evaluate_and_generate(eval_run, tmp_path):
    from rdlm import ema
    from rdlm.generate import generate_text

    workdir, _, specs = eval_run
    chosen = ema.average(workdir, tmp_path / "ema", beta=0.9, last=2, dilation=1)
    assert chosen.steps == (3, 6)
    result = runner.evaluate(runner.load_model(str(tmp_path / "ema")), num_steps=(1,),
                             tasks=["builtin", str(specs["parity-choice"])])
    assert 0.0 <= result["accuracy"][0] <= 1.0 and "small-parity-choice" in result["tasks"]
    out = generate_text(str(tmp_path / "ema"), "0110=", num_steps=4, max_new_tokens=2, init_scale=0.0)
    assert len(out.new_ids) >= 1 and out.steps_per_token[0] == 4
    assert tasks.load(str(specs["parity-answer"])).fewshot[0].answer == "0"
