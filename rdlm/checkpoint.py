"""What a training run saves: its tokenizer, and Orbax steps of params, optimizer, data iterator and config.

Layout: `WORKDIR/tokenizer.model` (written once, at the start of the run) and
`WORKDIR/checkpoints/<step>/{params, opt_state, data_iter, config, model_config, corpus}`. `corpus`
names the data source and, for the built-in corpus, its fingerprint.

What can go wrong, and what happens then:
- a run killed mid-save leaves a step Orbax never committed: it is ignored, and removed at the next start;
- each committed step is verified (read back, every item present) and gets a manifest of its files'
  sizes and CRC-32s (rdlm.checkpoint_manifest); the rotation deletes old steps only when `keep` newer
  verified ones exist, so a bad newest step never costs the last good one (Orbax's own `max_to_keep`
  would delete eagerly, so it is off);
- at resume, a step whose files no longer match its manifest, or that cannot be restored, is named with
  the file, moved to `WORKDIR/corrupt_checkpoints/` and the previous complete step is used;
- a save of non-finite values is refused, and a save that fails (a full disk) is one sentence naming
  the step, while every complete step stays as it was.
"""

import contextlib
import os
import re
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from rdlm import checkpoint_manifest, cli, fault_hooks, numerics, orbax_steps, storage
from rdlm.data import tokenizer as tokenizer_lib
from rdlm.state import TrainState

TOKENIZER_FILE = "tokenizer.model"
CORRUPT_SUBDIR = "corrupt_checkpoints"
# The items of a training step (rdlm.orbax_steps); a verified step has every one.
ITEMS = ("params", "opt_state", "data_iter", "config", "model_config", "corpus")
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def tokenizer_file(workdir) -> epath.Path:
    """Where a run keeps its tokenizer: WORKDIR/tokenizer.model."""
    return storage.path(workdir) / TOKENIZER_FILE


def load_run_tokenizer(workdir) -> tokenizer_lib.Tokenizer | None:
    """The tokenizer a run was trained with; None for a run on bare token ids (it saved none)."""
    path = tokenizer_file(workdir)
    return tokenizer_lib.Tokenizer(path.read_bytes()) if path.exists() else None


def save_run_tokenizer(workdir, tokenizer: tokenizer_lib.Tokenizer) -> None:
    """Writes the tokenizer of a run that is starting (call it before its first checkpoint)."""
    tokenizer_file(workdir).write_bytes(tokenizer.model_proto)


def _primary() -> bool:
    return jax.process_index() == 0


def _agree(value):
    """`value` as process 0 has it, on every process (an int or a bool array)."""
    if jax.process_count() == 1:
        return value
    return multihost_utils.broadcast_one_to_all(np.asarray(value))


