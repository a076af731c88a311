"""What a run shows: metric files, a console progress line, collapse diagnostics and model FLOPs.

`WORKDIR/metrics.jsonl` holds one JSON object per `write` call, e.g. `{"step": 10, "loss": 2.5,
"time": 1718000000.0}`; it is only ever appended to. Several lines may share a step (train and eval
metrics logged separately): readers merge them, the last value of each key winning. A run resumed
from the checkpoint at step N first appends `{"resume_step": N}`, after which earlier lines with a
step above N are stale; `read_metrics` applies both rules.
"""

import json
import math
import os
import sys
import time
import uuid
from typing import Any, Callable, Mapping, Optional, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from rdlm import storage

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _staging_dir(remote: str) -> epath.Path:
    """Where the metrics of a remote workdir are written before they are copied there."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in remote)
    return storage.path("~/.cache/rdlm/staging") / name


def _number(key: str, value: Any):
    array = np.asarray(jax.device_get(value))
    if array.size != 1:
        raise ValueError(f"Metric '{key}' must be a scalar, got shape {array.shape}.")
    item = array.item()
    if isinstance(item, (bool, int)):
        return int(item)
    item = float(item)
    return item if math.isfinite(item) else None


class MetricsWriter:
    """Appends metrics to `WORKDIR/metrics.jsonl` and to TensorBoard; only process 0 writes.

    A remote workdir (gs://...) is written through a local staging directory that `flush()` mirrors
    to the workdir with etils.epath (object stores cannot append).
    """

    def __init__(self, workdir, *, is_primary: bool = True, resume_step: Optional[int] = None):
        self._is_primary = is_primary
        if not is_primary:
            return
        from tensorboardX import SummaryWriter  # imported here: only process 0 pays for it

        self._remote = storage.path(workdir) if storage.is_remote(workdir) else None
        local = storage.makedirs(_staging_dir(os.fspath(workdir)) if self._remote else workdir)
        if self._remote and storage.exists(self._remote / METRICS_FILE) and not storage.exists(local / METRICS_FILE):
            storage.copy(self._remote / METRICS_FILE, local / METRICS_FILE)
        self._local = local
        self._file = storage.open(local / METRICS_FILE, "a")
        purge_step = None if resume_step is None else int(resume_step) + 1
        # A unique suffix so a restart within the same second never truncates the old event file.
        self._tb = SummaryWriter(
            os.fspath(local / TENSORBOARD_DIR),
            purge_step=purge_step,
            filename_suffix=f".{uuid.uuid4().hex[:8]}",
        )
        if resume_step is not None:
            self._append({"resume_step": int(resume_step)})

    def _append(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Logs scalar metrics (Python, NumPy or JAX scalars; non-finite become JSON null)."""
        if not self._is_primary:
            return
        step = int(step)
        values = {key: _number(key, value) for key, value in metrics.items()}
        self._append({"step": step, "time": round(time.time(), 3), **values})
        for key, value in values.items():
            self._tb.add_scalar(key, float("nan") if value is None else value, step)

    def write_text(self, step: int, tag: str, text: str) -> None:
        """Logs a text sample (e.g. a generation) under `tag`."""
        if not self._is_primary:
            return
        self._append({"step": int(step), tag: str(text)})
        self._tb.add_text(tag, str(text), int(step))

    def flush(self) -> None:
        """Flushes the files and, for a remote workdir, copies them there."""
        if not self._is_primary:
            return
        self._file.flush()
        self._tb.flush()
        if self._remote:
            events = storage.glob(f"{self._local / TENSORBOARD_DIR}/events.*")
            for path in [self._local / METRICS_FILE, *map(storage.path, events)]:
                storage.copy(path, self._remote / path.relative_to(self._local))

    def close(self) -> None:
        if self._is_primary and not self._file.closed:
            self.flush()
            self._file.close()
            self._tb.close()


def read_metrics(workdir) -> list[dict]:
    """The records of `WORKDIR/metrics.jsonl`, one per step in step order, stale lines dropped."""
    by_step: dict[int, dict] = {}
    for line in storage.read_text(storage.path(workdir) / METRICS_FILE).splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "resume_step" in record:
            cut = record["resume_step"]
            by_step = {step: r for step, r in by_step.items() if step <= cut}
            continue
        by_step.setdefault(record["step"], {}).update(record)
    return [by_step[step] for step in sorted(by_step)]


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    days, seconds = divmod(seconds, 86400)
    text = f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    return f"{days}d {text}" if days else text


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.1f}"


