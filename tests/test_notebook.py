"""The Colab notebook, executed as a notebook: nbclient runs every cell on a real Jupyter kernel on CPU, on a
freshly trained run and on the Hugging Face fixture; its cells hold no scoring code."""

import ast
import json
import os
import pathlib
import shutil

import nbformat
import pytest

import huginn_tokenizer
import xla_env

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "colab_eval.ipynb"
PUBLIC = {"rdlm.eval.runner", "rdlm.eval.report", "rdlm.eval", "rdlm"}  # what the cells may import from rdlm


def _code_cells():
    return [c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"]


def test_notebook_uses_only_rdlm_public_functions_and_no_scoring_code():
    for source in _code_cells():
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rdlm"):
                assert node.module in PUBLIC, node.module
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("rdlm.") and a.name not in PUBLIC for a in node.names)
            if isinstance(node, ast.Attribute):  # no log-probabilities, argmax or model calls in the cells
                assert node.attr not in {"log_softmax", "argmax", "take_along_axis", "apply", "logits"}, node.attr
    parameters = [c for c in nbformat.read(NOTEBOOK, as_version=4).cells if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1 and "RDLM_CHECKPOINT" in parameters[0].source


def execute(tmp_path, monkeypatch, **env) -> nbformat.NotebookNode:
    """Runs the notebook top to bottom in a fresh kernel (which inherits these RDLM_* variables)."""
    from nbclient import NotebookClient

    for key, value in {"XLA_FLAGS": xla_env.xla_flags(8), "JAX_PLATFORMS": "cpu",
                       "MPLBACKEND": "Agg", **env}.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    return nb


def _stdout(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.slow
def test_notebook_runs_on_a_trained_run(eval_run, tmp_path, monkeypatch):
    workdir, trained, specs = eval_run
    out = tmp_path / "out"
    nb = execute(tmp_path, monkeypatch, RDLM_CHECKPOINT=str(workdir), RDLM_NUM_STEPS="1,4", RDLM_EXIT="kl:1e-3",
                 RDLM_TASKS=f"val,builtin,{specs['parity-choice']},{specs['parity-answer']}", RDLM_OUT=str(out),
                 RDLM_PROMPT="0110=", RDLM_MAX_NEW_TOKENS="4")
    saved = json.loads((out / "results.json").read_text())
    assert saved["val_loss"] == trained["val_loss"] and saved["accuracy"] == trained["accuracy"]
    assert set(saved["tasks"]) == {"small-parity-choice", "small-parity-answer"}
    adaptive = json.loads((out / "exit" / "results.json").read_text())
    assert all(1.0 <= x <= 4.0 for x in adaptive["tasks"]["small-parity-choice"]["mean_iterations"])
    text = _stdout(nb)
    assert "8 devices" in text and "--- r = 32: mean steps per token 32.0" in text and "--- exit kl:1e-3" in text
    assert _images(nb) == 2


@pytest.mark.slow
def test_notebook_runs_on_the_hf_fixture(huginn_tiny_dir, eval_run, tmp_path, monkeypatch):
    checkpoint = tmp_path / "huginn-tiny"
    shutil.copytree(huginn_tiny_dir / "checkpoint", checkpoint)
    huginn_tokenizer.write_bpe(checkpoint)  # the fixture ships no tokenizer; huginn's chat tokens, a tiny vocabulary
    specs = eval_run[2]
    out = tmp_path / "out"
    nb = execute(tmp_path, monkeypatch, RDLM_CHECKPOINT=str(checkpoint), RDLM_NUM_STEPS="1,4", RDLM_EXIT="",
                 RDLM_TASKS=f"{specs['parity-choice']},{specs['parity-answer']}", RDLM_OUT=str(out),
                 RDLM_PROMPT="def fibonacci(n):", RDLM_MAX_NEW_TOKENS="8")
    saved = json.loads((out / "results.json").read_text())
    assert "val_loss" not in saved and set(saved["tasks"]["small-parity-choice"]) == {"acc", "acc_norm"}
    text = _stdout(nb)
    assert "n_embd=64, layers=2/4/2" in text and "--- r = 32: mean steps per token" in text
    assert not (out / "exit").exists() and _images(nb) == 1
