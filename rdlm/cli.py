"""Command-line parsing shared by the entry points: absl flags with one-sentence errors.

Every entry point owns its flags in its own `flags.FlagValues`, so importing several of them into
one process (a test run, a notebook) never defines a flag twice. Every expected failure (bad input
that the user can fix) ends the process with one line `error: ...` on stderr and exit code 2; a bug
still shows its traceback.
"""

import functools
import importlib.util
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Mapping

from absl import app, flags
from absl import logging as absl_logging

# The exit status of every expected failure (bad flag, bad config, bad file, bad data).
USAGE_ERROR = 2


class Failure(Exception):
    """An expected failure that is not a bad value: saved files that cannot be used (every checkpoint of a run
    corrupt), a disk that filled up. Raise it with one sentence that says what to do."""


# Exceptions an entry point's `main` raises for input the user can fix; `run` turns them into one sentence.
EXPECTED_ERRORS = (
    ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError,
    FloatingPointError, Failure,
)


def fail(message: str) -> None:
    """Ends the process with `error: message` on stderr and exit code 2."""
    message = " ".join(str(message).split())
    print(message if message.startswith("error: ") else f"error: {message}", file=sys.stderr, flush=True)
    # A write that failed under Orbax (a full disk) leaves its TensorStore coroutines unawaited; their warning at
    # interpreter exit would follow the sentence, which must stay the last line.
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    sys.exit(USAGE_ERROR)


def _config_file(argv) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _config_file_problem(argv) -> str | None:
    """One sentence on why the `--config=FILE[:arg]` of `argv` cannot be loaded, or None if it loads."""
    given = _config_file(argv)
    if not given:
        return None
    file, _, arg = given.partition(":")
    from rdlm import storage  # here: the entry points import cli before anything heavy

    if not storage.is_file(file):
        what = "is a directory" if storage.exists(file) else "does not exist"
        return f"--config={given}: the config file {file} {what}; pass a config file such as configs/tiny.py."
    try:
        _load_config(file, arg)
    except Exception as e:  # noqa: BLE001 (whatever the file raises is the file's problem)
        where = _line_in(file, e)
        first = e.msg if isinstance(e, SyntaxError) else (str(e).strip().splitlines() or [""])[0]
        return f"--config={given} cannot be loaded: {type(e).__name__}: {first}{where}; fix the config file."
    return None


def _line_in(file: str, error: BaseException) -> str:
    """' (FILE, line N)' for the deepest frame of `error` in `file`, or ''."""
    if isinstance(error, SyntaxError) and error.lineno:
        return f" ({file}, line {error.lineno})"
    from rdlm import storage

    frames = [f for f in traceback.extract_tb(error.__traceback__) if storage.path(f.filename) == storage.path(file)]
    return f" ({file}, line {frames[-1].lineno})" if frames else ""


