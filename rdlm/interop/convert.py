"""Convert huginn checkpoints between the Hugging Face layout and Orbax, tensor by tensor.

    python -m rdlm.interop.convert to-orbax SRC_HF_DIR DST_ORBAX_DIR [--dtype=float32|bfloat16]
    python -m rdlm.interop.convert to-hf SRC_CHECKPOINT DST_HF_DIR [--dtype=float32|bfloat16]

SRC and DST may be local or gs://. to-hf reads any checkpoint `rdlm.generate` reads (a training workdir, an
Orbax step directory). The tokenizer (tokenizer.json, tokenizer.model and their settings) and
generation_config.json travel with the weights in both directions, so `rdlm.generate` finds them after
a conversion.
"""

from absl import flags

from rdlm import checkpoint_io, cli, orbax_steps, storage
from rdlm.interop import huginn

COMMANDS = ("to-orbax", "to-hf")

FLAGS = flags.FlagValues()
_DTYPE = flags.DEFINE_enum(
    "dtype", None, ["float32", "bfloat16"], "Convert the weights to this dtype (default: keep theirs).",
    flag_values=FLAGS,
)


def copy_companions(src, dst) -> list[str]:
    """Copies the companion files found for checkpoint `src` into directory `dst`; returns their names."""
    found = checkpoint_io.companion_files(src)
    for name, path in found.items():
        storage.copy(path, storage.path(dst) / name)
    return sorted(found)


def to_orbax(src, dst, dtype: str | None = None) -> None:
    """A Hugging Face huginn directory -> an Orbax params-only step directory with its companion files."""
    config, params = huginn.load_hf_checkpoint(src, dtype=dtype)
    orbax_steps.save_params(dst, config, params)
    copy_companions(src, dst)


def to_hf(src, dst, dtype: str | None = None) -> None:
    """Any checkpoint directory -> a Hugging Face huginn directory with its companion files."""
    config, params = checkpoint_io.load_params(src, as_numpy=True)
    huginn.save_hf_checkpoint(config, params, dst, dtype=dtype)
    copy_companions(src, dst)  # a carried generation_config.json replaces the default one


def convert(command: str, src: str, dst: str, dtype: str | None = None) -> None:
    if command not in COMMANDS:
        raise ValueError(f"{command!r} is not a conversion; use one of {COMMANDS}.")
    if storage.exists(dst):
        raise FileExistsError(f"{dst} already exists; choose a new output directory.")
    (to_orbax if command == "to-orbax" else to_hf)(src, dst, dtype)


def main(argv):
    args = argv[1:]
    if len(args) != 3 or args[0] not in COMMANDS:
        cli.fail(f"expected {{to-orbax|to-hf}} SRC DST, got {args}; e.g. python -m rdlm.interop.convert "
                 "to-orbax path/to/huginn-0125 checkpoints/huginn-0125.")
    command, src, dst = args
    convert(command, src, dst, _DTYPE.value)
    print(f"wrote {dst}")


if __name__ == "__main__":
    cli.run(main, FLAGS, usage=__doc__)
