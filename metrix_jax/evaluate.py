r"""Evaluation report of a trained run: `python -m metrix_jax.evaluate --workdir=DIR`.

Loads the run's config (DIR/config.json, written by the trainer) and its best checkpoint (highest R@1 among the
kept ones; `--checkpoint=latest` or a step number to choose another), embeds the test split(s) with the eval
preprocessing and prints every metric of `metrix_jax.evaluation` (spec section 6):

* Recall@K at the data set's Ks (`config.dataset.recall_ks`), MAP@R, R-Precision: leave-one-out over the test
  split (CUB, Cars, SOP, demo, Omniglot) or query -> gallery (In-Shop);
* utilization of the test embeddings w.r.t. the clean training set (the train split embedded with the eval
  preprocessing; `--utilization=False` skips it);
* alignment and uniformity of the test embeddings (In-Shop: query and gallery together);
* positivity: fraction of mixed items that act as positives for their anchor vs lambda, with the configured loss
  on batches of test embeddings (`metrix_jax.analysis`), next to the paper's theoretical curve.

Writes DIR/eval.json (every number, the checkpoint step and the options), DIR/eval_recall.png and
DIR/eval_positivity.png (`--out_dir` to write elsewhere). Any config value can be overridden like in training,
e.g. `--config.dataset.data_dir=/data/tfds --config.dataset.eval_batch_size=128`. The run's
`train.distributed` applies (multi-host evaluation on every host); a run trained on several hosts evaluates on
one with `--config.train.distributed=False`.

Library use (notebooks, tests): `run(workdir, ...)` returns the report dict; `load_trained_model(workdir)` gives
(config, model, variables, step) for your own embedding code (`metrix_jax.embed` uses it).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CONFIG_FILE = 'config.json'
TRAIN_COMMAND = 'python -m metrix_jax.main --config=configs/demo.py --workdir=DIR'
EVAL_JSON = 'eval.json'
RECALL_PNG = 'eval_recall.png'
POSITIVITY_PNG = 'eval_positivity.png'
DEFAULT_LAMBDAS = tuple(np.round(np.linspace(0.05, 0.95, 19), 2))


class EvaluationError(Exception):
  """A problem the user can fix (missing workdir, no checkpoint, ...); the message says how."""


# ----------------------------------------------------------------------------------------------------------
# Workdir: config and checkpoint.
# ----------------------------------------------------------------------------------------------------------
def _check_workdir(workdir: str) -> str:
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(workdir):
    raise EvaluationError(f'Workdir {workdir} does not exist. Train a model into it first, e.g. '
                          f'`{TRAIN_COMMAND.replace("DIR", workdir)}`.')
  return workdir


def _tuples(value: Any) -> Any:
  """JSON lists back into tuples (configs hold sequences as tuples), recursively."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def _merge(config, values: Mapping[str, Any], prefix: str = '') -> None:
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  for key, value in values.items():
    if isinstance(value, dict) and isinstance(config.get(key), config_dict.ConfigDict):
      _merge(config[key], value, f'{prefix}{key}.')
    elif key in config:
      config[key] = _tuples(value)
    else:  # a key this version does not read (a run of another version): not needed to evaluate
      log.warning('Ignoring %s%s of config.json: unknown to this version of metrix_jax.', prefix, key)


def load_config(workdir: str):
  """The run's config (`config_lib.base_config()` updated with WORKDIR/config.json), unlocked ConfigDict."""
  from metrix_jax import config_lib  # pylint: disable=g-import-not-at-top
  workdir = _check_workdir(workdir)
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise EvaluationError(f'{path} is missing: {workdir} is not a training workdir (the trainer writes '
                          f'config.json at start). Train into it with `{TRAIN_COMMAND.replace("DIR", workdir)}`.')
  with open(path) as f:
    values = json.load(f)
  config = config_lib.base_config()
  _merge(config, values)
  return config