def _load_config(file: str, arg: str):
    spec = importlib.util.spec_from_file_location("_rdlm_config", file)
    if spec is None or spec.loader is None:
        raise ImportError(f"{file} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _unknown_override(argv) -> str | None:
    """The first `--config.a.b=v` whose key the config file does not define, if any."""
    path = _config_file(argv)
    if not path:
        return None
    file, _, arg = path.partition(":")
    config = _load_config(file, arg)
    for item in argv:
        if not item.startswith("--config."):
            continue
        key = item[len("--config.") :].split("=", 1)[0]
        node = config
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node.keys():
                return key
            node = node[part]
    return None


def parse_flags(
    argv: list[str],
    flag_values: flags.FlagValues,
    usage: str = "",
    required: Mapping[str, str] | None = None,
) -> list[str]:
    """Parses `argv` into `flag_values`; a bad flag, override or missing flag exits with one sentence.

    `required` maps a flag name to an example value shown when it is missing.
    """
    if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
        print((usage.strip() + "\n\n" if usage else "") + flag_values.get_help(include_special_flags=False))
        sys.exit(0)
    try:
        remaining = flag_values(argv)
    except Exception as e:  # absl and ml_collections raise many types here; all are the user's input.
        problem = _config_file_problem(argv[1:])
        if problem:
            fail(problem)
        try:
            unknown = _unknown_override(argv[1:])
        except Exception:
            unknown = None
        if unknown:
            fail(f"--config.{unknown} is not a config field; see configs/base.py for the fields.")
        fail(f"bad command line ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1]}).")
    if any(type(flag_values[name].value).__name__ == "_ErrorConfig" for name in flag_values):
        # ml_collections defers a config file's load error until the config is used
        fail(_config_file_problem(argv[1:]) or "the --config file cannot be loaded; check its path.")
    for name, example in (required or {}).items():
        if flag_values[name].value is None:
            fail(f"--{name} is required, e.g. --{name}={example}.")
    if not flags.FLAGS.is_parsed():  # absl's own flags (logging, grain workers) read the global set.
        flags.FLAGS(argv[:1])
    return remaining


class _DropLibraryInfo(logging.Filter):
    """Keeps warnings and errors of the libraries below, and drops their INFO chatter (Orbax logs ~30
    lines per checkpoint, fsspec one per gs:// file opened) and the tracebacks they log beside an error."""

    LIBRARIES = ("/orbax/", "/fsspec/", "/gcsfs/")

    def filter(self, record: logging.LogRecord) -> bool:
        if not any(lib in record.pathname for lib in self.LIBRARIES):
            return True
        if record.exc_info:  # the error it logs is raised to rdlm, which explains it (or shows its traceback)
            record.exc_info, record.exc_text = None, None
        return record.levelno >= logging.WARNING


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def restart_with_huge_pages() -> None:
    """Restarts this process once with glibc's malloc asking for transparent huge pages.

    XLA CPU allocates a step's temporaries afresh on every call; with 4 KB pages each step faults
    hundreds of MB back in (docs/performance.md: the bench_cpu train step is about 10% faster with
    huge pages). Skipped off Linux, when GLIBC_TUNABLES is already set, and with RDLM_HUGE_PAGES=0.
    Entry points call it before their heavy imports, so the first process only loads absl.
    """
    if sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ or os.environ.get("RDLM_HUGE_PAGES") == "0":
        return
    if not sys.orig_argv:  # an embedded interpreter has no command line to restart
        return
    os.execve(sys.executable, sys.orig_argv, dict(os.environ, GLIBC_TUNABLES=HUGE_PAGES_TUNABLE))


def expected_failures(main: Callable[[list[str]], object]) -> Callable[[list[str]], object]:
    """`main` with every exception of EXPECTED_ERRORS turned into `fail(its message)`."""

    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except EXPECTED_ERRORS as e:
            # Orbax's writes that failed with it are logged again at exit as futures "never retrieved".
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
            fail(describe(e))

    return wrapped


def describe(error: BaseException) -> str:
    """The message of an expected failure; an OSError raised by the OS itself (no message of ours, only
    `[Errno 20] Not a directory: 'x'`) becomes a sentence that names the path and what to check."""
    if isinstance(error, OSError) and error.errno is not None and error.args == (error.errno, error.strerror):
        where = " -> ".join(str(f) for f in (error.filename, error.filename2) if f) or "a path"
        return (f"{where} cannot be used ({error.strerror}); check that the path is right and that this process "
                "may read and write there.")
    return str(error) or type(error).__name__


def run(
    main: Callable[[list[str]], object],
    flag_values: flags.FlagValues,
    usage: str = "",
    required: Mapping[str, str] | None = None,
) -> None:
    """`absl.app.run(main)` with `flag_values` parsed by `parse_flags`, library INFO logs dropped, and the
    expected failures of `main` (EXPECTED_ERRORS) ending in one sentence and exit code 2."""
    absl_logging.get_absl_handler().addFilter(_DropLibraryInfo())
    app.run(
        expected_failures(main),
        flags_parser=functools.partial(parse_flags, flag_values=flag_values, usage=usage, required=required),
    )
