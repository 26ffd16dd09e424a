"""A run directory (WORKDIR): what the trainer writes there, and reading a trained model back.

    WORKDIR/config.json       the run's resolved config (`CONFIG_FILE`)
    WORKDIR/checkpoints/<s>/  Orbax checkpoints: state, data-iterator states, metrics (`CHECKPOINT_DIR`)
    WORKDIR/metrics.jsonl     one JSON object per log line + TensorBoard events (`METRICS_FILE`)
    WORKDIR/results.json      the final numbers of a finished run (`RESULTS_FILE`)
    WORKDIR/eval.json         `python -m metrix_jax.evaluate`'s report (+ `EVAL_RECALL_PNG`, `EVAL_POSITIVITY_PNG`,
                              and `EVAL_RETRIEVAL_PNG` on request)

Readers (`evaluate`, `embed`, `scripts/study.py`, notebooks): `load_config(workdir)`, `open_checkpoints(workdir)`,
`select_step(ckpt, 'best' | 'latest' | step)` and `load_trained_model(workdir)` -> `TrainedModel`. A missing
workdir, config or checkpoint raises `cli.UserError` with the command that fixes it.
"""

from __future__ import annotations

import dataclasses
import functools
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
QUARANTINE_DIR = 'checkpoints_unreadable'
METRICS_FILE = 'metrics.jsonl'
RESULTS_FILE = 'results.json'
EVAL_FILE = 'eval.json'
EVAL_RECALL_PNG = 'eval_recall.png'
EVAL_POSITIVITY_PNG = 'eval_positivity.png'
EVAL_RETRIEVAL_PNG = 'eval_retrieval.png'  # evaluate --retrieval_grid=Q
TRAIN_COMMAND = 'python -m metrix_jax.main --config=configs/demo.py --workdir=DIR'


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINT_DIR)


def quarantine_dir(workdir: str) -> str:
  """Where damaged checkpoints are moved (never deleted): WORKDIR/checkpoints_unreadable/<step>."""
  return os.path.join(workdir, QUARANTINE_DIR)


# Config keys that change how a run is operated, not what it computes: they may differ between the runs that
# continue one another in a WORKDIR (every other key is compared: loss, mix, model, data, optimiser, seed, schedule).
OPERATIONAL_KEYS = frozenset(
  {
    'train.log_every_steps',
    'train.checkpoint_every_steps',
    'train.keep',
    'train.nan_check_every_steps',
    'train.profile_steps',
    'train.distributed',
    'train.eval_every_epochs',
    'dataset.data_dir',
    'dataset.manual_dir',
    'dataset.num_workers',
    'dataset.eval_batch_size',
  }
)


def _exists(path: str) -> bool:
  if jsonio.is_remote(path):
    from etils import epath  # pylint: disable=g-import-not-at-top  # cloud workdirs only

    return epath.Path(path).exists()
  return os.path.exists(path)


def prepare_workdir(workdir: str) -> None:
  """Creates a local WORKDIR; cli.UserError when it is a file or cannot be created or written."""
  if jsonio.is_remote(workdir):
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise cli.UserError(f'--workdir={workdir} is a file, not a folder: pass a folder (it is created if missing).')
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_probe.{os.getpid()}')
    with open(probe, 'w'):
      pass
    os.remove(probe)
  except OSError as error:
    raise cli.UserError(
      f'--workdir={workdir} cannot be used ({error.strerror or error}): pass a folder you can write to.'
    ) from None


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def config_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """'key: old -> new' for every non-operational key whose value differs (JSON values compared), sorted."""
  old, new = _flatten(jsonio.to_jsonable(stored)), _flatten(jsonio.to_jsonable(current))
  keys = sorted(k for k in set(old) | set(new) if k not in OPERATIONAL_KEYS and old.get(k) != new.get(k))
  return [f'{k}: {old.get(k, "(absent)")!r} -> {new.get(k, "(absent)")!r}' for k in keys]


def _archive(workdir: str, name: str, step: int) -> str | None:
  """WORKDIR/<name> copied to <stem>.<step>.json (never overwriting an earlier copy); the copy's name."""
  source = os.path.join(workdir, name)
  if not _exists(source):
    return None
  stem, suffix = os.path.splitext(name)
  target, n = f'{stem}.{step}{suffix}', 1
  while _exists(os.path.join(workdir, target)):
    target, n = f'{stem}.{step}.{n}{suffix}', n + 1
  jsonio.write_json(os.path.join(workdir, target), jsonio.read_json(source))
  return target


