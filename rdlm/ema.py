"""Checkpoint EMA, as the paper's GSM8K model: `python -m rdlm.ema --workdir=W --beta=0.9 --last=75 --dilation=7 --out=DIR`.

Which checkpoints: the training workdir's complete steps in increasing order; the window is the
newest `last` of them (all of them if fewer exist); from the window every `dilation`-th is kept,
counting back from the newest, which is always kept. With steps s_1 < ... < s_N, last L and dilation
d, the kept steps are s_N, s_{N-d}, s_{N-2d}, ... while inside the window, then taken oldest first
as c_1 < c_2 < ... < c_m.

Which weights: e_1 = theta(c_1), e_k = beta * e_{k-1} + (1 - beta) * theta(c_k), and the output is
e_m. So c_k weighs (1 - beta) * beta^(m - k) for k >= 2 and c_1 weighs beta^(m - 1); the newest
counts most and the weights sum to 1.

Only parameters are read, one tensor at a time from one checkpoint at a time (accumulated in
float64, stored in the checkpoint's dtype), so memory holds the output model and one tensor, never
the N checkpoints. DIR is an Orbax step directory (params, model_config, the run's config and its
tokenizer.model) that `rdlm.evaluate` and `rdlm.generate` load like any checkpoint. Keep enough
checkpoints for it: training keeps `checkpoint.keep` of them.
"""

import dataclasses

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import flags

from rdlm import checkpoint, cli, orbax_steps, storage



@dataclasses.dataclass(frozen=True)
class Plan:
    steps: tuple[int, ...]  # oldest first
    weights: tuple[float, ...]  # of each step in the average


def plan(all_steps, *, beta: float, last: int, dilation: int) -> Plan:
    """The kept steps and their weights (see the module docstring)."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"--beta={beta} must be in [0, 1).")
    if last < 1 or dilation < 1:
        raise ValueError(f"--last={last} and --dilation={dilation} must be >= 1.")
    window = sorted(all_steps)[-last:]
    kept = tuple(sorted(window[::-1][::dilation]))
    m = len(kept)
    weights = [beta ** (m - 1)] + [(1 - beta) * beta ** (m - k) for k in range(2, m + 1)]
    return Plan(kept, tuple(weights))


def _nested(path, value):
    for key in reversed(path):
        value = {key.key: value}
    return value


def _read_tensor(step_dir, path, meta) -> np.ndarray:
    item = _nested(path, np.zeros((), meta.dtype))
    args = _nested(path, ocp.RestoreArgs(restore_type=np.ndarray))
    restored = orbax_steps.checkpointer().restore(
        step_dir, ocp.args.Composite(params=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))
    ).params
    for key in path:
        restored = restored[key.key]
    return np.asarray(restored)


def average(workdir, out, *, beta: float = 0.9, last: int = 75, dilation: int = 7) -> Plan:
    """Writes the EMA of `workdir`'s checkpoints to `out` (an Orbax step directory); returns what it averaged."""
    root = storage.path(workdir) / orbax_steps.CHECKPOINTS_SUBDIR
    steps = ocp.utils.checkpoint_steps(root) if root.exists() else []
    if not steps:
        raise FileNotFoundError(f"{root} holds no complete checkpoint; --workdir must be a training workdir.")
    out = storage.path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new --out directory.")
    chosen = plan(steps, beta=beta, last=last, dilation=dilation)
    dirs = [root / str(s) for s in chosen.steps]
    newest = dirs[-1]
    meta = orbax_steps.checkpointer().metadata(newest).item_metadata["params"].tree
    leaves, treedef = jax.tree_util.tree_flatten_with_path(meta)
    averaged = []
    for path, leaf in leaves:
        acc = None
        for step_dir in dirs:
            x = _read_tensor(step_dir, path, leaf).astype(np.float64)
            if x.shape != tuple(leaf.shape):
                raise ValueError(f"{step_dir}: parameter {jax.tree_util.keystr(path)} has shape {x.shape}, "
                                 f"not {tuple(leaf.shape)} as in {newest}; the checkpoints are of different models.")
            acc = x if acc is None else beta * acc + (1 - beta) * x
        averaged.append(acc.astype(leaf.dtype))
    params = jax.tree_util.tree_unflatten(treedef, averaged)
    items = ["model_config"] + (["config"] if (newest / "config").exists() else [])  # the run's config, if saved
    restored = orbax_steps.checkpointer().restore(
        newest, ocp.args.Composite(**{k: ocp.args.JsonRestore() for k in items}))
    saves = {k: ocp.args.JsonSave(restored[k]) for k in items}
    orbax_steps.checkpointer().save(out, ocp.args.Composite(params=ocp.args.StandardSave(params), **saves))
    tokenizer = checkpoint.tokenizer_file(workdir)
    if tokenizer.exists():
        storage.copy(tokenizer, out / checkpoint.TOKENIZER_FILE)
    return chosen


FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir whose checkpoints are averaged.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "New output directory (an Orbax step directory).", flag_values=FLAGS)
_BETA = flags.DEFINE_float("beta", 0.9, "EMA decay: e = beta * e + (1 - beta) * next.", flag_values=FLAGS)
_LAST = flags.DEFINE_integer("last", 75, "Window: the newest this many checkpoints.", flag_values=FLAGS)
_DILATION = flags.DEFINE_integer("dilation", 7, "Keep every this-many-th checkpoint of the window.", flag_values=FLAGS)


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}.")
    chosen = average(_WORKDIR.value, _OUT.value, beta=_BETA.value, last=_LAST.value, dilation=_DILATION.value)
    print("steps " + ", ".join(f"{s} (weight {w:.4f})" for s, w in zip(chosen.steps, chosen.weights)))
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    cli.run(main, FLAGS, usage=__doc__, required={"workdir": "runs/tiny", "out": "runs/tiny-ema"})
