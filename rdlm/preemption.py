"""When a run must save and leave: SIGTERM (or JAX's preemption sync point) and the job's wall-clock limit.

`train.max_hours` is the job's limit as a scheduler sets it (SLURM `--time`, a queued resource's
duration); the run saves and exits cleanly `train.exit_minutes_before_limit` before it, as the
reference's `save_n_min_before_job_done` does. Both end the process with exit code 0 and a
checkpoint of the step just taken, so rerunning the same command resumes.
"""

import signal
import time

import jax
from absl import logging


class Preempted(Exception):
    """Training stopped (SIGTERM or the job's time limit) after saving a checkpoint."""


class StopSignals:
    """Set by SIGTERM; multi-process runs use JAX's preemption sync point instead (it owns SIGTERM)."""

    def __init__(self, train_config, clock=time.monotonic):
        if train_config.max_hours < 0 or train_config.exit_minutes_before_limit < 0:
            raise ValueError(
                f"train.max_hours={train_config.max_hours} and train.exit_minutes_before_limit="
                f"{train_config.exit_minutes_before_limit} must be >= 0."
            )
        self.sigterm_received = False
        self._clock, self._started = clock, clock()
        self._max_hours = float(train_config.max_hours)
        self._margin_minutes = float(train_config.exit_minutes_before_limit)
        if self._max_hours and self._margin_minutes >= self._max_hours * 60:
            raise ValueError(
                f"train.exit_minutes_before_limit={self._margin_minutes:g} leaves no time within "
                f"train.max_hours={self._max_hours:g}; lower it or raise train.max_hours."
            )
        if jax.process_count() == 1:
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint at the end of this step.")
        self.sigterm_received = True

    def sigterm(self, manager, step: int) -> bool:
        """True once SIGTERM arrived (every process agrees on the step in a multi-process run)."""
        if jax.process_count() > 1:
            return manager.reached_preemption(step)
        return self.sigterm_received

    def out_of_job_time(self) -> bool:
        """True once less than `train.exit_minutes_before_limit` is left of `train.max_hours`."""
        if not self._max_hours:
            return False
        return self._clock() - self._started >= self._max_hours * 3600 - self._margin_minutes * 60

    def describe_limit(self, step: int) -> str:
        return (
            f"Stopped at step {step}, {self._margin_minutes:g} minutes before train.max_hours={self._max_hours:g}; "
            "the checkpoint is saved, rerun to resume."
        )
