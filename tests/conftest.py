"""Test setup: eight fake CPU devices, and every GCS client pointed at a local emulator, set before JAX or
gcsfs is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gcs_emulator  # noqa: E402

os.environ.update(gcs_emulator.ENVIRONMENT)  # subprocesses of the tests inherit it

import pathlib  # noqa: E402

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def huginn_tiny_dir():
    return FIXTURES / "huginn-tiny"


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
