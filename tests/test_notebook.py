"""The Colab notebook runs top to bottom on CPU against a freshly trained workdir (install cells skipped)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

import train_config
from rdlm.train import train_and_evaluate

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "colab_eval.ipynb"


def notebook_script() -> str:
    """The notebook's code cells as one script, without the Colab-only cells."""
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    return "\n\n".join(c for c in code if not c.lstrip().startswith("# colab-only"))


def test_notebook_cells_are_valid_python():
    compile(notebook_script(), str(NOTEBOOK), "exec")


@pytest.mark.slow
def test_notebook_runs_on_a_trained_workdir(tmp_path):
    workdir = tmp_path / "run"
    config = train_config.small_config(tmp_path / "cache", **{"eval.final_num_steps": ()})
    train_and_evaluate(config, str(workdir))
    script = tmp_path / "notebook.py"
    script.write_text(notebook_script())
    env = {
        **os.environ, "RDLM_CHECKPOINT": str(workdir), "RDLM_PROMPT": "def f(x):",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg",
    }
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "8 devices" in out and "r=  1  loss" in out and "r= 32  loss" in out
    assert "--- r = 32: mean steps per token 32.0" in out and "--- kl exit: mean steps per token" in out
    assert "accuracy" in out and (tmp_path / "recurrence_scaling.png").exists()
