"""A config file for subprocess tests of the loop with the small test task (`configs/`-style `get_config`)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_toy_task import toy_config  # noqa: E402  (registers the toy task in this process)


def get_config(arg=None):
    del arg
    return toy_config({"total_steps": 24, "checkpoint_every": 4, "keep_checkpoints": 10})