def _checkpointer(workdir: str):
  from metrix_jax import checkpointing  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory) or not os.listdir(directory):
    raise EvaluationError(f'No checkpoint in {directory}. Train first (the trainer checkpoints every '
                          f'`train.checkpoint_every_steps`, at each evaluation and at the end): '
                          f'`{TRAIN_COMMAND.replace("DIR", workdir)}`; rerunning it resumes.')
  ckpt = checkpointing.Checkpointer(directory, read_only=True)  # a running training may be saving here
  if ckpt.latest_step() is None:
    ckpt.close()
    raise EvaluationError(f'No complete checkpoint in {directory} (only unfinished saves?). Rerun the '
                          f'training command to resume and save one: `{TRAIN_COMMAND.replace("DIR", workdir)}`.')
  return ckpt


def select_step(ckpt, checkpoint: str | int = 'best') -> tuple[int, str]:
  """(step, how it was chosen) for 'best' (highest saved R@1; the latest when none has metrics), 'latest' or a step."""
  steps = ckpt.all_steps()
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
    raise EvaluationError(f"--checkpoint must be 'best', 'latest' or a step number; got {checkpoint!r}.") from None
  if step not in steps:
    raise EvaluationError(f'No checkpoint at step {step} in {ckpt.directory}; kept steps: {sorted(steps)}.')
  return step, 'requested'


@dataclasses.dataclass
class TrainedModel:
  """A model restored from a workdir: `model.apply(variables, images, train=False)` -> (embeddings, map)."""
  config: Any
  model: Any
  variables: dict[str, Any]  # {'params': {'backbone', 'head'}, 'batch_stats': ...} as numpy arrays
  proxies: np.ndarray | None  # [C, D] for proxy-based losses
  step: int
  selection: str
  train_metrics: dict[str, float] | None  # what the trainer measured at that step


def load_trained_model(workdir: str, *, checkpoint: str | int = 'best', config=None,
                       model_factory: Callable[[Any], Any] | None = None) -> TrainedModel:
  """Config, model and variables of the chosen checkpoint of a training workdir.

  `config`: use this instead of WORKDIR/config.json; `model_factory(config)`: a model other than
  `train.create_model` (tests). Raises EvaluationError with the fix when the workdir or checkpoint is missing.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from metrix_jax import train  # pylint: disable=g-import-not-at-top
  workdir = _check_workdir(workdir)
  config = load_config(workdir) if config is None else config
  ckpt = _checkpointer(workdir)
  try:
    step, selection = select_step(ckpt, checkpoint)
    raw = ckpt.restore_raw(step)
    train_metrics = ckpt.metrics(step)
  finally:
    ckpt.close()
  to_numpy = lambda tree: jax.tree.map(np.asarray, tree)  # noqa: E731
  params = raw['params']
  variables = {'params': {'backbone': to_numpy(params['backbone']), 'head': to_numpy(params['head'])},
               'batch_stats': to_numpy(raw['batch_stats'])}
  proxies = np.asarray(params['proxies']) if 'proxies' in params else None
  model = (model_factory or train.create_model)(config)
  return TrainedModel(config=config, model=model, variables=variables, proxies=proxies, step=int(step),
                      selection=selection, train_metrics=train_metrics)


# ----------------------------------------------------------------------------------------------------------
# Data and embeddings.
# ----------------------------------------------------------------------------------------------------------
def build_eval_data(config, *, include_train: bool) -> dict[str, Any]:
  """{'test': batches} or {'query', 'gallery'} (+ 'train' with the eval preprocessing): `metrix_jax.data`."""
  import jax  # pylint: disable=g-import-not-at-top
  from metrix_jax import config_lib  # pylint: disable=g-import-not-at-top
  from metrix_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  d = config.dataset
  where = dict(data_dir=config_lib.optional(d.data_dir), manual_dir=config_lib.optional(d.manual_dir))
  data_lib.prepare(d.name, **where)
  info = data_lib.get_dataset_info(d.name, **where)
  splits = tuple(info.eval_splits) + (('train',) if include_train else ())
  return {split: data_lib.create_eval_iterator(
      d.name, split, global_batch_size=d.eval_batch_size, image_size=d.image_size,
      resize_size=int(d.eval_resize or 0) or None, process_index=jax.process_index(),
      process_count=jax.process_count(), num_workers=d.num_workers, **where) for split in splits}


def embed_splits(trained: TrainedModel, eval_data: Mapping[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{split: (embeddings float32 [N, D], labels [N])} for every split of `eval_data` (all devices).

  `config.dataset.eval_max_images` > 0 keeps only the first that many images of each split (smoke tests).
  """
  from metrix_jax import sharding, train  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh()
  embed_fn = train.make_embed_fn(trained.model, trained.config, mesh)
  variables = sharding.replicate(trained.variables, mesh)  # on device once, not per batch
  limit = int(trained.config.dataset.get('eval_max_images', 0) or 0)
  out = {}
  for split, batches in eval_data.items():
    log.info('embedding the %s split...', split)
    out[split] = train.embed_dataset(embed_fn, variables, batches, mesh, limit)
  return out


