"""A run that is killed, preempted, filled up and fed NaNs loses nothing: each interruption resumes from the last
complete checkpoint and the final parameters equal an uninterrupted run's bit for bit. Real `python -m rdlm.train`
processes on the test-sized config; the faults are SIGKILL, SIGTERM, the job's time limit, a file-size limit
(RLIMIT_FSIZE: a full disk as the writer sees it), corrupted checkpoint files and NaN batches (rdlm.fault_hooks)."""

import random
import re
import resource
import shutil
import time

import jax
import numpy as np
import pytest

import fault_report
import faulty_runs
from faulty_runs import NUM_STEPS, committed_steps, logged_steps, losses, same_params, wait_for
from rdlm import checkpoint_manifest, fault_hooks, metrics, orbax_steps
from test_checkpoint_faults import damage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return faulty_runs.Runs(tmp_path_factory.mktemp("faulty"))


@pytest.fixture(scope="module")
def reference(runs):
    """The uninterrupted run (it also fills the data and compilation caches the other runs use)."""
    workdir = runs.root / "reference"
    run = runs.run(workdir)
    assert run.proc.returncode == 0, run.text()[-3000:]
    assert sorted(losses(workdir)) == list(range(1, NUM_STEPS + 1))
    return workdir


def _same_as_reference(workdir, reference) -> None:
    assert losses(workdir) == losses(reference)  # every step's loss, exactly
    assert committed_steps(workdir)[-1] == NUM_STEPS and same_params(workdir, reference)


def test_sigkill_five_times_at_random_moments_then_the_same_parameters(runs, reference):
    """Five SIGKILLs in a row, two of them while an async checkpoint is held between its last write and its commit;
    every restart resumes from the newest complete checkpoint, never the half-written one."""
    workdir, rng = runs.root / "soak", random.Random(15)
    in_commit = {1, 3}
    for kill in range(5):
        complete = committed_steps(workdir)
        if kill in in_commit:
            run = runs.start(workdir, env=runs.env(**{fault_hooks.COMMIT_DELAY_S: "30"}), log_name=f"kill{kill}")
            wait_for(lambda: fault_hooks.COMMIT_HELD in run.text(), run, what="a held commit")
        else:
            target = max(logged_steps(workdir), default=0) + rng.randint(1, 3)
            run = runs.start(workdir, log_name=f"kill{kill}")
            wait_for(lambda: max(logged_steps(workdir), default=0) >= target, run, what=f"step {target}")
            time.sleep(rng.uniform(0, 0.5))
        run.kill()
        assert run.resumed_at() == (complete[-1] if complete else None), run.text()[-2000:]
        if kill in in_commit:  # the held step was fully written, but it is not a checkpoint
            partial = [p.name for p in (workdir / "checkpoints").iterdir() if "orbax-checkpoint-tmp" in p.name]
            assert partial and not {int(name.split(".")[0]) for name in partial} & set(committed_steps(workdir))
    complete = committed_steps(workdir)
    final = runs.run(workdir, log_name="final")
    assert final.proc.returncode == 0, final.text()[-3000:]
    assert final.resumed_at() == complete[-1]
    _same_as_reference(workdir, reference)
    fault_report.record("SIGKILL at a random moment", 3, 3, "0 steps (params bit-equal)")
    fault_report.record("SIGKILL during an async checkpoint commit", 2, 2, "0 steps (params bit-equal)")


def test_the_jobs_time_limit_saves_and_exits_cleanly(runs, reference):
    workdir = runs.root / "time-limit"
    run = runs.run(workdir, "--config.train.max_hours=0.001", "--config.train.exit_minutes_before_limit=0")
    assert run.proc.returncode == 0, run.text()[-3000:]
    stopped = committed_steps(workdir)
    assert stopped and stopped[-1] < NUM_STEPS
    assert f"Stopped at step {stopped[-1]}, 0 minutes before train.max_hours=0.001; the checkpoint is saved" in run.text()
    assert checkpoint_manifest.has_manifest(workdir / "checkpoints" / str(stopped[-1]))
    final = runs.run(workdir, log_name="final")
    assert final.proc.returncode == 0 and final.resumed_at() == stopped[-1]
    _same_as_reference(workdir, reference)
    fault_report.record("job time limit (train.max_hours)", 1, 1, "0 steps (saved at the step, exit 0)")


