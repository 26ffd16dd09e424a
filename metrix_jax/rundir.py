"""A run directory (WORKDIR): what the trainer writes there, and reading a trained model back.

    WORKDIR/config.json       the run's resolved config (`CONFIG_FILE`)
    WORKDIR/checkpoints/<s>/  Orbax checkpoints: state, data-iterator states, metrics (`CHECKPOINT_DIR`)
    WORKDIR/metrics.jsonl     one JSON object per log line + TensorBoard events (`METRICS_FILE`)
    WORKDIR/results.json      the final numbers of a finished run (`RESULTS_FILE`)
    WORKDIR/eval.json         `python -m metrix_jax.evaluate`'s report (+ `EVAL_RECALL_PNG`, `EVAL_POSITIVITY_PNG`)

Readers (`evaluate`, `embed`, `scripts/study.py`, notebooks): `load_config(workdir)`, `open_checkpoints(workdir)`,
`select_step(ckpt, 'best' | 'latest' | step)` and `load_trained_model(workdir)` -> `TrainedModel`. A missing
workdir, config or checkpoint raises `cli.UserError` with the command that fixes it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import flags
from ml_collections import config_dict
from ml_collections import config_flags

from metrix_jax import checkpointing
from metrix_jax import cli
from metrix_jax import config_lib
from metrix_jax import embedding
from metrix_jax import jsonio

log = logging.getLogger(__name__)

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
METRICS_FILE = 'metrics.jsonl'
RESULTS_FILE = 'results.json'
EVAL_FILE = 'eval.json'
EVAL_RECALL_PNG = 'eval_recall.png'
EVAL_POSITIVITY_PNG = 'eval_positivity.png'
TRAIN_COMMAND = 'python -m metrix_jax.main --config=configs/demo.py --workdir=DIR'


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINT_DIR)


def _train_command(workdir: str) -> str:
  return TRAIN_COMMAND.replace('DIR', workdir)


def check_workdir(workdir: str) -> str:
  """The absolute path of an existing run directory; cli.UserError (with the training command) otherwise."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(workdir):
    raise cli.UserError(
      f'Workdir {workdir} does not exist. Train a model into it first, e.g. `{_train_command(workdir)}`.'
    )
  return workdir


def _tuples(value: Any) -> Any:
  """JSON lists back into tuples (configs hold sequences as tuples), recursively."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def _merge(config: config_dict.ConfigDict, values: Mapping[str, Any], prefix: str = '') -> None:
  for key, value in values.items():
    if isinstance(value, dict) and isinstance(config.get(key), config_dict.ConfigDict):
      _merge(config[key], value, f'{prefix}{key}.')
    elif key in config:
      config[key] = _tuples(value)
    else:  # a key this version does not read (a run of another version): not needed to evaluate
      log.warning('Ignoring %s%s of %s: unknown to this version of metrix_jax.', prefix, key, CONFIG_FILE)


def load_config(workdir: str) -> config_dict.ConfigDict:
  """The run's config (`config_lib.base_config()` updated with WORKDIR/config.json), unlocked."""
  workdir = check_workdir(workdir)
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise cli.UserError(
      f'{path} is missing: {workdir} is not a training workdir (the trainer writes '
      f'{CONFIG_FILE} at start). Train into it with `{_train_command(workdir)}`.'
    )
  config = config_lib.base_config()
  _merge(config, jsonio.read_json(path))
  return config


def open_checkpoints(workdir: str) -> checkpointing.Checkpointer:
  """The run's checkpoints, read-only (a training may be saving into them); cli.UserError when there are none."""
  workdir = check_workdir(workdir)
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory) or not os.listdir(directory):
    raise cli.UserError(
      f'No checkpoint in {directory}. Train first (the trainer checkpoints every '
      f'`train.checkpoint_every_steps`, at each evaluation and at the end): '
      f'`{_train_command(workdir)}`; rerunning it resumes.'
    )
  ckpt = checkpointing.Checkpointer(directory, read_only=True)
  if ckpt.latest_step() is None:
    ckpt.close()
    raise cli.UserError(
      f'No complete checkpoint in {directory} (only unfinished saves?). Rerun the training '
      f'command to resume and save one: `{_train_command(workdir)}`.'
    )
  return ckpt