class ProgressBar:
    """A console line with step, loss, tokens/s and ETA.

    On a terminal the line is redrawn in place; otherwise (CI logs, SLURM files) a full line is
    printed at most every `interval_s` seconds and at the last step. Speed is measured from the
    first `update`, so compilation of the first step does not count.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        tokens_per_step: Optional[int] = None,
        stream: Optional[TextIO] = None,
        interval_s: float = 30.0,
        is_tty: Optional[bool] = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total_steps = int(total_steps)
        self.tokens_per_step = tokens_per_step
        self._stream = sys.stderr if stream is None else stream
        self._tty = self._stream.isatty() if is_tty is None else is_tty
        self._interval_s = 0.2 if self._tty else interval_s
        self._clock = clock
        self._first: Optional[tuple[int, float]] = None
        self._last_print = -math.inf
        self._width = 0

    def format(self, step: int, loss: Optional[float] = None) -> str:
        """The progress line for `step`, using the speed measured so far."""
        parts = [f"step {step}/{self.total_steps} ({100 * step / max(self.total_steps, 1):.1f}%)"]
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        first_step, first_time = self._first or (step, self._clock())
        elapsed, done = self._clock() - first_time, step - first_step
        if done > 0 and elapsed > 0:
            seconds_per_step = elapsed / done
            if self.tokens_per_step:
                parts.append(f"{_si(self.tokens_per_step / seconds_per_step)} tok/s")
            parts.append(f"{seconds_per_step:.3g} s/step")
            parts.append(f"ETA {_duration((self.total_steps - step) * seconds_per_step)}")
        return " | ".join(parts)

    def update(self, step: int, loss: Optional[float] = None) -> None:
        now = self._clock()
        if self._first is None:
            self._first = (int(step), now)
        final = step >= self.total_steps
        if not final and now - self._last_print < self._interval_s:
            return
        self._last_print = now
        line = self.format(int(step), loss)
        if self._tty:
            self._stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._tty and self._width:
            self._stream.write("\n")
            self._stream.flush()


def token_correlation(state_BSD: jax.Array) -> jax.Array:
    """Mean pairwise cosine similarity of the feature-centred token states, averaged over the batch.

    Same centring as the reference's `monitor_module` (recpre/model_dynamic.py lines 1386-1391), but
    averaged over the S(S-1) distinct pairs, so identical states give exactly 1; the reference's
    `token_corr` equals this times (1 - 1/S).
    """
    x_BSD = state_BSD.astype(jnp.float32)
    x_BSD = x_BSD - x_BSD.mean(axis=-1, keepdims=True)
    norm_BS1 = jnp.linalg.norm(x_BSD, axis=-1, keepdims=True)
    unit_BSD = x_BSD / jnp.maximum(norm_BS1, jnp.finfo(jnp.float32).tiny)
    seq_len = state_BSD.shape[1]
    total_B = jnp.sum(jnp.square(unit_BSD.sum(axis=1)), axis=-1)  # sum over all (i, j) pairs
    diagonal_B = jnp.sum(jnp.square(unit_BSD), axis=(1, 2))
    return jnp.mean((total_B - diagonal_B) / max(seq_len * (seq_len - 1), 1))


def relative_state_change(s_new: jax.Array, s_prev: jax.Array) -> jax.Array:
    """Mean over tokens of |s_r - s_{r-1}| / |s_r| (the reference's `rel_residual`)."""
    s_new, s_prev = s_new.astype(jnp.float32), s_prev.astype(jnp.float32)
    change = jnp.linalg.norm(s_new - s_prev, axis=-1)
    size = jnp.linalg.norm(s_new, axis=-1)
    return jnp.mean(change / jnp.maximum(size, jnp.finfo(jnp.float32).tiny))


def rms(tree: Any) -> jax.Array:
    """Root mean square over every element of every leaf of `tree`."""
    leaves = jax.tree.leaves(tree)
    total = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)
    count = sum(x.size for x in leaves)
    return jnp.sqrt(total / float(max(count, 1)))  # a float: counts of 3.5B overflow int32


def model_flops_per_token(
    model_config, seq_len: int, num_steps_no_grad: int, num_steps_with_grad: int
) -> int:
    """Training matmul FLOPs per token, MaxText-style, for a recurrent-depth model.

    Forward is 2 FLOPs per weight plus causal attention (half of the S x S scores and values);
    backward is twice the forward. The `num_steps_no_grad` core iterations count forward only;
    prelude, coda, head and the `num_steps_with_grad` iterations count forward and backward.
    Rematerialisation is not counted (these are model FLOPs, for MFU).
    """
    c = model_config
    d, attn_dim, hidden = c.n_embd, c.n_heads * c.head_dim, c.intermediate_size
    block = 2 * (d * 3 * attn_dim + attn_dim * d)  # qkv and output projection
    block += 2 * (d * 2 * hidden + hidden * d)  # gated MLP: fc (gate and up) and projection
    block += 2 * seq_len * attn_dim  # causal q.k and attn.v: 4 * S * attn_dim / 2
    core_iteration = c.n_layers_in_recurrent_block * block + 2 * (2 * d * d)  # plus the adapter
    forward_with_grad = (
        (c.n_layers_in_prelude + c.n_layers_in_coda) * block
        + 2 * d * c.vocab_size
        + int(num_steps_with_grad) * core_iteration
    )
    return 3 * forward_with_grad + int(num_steps_no_grad) * core_iteration


def read_events(logdir) -> list[tuple[str, int, Any]]:
    """Every (tag, step, value or text) in the TensorBoard event files under `logdir` (no TensorFlow needed)."""
    import struct

    from tensorboardX.proto import event_pb2

    found = []
    for path in storage.glob(f"{storage.path(logdir)}/events.out.tfevents.*"):
        data = storage.read_bytes(path)
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4  # length, its crc, payload, payload crc
            for value in event.summary.value:
                text = value.tensor.string_val[0].decode() if value.tensor.string_val else None
                found.append((value.tag, event.step, value.simple_value if text is None else text))
    return found
