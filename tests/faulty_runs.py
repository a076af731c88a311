"""Runs of `python -m rdlm.train` that the fault tests interrupt: the test-sized config on one CPU device, its logs in
a file the test can watch, and a shared compilation cache so that each restart skips the compile."""

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

import xla_env
from rdlm import checkpoint_io, metrics, orbax_steps

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 12
RESUMED = re.compile(r"Resumed from \S+ at step (\d+)\.")


class Runs:
    """Starts training runs of one shape (every run of a test reads the same data and compiles the same program)."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.cache = root / "data-cache"
        self.jax_cache = root / "jax-cache"

    def command(self, workdir, *overrides) -> list[str]:
        return [sys.executable, "-m", "rdlm.train", "--config=tests/train_config_cli.py", f"--workdir={workdir}",
                f"--config.data.cache_dir={self.cache}", f"--config.train.num_steps={NUM_STEPS}",
                "--config.checkpoint.every_steps=2", "--config.checkpoint.async_save=true",
                "--config.log.every_steps=1", *overrides]

    def env(self, **extra) -> dict:
        env = dict(os.environ)  # XLA_FLAGS: one CPU device, a quick compile
        env.update(XLA_FLAGS=xla_env.xla_flags(None), JAX_PLATFORMS="cpu", RDLM_HUGE_PAGES="0", PYTHONUNBUFFERED="1",
                   JAX_COMPILATION_CACHE_DIR=str(self.jax_cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **extra)
        return env

    def start(self, workdir, *overrides, env=None, log_name="run", preexec_fn=None) -> "Run":
        log = self.root / f"{pathlib.Path(workdir).name}-{log_name}.log"
        handle = open(log, "w")
        proc = subprocess.Popen(self.command(workdir, *overrides), cwd=REPO, env=env or self.env(),
                                stdout=handle, stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
        return Run(proc, log, handle)

    def run(self, workdir, *overrides, env=None, log_name="run", preexec_fn=None, timeout=600) -> "Run":
        run = self.start(workdir, *overrides, env=env, log_name=log_name, preexec_fn=preexec_fn)
        run.wait(timeout)
        return run


class Run:
    def __init__(self, proc, log, handle):
        self.proc, self.log, self._handle = proc, log, handle

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout=600) -> int:
        code = self.proc.wait(timeout=timeout)
        self._handle.close()
        return code

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.wait()

    def resumed_at(self) -> int | None:
        found = RESUMED.findall(self.text())
        return int(found[-1]) if found else None

    def last_error(self) -> str:
        lines = [line for line in self.text().splitlines() if line.strip()]
        return lines[-1] if lines else ""


def wait_for(predicate, run: Run, timeout=300, what="a condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if run.proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {run.proc.returncode}) before {what}:\n{run.text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout} s")


def logged_steps(workdir) -> list[int]:
    path = pathlib.Path(workdir) / metrics.METRICS_FILE
    if not path.exists():
        return []
    return [r["step"] for r in metrics.read_metrics(workdir) if "loss" in r]


def committed_steps(workdir) -> list[int]:
    root = pathlib.Path(workdir) / orbax_steps.CHECKPOINTS_SUBDIR
    return sorted(ocp.utils.checkpoint_steps(root)) if root.exists() else []


def losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics.read_metrics(workdir) if "loss" in r}


def same_params(a, b) -> bool:
    """Bit-equal parameters of the newest steps of two workdirs."""
    _, pa = checkpoint_io.load_params(a, as_numpy=True)
    _, pb = checkpoint_io.load_params(b, as_numpy=True)
    la, lb = jax.tree.leaves(pa), jax.tree.leaves(pb)
    return len(la) == len(lb) and all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb))
