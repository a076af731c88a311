"""What a training run saves: its tokenizer, and Orbax steps of params, optimizer, data iterator and config.

Layout: `WORKDIR/tokenizer.model` (written once, at the start of the run) and
`WORKDIR/checkpoints/<step>/{params, opt_state, data_iter, config, model_config, corpus}`. `corpus`
names the data source and, for the built-in corpus, its fingerprint. Orbax finalises a step only
when every item is written, so a run killed mid-save leaves no step that looks complete;
`latest_step` only sees complete ones.
"""

from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from rdlm import orbax_steps, storage
from rdlm.data import tokenizer as tokenizer_lib
from rdlm.state import TrainState

TOKENIZER_FILE = "tokenizer.model"


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


class Checkpoints:
    """Saves and restores complete training steps under `WORKDIR/checkpoints`."""

    def __init__(self, workdir, *, keep: int, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep} must be at least 1.")
        self.directory = storage.path(workdir) / orbax_steps.CHECKPOINTS_SUBDIR
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=orbax_steps.registry())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, data_iter_state, config: dict, model_config, corpus: dict) -> None:
        """Starts writing the step (async); the arrays are snapshotted before training continues.

        `corpus` ({"source": ..., "fingerprint": ...}) is what `corpus(step)` returns on resume.
        """
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return
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

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

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

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
