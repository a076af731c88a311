"""rdlm.seeds: the mean-and-range table over training seeds, its target lines, and the per-seed runs."""

import subprocess
import sys

import pytest

import train_config
from rdlm import seeds
from rdlm.eval import heldout, report
from rdlm.data import tasks

REPO = train_config.pathlib.Path(__file__).resolve().parents[1]
RS = [1, 4, 16, 64]


def _result(acc, beyond_parity, trained=(1, 2)):
    return {
        "num_steps": RS,
        "accuracy": acc,
        "accuracy_in_distribution": [1.0] * len(RS),
        "accuracy_beyond_training": acc,
        "accuracy_by_difficulty": {"parity/1-2": [1.0] * len(RS), "parity/3-4*": beyond_parity},
        "difficulties_trained": list(trained),
    }


def test_summary_means_ranges_and_targets():
    runs = {
        0: _result([0.50, 0.60, 0.80, 0.80], [0.5, 0.5, 0.7, 0.75]),
        1: _result([0.40, 0.60, 0.60, 0.57], [0.5, 0.5, 0.6, 0.60]),
    }
    baselines = {0: {**_result([0.55], [0.5]), "num_steps": [1]}, 1: {**_result([0.65], [0.5]), "num_steps": [1]}}
    text = seeds.summary(runs, baselines, chance={"parity/3-4*": 0.5})
    lines = text.splitlines()
    # One never-trained bucket is the "longer than trained" column itself: it is not repeated.
    assert "| model | r | all held-out | trained lengths | longer than trained* |" in lines
    assert "| recurrent depth | 16 | 0.700 (0.600–0.800) | 1.000 (1.000–1.000) | 0.700 (0.600–0.800) |" in lines
    assert "| fixed depth | 1 (always) | 0.600 (0.550–0.650) | 1.000 (1.000–1.000) | 0.600 (0.550–0.650) |" in lines
    assert "| 1 | 0.400 | 0.600 | 0.600 | 0.570 | +20.0 |" in lines
    assert "- r=1→16 at least +25 points on every seed: +30.0, +20.0 — MISSED" in lines
    assert "- r=64 at most 2 points below the best r: +0.0, -3.0 — MISSED" in lines
    # The baseline's best seed (0.65) is above seed 1's r=16 (0.60).
    assert "- the baseline (best seed 0.650) below the recurrent model at r≥16 (worst seed and r 0.570) — MISSED" in lines
    assert "- stretch: parity/3-4* at r=64 at least 20 points above chance (0.500): +25.0, +10.0 — missed" in lines


def test_summary_shows_each_never_trained_bucket_when_there_are_several():
    run = _result([0.5, 0.7, 0.9, 0.89], [0.5, 0.6, 0.8, 0.8])
    run["accuracy_by_difficulty"]["s3/3-4*"] = [0.3, 0.4, 0.5, 0.6]
    lines = seeds.summary({0: run}).splitlines()
    assert "| model | r | all held-out | trained lengths | longer than trained* | parity/3-4* | s3/3-4* |" in lines
    assert "| recurrent depth | 16 | 0.900 | 1.000 | 0.900 | 0.800 | 0.500 |" in lines


def test_summary_targets_met():
    runs = {s: _result([0.5, 0.7, 0.9, 0.89], [0.5, 0.6, 0.8, 0.8]) for s in (0, 1, 2)}
    lines = seeds.summary(runs, chance={"parity/3-4*": 0.5}).splitlines()
    assert lines[0] == "Mean (min–max) over seeds 0,1,2; `*` = never trained."
    assert "- r=1→16 at least +25 points on every seed: +40.0, +40.0, +40.0 — met" in lines
    assert "- r=64 at most 2 points below the best r: -1.0, -1.0, -1.0 — met" in lines
    assert "- stretch: parity/3-4* at r=64 at least 20 points above chance (0.500): +30.0, +30.0, +30.0 — met" in lines


def test_summary_refuses_runs_with_different_r_lists():
    runs = {0: _result([0.5] * 4, [0.5] * 4), 1: {**_result([0.5], [0.5]), "num_steps": [1]}}
    with pytest.raises(ValueError, match="different r lists"):
        seeds.summary(runs)


def test_chance_is_the_most_common_answer_per_bucket():
    problems = {"s3": tasks.generate("s3", 600, seed=0, difficulties=[1, 20])}
    chance = seeds.chance_by_label(problems, {"difficulties_trained": [1]}, heldout.parse_buckets("1,20"))
    ones = [p.answer for p in problems["s3"] if p.difficulty == 1]
    assert chance["s3/1"] == max(ones.count("0"), ones.count("1")) / len(ones)  # 1 op: x is 1 or 0
    assert set(chance) == {"s3/1", "s3/20*"} and 0.3 < chance["s3/20*"] < 0.42


def test_runs_each_seed_once_and_reads_finished_runs_back(tmp_path):
    config = train_config.small_config(tmp_path / "cache")
    config.train.num_steps = 2
    first = seeds.run_seeds(config, seeds.epath.Path(tmp_path / "runs"), [0, 1], "")
    assert sorted(first) == [0, 1]
    assert first[0]["val_loss"] != first[1]["val_loss"]  # train.seed differs: another init and data order
    stamp = (tmp_path / "runs" / "seed_0" / report.SCALING_JSON).stat().st_mtime_ns
    again = seeds.run_seeds(config, seeds.epath.Path(tmp_path / "runs"), [0, 1], "")
    assert again == first
    assert (tmp_path / "runs" / "seed_0" / report.SCALING_JSON).stat().st_mtime_ns == stamp
    config.train.num_steps = 3  # another config on the same runs: refused, nothing trained or overwritten
    with pytest.raises(ValueError, match=r"seed_0 was trained with another config \(train.num_steps was 2, now 3\); "
                                         r"pass another --workdir, or delete .*seed_0 to train it again.$"):
        seeds.run_seeds(config, seeds.epath.Path(tmp_path / "runs"), [0, 1], "")
    assert (tmp_path / "runs" / "seed_0" / report.SCALING_JSON).stat().st_mtime_ns == stamp


def test_seeds_share_one_compiled_train_step(tmp_path):
    """The run's key is an argument of the step, not a constant in it: another train.seed lowers the same program
    (so the persistent compilation cache serves every seed after the first)."""
    import flax.linen as nn
    import jax

    from rdlm import program as program_lib, sharding

    texts, keys = [], []
    for seed in (0, 1):
        config = train_config.small_config(tmp_path / "cache", **{"train.seed": seed})
        mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
        rules = sharding.check_rules(config.mesh.rules, mesh)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            program = program_lib.build(config, mesh, rules)
            batch = program.abstract_batch(config.data.seq_len)
            texts.append(program.train_step.lower(program.abstract, batch, program.abstract_key()).as_text())
            keys.append(jax.device_get(program.key(seed)).tolist())
    assert texts[0] == texts[1] and keys[0] != keys[1]


def test_bad_seeds_flag_is_one_sentence(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rdlm.seeds", "--config=configs/tiny.py", f"--workdir={tmp_path}",
                          "--seeds=0,x"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "error: --seeds=0,x must be comma-separated integers, e.g. --seeds=0,1,2."
