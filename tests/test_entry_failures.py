"""Every entry point, run as a user runs it (`python -m ...`), turns an expected failure into one sentence on
stderr and exit code 2, before anything is compiled: a missing or broken config file, a workdir that cannot be
written, a disk without room for one checkpoint, paths that do not exist.

The tests run as root, which ignores permission bits, so "cannot be written" is a path under a regular file
(ENOTDIR for every process, root included). "A full disk" at start is the free-space check against the size of
one checkpoint: a model whose parameters and optimizer state exceed the disk's free space (computed from
abstract shapes: nothing is allocated). A disk that fills during a write is the soak's RLIMIT_FSIZE case
(tests/test_faults_soak.py).
"""

import concurrent.futures
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

import fault_report
from rdlm import cli, workdir

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN = ("rdlm.train", "--config=tests/train_config_cli.py")


def _cases(tmp: pathlib.Path) -> list[tuple[str, list[str], str | re.Pattern]]:
    """(fault, command, the last line expected on stderr) for each entry point."""
    (tmp / "syntax.py").write_text("def get_config(:\n")
    (tmp / "raises.py").write_text("def get_config():\n    raise KeyError('no such field')\n")
    (tmp / "a-file").write_text("not a directory\n")
    (tmp / "doc.txt").write_text("hello\n")
    under_file = tmp / "a-file" / "run"
    big = ["--config.model.n_embd=65536", "--config.model.intermediate_size=262144", "--config.model.n_heads=64"]
    return [
        ("train: missing config file", ["rdlm.train", f"--config={tmp}/nope.py", f"--workdir={tmp}/w"],
         f"error: --config={tmp}/nope.py: the config file {tmp}/nope.py does not exist; pass a config file such as "
         "configs/tiny.py."),
        ("train: config file with a syntax error", ["rdlm.train", f"--config={tmp}/syntax.py", f"--workdir={tmp}/w"],
         f"error: --config={tmp}/syntax.py cannot be loaded: SyntaxError: invalid syntax ({tmp}/syntax.py, line 1); "
         "fix the config file."),
        ("train: config file that raises", ["rdlm.train", f"--config={tmp}/raises.py", f"--workdir={tmp}/w"],
         f"error: --config={tmp}/raises.py cannot be loaded: KeyError: 'no such field' ({tmp}/raises.py, line 2); "
         "fix the config file."),
        ("train: unwritable workdir", [*TRAIN, f"--workdir={under_file}", f"--config.data.cache_dir={tmp}/cache"],
         f"error: --workdir={under_file} cannot be written (Not a directory); choose a directory this process may "
         "write to."),
        ("train: disk without room for a checkpoint", [*TRAIN, f"--workdir={tmp}/big", *big],
         re.compile(rf"error: --workdir={tmp}/big has [0-9.e+]+ GiB free, less than one checkpoint of this run \(about "
                    r"[0-9.e+]+ GiB\); free some space or choose a --workdir on a larger disk\.")),
        ("memory_plan: missing config file", ["rdlm.memory_plan", f"--config={tmp}/nope.py"],
         f"error: --config={tmp}/nope.py: the config file {tmp}/nope.py does not exist; pass a config file such as "
         "configs/tiny.py."),
        ("bench: missing config file", ["rdlm.bench", "train", f"--config={tmp}/nope.py"],
         f"error: --config={tmp}/nope.py: the config file {tmp}/nope.py does not exist; pass a config file such as "
         "configs/tiny.py."),
        ("generate: missing checkpoint", ["rdlm.generate", f"--checkpoint={tmp}/nope", "--prompt=x"],
         f"error: Checkpoint path {tmp}/nope does not exist."),
        ("evaluate: missing checkpoint", ["rdlm.evaluate", f"--checkpoint={tmp}/nope"],
         f"error: Checkpoint path {tmp}/nope does not exist."),
        ("ema: not a training workdir", ["rdlm.ema", f"--workdir={tmp}/nope", f"--out={tmp}/ema"],
         f"error: {tmp}/nope/checkpoints holds no complete checkpoint; --workdir must be a training workdir."),
        ("prepare: input matches no file", ["rdlm.data.prepare", f"--input={tmp}/nope*.txt", f"--output_dir={tmp}/o"],
         f"error: --input: '{tmp}/nope*.txt' matches no file; check the path or glob."),
        ("prepare: unwritable output_dir", ["rdlm.data.prepare", f"--input={tmp}/doc.txt",
                                            f"--output_dir={tmp}/a-file/out", "--vocab_size=40"],
         f"error: {tmp}/a-file/out cannot be used (Not a directory); check that the path is right and that this "
         "process may read and write there."),
        ("convert: missing source", ["rdlm.interop.convert", "to-orbax", f"{tmp}/nope", f"{tmp}/out"],
         f"error: Checkpoint directory {tmp}/nope does not exist."),
    ]


@pytest.mark.slow
def test_every_entry_point_fails_with_one_sentence_and_exit_2(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "RDLM_HUGE_PAGES": "0"}
    cases = _cases(tmp_path)

    def run(command):
        return subprocess.run([sys.executable, "-m", *command], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # each process mostly imports: run a few at once
        procs = list(pool.map(run, [command for _, command, _ in cases]))
    for (fault, _, expected), proc in zip(cases, procs):
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, f"{fault}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, f"{fault}:\n{proc.stderr[-3000:]}"
        expected = expected if isinstance(expected, re.Pattern) else re.compile(re.escape(expected))
        assert expected.fullmatch(lines[-1]), f"{fault}: {lines[-1]!r}"
        fault_report.record(f"expected failure: {fault}", 1, 1, "0 (one sentence, exit 2)")
    assert not (tmp_path / "w").exists() and not (tmp_path / "big" / "checkpoints").exists()


def test_a_workdir_under_a_file_is_one_sentence(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(PermissionError, match=r"^--workdir=\S+/a-file/run cannot be written \(Not a directory\); "):
        workdir.check_writable(tmp_path / "a-file" / "run")


def test_a_disk_without_room_for_one_checkpoint_is_one_sentence(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(cli.Failure, match=r"less than one checkpoint of this run .*; free some space or choose a "
                                          r"--workdir on a larger disk\.$"):
        workdir.check_free_space(tmp_path, checkpoint_bytes=free + (1 << 40), keep=3)
    workdir.check_free_space(tmp_path, checkpoint_bytes=1 << 20, keep=3)  # room: nothing raised


def test_an_error_of_the_os_itself_names_the_path():
    error = NotADirectoryError(20, "Not a directory")
    error.filename = "/data/out"
    assert cli.describe(error) == ("/data/out cannot be used (Not a directory); check that the path is right and "
                                   "that this process may read and write there.")
    assert cli.describe(FileNotFoundError("Checkpoint path /x does not exist.")) == "Checkpoint path /x does not exist."