class Checkpoints:
    """Saves, verifies, rotates and restores complete training steps under `WORKDIR/checkpoints`."""

    def __init__(self, workdir, *, keep: int, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep} must be at least 1.")
        self.workdir = storage.path(workdir)
        self.directory = self.workdir / orbax_steps.CHECKPOINTS_SUBDIR
        self.keep, self._async = keep, async_save
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # the rotation is ours: only after a newer step is verified
            create=True,
            cleanup_tmp_directories=True,  # what a killed save left behind
            enable_async_checkpointing=True,  # async_save=False waits at once (and commits the same way)
            async_options=ocp.AsyncOptions(post_finalization_callback=fault_hooks.hold_commit),
        )
        with storage.explained(self.directory):
            self.manager = ocp.CheckpointManager(
                self.directory, options=options, handler_registry=orbax_steps.registry()
            )
        self._writing = None  # the step being written, until it is verified

    def steps(self) -> list[int]:
        """The committed steps, oldest first."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def save(self, state: TrainState, data_iter_state, config: dict, model_config, corpus: dict) -> None:
        """Starts writing the step (async); the arrays are snapshotted before training continues.

        `corpus` ({"source": ..., "fingerprint": ...}) is what `corpus(step)` returns on resume.
        """
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return
        if not bool(numerics.all_finite((state.params, state.opt_state))):
            raise FloatingPointError(
                f"Refusing to save step {step} to {self.directory}: its parameters or optimizer state hold "
                "non-finite values; the checkpoints already there are kept."
            )
        self.wait()  # the previous step is verified (and old ones rotated) before the next is written
        self._writing = step
        with self._write_errors_explained():
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(state.params),
                    opt_state=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
                    data_iter=orbax_steps.DataIterSave(data_iter_state),
                    config=ocp.args.JsonSave(config),
                    model_config=ocp.args.JsonSave(orbax_steps.model_config_to_json(model_config)),
                    corpus=ocp.args.JsonSave(corpus),
                ),
                force=True,
            )
        if not self._async:
            self.wait()

    def wait(self) -> None:
        """Waits for the step being written, verifies it and rotates old steps out."""
        with self._write_errors_explained():
            self.manager.wait_until_finished()
        if self._writing is None:
            return
        step, self._writing = self._writing, None
        self.verify(step)
        self._rotate()

    def verify(self, step: int) -> None:
        """Reads a committed step back and records its files (process 0); a no-op for a verified step."""
        if _primary() and not checkpoint_manifest.has_manifest(self.step_dir(step)):
            with storage.explained(self.step_dir(step)):
                checkpoint_manifest.write(self.step_dir(step), ITEMS)
        _agree(0)  # every process waits for the manifest

    def _rotate(self) -> None:
        """Deletes the steps older than the `keep` newest verified ones (never one newer than those)."""
        steps = self.steps()
        verified = [s for s in steps if checkpoint_manifest.has_manifest(self.step_dir(s))] if _primary() else []
        oldest_kept = verified[-self.keep] if len(verified) >= self.keep else -1
        doomed = _agree(np.asarray([s < oldest_kept for s in steps], bool))
        for step, delete in zip(steps, doomed):
            if delete:
                self.manager.delete(step)

    @contextlib.contextmanager
    def _write_errors_explained(self):
        """A write that fails for the storage's sake (a full disk, a file size limit) becomes one sentence."""
        try:
            yield
        except (OSError, ValueError) as error:
            reason = _storage_failure(error)
            if reason is None:
                raise
            step, self._writing = self._writing, None
            complete = [s for s in self.steps() if s != step]
            kept = f"the newest complete checkpoint, step {complete[-1]}, is intact" if complete else (
                "no earlier checkpoint exists")
            raise cli.Failure(
                f"Writing checkpoint step {step} under {self.directory} failed ({reason}); {kept}. Free some space "
                "(or fix the storage) and rerun the same command to resume."
            ) from None

    def config(self, step: int) -> dict:
        """The training config a complete step was saved with (as JSON: tuples are lists)."""
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def corpus(self, step: int) -> dict | None:
        """The `corpus` item of a complete step; None for a step saved before rdlm stored it."""
        if not (self.step_dir(step) / "corpus").exists():
            return None
        return self.manager.restore(step, args=ocp.args.Composite(corpus=ocp.args.JsonRestore())).corpus

    def restore(self, step: int, abstract: TrainState, shardings: TrainState) -> tuple[TrainState, Any]:
        """(state on the given shardings, this process's data-iterator state) of a complete step."""

        def target(tree, sh):
            return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)

        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(target(abstract.params, shardings.params)),
                opt_state=ocp.args.StandardRestore(
                    target({"step": abstract.step, "opt_state": abstract.opt_state}, {"step": shardings.step, "opt_state": shardings.opt_state})
                ),
                data_iter=orbax_steps.DataIterRestore(),
            ),
        )
        opt = restored.opt_state
        return TrainState(step=opt["step"], params=restored.params, opt_state=opt["opt_state"]), restored.data_iter

    def restore_latest(self, abstract: TrainState, shardings: TrainState) -> tuple[int, TrainState, Any] | None:
        """(step, state, data-iterator state) of the newest intact step, None if there is no step at all.

        A newer step that is corrupt (a file missing, truncated or garbled since it was verified, or, for a
        step never verified, one that cannot be restored) is named, moved to WORKDIR/corrupt_checkpoints and
        passed over. If every step is corrupt, nothing is moved and the run stops with one sentence.
        """
        tried = []
        for step in reversed(self.steps()):
            reason = self._corruption(step, abstract)
            if reason is None:
                try:
                    state, data_state = self.restore(step, abstract, shardings)
                except Exception as e:  # noqa: BLE001 (for a step never verified, any failure is its damage)
                    if not self._may_be_damaged(step):
                        raise
                    reason = f"it cannot be restored ({type(e).__name__}: {_first_line(e)})"
                else:
                    self.verify(step)
                    self._set_aside([s for s, _ in tried])
                    return step, state, data_state
            logging.warning("Checkpoint %s is corrupt: %s; falling back to the previous complete checkpoint.",
                            self.step_dir(step), reason)
            tried.append((step, reason))
        if tried:
            listed = "; ".join(f"step {s}: {r}" for s, r in tried)
            raise cli.Failure(
                f"Every checkpoint in {self.directory} is corrupt ({listed}); move the directory away to start the "
                "run afresh, or restore the files from a copy."
            )
        return None

    def _may_be_damaged(self, step: int) -> bool:
        """Whether a failure to read `step` may be taken for damage: only for a step never verified, and only
        where one process decides alone (otherwise the failure is raised as it is)."""
        return jax.process_count() == 1 and not checkpoint_manifest.has_manifest(self.step_dir(step))

    def _corruption(self, step: int, abstract: TrainState) -> str | None:
        """Why `step` cannot be used (naming the file), or None; a step of other shapes is a ValueError."""
        if _agree(self._problem_code(step)):
            return self._last_problem or "process 0 found it damaged (see its log)"
        try:
            stored = orbax_steps.param_shapes(self.step_dir(step))
        except Exception as e:  # noqa: BLE001 (see restore_latest)
            if not self._may_be_damaged(step):
                raise
            return f"its metadata cannot be read ({type(e).__name__}: {_first_line(e)})"
        _check_shapes(self.step_dir(step), stored, abstract.params)
        return None

    def _problem_code(self, step: int) -> int:
        self._last_problem = None
        if not _primary():
            return 0
        try:
            self._last_problem = checkpoint_manifest.problem(self.step_dir(step))
        except OSError as e:
            self._last_problem = f"its files cannot be listed ({e})"
        return int(self._last_problem is not None)

    def _set_aside(self, steps: list[int]) -> None:
        """Moves corrupt steps out of the way (kept for inspection), so that new saves of those steps can happen."""
        if steps and _primary():
            stamp = time.strftime("%Y%m%dT%H%M%S")
            for step in steps:
                target = self.workdir / CORRUPT_SUBDIR / f"{step}-{stamp}"
                storage.rename(self.step_dir(step), target)
                logging.warning("Moved the corrupt checkpoint %s to %s.", self.step_dir(step), target)
        _agree(0)
        if steps:
            self.manager.reload()

    def close(self) -> None:
        self.wait()
        self.manager.close()

    def close_after_failure(self) -> None:
        """When training fails elsewhere: finishes and verifies the step being written (it stays a checkpoint)
        and stops Orbax's threads, so the process leaves with the first failure alone; a second is logged."""
        for finish in (self.wait, self.manager.close):
            try:
                finish()
            except Exception as e:  # noqa: BLE001 (the failure being raised is the one to report)
                logging.warning("Closing the checkpoints under %s after a failure: %s", self.directory, _first_line(e))


def _check_shapes(step_dir, stored: dict, params) -> None:
    """Raises ValueError naming the first parameter whose saved shape differs from this config's."""
    expected = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    for name, shape in expected.items():
        if stored.get(name) != shape:
            raise ValueError(
                f"{step_dir} holds parameter {name} with shape {stored.get(name)}, but this config's model has "
                f"{shape}; resume with the run's own config (saved in the step's config item) or start a new --workdir."
            )


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _storage_failure(error: BaseException) -> str | None:
    """What a failed checkpoint write says about the storage (a full disk, a file size limit, no access)."""
    if isinstance(error, OSError) and error.errno:
        return f"{error.strerror or os.strerror(error.errno)} [errno {error.errno}]"
    match = _OS_ERROR_CODE.search(str(error))
    if match:
        code = int(match.group(1))
        return f"{os.strerror(code)} [errno {code}]"
    return None
