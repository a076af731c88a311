"""The entry points share one process without clashing flags, and parse bad input into one sentence."""

import importlib
import os
import subprocess
import sys

import pytest

from rdlm import cli

ENTRY_POINTS = ("rdlm.train", "rdlm.generate", "rdlm.bench", "rdlm.memory_plan", "rdlm.data.prepare", "rdlm.interop.convert")


def test_entry_points_import_together_with_their_own_flags():
    modules = [importlib.import_module(name) for name in ENTRY_POINTS]
    flag_sets = [m.FLAGS for m in modules]
    assert len({id(f) for f in flag_sets}) == len(ENTRY_POINTS)
    assert "tokenizer" in modules[1].FLAGS and "tokenizer" in modules[4].FLAGS


def test_missing_required_flag_is_one_sentence(capsys):
    generate = importlib.import_module("rdlm.generate")
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.parse_flags(["rdlm.generate", "--prompt=x"], generate.FLAGS, required={"checkpoint": "runs/tiny"})
    finally:
        generate.FLAGS.unparse_flags()
    assert exit_.value.code == cli.USAGE_ERROR == 2
    assert capsys.readouterr().err == "error: --checkpoint is required, e.g. --checkpoint=runs/tiny.\n"


def test_unknown_flag_is_one_sentence(capsys):
    generate = importlib.import_module("rdlm.generate")
    with pytest.raises(SystemExit) as exit_:
        cli.parse_flags(["rdlm.generate", "--num_stepz=3"], generate.FLAGS)
    message = capsys.readouterr().err
    assert exit_.value.code == 2
    assert message.startswith("error: bad command line") and "num_stepz" in message and message.count("\n") == 1


def test_expected_failures_are_one_sentence_and_exit_2_but_bugs_keep_their_traceback(capsys):
    def bad_input(argv):
        raise FileNotFoundError("Checkpoint path /nope does not exist.\nSecond line.")

    with pytest.raises(SystemExit) as exit_:
        cli.expected_failures(bad_input)([])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: Checkpoint path /nope does not exist. Second line.\n"

    def bug(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        cli.expected_failures(bug)([])


def test_library_info_is_dropped_but_warnings_and_our_info_are_kept():
    import logging

    def record(path, level):
        return logging.LogRecord("absl", level, path, 1, "msg", None, None)

    keep = cli._DropLibraryInfo().filter
    assert not keep(record("/site-packages/orbax/checkpoint/atomicity.py", logging.INFO))
    assert keep(record("/site-packages/orbax/checkpoint/atomicity.py", logging.WARNING))
    assert keep(record("/work/main/rdlm/train.py", logging.INFO))


@pytest.mark.skipif(sys.platform != "linux", reason="the huge-pages restart is Linux-only (a glibc tunable)")
@pytest.mark.parametrize("switch, expected", [("1", cli.HUGE_PAGES_TUNABLE), ("0", "None")])
def test_restart_with_huge_pages_sets_the_tunable_once(switch, expected):
    script = "import os; from rdlm import cli; cli.restart_with_huge_pages(); print(os.environ.get('GLIBC_TUNABLES'))"
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | {"RDLM_HUGE_PAGES": switch}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected


@pytest.mark.skipif(sys.platform != "linux", reason="the huge-pages restart is Linux-only (a glibc tunable)")
@pytest.mark.parametrize("entry", ["rdlm.train", "rdlm.bench"])
def test_entry_points_restart_once_before_importing_jax(entry, tmp_path):
    """Each interpreter start and the restart itself are recorded by a sitecustomize hook."""
    log = tmp_path / "starts.txt"
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\n"
        f"LOG = {str(log)!r}\n"
        "with open(LOG, 'a') as f:\n"
        "    f.write(f\"start {os.environ.get('GLIBC_TUNABLES')}\\n\")\n"
        "_execve = os.execve\n"
        "def execve(*args):\n"
        "    with open(LOG, 'a') as f:\n"
        "        f.write(f\"restart jax_loaded={'jax' in sys.modules}\\n\")\n"
        "    _execve(*args)\n"
        "os.execve = execve\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RDLM_HUGE_PAGES")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", entry, "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().splitlines() == ["start None", "restart jax_loaded=False", f"start {cli.HUGE_PAGES_TUNABLE}"]