def select_step(ckpt: checkpointing.Checkpointer, checkpoint: str | int = 'best') -> tuple[int, str]:
  """(step, how it was chosen) for 'best' (highest saved R@1; the latest when none has metrics), 'latest' or a step."""
  if str(checkpoint) == 'latest':
    return ckpt.latest_step(), 'latest'
  if str(checkpoint) == 'best':
    best = ckpt.best_step()
    if best is None:
      return ckpt.latest_step(), 'latest (no checkpoint has evaluation metrics)'
    return best, 'best R@1 during training (selected on the test split: optimistic, spec defect 8)'
  try:
    step = int(checkpoint)
  except ValueError:
    raise cli.UserError(f"--checkpoint must be 'best', 'latest' or a step number; got {checkpoint!r}.") from None
  steps = ckpt.all_steps()
  if step not in steps:
    raise cli.UserError(f'No checkpoint at step {step} in {ckpt.directory}; kept steps: {sorted(steps)}.')
  return step, 'requested'


@dataclasses.dataclass
class TrainedModel:
  """A model restored from a workdir: `model.apply(variables, images, train=False)` -> (embeddings, map)."""

  config: Any
  model: Any
  variables: dict[str, Any]  # `embedding.model_variables` layout, numpy arrays
  proxies: np.ndarray | None  # [C, D] for proxy-based losses
  step: int
  selection: str  # how the step was chosen
  train_metrics: dict[str, float] | None  # what the trainer measured at that step


def load_trained_model(
  workdir: str, *, checkpoint: str | int = 'best', config=None, model_factory: Callable[[Any], Any] | None = None
) -> TrainedModel:
  """Config, model and variables of the chosen checkpoint of a run directory.

  `config`: use this instead of WORKDIR/config.json; `model_factory(config)`: a model other than
  `embedding.create_model` (tests). Raises cli.UserError with the fix when the workdir or checkpoint is missing.
  """
  config = load_config(workdir) if config is None else config
  ckpt = open_checkpoints(workdir)
  try:
    step, selection = select_step(ckpt, checkpoint)
    params, batch_stats = ckpt.restore_params(step)
    train_metrics = ckpt.metrics(step)
  finally:
    ckpt.close()
  params, batch_stats = jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, batch_stats)
  return TrainedModel(
    config=config,
    model=(model_factory or embedding.create_model)(config),
    variables=embedding.model_variables(params, batch_stats),
    proxies=np.asarray(params['proxies']) if 'proxies' in params else None,
    step=int(step),
    selection=selection,
    train_metrics=train_metrics,
  )


def _workdir_from_argv(argv: Sequence[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith('--workdir='):
      return arg.split('=', 1)[1]
    if arg == '--workdir' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def define_config_flag(argv: Sequence[str], *, example: str) -> None:
  """Defines the absl flag `--config` as the run's saved config (WORKDIR/config.json) when `argv` names a
  workdir, so that `--config.KEY=VALUE` overrides parse against it (`evaluate`, `embed`). cli.UserError when that
  config is unreadable; nothing when argv has no --workdir (absl then reports the missing flag)."""
  workdir = _workdir_from_argv(argv)
  if workdir is None:
    return
  config_flags.DEFINE_config_dict(
    'config', load_config(workdir), f"The run's config; override values with --config.KEY=VALUE (e.g. {example})."
  )


def define_run_flags(argv: Sequence[str], *, example: str) -> int:
  """The flags of every command that reads a run directory (`evaluate`, `embed`): --workdir, --checkpoint,
  --verbose_libraries and --config (the run's saved config, `define_config_flag`). Returns 0, or
  cli.EXIT_USER_ERROR after printing why the run's config is unreadable."""
  flags.DEFINE_string('workdir', None, 'Training workdir (config.json + checkpoints/).', required=True)
  flags.DEFINE_string('checkpoint', 'best', "'best' (highest R@1 kept), 'latest' or a step number.")
  flags.DEFINE_bool('verbose_libraries', False, 'Keep the INFO log lines of Orbax, tfds and grain.')
  return cli.run_user_command(lambda: define_config_flag(argv, example=example))
