"""Non-finite steps and loss spikes: the check inside the jitted step, and what the host does about it.

Inside the step (`finite_step`, `apply_if_finite`): a step whose loss or gradient norm is not finite
leaves the parameters and optimizer state as they were (a `lax.cond`, so no host sync and no extra
copy) and reports `finite = 0` in its metrics. So the state never holds a non-finite value, and no
checkpoint can (`Checkpoints.save` checks again).

On the host, `StepMonitor` reads each step's loss, gradient norm and flag one step late (the device is
already running the next step). With `train.on_nonfinite = 'skip'` the step is counted and logged and
training goes on, up to `train.max_consecutive_nonfinite` such steps in a row; with 'stop' the run ends
with one sentence. Either way the message names the step and where its batch lies in the data.
A finite loss above `log.loss_spike_factor` times the mean of the last `log.loss_spike_window` losses
is logged as an event (metrics.jsonl and TensorBoard: `loss_spike`, `loss_running_mean`).
"""

import collections
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
from absl import logging

from rdlm import storage

ON_NONFINITE = ("skip", "stop")
EVENTS_DIR = "nonfinite"  # WORKDIR/nonfinite/step_<n>.process_<i>.json: what a non-finite step read
_MIN_SPIKE_HISTORY = 10  # losses needed before a spike is judged


def finite_step(loss: jax.Array, grad_norm: jax.Array) -> jax.Array:
    """True when a step's loss and gradient norm are both finite (so every gradient is)."""
    return jnp.isfinite(loss) & jnp.isfinite(grad_norm)


def apply_if_finite(finite: jax.Array, apply: Callable[[], tuple], keep: Callable[[], tuple]) -> tuple:
    """`apply()` when `finite`, else `keep()`; only the taken branch runs (inside jit, without a host sync)."""
    return jax.lax.cond(finite, lambda _: apply(), lambda _: keep(), None)


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when every floating-point value in `tree` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def check_config(train_config) -> None:
    if train_config.on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"train.on_nonfinite={train_config.on_nonfinite!r} is not one of {ON_NONFINITE}.")
    if train_config.max_consecutive_nonfinite < 1:
        raise ValueError(
            f"train.max_consecutive_nonfinite={train_config.max_consecutive_nonfinite} must be at least 1."
        )


class StepMonitor:
    """Watches each step's loss and finite flag (host floats, one step late); writes events, stops on request."""

    def __init__(self, config, writer, workdir, *, process_index: int = 0):
        check_config(config.train)
        self._mode, self._limit = config.train.on_nonfinite, int(config.train.max_consecutive_nonfinite)
        self._factor, self._seed = float(config.log.loss_spike_factor), config.train.seed
        self._recent = collections.deque(maxlen=max(int(config.log.loss_spike_window), 1))
        self._writer, self._workdir, self._process = writer, storage.path(workdir), process_index
        self.nonfinite_steps = 0
        self._in_a_row = 0

    def observe(self, step: int, loss: float, grad_norm: float, finite: bool, data_state) -> None:
        """Judges step `step`; `data_state` is the data iterator's state just before its batch was read."""
        if not finite:
            self._nonfinite(step, loss, grad_norm, data_state)
            return
        self._in_a_row = 0
        if self._factor > 0 and len(self._recent) >= _MIN_SPIKE_HISTORY:
            mean = sum(self._recent) / len(self._recent)
            if loss > self._factor * mean:
                logging.warning("Loss spike at step %d: %.4g is %.1fx the running mean %.4g.", step, loss,
                                loss / mean, mean)
                self._writer.write(step, {"loss_spike": loss, "loss_running_mean": mean})
        self._recent.append(loss)

    def _nonfinite(self, step, loss, grad_norm, data_state) -> None:
        self.nonfinite_steps += 1
        self._in_a_row += 1
        where = self._save_data_state(step, loss, grad_norm, data_state)
        what = (
            f"step {step} is not finite (loss {loss}, gradient norm {grad_norm}) and its update was not applied; "
            f"its batch is batch {step} of this run's data order (train.seed={self._seed}), read from the "
            f"data-iterator state saved in {where}"
        )
        self._writer.write(step, {"nonfinite_step": 1, "nonfinite_steps": self.nonfinite_steps})
        if self._mode == "stop":
            raise FloatingPointError(
                f"train.on_nonfinite='stop': {what}; the run stops, and no checkpoint holds a non-finite value. "
                "Lower optim.lr, inspect that batch, or set train.on_nonfinite='skip'."
            )
        if self._in_a_row >= self._limit:
            raise FloatingPointError(
                f"{self._in_a_row} steps in a row were not finite (train.max_consecutive_nonfinite="
                f"{self._limit}); the last: {what}. The run stops; lower optim.lr or check the data."
            )
        logging.warning("Skipped: %s (train.on_nonfinite='skip'; %d such step(s) so far).", what,
                        self.nonfinite_steps)

    def _save_data_state(self, step, loss, grad_norm, data_state) -> str:
        path = self._workdir / EVENTS_DIR / f"step_{step}.process_{self._process}.json"
        record = {"step": step, "loss": str(loss), "grad_norm": str(grad_norm), "data_iter_state": data_state}
        storage.write_text(path, json.dumps(record, indent=1))
        return str(path)
