"""One config over several training seeds: `python -m rdlm.seeds --config=configs/tiny.py --workdir=runs/seeds --seeds=0,1,2`.

Each seed N trains in WORKDIR/seed_N with `train.seed = N` (a finished run is not trained again: its
recurrence_scaling.json is read back). `--baseline=configs/tiny_baseline.py` also trains that config on
the same seeds, in WORKDIR/baseline_seed_N. The command then prints, as Markdown:
- the mean and range (min-max) over seeds of held-out accuracy at each test-time r, and the
  baseline's, in one table;
- each seed's own row;
- the main job's targets, each marked met or missed.
"""

# ruff: noqa: E402 (the huge-pages restart runs before the heavy imports, so that they load once)
from rdlm import cli

if __name__ == "__main__":
    cli.restart_with_huge_pages()

import collections
import copy
import json
import statistics

from absl import flags
from etils import epath
from ml_collections import config_flags

from rdlm import storage
from rdlm.eval import heldout, report

# The targets of the main job (issue 18): accuracy points between test-time depths.
GAIN_FROM, GAIN_TO, MIN_GAIN = 1, 16, 25.0
MAX_DROP_AT_LAST = 2.0  # the largest r may lose at most this much against the best r
MIN_OVER_CHANCE = 20.0  # stretch: the longest, never-trained bucket at the largest r


def _points(x: float) -> float:
    return 100.0 * x


def _columns(result: dict) -> list[tuple[str, str]]:
    """(key, title) of the table's columns: overall, in and beyond training, and every never-trained bucket."""
    cols = [(key, title) for key, title in (("accuracy", "all held-out"), ("accuracy_in_distribution", "trained lengths"),
                                            ("accuracy_beyond_training", "longer than trained*")) if key in result]
    beyond = [label for label in result.get("accuracy_by_difficulty", {}) if label.endswith("*")]
    if len(beyond) > 1 or "accuracy_beyond_training" not in result:  # one such bucket is the column before
        cols += [(f"by:{label}", label) for label in beyond]
    return cols


def _values(result: dict, key: str) -> list[float]:
    if key.startswith("by:"):
        return result["accuracy_by_difficulty"][key[3:]]
    return result[key]


def _cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ({min(values):.3f}–{max(values):.3f})"


def chance_by_label(problems: dict[str, list], result: dict, buckets) -> dict[str, float]:
    """Per bucket label, the accuracy of always giving that bucket's most common answer."""
    trained = set(result.get("difficulties_trained", ()))
    answers = collections.defaultdict(collections.Counter)
    for task, ps in problems.items():
        for p in ps:
            answers[heldout.problem_label(task, p.difficulty, buckets, p.difficulty in trained)][p.answer] += 1
    return {label: max(c.values()) / sum(c.values()) for label, c in answers.items()}


def summary(runs: dict[int, dict], baselines: dict[int, dict] | None = None, chance: dict[str, float] | None = None,
            name: str = "recurrent depth", baseline_name: str = "fixed depth") -> str:
    """The Markdown tables and target lines for the recurrence-scaling results of several seeds."""
    seeds = sorted(runs)
    first = runs[seeds[0]]
    rs = first["num_steps"]
    if any(runs[s]["num_steps"] != rs for s in seeds):
        raise ValueError("The seeds' recurrence_scaling.json files have different r lists; rerun them with one config.")
    cols = _columns(first)
    seed_text = ",".join(map(str, seeds))
    lines = [f"Mean (min–max) over seeds {seed_text}; `*` = never trained.", ""]
    lines.append("| model | r | " + " | ".join(title for _, title in cols) + " |")
    lines.append("|---|---|" + "---|" * len(cols))
    for i, r in enumerate(rs):
        cells = [_cell([_values(runs[s], key)[i] for s in seeds]) for key, _ in cols]
        lines.append(f"| {name} | {r} | " + " | ".join(cells) + " |")
    for i, r in enumerate((baselines or {}).get(sorted(baselines)[0], {}).get("num_steps", []) if baselines else []):
        cells = [_cell([_values(baselines[s], key)[i] for s in sorted(baselines)]) for key, _ in cols]
        lines.append(f"| {baseline_name} | {r} (always) | " + " | ".join(cells) + " |")

    show = [r for r in rs if r in (1, 4, 8, 16, 64)] or rs
    lines += ["", "| seed | " + " | ".join(f"r={r}" for r in show) + f" | r={GAIN_FROM}→{GAIN_TO} |", "|---|" + "---|" * (len(show) + 1)]
    gains, drops = {}, {}
    for s in seeds:
        acc = runs[s]["accuracy"]
        at = dict(zip(rs, acc))
        gains[s] = _points(at[GAIN_TO] - at[GAIN_FROM]) if GAIN_FROM in at and GAIN_TO in at else float("nan")
        drops[s] = _points(max(acc) - acc[-1])
        lines.append(f"| {s} | " + " | ".join(f"{at[r]:.3f}" for r in show) + f" | {gains[s]:+.1f} |")

    lines += ["", "Targets:"]
    if GAIN_FROM in rs and GAIN_TO in rs:
        ok = all(g >= MIN_GAIN for g in gains.values())
        lines.append(f"- r={GAIN_FROM}→{GAIN_TO} at least +{MIN_GAIN:.0f} points on every seed: "
                     + ", ".join(f"{gains[s]:+.1f}" for s in seeds) + f" — {'met' if ok else 'MISSED'}")
    ok = all(d <= MAX_DROP_AT_LAST for d in drops.values())
    lines.append(f"- r={rs[-1]} at most {MAX_DROP_AT_LAST:.0f} points below the best r: "
                 + ", ".join(f"{0.0 - drops[s]:+.1f}" for s in seeds) + f" — {'met' if ok else 'MISSED'}")
    if baselines:
        best_base = max(max(b["accuracy"]) for b in baselines.values())
        deep = [i for i, r in enumerate(rs) if r >= GAIN_TO]
        worst_deep = min(runs[s]["accuracy"][i] for s in seeds for i in deep) if deep else float("nan")
        ok = best_base < worst_deep
        lines.append(f"- the baseline (best seed {best_base:.3f}) below the recurrent model at r≥{GAIN_TO} "
                     f"(worst seed and r {worst_deep:.3f}) — {'met' if ok else 'MISSED'}")
    longest = {}  # per task, its hardest never-trained bucket (labels come ordered by difficulty)
    for label in first.get("accuracy_by_difficulty", {}):
        if label.endswith("*"):
            longest[label.split("/", 1)[0]] = label
    for label in longest.values():
        if chance is None or label not in chance:
            continue
        over = [_points(runs[s]["accuracy_by_difficulty"][label][-1] - chance[label]) for s in seeds]
        ok = all(o >= MIN_OVER_CHANCE for o in over)
        lines.append(f"- stretch: {label} at r={rs[-1]} at least {MIN_OVER_CHANCE:.0f} points above chance "
                     f"({chance[label]:.3f}): " + ", ".join(f"{o:+.1f}" for o in over) + f" — {'met' if ok else 'missed'}")
    return "\n".join(lines)


