"""Launch scripts: dry runs print runnable commands, and the resume and failure paths work against stubs."""

import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU_FLAGS = ["--name=huginn", "--project=my-proj", "--zone=us-east5-a", "--workdir=gs://bucket/run"]
EXTRA = "--extra=--config.data.paths=gs://bucket/data/*.parquet --config.train.num_steps=10"


def _run(script, *args, env=None, timeout=60):
    return subprocess.run(
        [str(LAUNCH / script), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


def _stub(directory: pathlib.Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def _recording_path(tmp_path, *names) -> dict:
    """An environment whose PATH has stubs for `names` that append their argv (one JSON-free line) to a log."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    for name in names:
        _stub(stubs, name, f'printf "%s\\0" {name} "$@" >> {tmp_path}/calls; printf "\\n" >> {tmp_path}/calls\n')
    return {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"}


def _calls(tmp_path) -> list[list[str]]:
    text = (tmp_path / "calls").read_text() if (tmp_path / "calls").exists() else ""
    return [line.split("\0")[:-1] for line in text.split("\n") if line]


@pytest.mark.parametrize("script", ["tpu_vm.sh", "slurm_gpu.sh", "local.sh"])
def test_help_and_missing_required_flag(script):
    assert os.access(LAUNCH / script, os.X_OK)
    shown = _run(script, "--help")
    assert shown.returncode == 0 and "--dry-run" in shown.stdout and "--workdir" in shown.stdout
    missing = _run(script, "--dry-run")
    assert missing.returncode != 0
    assert missing.stderr.strip().splitlines()[-1].startswith("error: --")
    assert missing.stderr.count("\n") == 1 and "is required, e.g. --" in missing.stderr
    unknown = _run(script, "--nope=1")
    assert unknown.returncode != 0 and unknown.stderr.strip() == "error: unknown flag --nope; see --help."


def test_tpu_dry_run_prints_the_commands_and_the_resume_loop():
    out = _run("tpu_vm.sh", *TPU_FLAGS, "--queued", "--spot", EXTRA, "--dry-run")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == (
        "gcloud compute tpus queued-resources create huginn --node-id=huginn --accelerator-type=v5p-64 "
        "--runtime-version=v2-alpha-tpuv5 --zone=us-east5-a --project=my-proj --spot"
    )
    train = [line for line in lines if "rdlm.train" in line]
    assert len(train) == 1 and train[0].startswith("gcloud compute tpus tpu-vm ssh huginn")
    assert "--worker=all" in train[0] and "--config=configs/3b5.py --workdir=gs://bucket/run" in train[0]
    assert "JAX_COORDINATOR_ADDRESS=$COORDINATOR:8476" in train[0]
    assert any("scp" in line and "--worker=all" in line for line in lines)
    assert any("pip install" in line and "jax[tpu]==" in line for line in lines)
    assert "resume loop" in out.stdout and "delete it, create it again" in out.stdout


def test_tpu_dry_run_output_runs_as_printed(tmp_path):
    """Each printed line, run by bash against a recording gcloud, gives the intended argv."""
    out = _run("tpu_vm.sh", *TPU_FLAGS, EXTRA, "--dry-run")
    env = _recording_path(tmp_path, "gcloud", "tar")
    subprocess.run(["bash", "-euc", out.stdout], env=env, check=True, timeout=30)
    calls = _calls(tmp_path)
    assert calls[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and calls[1][-1] == "--format=value(state)"
    assert calls[2][:2] == ["tar", "-czf"] and calls[3][4] == "scp"
    remote = calls[-1][-1]
    assert remote.startswith("--command=cd ~/rdlm && JAX_COORDINATOR_ADDRESS=")
    # The lookup stub prints nothing, so the address is empty; the remote words come back intact.
    words = shlex.split(remote.split("&& ", 1)[1])
    assert words[:4] == ["JAX_COORDINATOR_ADDRESS=:8476", "~/rdlm-venv/bin/python", "-m", "rdlm.train"]
    assert words[4:] == [
        "--config=configs/3b5.py", "--workdir=gs://bucket/run",
        "--config.data.paths=gs://bucket/data/*.parquet", "--config.train.num_steps=10",
    ]


def _fake_gcloud(tmp_path, train_exits: list[int]) -> dict:
    """A gcloud whose TPU is created READY, preempted during the first training run, then healthy."""
    state, runs = tmp_path / "state", tmp_path / "runs"
    runs.write_text("0")
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    exits = " ".join(map(str, train_exits))
    _stub(stubs, "gcloud", f"""echo "$*" >> {tmp_path}/log
case "$*" in
  *"describe"*"ipAddress"*) echo 10.0.0.2 ;;
  *"describe"*) cat {state} 2>/dev/null || true ;;
  *"tpu-vm create"*) echo READY > {state} ;;
  *"tpu-vm delete"*) rm -f {state} ;;
  *"rdlm.train"*) n=$(cat {runs}); echo $((n + 1)) > {runs}; codes=({exits})
     [ "$n" = 0 ] && [ "${{codes[0]}}" = 255 ] && echo PREEMPTED > {state}; exit "${{codes[$n]}}" ;;
