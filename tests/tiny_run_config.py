"""A config file for CLI tests: `--config=tests/tiny_run_config.py` = `trainer_fakes.tiny_config()` (4 steps)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trainer_fakes  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  config = trainer_fakes.tiny_config(steps=4)
  config.train.checkpoint_every_steps = 2
  return config
