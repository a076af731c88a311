"""Orbax step directories: the items a step holds, their handlers, and params-only steps.

A step directory holds Orbax items side by side: `params`, `model_config` (JSON) and, for training
checkpoints, `opt_state`, `data_iter` (one JSON file per process) and `config`. A training workdir keeps
its steps under `WORKDIR/checkpoints/<step>`. Paths are local or gs:// (`rdlm.storage`). To read the model
of any kind of checkpoint directory, use `rdlm.checkpoint_io`. A step whose files no longer match its
manifest (rdlm.checkpoint_manifest), or that fails to read, is one sentence (CorruptCheckpoint).
"""

import contextlib
import dataclasses
import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from rdlm import checkpoint_manifest, storage
from rdlm.model.config import ModelConfig

CHECKPOINTS_SUBDIR = "checkpoints"


def model_config_to_json(config: ModelConfig) -> dict:
    return dataclasses.asdict(config)


def model_config_from_json(fields: dict) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in fields.items() if k in known})


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


def registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """The handler of every item a step directory may hold."""
    items = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item in ("params", "opt_state"):
        for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
            items.add(item, args, ocp.StandardCheckpointHandler())
    items.add("params", ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler())
    for item in ("config", "model_config", "corpus"):
        for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
            items.add(item, args, ocp.JsonCheckpointHandler())
    items.add("data_iter", DataIterSave, DataIterHandler())
    items.add("data_iter", DataIterRestore, DataIterHandler())
    return items


def checkpointer() -> ocp.Checkpointer:
    """A synchronous composite checkpointer that knows every item of a step directory."""
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=registry()))


def save_params(directory, config: ModelConfig, params) -> None:
    """Writes a params-only step directory (what `to-orbax` produces and `init_from` reads)."""
    directory = storage.path(directory)
    if storage.exists(directory):
        raise FileExistsError(f"{directory} already exists; choose a new output directory.")
    storage.makedirs(directory.parent)
    checkpointer().save(
        directory,
        ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            model_config=ocp.args.JsonSave(model_config_to_json(config)),
        ),
    )
    checkpoint_manifest.write(directory, ("params", "model_config"))


def is_step_dir(directory) -> bool:
    directory = storage.path(directory)
    return storage.exists(directory / "params") and storage.exists(directory / "model_config")


def latest_step_dir(workdir) -> epath.Path:
    """The newest complete step directory of a training workdir."""
    root = storage.path(workdir) / CHECKPOINTS_SUBDIR
    with storage.explained(root):
        steps = ocp.utils.checkpoint_steps(root) if storage.exists(root) else []
    if not steps:
        raise FileNotFoundError(f"{root} holds no complete checkpoint.")
    return root / str(max(steps))


class CorruptCheckpoint(ValueError):
    """A step directory that cannot be read, in one sentence naming the step and the file (or the error)."""


@contextlib.contextmanager
def _readable(step_dir, items: tuple[str, ...]):
    """Checks the files of `items` against the step's manifest, and turns a failed read into CorruptCheckpoint."""
    step_dir = storage.path(step_dir)
    problem = checkpoint_manifest.problem(step_dir, items)
    if problem is not None:
        raise CorruptCheckpoint(f"The checkpoint {step_dir} is corrupt: {problem}; {_EARLIER}")
    try:
        yield
    except (CorruptCheckpoint, storage.NotFound, storage.AccessDenied):
        raise
    except Exception as e:  # noqa: BLE001 (Orbax and tensorstore raise many kinds for a damaged step)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CorruptCheckpoint(
            f"The checkpoint {step_dir} cannot be read ({type(e).__name__}: {first}); {_EARLIER}"
        ) from e


_EARLIER = "pass an earlier step of the run (WORKDIR/checkpoints/<step>) as the checkpoint, or restore the files."


def read_model_config(step_dir) -> ModelConfig:
    with _readable(step_dir, ("model_config",)):
        restored = checkpointer().restore(
            storage.path(step_dir), ocp.args.Composite(model_config=ocp.args.JsonRestore())
        )
        return model_config_from_json(restored.model_config)


def param_shapes(step_dir) -> dict[str, tuple[int, ...]]:
    """{'['core']['adapter']'-style path: shape} of the params a step directory holds, from its metadata."""
    metadata = checkpointer().metadata(storage.path(step_dir)).item_metadata["params"].tree
    return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(metadata)}


def read_run_config(step_dir) -> dict | None:
    """The training config (a dict) saved with a step; None for a params-only step."""
    step_dir = storage.path(step_dir)
    if not storage.exists(step_dir / "config"):
        return None
    with _readable(step_dir, ("config",)):
        return checkpointer().restore(step_dir, ocp.args.Composite(config=ocp.args.JsonRestore())).config


def restore_params(step_dir, *, shardings=None, as_numpy: bool = False) -> dict:
    """The params of a step directory: on `shardings` (a pytree of NamedSharding; Orbax reshards, so the step
    may come from another mesh or device count), on the first local device, or as NumPy arrays."""
    step_dir = storage.path(step_dir)
    with _readable(step_dir, ("params",)):
        return _restore_params(step_dir, shardings, as_numpy)


def _restore_params(step_dir, shardings, as_numpy: bool) -> dict:
    ckpt = checkpointer()
    metadata = ckpt.metadata(step_dir).item_metadata["params"].tree
    if as_numpy:
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
        args = ocp.args.PyTreeRestore(restore_args=restore_args)
    else:
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata)
        if shardings is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree.map(lambda _: device, abstract)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        args = ocp.args.StandardRestore(abstract)
    return ckpt.restore(step_dir, ocp.args.Composite(params=args)).params