esac
""")
    return {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "RDLM_POLL_SECONDS": "0"}


def test_tpu_resume_loop_recreates_a_preempted_slice_and_reruns(tmp_path):
    env = _fake_gcloud(tmp_path, [255, 0])
    out = _run("tpu_vm.sh", *TPU_FLAGS, "--spot", "--repo=https://example.com/rdlm.git", env=env)
    assert out.returncode == 0, out.stderr
    log = (tmp_path / "log").read_text().splitlines()
    kinds = [next((k for k in ("create", "delete", "rdlm.train", "ssh") if k in line), None) for line in log]
    assert [k for k in kinds if k] == ["create", "ssh", "rdlm.train", "delete", "create", "ssh", "rdlm.train"]
    assert all("JAX_COORDINATOR_ADDRESS=10.0.0.2:8476" in line for line in log if "rdlm.train" in line)
    assert "restart 1 of 100" in out.stderr


def test_tpu_failure_on_a_healthy_slice_stops_with_one_sentence(tmp_path):
    env = _fake_gcloud(tmp_path, [1])
    out = _run("tpu_vm.sh", *TPU_FLAGS, "--repo=https://example.com/rdlm.git", env=env)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == (
        "error: training failed on a healthy huginn (exit 1); fix the cause and rerun this command to resume."
    )


def _slurm_script(*flags) -> str:
    out = _run("slurm_gpu.sh", "--nodes=2", "--workdir=/shared/run", EXTRA, *flags, "--dry-run")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "sbatch <<'SBATCH'" and lines[-1] == "SBATCH"
    return "\n".join(lines[1:-1]) + "\n"


def test_slurm_dry_run_prints_the_batch_script():
    script = _slurm_script("--partition=gpu", "--python=/env/bin/python")
    for option in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--requeue", "--signal=B:USR1@300",
                   "--partition=gpu"):
        assert f"#SBATCH {option}\n" in script
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert shlex.split(srun)[4:] == [
        "/env/bin/python", "-m", "rdlm.train", "--config=configs/3b5.py", "--workdir=/shared/run",
        "--config.data.paths=gs://bucket/data/*.parquet", "--config.train.num_steps=10", "&",
    ]
    assert "scontrol requeue" in script and f"cd {REPO}" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def _start_batch(tmp_path):
    """The batch script under stub srun/scancel/scontrol; srun's task saves and exits 0 on SIGTERM."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    _stub(stubs, "srun", f"trap 'echo saved > {tmp_path}/saved; exit 0' TERM\necho $$ > {tmp_path}/task.pid\n"
          "while :; do sleep 0.1; done\n")
    _stub(stubs, "scancel", f'echo "scancel $*" >> {tmp_path}/log; kill -TERM "$(cat {tmp_path}/task.pid)"\n')
    _stub(stubs, "scontrol", f'echo "scontrol $*" >> {tmp_path}/log\n')
    script = tmp_path / "job.sbatch"
    script.write_text(_slurm_script())
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n[1-2]"}
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while not (tmp_path / "task.pid").exists() and time.time() < deadline:
        time.sleep(0.05)
    return proc