def test_a_full_disk_is_one_sentence_and_a_rerun_resumes(runs, reference):
    """RLIMIT_FSIZE makes every write past 64 KB fail with EFBIG, as a full disk fails with ENOSPC: the checkpoint
    write fails, the run stops with one sentence, and nothing complete is lost."""
    workdir = runs.root / "disk-full"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    run = runs.run(workdir, preexec_fn=limit)
    assert run.proc.returncode == 2, run.text()[-3000:]
    assert run.last_error() == (
        f"error: Writing checkpoint step 2 under {workdir / 'checkpoints'} failed (File too large [errno 27]); no "
        "earlier checkpoint exists. Free some space (or fix the storage) and rerun the same command to resume.")
    # Orbax's and TensorStore's writer threads print "Event loop is closed" tracebacks as the write fails under
    # them; no traceback passes through rdlm's code, and the last line is the sentence.
    frames = re.findall(r'File "([^"]*)"', run.text())
    assert not [f for f in frames if f.startswith(f"{faulty_runs.REPO / 'rdlm'}/")] and committed_steps(workdir) == []
    final = runs.run(workdir, log_name="final")
    assert final.proc.returncode == 0, final.text()[-3000:]
    _same_as_reference(workdir, reference)
    fault_report.record("disk full while writing a checkpoint (RLIMIT_FSIZE)", 1, 1, "0 steps (rerun resumes)")


def test_a_corrupt_newest_checkpoint_is_named_and_the_run_resumes_from_the_previous(runs, reference):
    workdir = runs.root / "corrupt"
    shutil.copytree(reference, workdir)
    newest = workdir / "checkpoints" / str(NUM_STEPS)
    params = max((p for p in (newest / "params").rglob("*") if p.is_file() and "/d/" in str(p)), key=lambda p: p.stat().st_size)
    damage(params, "garbled")
    run = runs.run(workdir)
    assert run.proc.returncode == 0, run.text()[-3000:]
    assert f"Checkpoint {newest} is corrupt: {params} is garbled" in run.text()
    assert run.resumed_at() == NUM_STEPS - 2
    _same_as_reference(workdir, reference)
    fault_report.record("newest checkpoint garbled, then resumed (CLI)", 1, 1, "0 steps (params bit-equal)")


def test_a_nan_batch_stops_or_is_skipped_and_nothing_nonfinite_is_saved(runs, reference):
    workdir = runs.root / "nan-stop"
    run = runs.run(workdir, "--config.train.on_nonfinite=stop", env=runs.env(**{fault_hooks.NAN_STEPS: "5"}))
    assert run.proc.returncode == 2, run.text()[-3000:]
    assert run.last_error().startswith("error: train.on_nonfinite='stop': step 5 is not finite (loss nan, gradient "
                                       "norm nan) and its update was not applied; its batch is batch 5 ")
    assert committed_steps(workdir) == [2, 4]
    final = runs.run(workdir, log_name="final")  # the data is fine again: the rerun resumes at step 4
    assert final.proc.returncode == 0 and final.resumed_at() == 4
    _same_as_reference(workdir, reference)

    skipped = runs.root / "nan-skip"
    run = runs.run(skipped, env=runs.env(**{fault_hooks.NAN_STEPS: "3,8"}))
    assert run.proc.returncode == 0, run.text()[-3000:]
    rows = {r["step"]: r for r in metrics.read_metrics(skipped)}
    assert [(s, r["nonfinite_steps"]) for s, r in rows.items() if r.get("nonfinite_step")] == [(3, 1), (8, 2)]
    assert rows[3]["param_rms"] == rows[2]["param_rms"] and rows[8]["param_rms"] == rows[7]["param_rms"]
    assert rows[NUM_STEPS]["loss"] is not None and committed_steps(skipped)[-1] == NUM_STEPS
    for step in committed_steps(skipped):  # every checkpoint holds finite values
        params = orbax_steps.restore_params(skipped / "checkpoints" / str(step), as_numpy=True)
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    fault_report.record("NaN batch, train.on_nonfinite='stop' (then rerun)", 1, 1, "0 steps (params bit-equal)")
    fault_report.record("NaN batch, train.on_nonfinite='skip'", 2, 2, "2 updates (the NaN batches', by design)")
