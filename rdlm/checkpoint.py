"""Training checkpoints: one Orbax step holds params, optimizer state, data-iterator state and config.

Layout: `WORKDIR/checkpoints/<step>/{params, opt_state, data_iter, config, model_config}`. Orbax
finalises a step only when every item is written, so a run killed mid-save leaves no step that
looks complete; `latest_step` only sees complete ones.
"""

import dataclasses
import json
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from rdlm import checkpoint_io
from rdlm.state import TrainState


@dataclasses.dataclass
class DataIterSave(ocp.args.CheckpointArgs):
    state: Any  # this process's iterator state (a JSON-able dict), captured when the step was taken


@dataclasses.dataclass
class DataIterRestore(ocp.args.CheckpointArgs):
    pass


class DataIterHandler(ocp.CheckpointHandler):
    """Each process writes and reads its own `process_<i>-of-<n>.json`."""

    def _file(self, directory: epath.Path) -> epath.Path:
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: epath.Path, args: DataIterSave):
        self._file(directory).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: DataIterRestore | None = None):
        path = self._file(directory)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint was written by a different number of processes "
                f"than {jax.process_count()}; the data iterator cannot resume on another process count."
            )
        return json.loads(path.read_text())

    def metadata(self, directory: epath.Path):
        return None

    def structure(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path):
        pass

    def close(self):
        pass


ocp.args.register_with_handler(DataIterHandler, for_save=True)(DataIterSave)
ocp.args.register_with_handler(DataIterHandler, for_restore=True)(DataIterRestore)


def _registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item in ("params", "opt_state"):
        for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
            registry.add(item, args)
    for item in ("config", "model_config"):
        for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
            registry.add(item, args)
    registry.add("data_iter", DataIterSave, DataIterHandler())
    registry.add("data_iter", DataIterRestore, DataIterHandler())
    return registry


class Checkpoints:
    """Saves and restores complete training steps under `WORKDIR/checkpoints`."""

    def __init__(self, workdir, *, keep: int, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep} must be at least 1.")
        self.directory = epath.Path(workdir) / checkpoint_io.CHECKPOINTS_SUBDIR
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=_registry())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, data_iter_state, config: dict, model_config) -> None:
        """Starts writing the step (async); the arrays are snapshotted before training continues."""
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt_state=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
                data_iter=DataIterSave(data_iter_state),
                config=ocp.args.JsonSave(config),
                model_config=ocp.args.JsonSave(checkpoint_io.model_config_to_json(model_config)),
            ),
            force=True,
        )

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
                data_iter=DataIterRestore(),
            ),
        )
        opt = restored.opt_state
        return TrainState(step=opt["step"], params=restored.params, opt_state=opt["opt_state"]), restored.data_iter

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
