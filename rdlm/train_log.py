"""What the training loop reports of each step, fetched one step late so the device never waits for the host.

Every step: its loss, gradient norm and finite flag go to the non-finite guard and the loss-spike watch
(rdlm.numerics.StepMonitor), and records the data pipeline skipped are logged (`data_bad_records`).
Every `log.every_steps` steps (and the last): the full metrics, tokens/s and MFU, to metrics.jsonl,
TensorBoard and the progress line.
"""

import dataclasses
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from rdlm import metrics, numerics

GUARD_KEYS = ("loss", "grad_norm", "finite")


@dataclasses.dataclass
class _Step:
    step: int
    metrics: dict  # device arrays, still being computed
    data_state: Any  # the data iterator's state before this step's batch
    bad_records: int  # records the data pipeline skipped while reading this step's batch


class StepReporter:
    """Holds the newest step's metrics until the next step is on its way, then judges and logs them."""

    def __init__(self, config, model_config, writer, workdir, *, progress, peak_tflops: float, process_index: int):
        self._config, self._model_config, self._writer, self._progress = config, model_config, writer, progress
        self._peak = peak_tflops
        self._tokens_per_step = config.train.batch_size * config.data.seq_len
        self.monitor = numerics.StepMonitor(config, writer, workdir, process_index=process_index)
        self._pending: _Step | None = None
        self._last_log_time = time.perf_counter()
        self.bad_records = 0

    def add(self, step: int, step_metrics: dict, data_state, bad_records: int) -> None:
        """Reports the previous step (its results are ready by now) and keeps this one for the next call."""
        self.finish()
        self._pending = _Step(step, step_metrics, data_state, bad_records)

    def finish(self) -> None:
        """Reports the held step, if any (before a save, so a checkpoint covers its steps' metrics)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        every, last = self._config.log.every_steps, self._config.train.num_steps
        if pending.bad_records:
            self.bad_records += pending.bad_records
            logging.warning("Step %d skipped %d bad record(s) (data.on_bad_record='skip'; %d so far).",
                            pending.step, pending.bad_records, self.bad_records)
            self._writer.write(pending.step, {"data_bad_records": pending.bad_records,
                                              "data_bad_records_total": self.bad_records})
        full = pending.step % every == 0 or pending.step == last
        values = jax.device_get(pending.metrics if full else {k: pending.metrics[k] for k in GUARD_KEYS})
        values = {k: float(v) for k, v in values.items()}
        self.monitor.observe(pending.step, values["loss"], values["grad_norm"], bool(values["finite"]),
                             pending.data_state)
        if full:
            self._log(pending.step, values)

    def _log(self, step: int, values: dict) -> None:
        now = time.perf_counter()
        n = int(values["num_steps_no_grad"])
        k = int(values["num_steps"]) - n
        flops = metrics.model_flops_per_token(self._model_config, self._config.data.seq_len, n, k)
        seconds = (now - self._last_log_time) / max(1, self._config.log.every_steps)
        values.update(step_seconds=seconds, tokens_per_second=self._tokens_per_step / seconds)
        values["mfu"] = flops * self._tokens_per_step / seconds / (self._peak * 1e12 * jax.device_count())
        self._writer.write(step, values)
        if self._progress:
            self._progress.update(step, loss=values["loss"] if np.isfinite(values["loss"]) else None)
        self._last_log_time = now
