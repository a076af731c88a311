"""The test-sized training config as a config file, for runs of `python -m rdlm.train` in tests."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import train_config  # noqa: E402


def get_config():
    config = train_config.small_config("~/.cache/rdlm")
    config.eval.final_num_steps = ()
    return config
