"""Command-line parsing shared by the entry points: absl flags with one-sentence errors."""

import importlib.util
import sys

from absl import flags


def _config_file(argv) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _unknown_override(argv) -> str | None:
    """The first `--config.a.b=v` whose key the config file does not define, if any."""
    path = _config_file(argv)
    if not path:
        return None
    file, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("_rdlm_config", file)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
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


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing for `app.run`, turning a bad flag or config override into one sentence."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # absl and ml_collections raise many types here; all are the user's input.
        try:
            unknown = _unknown_override(argv[1:])
        except Exception:
            unknown = None
        if unknown:
            sys.exit(f"error: --config.{unknown} is not a config field; see configs/base.py for the fields.")
        sys.exit(f"error: bad command line ({type(e).__name__}: {e}).")
