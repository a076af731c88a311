"""Model parameters on disk: Orbax step directories, training workdirs and Hugging Face directories.

A step directory holds Orbax items side by side: `params`, `model_config` (JSON) and, for training
checkpoints, `opt_state`, `data_iter` (one JSON file per process) and `config`. Anything that only needs the model
(`--config.init_from`, `rdlm.generate`, the converters) reads `params` + `model_config` through
`load_params`, whatever kind of directory it is given.
"""

import dataclasses
import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

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
    directory = as_path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} already exists; choose a new output directory.")
    checkpointer().save(
        directory,
        ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            model_config=ocp.args.JsonSave(model_config_to_json(config)),
        ),
    )


def as_path(directory) -> epath.Path:
    """An epath; local paths made absolute (Orbax refuses relative ones)."""
    path = epath.Path(directory)
    return path if "://" in str(directory) else path.resolve()


def kind_of(directory) -> str:
    """'hf', 'step' or 'workdir' for a directory holding a checkpoint; a clear error otherwise."""
    directory = as_path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"Checkpoint path {directory} does not exist.")
    if (directory / "config.json").exists():
        return "hf"
    if (directory / "params").exists() and (directory / "model_config").exists():
        return "step"
    if (directory / CHECKPOINTS_SUBDIR).exists():
        return "workdir"
    raise FileNotFoundError(
        f"{directory} is neither a Hugging Face checkpoint (config.json), an Orbax step directory "
        f"(params/ and model_config/) nor a training workdir ({CHECKPOINTS_SUBDIR}/)."
    )


def latest_step_dir(workdir) -> epath.Path:
    """The newest complete step directory of a training workdir."""
    root = as_path(workdir) / CHECKPOINTS_SUBDIR
    steps = ocp.utils.checkpoint_steps(root) if root.exists() else []
    if not steps:
        raise FileNotFoundError(f"{root} holds no complete checkpoint.")
    return root / str(max(steps))


def read_model_config(step_dir) -> ModelConfig:
    restored = checkpointer().restore(
        as_path(step_dir), ocp.args.Composite(model_config=ocp.args.JsonRestore())
    )
    return model_config_from_json(restored.model_config)


def model_config_of(directory) -> ModelConfig:
    """The ModelConfig of any checkpoint directory (HF, step or workdir), without loading weights."""
    kind = kind_of(directory)
    if kind == "hf":
        from rdlm.interop import huginn

        return huginn.read_config(directory)
    return read_model_config(latest_step_dir(directory) if kind == "workdir" else as_path(directory))


def read_run_config(directory) -> dict | None:
    """The training config (a dict) saved with a workdir's newest step or a step directory; None for others."""
    kind = kind_of(directory)
    if kind == "hf":
        return None
    step_dir = latest_step_dir(directory) if kind == "workdir" else as_path(directory)
    if not (step_dir / "config").exists():
        return None
    return checkpointer().restore(step_dir, ocp.args.Composite(config=ocp.args.JsonRestore())).config


def load_params(directory, *, shardings=None, as_numpy: bool = False) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) from an HF directory, an Orbax step directory or a training workdir.

    `shardings` (a pytree of NamedSharding matching the params) places the restored arrays on a
    mesh; Orbax reshards, so the checkpoint may come from another mesh or device count.
    """
    kind = kind_of(directory)
    if kind == "hf":
        from rdlm.interop import huginn

        config, params = huginn.load_hf_checkpoint(directory)
        if shardings is not None:
            params = jax.device_put(params, shardings)
        return config, params
    step_dir = latest_step_dir(directory) if kind == "workdir" else as_path(directory)
    config = read_model_config(step_dir)
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
    restored = ckpt.restore(step_dir, ocp.args.Composite(params=args))
    return config, restored.params