def run_seeds(config, workdir: epath.Path, seeds: list[int], prefix: str) -> dict[int, dict]:
    """Trains (or reads back) `config` once per seed in WORKDIR/{prefix}seed_N; returns each run's results."""
    from rdlm.train import train_and_evaluate

    results = {}
    for seed in seeds:
        run_dir = workdir / f"{prefix}seed_{seed}"
        done = run_dir / report.SCALING_JSON
        c = copy.deepcopy(config)
        c.train.seed = seed
        if storage.exists(done):
            _check_same_config(run_dir, c)
        else:
            train_and_evaluate(c, str(run_dir))
        results[seed] = json.loads(storage.read_text(done))
    return results


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_same_config(run_dir, config) -> None:
    """A finished run is read back only if it was trained with `config` (keys that rdlm added since are not
    compared); otherwise one sentence names the first values that differ."""
    from rdlm import checkpoint

    ckpts = checkpoint.Checkpoints(run_dir, keep=config.checkpoint.keep, async_save=False)
    try:
        step = ckpts.latest_step()
        saved = _flat(ckpts.config(step)) if step is not None else None
    finally:
        ckpts.close()
    if saved is None:
        raise ValueError(f"{run_dir} has {report.SCALING_JSON} but no checkpoint; delete {run_dir} to train it again.")
    wanted = _flat(json.loads(json.dumps(config.to_dict(), default=list)))
    differ = [k for k in wanted if k in saved and saved[k] != wanted[k]]
    if differ:
        shown = ", ".join(f"{k} was {saved[k]!r}, now {wanted[k]!r}" for k in differ[:3])
        raise ValueError(f"{run_dir} was trained with another config ({shown}); pass another --workdir, or delete "
                         f"{run_dir} to train it again.")


FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/tiny.py.",
                                          lock_config=True, flag_values=FLAGS)
_BASELINE = config_flags.DEFINE_config_file("baseline", None, "Optional baseline config, e.g. configs/tiny_baseline.py.",
                                            lock_config=True, flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the per-seed runs (local or gs://).", flag_values=FLAGS)
_SEEDS = flags.DEFINE_list("seeds", "0,1,2", "Training seeds (train.seed), comma-separated.", flag_values=FLAGS)


def _parse_seeds(values: list[str]) -> list[int]:
    try:
        seeds = [int(v) for v in values]
    except ValueError:
        raise ValueError(f"--seeds={','.join(values)} must be comma-separated integers, e.g. --seeds=0,1,2.") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds={','.join(values)} must name at least one seed, each once.")
    return seeds


def main(argv):
    del argv
    seeds = _parse_seeds(_SEEDS.value)
    workdir = storage.path(_WORKDIR.value)
    runs = run_seeds(_CONFIG.value, workdir, seeds, "")
    baselines = run_seeds(_BASELINE.value, workdir, seeds, "baseline_") if _BASELINE.value else None
    from rdlm.data import builtin

    config = _CONFIG.value
    chance = None
    if config.data.source == "builtin" and config.data.builtin.task_fraction > 0:
        buckets = heldout.parse_buckets(config.eval.difficulty_buckets)
        chance = chance_by_label(builtin.heldout_problems(config), runs[seeds[0]], buckets)
    print(summary(runs, baselines, chance), flush=True)


if __name__ == "__main__":
    cli.run(main, FLAGS, usage=__doc__, required={"config": "configs/tiny.py", "workdir": "runs/seeds"})