def trained_step(workdir: str) -> int | None:
  """The newest committed checkpoint step in WORKDIR (None: nothing trained yet); reads, never writes."""
  directory = checkpoint_dir(workdir)
  if not _exists(directory):
    return None
  ckpt = checkpointing.Checkpointer(directory, read_only=True)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def check_config(workdir: str, config, *, step: int | None, allow_change: bool = False) -> list[str]:
  """Before a run continues the checkpoints of WORKDIR (at `step`; None: nothing trained yet, nothing to check).

  The stored config.json and `config` must agree on every key that changes the result; otherwise cli.UserError
  with a one-line diff, unless `allow_change`: then the differences are returned (to be logged; keep the earlier
  records with `archive_records` before writing new ones).
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if step is None or not _exists(path):
    return []
  stored = config_lib.base_config()  # keys added by a later version compare with their defaults
  _merge(stored, jsonio.read_json(path))
  differences = config_differences(stored.to_dict(), config.to_dict())
  if differences and not allow_change:
    raise cli.UserError(
      f'{workdir} holds a run trained to step {step} with another config ({"; ".join(differences)}). Use a new '
      '--workdir, or pass --allow_config_change to continue this run with the new config (the old config.json '
      'is kept as config.<step>.json).'
    )
  return differences


def archive_records(workdir: str, step: int) -> list[str]:
  """Keeps config.json and results.json as config.<step>.json / results.<step>.json (never overwriting an earlier
  copy) before a changed config writes new ones; returns the copies' names."""
  return [name for name in (_archive(workdir, n, step) for n in (CONFIG_FILE, RESULTS_FILE)) if name]


def finished_results(workdir: str, config) -> dict[str, Any] | None:
  """The stored results.json when the run in WORKDIR has finished the schedule of `config`, else None."""
  path = os.path.join(workdir, RESULTS_FILE)
  if not _exists(path):
    return None
  results = jsonio.read_json(path)
  steps, epochs = int(results.get('steps') or 0), float(results.get('epochs') or 0)
  if config.train.num_steps > 0:
    total = int(config.train.num_steps)
  elif epochs > 0:
    total = int(config.train.num_epochs) * round(steps / epochs)  # steps per epoch of the finished run
  else:
    return None
  return results if steps >= total else None


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


def _readable_hint(ckpt: checkpointing.Checkpointer, *, exclude: int) -> str:
  """Which --checkpoint= reads back, newest first (each kept step other than `exclude` is tried)."""
  readable = []
  for step in sorted(ckpt.all_steps(), reverse=True):
    if step == exclude:
      continue
    try:
      ckpt.restore_params(step)
      readable.append(step)
    except checkpointing.UnreadableCheckpointError:
      pass
  if not readable:
    return 'no other kept checkpoint reads back: rerun the training command, which moves damaged ones aside'
  return f'pass --checkpoint={readable[0]} (readable kept steps: {", ".join(map(str, readable))})'


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
    try:
      params, batch_stats = ckpt.restore_params(step)
    except checkpointing.UnreadableCheckpointError as error:
      raise cli.UserError(f'{error} in {ckpt.directory}; {_readable_hint(ckpt, exclude=step)}.') from None
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


def parse_run_reference(spec: str) -> tuple[str, int | None] | None:
  """(workdir, step or None for the newest) when `spec` names a metrix_jax run: 'WORKDIR', 'WORKDIR:STEP' or
  'WORKDIR/checkpoints/STEP'; None when it does not (e.g. a torchvision weights file)."""
  path, step = str(spec), ''
  head, colon, tail = path.rpartition(':')
  if colon and tail.isdigit():
    path, step = head, tail
  path = os.path.abspath(os.path.expanduser(path))
  parent, name = os.path.split(path)
  if name.isdigit() and os.path.basename(parent) == CHECKPOINT_DIR and not step:
    path, step = os.path.dirname(parent), name
  if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, CONFIG_FILE)):
    return None
  return path, int(step) if step else None


def load_backbone(spec: str, *, depth: int) -> dict[str, Any]:
  """The backbone (and head) of a trained metrix_jax run, to fine-tune from (`config.model.pretrained=WORKDIR`).

  spec: see `parse_run_reference` (the newest readable checkpoint when no step is named). Returns {'backbone':
  {'params', 'batch_stats'} numpy trees, 'head': the head's params, 'step', 'source' (a description)}.
  cli.UserError for a depth other than `depth`, a missing step or no checkpoint.
  """
  reference = parse_run_reference(spec)
  if reference is None:
    raise cli.UserError(f'{spec} is not a metrix_jax run directory (no {CONFIG_FILE}): pass WORKDIR[:STEP].')
  workdir, step = reference
  trained_depth = int(jsonio.read_json(os.path.join(workdir, CONFIG_FILE))['model']['depth'])
  if trained_depth != int(depth):
    raise cli.UserError(
      f'{workdir} trained a ResNet-{trained_depth}; this config builds a ResNet-{depth}: set '
      f'--config.model.depth={trained_depth} to fine-tune from it.'
    )
  ckpt = open_checkpoints(workdir)
  try:
    step, _ = select_step(ckpt, 'latest' if step is None else step)
    params, batch_stats = ckpt.restore_params(step)
  except checkpointing.UnreadableCheckpointError as error:
    raise cli.UserError(f'{error} in {ckpt.directory}; {_readable_hint(ckpt, exclude=step)}.') from None
  finally:
    ckpt.close()
  to_numpy = functools.partial(jax.tree.map, np.asarray)
  return {
    'backbone': {'params': to_numpy(params['backbone']), 'batch_stats': to_numpy(batch_stats['backbone'])},
    'head': to_numpy(params['head']),
    'step': int(step),
    'source': f'{workdir} step {step}',
  }
