"""Test setup: eight fake CPU devices, and every GCS client pointed at a local emulator, set before JAX or
gcsfs is imported anywhere."""

import os

import xla_env

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_env.xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and their subprocesses) compile the same small programs: one persistent XLA cache per session
# compiles each once. It is keyed on the program, the flags and the devices, so results do not change.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rdlm-test-xla-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import gcs_emulator  # noqa: E402

os.environ.update(gcs_emulator.ENVIRONMENT)  # subprocesses of the tests inherit it

import pathlib  # noqa: E402

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def huginn_tiny_dir():
    return FIXTURES / "huginn-tiny"


@pytest.fixture(scope="session")
def hf_with_tokenizer(tmp_path_factory, huginn_tiny_dir):
    """A copy of the HF fixture with a byte-level BPE tokenizer that has huginn's chat tokens (read-only use)."""
    import shutil

    import huginn_tokenizer

    directory = tmp_path_factory.mktemp("hf") / "checkpoint"
    shutil.copytree(huginn_tiny_dir / "checkpoint", directory)
    huginn_tokenizer.write_bpe(directory)
    return directory


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """The fake-gcs-server process, started once when a test first asks for it."""
    server = gcs_emulator.Server(tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log")
    yield server
    server.stop()


@pytest.fixture
def gcs_bucket(gcs_server):
    """A fresh, empty bucket on the emulator, as a gs:// URL."""
    return gcs_server.create_bucket()


def pytest_terminal_summary(terminalreporter):
    """The table of faults tried and survived (README "Faults and bad input"), when fault tests ran."""
    import fault_report

    if fault_report.ROWS:
        terminalreporter.write_sep("=", "faults tried and survived")
        terminalreporter.write_line(fault_report.table())


def write_small_tasks(directory) -> dict[str, pathlib.Path]:
    """8-document copies of the shipped parity tasks as task specs; the generation one with a few-shot exemplar."""
    import json

    from rdlm.eval import tasks

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specs = {}
    for name, extra in (("parity-choice", {}), ("parity-answer", {"fewshot": [{"question": "0110=", "answer": "0"}],
                                                                   "target_delimiter": "", "fewshot_delimiter": "\n"})):
        shipped = json.loads(tasks.shipped_path(name).read_text())
        lines = (tasks.shipped_path(name).parent / shipped["data"]).read_text().splitlines()[:8]
        small = f"small-{name}"
        (directory / f"{small}.jsonl").write_text("\n".join(lines) + "\n")
        spec = {**shipped, **extra, "name": small, "data": f"{small}.jsonl"}
        (directory / f"{small}.json").write_text(json.dumps(spec))
        specs[name] = directory / f"{small}.json"
    return specs


@pytest.fixture(scope="session")
def eval_run(tmp_path_factory):
    """A tiny run trained for 6 steps that also scores a small task every 3 steps: (workdir, result, task specs)."""
    import train_config
    from rdlm.train import train_and_evaluate

    root = tmp_path_factory.mktemp("eval_run")
    specs = write_small_tasks(root / "tasks")
    config = train_config.small_config(root / "cache", **{
        "eval.every_steps": 3, "eval.tasks": str(specs["parity-choice"]), "eval.final_num_steps": (1, 4)})
    result = train_and_evaluate(config, str(root / "run"))
    return root / "run", result, specs