# ----------------------------------------------------------------------------------------------------------
# Metrics.
# ----------------------------------------------------------------------------------------------------------
def _balanced_batches(labels: np.ndarray, rng: np.random.Generator, *, classes_per_batch: int,
                      images_per_class: int, num_batches: int) -> list[np.ndarray]:
  """Index batches of `classes_per_batch` classes x `images_per_class` items (classes with enough items)."""
  classes, counts = np.unique(labels, return_counts=True)
  images_per_class = max(2, min(images_per_class, int(counts.max())))  # small test sets: fewer per class
  eligible = classes[counts >= images_per_class]
  if len(eligible) < 2:
    return []
  take = min(classes_per_batch, len(eligible))
  batches = []
  for _ in range(num_batches):
    chosen = rng.choice(eligible, take, replace=False)
    batches.append(np.concatenate([rng.choice(np.flatnonzero(labels == c), images_per_class, replace=False)
                                   for c in chosen]))
  return batches


def positivity(config, embeddings: np.ndarray, labels: np.ndarray, *, proxies: np.ndarray | None = None,
               lambdas: Sequence[float] = DEFAULT_LAMBDAS, pair_sets: Sequence[str] = ('pos_neg',),
               num_batches: int = 8, seed: int | None = None) -> dict[str, Any]:
  """Positivity curve of the configured loss on balanced batches of `embeddings` [N, D] with `labels` [N].

  Batches: `config.dataset.classes_per_batch` x `images_per_class` test items (like a balanced train batch),
  `num_batches` of them; per batch `metrix_jax.analysis.positivity_curve` at embedding level with the loss's
  hyperparameters and mining, on `pair_sets` (default positive-negative, the paper's analysis, so that runs with
  and without Metrix are comparable): the fraction of mixed items with d(mixed loss)/d s(a, v) < 0 at each
  lambda (items whose gradient is exactly 0 neither pull nor push and are not counted; see
  `metrix_jax.analysis.positivity_curve`). Both curves are averaged over batches weighted by the number of
  (anchor, item) pairs counted. Returns {'lambda' [L], 'empirical' [L], 'theoretical' [L] or None
  (Multi-Similarity only), 'num_batches', 'batch_size', 'num_items'}; NaN where no item was counted.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from metrix_jax import analysis, train  # pylint: disable=g-import-not-at-top
  seed = int(config.seed) if seed is None else int(seed)
  loss = train.create_loss(config)
  labels = np.asarray(labels)
  rng = np.random.default_rng([seed, 0x905])
  batches = _balanced_batches(labels, rng, classes_per_batch=int(config.dataset.classes_per_batch),
                              images_per_class=max(2, int(config.dataset.images_per_class)),
                              num_batches=num_batches)
  if not batches:
    raise ValueError('positivity needs at least two classes with images_per_class test items each.')
  key = jax.random.key(seed)
  lambdas = np.asarray(lambdas, np.float64)
  sums = {'empirical': np.zeros(len(lambdas)), 'theoretical': np.zeros(len(lambdas))}
  weights = {'empirical': np.zeros(len(lambdas)), 'theoretical': np.zeros(len(lambdas))}
  has_theory, num_items = False, 0
  for i, index in enumerate(batches):
    curve = analysis.positivity_curve(loss, embeddings[index], labels[index], jax.random.fold_in(key, i),
                                      lambdas=lambdas, pair_sets=tuple(pair_sets), proxies=proxies,
                                      mask_mode=str(config.mix.mask_mode))
    count = int(curve.get('num_items', 1))
    num_items += count
    for name in sums:
      if curve.get(name) is None:
        continue
      has_theory |= name == 'theoretical'
      values = np.asarray(curve[name], np.float64)
      finite = np.isfinite(values)
      sums[name][finite] += count * values[finite]
      weights[name][finite] += count
  with np.errstate(invalid='ignore', divide='ignore'):
    mean = {name: np.where(weights[name] > 0, sums[name] / weights[name], np.nan) for name in sums}
  return {'lambda': lambdas, 'empirical': mean['empirical'],
          'theoretical': mean['theoretical'] if has_theory else None, 'num_batches': len(batches),
          'batch_size': int(len(batches[0])), 'num_items': num_items, 'pair_sets': list(pair_sets)}


def compute_metrics(config, embedded: Mapping[str, tuple[np.ndarray, np.ndarray]], *,
                    proxies: np.ndarray | None = None, with_positivity: bool = True) -> dict[str, Any]:
  """Every metric from embedded splits ({'test'} or {'query', 'gallery'}, optional 'train')."""
  from metrix_jax import evaluation  # pylint: disable=g-import-not-at-top
  ks = tuple(int(k) for k in config.dataset.recall_ks)
  report: dict[str, Any] = {}
  if 'gallery' in embedded:
    (q, qy), (g, gy) = embedded['query'], embedded['gallery']
    retrieval = evaluation.retrieval_metrics(q, qy, ks, gallery_embeddings=g, gallery_labels=gy)
    report.update(protocol='query -> gallery', num_query=len(q), num_gallery=len(g))
    test, test_labels = np.concatenate([q, g]), np.concatenate([qy, gy])
  else:
    test, test_labels = embedded['test']
    retrieval = evaluation.retrieval_metrics(test, test_labels, ks)
    report.update(protocol='leave-one-out', num_test=len(test))
  report.update(recall={int(k): v for k, v in retrieval['recall'].items()}, map_at_r=retrieval['map_at_r'],
                r_precision=retrieval['r_precision'], precision_at_1=retrieval['precision_at_1'],
                num_lone_queries=retrieval['num_lone_queries'])
  if 'train' in embedded:
    report['utilization'] = evaluation.utilization(test, embedded['train'][0])
    report['num_train'] = len(embedded['train'][0])
  else:
    report['utilization'] = None
  report['alignment'], report['uniformity'] = evaluation.alignment_and_uniformity(test, test_labels, t=2.0)
  if report['alignment'] is None:
    report['alignment_note'] = 'alignment needs a positive pair: no test class has two items.'
  report['positivity'] = None
  if with_positivity:
    try:
      report['positivity'] = positivity(config, test, test_labels, proxies=proxies)
    except ValueError as error:  # e.g. too few classes with enough items
      report['positivity_note'] = f'positivity analysis skipped: {error}'
    except Exception as error:  # pylint: disable=broad-except  # keep the metrics computed so far
      log.exception('positivity analysis failed')
      report['positivity_note'] = f'positivity analysis failed: {type(error).__name__}: {error}'
  return report


# ----------------------------------------------------------------------------------------------------------
# Output.
# ----------------------------------------------------------------------------------------------------------
def _percent(value: Any) -> str:
  return '-' if value is None or (isinstance(value, float) and math.isnan(value)) else f'{100 * value:.2f}'


def _plain(value: Any, digits: int = 4) -> str:
  return '-' if value is None or (isinstance(value, float) and math.isnan(value)) else f'{value:.{digits}f}'


def format_table(report: Mapping[str, Any]) -> str:
  """The report as an aligned two-column text table (recall, MAP@R, R-Precision in %)."""
  rows = [(f'Recall@{k} (%)', _percent(v)) for k, v in sorted(report['recall'].items())]
  rows += [('MAP@R (%)', _percent(report['map_at_r'])), ('R-Precision (%)', _percent(report['r_precision'])),
           ('utilization (lower: test closer to train)', _plain(report.get('utilization'))),
           ('alignment (lower: classes tighter)', _plain(report.get('alignment'))),
           ('uniformity (lower: more uniform)', _plain(report.get('uniformity')))]
  pos = report.get('positivity')
  if pos is not None:
    lam, emp = np.asarray(pos['lambda']), np.asarray(pos['empirical'], np.float64)
    for target in (0.2, 0.5, 0.8):
      i = int(np.argmin(np.abs(lam - target)))
      theory = '' if pos['theoretical'] is None else f' (theory {_plain(pos["theoretical"][i], 3)})'
      rows.append((f'P(positive) at lambda={lam[i]:.2f}', _plain(emp[i], 3) + theory))
  head = (f"{report.get('dataset', '')} step {report.get('step', '?')} ({report.get('protocol', '')}, "
          + ', '.join(f'{n} {report[k]:,}' for n, k in (('queries', 'num_query'), ('gallery', 'num_gallery'),
                                                        ('test', 'num_test'), ('train', 'num_train'))
                      if report.get(k) is not None) + ')')
  width = max(len(name) for name, _ in rows)
  lines = [head, '-' * max(len(head), width + 12)]
  lines += [f'{name:<{width}}  {value:>10}' for name, value in rows]
  if report.get('eval_max_images'):
    lines.append(f"note: only the first {report['eval_max_images']:,} images of each split "
                 '(dataset.eval_max_images): not comparable with full evaluations')
  for note in ('positivity_note', 'alignment_note'):
    if report.get(note):
      lines.append(f'note: {report[note]}')
  return '\n'.join(lines)


def write_outputs(report: dict[str, Any], out_dir: str) -> dict[str, str]:
  """eval.json and the PNG plots into `out_dir`; returns {'json', 'recall_plot'[, 'positivity_plot']}."""
  from metrix_jax import plots  # pylint: disable=g-import-not-at-top
  paths = {'recall_plot': plots.plot_recall_at_k(
      report['recall'], os.path.join(out_dir, RECALL_PNG),
      title=f"Recall@K, {report.get('dataset', '')} step {report.get('step', '?')}")}
  pos = report.get('positivity')
  if pos is not None:
    paths['positivity_plot'] = plots.plot_positivity(
        pos['lambda'], pos['empirical'], pos['theoretical'], os.path.join(out_dir, POSITIVITY_PNG),
        title=f"Positivity ({report.get('loss', '')}, test embeddings)")
    report['positivity'] = {**plots.positivity_record(pos['lambda'], pos['empirical'], pos['theoretical']),
                            **{k: pos[k] for k in ('num_batches', 'batch_size', 'num_items', 'pair_sets')}}
  elif os.path.exists(os.path.join(out_dir, POSITIVITY_PNG)):  # not from this evaluation: would mislead
    os.remove(os.path.join(out_dir, POSITIVITY_PNG))
  report['files'] = dict(paths)
  paths['json'] = plots.write_json(os.path.join(out_dir, EVAL_JSON), report)
  return paths


def run(workdir: str, *, checkpoint: str | int = 'best', config=None, out_dir: str | None = None,
        with_utilization: bool = True, with_positivity: bool = True,
        model_factory: Callable[[Any], Any] | None = None,
        eval_data_factory: Callable[..., Mapping[str, Any]] | None = None, verbose: bool = True) -> dict[str, Any]:
  """Loads the checkpoint, embeds, computes every metric, writes eval.json + plots (process 0); returns the report.

  Test seams: `model_factory(config)` (default `train.create_model`), `eval_data_factory(config,
  include_train=bool)` -> {split: batches} (default `build_eval_data`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  trained = load_trained_model(workdir, checkpoint=checkpoint, config=config, model_factory=model_factory)
  config = trained.config
  eval_data = (eval_data_factory or build_eval_data)(config, include_train=with_utilization)
  embedded = embed_splits(trained, eval_data)
  report = {'workdir': _check_workdir(workdir), 'dataset': config.dataset.name, 'loss': config.loss.name,
            'mix': config.mix.mode, 'step': trained.step, 'checkpoint_selection': trained.selection,
            'train_metrics_at_step': trained.train_metrics,
            'eval_max_images': int(config.dataset.get('eval_max_images', 0) or 0) or None}
  report.update(compute_metrics(config, embedded, proxies=trained.proxies, with_positivity=with_positivity))
  report['devices'] = f'{jax.device_count()} x {jax.devices()[0].device_kind}'
  if jax.process_index() == 0:
    paths = write_outputs(report, _check_out_dir(out_dir or report['workdir']))
    if verbose:
      print(format_table(report))
      print('wrote ' + ', '.join(paths.values()))
  return report


def _check_out_dir(out_dir: str) -> str:
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  os.makedirs(out_dir, exist_ok=True)
  return out_dir


# ----------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------
def _workdir_from_argv(argv: Sequence[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith('--workdir='):
      return arg.split('=', 1)[1]
    if arg == '--workdir' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def define_run_config_flag(argv: Sequence[str], *, example: str) -> bool:
  """Defines `--config` as the run's saved config (WORKDIR/config.json) when argv names a workdir, so that
  `--config.KEY=VALUE` overrides parse against it. False (after printing why) when that config is unreadable."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  workdir = _workdir_from_argv(argv)
  if workdir is None:
    return True  # absl reports the missing --workdir
  try:
    config = load_config(workdir)
  except EvaluationError as error:
    print(f'error: {error}', file=sys.stderr)
    return False
  config_flags.DEFINE_config_dict('config', config, f"The run's config; override values with "
                                  f'--config.KEY=VALUE (e.g. {example}).')
  return True


def main() -> int:
  """`python -m metrix_jax.evaluate --workdir=DIR [--checkpoint=best|latest|STEP] [--config.KEY=VALUE ...]`."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string('workdir', None, 'Training workdir (config.json + checkpoints/).', required=True)
  flags.DEFINE_string('checkpoint', 'best', "'best' (highest R@1 kept), 'latest' or a step number.")
  flags.DEFINE_string('out_dir', None, 'Where eval.json and the plots go (default: the workdir).')
  flags.DEFINE_bool('utilization', True, 'Embed the train split (eval preprocessing) for utilization.')
  flags.DEFINE_bool('positivity', True, 'Run the positivity analysis on test embeddings.')
  if not define_run_config_flag(sys.argv[1:], example='--config.dataset.data_dir=/data'):
    return 2

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
    from metrix_jax import config_lib  # pylint: disable=g-import-not-at-top
    logging.getLogger('metrix_jax').setLevel(logging.INFO)
    logging.getLogger('absl').setLevel(logging.WARNING)  # Orbax's per-step INFO lines
    FLAGS = flags.FLAGS  # pylint: disable=invalid-name
    from metrix_jax import sharding  # pylint: disable=g-import-not-at-top
    # Multi-host (--config.train.distributed=True or METRIX_DISTRIBUTED=1 on every host): before device queries.
    sharding.maybe_initialize_distributed(FLAGS.config.train.distributed)
    try:
      config_lib.validate(FLAGS.config, check_files=False)
      run(FLAGS.workdir, checkpoint=FLAGS.checkpoint, config=FLAGS.config, out_dir=FLAGS.out_dir,
          with_utilization=FLAGS.utilization, with_positivity=FLAGS.positivity)
    except (EvaluationError, ValueError, FileNotFoundError) as error:
      print(f'error: {error}', file=sys.stderr)
      return 2
    return 0

  app.run(_main)  # exits with _main's return value
  return 0


if __name__ == '__main__':
  sys.exit(main())