def test_slurm_time_limit_signal_checkpoints_then_requeues(tmp_path):
    proc = _start_batch(tmp_path)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=20) == 0
    assert (tmp_path / "saved").exists()
    assert (tmp_path / "log").read_text().splitlines() == ["scancel --signal=TERM 42", "scontrol requeue 42"]


def test_slurm_preemption_waits_for_the_task_to_save(tmp_path):
    proc = _start_batch(tmp_path)
    proc.send_signal(signal.SIGTERM)  # SLURM signals the batch shell and the tasks
    time.sleep(0.5)
    assert proc.poll() is None, "the batch shell must outlive the SIGTERM until the tasks have saved"
    os.kill(int((tmp_path / "task.pid").read_text()), signal.SIGTERM)
    assert proc.wait(timeout=20) == 0 and (tmp_path / "saved").exists()
    assert not (tmp_path / "log").exists()


def test_local_dry_run_two_processes():
    out = _run("local.sh", "--processes", "2", "--cpu-devices=4", "--workdir=runs/x", EXTRA, "--dry-run")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"cd {REPO}" and lines[-1] == "wait" and len(lines) == 4
    for i, line in enumerate(lines[1:3]):
        words = shlex.split(line)
        assert words[:3] == ["env", "JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=4"]
        assert words[3:9] == ["python3", "-m", "rdlm.train", "--config=configs/tiny.py", "--workdir=runs/x",
                              "--config.data.paths=gs://bucket/data/*.parquet"]
        assert words[-4:] == ["--coordinator_address=localhost:12355", "--num_processes=2", f"--process_id={i}", "&"]


def test_local_dry_run_one_process_has_no_coordinator():
    out = _run("local.sh", "--workdir=runs/x", "--dry-run")
    assert out.stdout.splitlines()[1] == "python3 -m rdlm.train --config=configs/tiny.py --workdir=runs/x"


def test_local_failure_of_one_process_stops_the_others_and_is_returned(tmp_path):
    python = tmp_path / "python"
    python.write_text(
        "#!/usr/bin/env bash\n"
        # Process 1 fails only after process 0 has had time to install its TERM handler.
        f"trap 'echo stopped > {tmp_path}/stopped; exit 0' TERM\n"
        f'case "$*" in *process_id=1*) sleep 1; exit 3 ;; esac\n'
        "while :; do sleep 0.1; done\n"
    )
    python.chmod(0o755)
    start = time.time()
    out = _run("local.sh", "--processes=2", "--workdir=runs/x", f"--python={python}", timeout=30)
    assert out.returncode == 3 and time.time() - start < 15
    assert (tmp_path / "stopped").read_text() == "stopped\n"
    assert "error: process 1 exited with status 3; stopping the others." in out.stderr


@pytest.mark.slow
def test_local_two_processes_train_and_resume(tmp_path):
    """Two real processes of 4 fake CPU devices each form one 8-device mesh; a rerun resumes."""
    args = ["--processes=2", "--cpu-devices=4", "--config=tests/train_config_cli.py", f"--workdir={tmp_path}",
            f"--python={sys.executable}"]
    first = _run("local.sh", *args, "--extra=--config.train.num_steps=2 --config.checkpoint.every_steps=2", timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "[0] " in first.stderr and "[1] " in first.stderr and "on mesh {'data': 1, 'fsdp': 8" in first.stderr
    second = _run("local.sh", *args, "--extra=--config.train.num_steps=3", timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resumed from" in second.stderr and "at step 2" in second.stderr
    assert (tmp_path / "checkpoints" / "3" / "_CHECKPOINT_METADATA").exists()
