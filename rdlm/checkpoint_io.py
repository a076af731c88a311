"""Any checkpoint directory, whatever its kind: what it is, its model config, its params, the files beside it.

The kinds are a Hugging Face directory (`config.json` and safetensors, `rdlm.interop.huginn`), an Orbax step
directory (`params/` and `model_config/`, `rdlm.orbax_steps`) and a training workdir (its newest complete
step). Anything that only needs the model (`--config.init_from`, `rdlm.generate`, the converters, the
notebook) reads it through `load_params`. Paths are local or gs:// (`rdlm.storage`).
"""

import jax
from etils import epath

from rdlm import orbax_steps, storage
from rdlm.interop import huginn
from rdlm.model.config import ModelConfig

KINDS = ("hf", "step", "workdir")
# The ModelConfig fields that decide the parameter shapes.
SHAPE_FIELDS = ("vocab_size", "n_embd", "n_heads", "intermediate_size", "n_layers_in_prelude",
                "n_layers_in_recurrent_block", "n_layers_in_coda", "qk_bias")


def kind_of(directory) -> str:
    """'hf', 'step' or 'workdir' for a directory holding a checkpoint; a clear error otherwise."""
    directory = storage.path(directory)
    if not storage.exists(directory):
        raise FileNotFoundError(f"Checkpoint path {directory} does not exist{storage.missing_reason(directory)}.")
    if storage.exists(directory / huginn.CONFIG_FILE):
        return "hf"
    if orbax_steps.is_step_dir(directory):
        return "step"
    if storage.exists(directory / orbax_steps.CHECKPOINTS_SUBDIR):
        return "workdir"
    raise FileNotFoundError(
        f"{directory} is neither a Hugging Face checkpoint ({huginn.CONFIG_FILE}), an Orbax step directory "
        f"(params/ and model_config/) nor a training workdir ({orbax_steps.CHECKPOINTS_SUBDIR}/)."
    )


def _step_dir(directory, kind: str) -> epath.Path:
    return orbax_steps.latest_step_dir(directory) if kind == "workdir" else storage.path(directory)


def companion_dirs(directory) -> list[epath.Path]:
    """Where the files that travel with a checkpoint (tokenizer, generation config) live, first match wins:
    the directory itself, and for a training step WORKDIR/checkpoints/<step> also its WORKDIR."""
    directory = storage.path(directory)
    dirs = [directory]
    if kind_of(directory) == "step" and directory.parent.name == orbax_steps.CHECKPOINTS_SUBDIR:
        dirs.append(directory.parent.parent)
    return dirs


def companion_files(directory) -> dict[str, epath.Path]:
    """The huginn companion files (tokenizer.json, generation_config.json, ...) found for a checkpoint, by name."""
    found = {}
    for folder in reversed(companion_dirs(directory)):
        for name in huginn.COMPANION_FILES:
            if storage.exists(folder / name):
                found[name] = folder / name
    return found


def model_config_of(directory) -> ModelConfig:
    """The ModelConfig of any checkpoint directory (HF, step or workdir), without loading weights."""
    kind = kind_of(directory)
    if kind == "hf":
        return huginn.read_config(directory)
    return orbax_steps.read_model_config(_step_dir(directory, kind))


def check_same_shape(directory, config: ModelConfig, field: str = "init_from") -> None:
    """Raises, in one sentence naming the fields, unless the checkpoint's parameters have `config`'s shapes."""
    saved = model_config_of(directory)
    differ = [n for n in SHAPE_FIELDS if getattr(saved, n) != getattr(config, n)]
    if differ:
        pairs = ", ".join(f"model.{n}={getattr(saved, n)} (this config: {getattr(config, n)})" for n in differ)
        raise ValueError(
            f"{field}={directory} holds a model of another shape: {pairs}; set those fields to the checkpoint's "
            "(configs/sft.py:CHECKPOINT takes them from it) or start from a checkpoint of this shape."
        )


def read_run_config(directory) -> dict | None:
    """The training config (a dict) saved with a workdir's newest step or a step directory; None for others."""
    kind = kind_of(directory)
    return None if kind == "hf" else orbax_steps.read_run_config(_step_dir(directory, kind))


def load_params(directory, *, shardings=None, as_numpy: bool = False) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) from an HF directory, an Orbax step directory or a training workdir.

    `shardings` (a pytree of NamedSharding matching the params) places the restored arrays on a
    mesh; Orbax reshards, so the checkpoint may come from another mesh or device count.
    """
    kind = kind_of(directory)
    if kind == "hf":
        config, params = huginn.load_hf_checkpoint(directory)
        if shardings is not None:
            params = jax.device_put(params, shardings)
        return config, params
    step_dir = _step_dir(directory, kind)
    config = orbax_steps.read_model_config(step_dir)
    return config, orbax_steps.restore_params(step_dir, shardings=shardings, as_numpy=as_numpy)
