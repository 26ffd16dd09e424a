"""The evaluation report of a trained run, from its embedded splits: every metric, a table, eval.json + plots.

`compute_metrics(config, embedded)` turns {split: (embeddings [N, D], labels [N])} ({'test'} or {'query',
'gallery'}, + 'train' for utilization) into the report (spec section 6):

* Recall@K at the data set's Ks, MAP@R, R-Precision (`evaluation.split_retrieval_metrics`: leave-one-out or
  query -> gallery);
* utilization of the test embeddings w.r.t. the training set; alignment and uniformity (In-Shop: query and gallery
  together);
* positivity: fraction of mixed items that act as positives for their anchor vs lambda, with the configured loss
  on balanced batches of test embeddings (`analysis.positivity_curve`), next to the isolated-item theory (MS).

`format_table(report)` prints it; `write_outputs(report, out_dir)` writes eval.json (strict JSON) and the plots.
`python -m metrix_jax.evaluate` (the CLI) restores a checkpoint, embeds and calls these.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from metrix_jax import analysis
from metrix_jax import evaluation
from metrix_jax import jsonio
from metrix_jax import plots
from metrix_jax import rundir
from metrix_jax import step as step_lib

log = logging.getLogger(__name__)

DEFAULT_LAMBDAS = tuple(np.round(np.linspace(0.05, 0.95, 19), 2))


class TooFewClassesError(ValueError):
  """The test split has fewer than two classes with enough items for a balanced positivity batch."""


def _balanced_batches(
  labels: np.ndarray, rng: np.random.Generator, *, classes_per_batch: int, images_per_class: int, num_batches: int
) -> list[np.ndarray]:
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
    batches.append(
      np.concatenate([rng.choice(np.flatnonzero(labels == c), images_per_class, replace=False) for c in chosen])
    )
  return batches


def positivity(
  config,
  embeddings: np.ndarray,
  labels: np.ndarray,
  *,
  proxies: np.ndarray | None = None,
  lambdas: Sequence[float] = DEFAULT_LAMBDAS,
  pair_sets: Sequence[str] = ('pos_neg',),
  num_batches: int = 8,
  seed: int | None = None,
) -> dict[str, Any]:
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
  seed = int(config.seed) if seed is None else int(seed)
  loss = step_lib.create_loss(config)
  labels = np.asarray(labels)
  rng = np.random.default_rng([seed, 0x905])
  batches = _balanced_batches(
    labels,
    rng,
    classes_per_batch=int(config.dataset.classes_per_batch),
    images_per_class=max(2, int(config.dataset.images_per_class)),
    num_batches=num_batches,
  )
  if not batches:
    raise TooFewClassesError('positivity needs at least two classes with images_per_class test items each.')
  key = jax.random.key(seed)
  lambdas = np.asarray(lambdas, np.float64)
  sums = {'empirical': np.zeros(len(lambdas)), 'theoretical': np.zeros(len(lambdas))}
  weights = {'empirical': np.zeros(len(lambdas)), 'theoretical': np.zeros(len(lambdas))}
  has_theory, num_items = False, 0
  for i, index in enumerate(batches):
    curve = analysis.positivity_curve(
      loss,
      embeddings[index],
      labels[index],
      jax.random.fold_in(key, i),
      lambdas=lambdas,
      pair_sets=tuple(pair_sets),
      proxies=proxies,
      mask_mode=str(config.mix.mask_mode),
    )
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
  return {
    'lambda': lambdas,
    'empirical': mean['empirical'],
    'theoretical': mean['theoretical'] if has_theory else None,
    'num_batches': len(batches),
    'batch_size': int(len(batches[0])),
    'num_items': num_items,
    'pair_sets': list(pair_sets),
  }


FEW_SHOT_SETTINGS = ((5, 1), (5, 5), (20, 1), (20, 5))  # (ways, shots): the standard Omniglot table


def few_shot(
  embeddings: np.ndarray,
  labels: np.ndarray,
  *,
  settings=FEW_SHOT_SETTINGS,
  queries: int = 5,
  episodes: int = 1000,
  seed: int = 0,
) -> list[dict[str, Any]]:
  """N-way K-shot accuracy (`evaluation.few_shot_accuracy`, nearest prototype) for each (ways, shots) the test
  split has enough classes for; settings it cannot fill are left out."""
  out = []
  for ways, shots in settings:
    try:
      out.append(
        evaluation.few_shot_accuracy(
          embeddings, labels, ways=ways, shots=shots, queries=queries, episodes=episodes, seed=seed
        )
      )
    except ValueError:  # too few classes with shots + queries items
      continue
  return out


def compute_metrics(
  config,
  embedded: Mapping[str, tuple[np.ndarray, np.ndarray]],
  *,
  proxies: np.ndarray | None = None,
  with_positivity: bool = True,
) -> dict[str, Any]:
  """Every metric from embedded splits ({'test'} or {'query', 'gallery'}, optional 'train')."""
  retrieval = evaluation.split_retrieval_metrics(embedded, tuple(int(k) for k in config.dataset.recall_ks))
  report: dict[str, Any] = {
    k: retrieval[k] for k in ('protocol', 'num_query', 'num_gallery', 'num_test') if k in retrieval
  }
  if 'gallery' in embedded:
    test, test_labels = (np.concatenate([embedded['query'][i], embedded['gallery'][i]]) for i in (0, 1))
  else:
    test, test_labels = embedded['test']
  report.update(
    recall={int(k): v for k, v in retrieval['recall'].items()},
    map_at_r=retrieval['map_at_r'],
    r_precision=retrieval['r_precision'],
    precision_at_1=retrieval['precision_at_1'],
    num_lone_queries=retrieval['num_lone_queries'],
  )
  if 'train' in embedded:
    report['utilization'] = evaluation.utilization(test, embedded['train'][0])
    report['num_train'] = len(embedded['train'][0])
  else:
    report['utilization'] = None
  report['alignment'], report['uniformity'] = evaluation.alignment_and_uniformity(test, test_labels, t=2.0)
  if report['alignment'] is None:
    report['alignment_note'] = 'alignment needs a positive pair: no test class has two items.'
  report['few_shot'] = few_shot(test, test_labels, seed=int(config.seed))
  report['positivity'] = None
  if with_positivity:
    report['positivity_split'], data = 'test', (test, test_labels)
    if proxies is not None:  # the proxies anchor the training classes: test classes have none to be mixed towards
      report['positivity_split'], data = 'train', embedded.get('train')
    try:
      if data is None:
        raise TooFewClassesError(
          f'{config.loss.name} has proxies for the training classes only: its positivity is '
          'measured on the train split (run with --utilization=True to embed it).'
        )
      report['positivity'] = positivity(config, *data, proxies=proxies)
    except TooFewClassesError as error:
      report['positivity_note'] = f'positivity analysis skipped: {error}'
  return report


def _percent(value: Any) -> str:
  return '-' if value is None or (isinstance(value, float) and math.isnan(value)) else f'{100 * value:.2f}'


def _plain(value: Any, digits: int = 4) -> str:
  return '-' if value is None or (isinstance(value, float) and math.isnan(value)) else f'{value:.{digits}f}'


def format_table(report: Mapping[str, Any]) -> str:
  """The report as an aligned two-column text table (recall, MAP@R, R-Precision in %)."""
  rows = [(f'Recall@{k} (%)', _percent(v)) for k, v in sorted(report['recall'].items())]
  rows += [
    ('MAP@R (%)', _percent(report['map_at_r'])),
    ('R-Precision (%)', _percent(report['r_precision'])),
    ('utilization (lower: test closer to train)', _plain(report.get('utilization'))),
    ('alignment (lower: classes tighter)', _plain(report.get('alignment'))),
    ('uniformity (lower: more uniform)', _plain(report.get('uniformity'))),
  ]
  rows += [
    (f'{f["ways"]}-way {f["shots"]}-shot accuracy (%)', f'{_percent(f["accuracy"])} ± {100 * f["ci95"]:.2f}')
    for f in report.get('few_shot') or ()
  ]
  pos = report.get('positivity')
  if pos is not None:
    lam, emp = np.asarray(pos['lambda']), np.asarray(pos['empirical'], np.float64)
    for target in (0.2, 0.5, 0.8):
      i = int(np.argmin(np.abs(lam - target)))
      theory = '' if pos['theoretical'] is None else f' (theory {_plain(pos["theoretical"][i], 3)})'
      rows.append((f'P(positive) at lambda={lam[i]:.2f}', _plain(emp[i], 3) + theory))
  head = (
    f'{report.get("dataset", "")} step {report.get("step", "?")} ({report.get("protocol", "")}, '
    + ', '.join(
      f'{n} {report[k]:,}'
      for n, k in (('queries', 'num_query'), ('gallery', 'num_gallery'), ('test', 'num_test'), ('train', 'num_train'))
      if report.get(k) is not None
    )
    + ')'
  )
  width = max(len(name) for name, _ in rows)
  lines = [head, '-' * max(len(head), width + 12)]
  lines += [f'{name:<{width}}  {value:>10}' for name, value in rows]
  if report.get('eval_max_images'):
    lines.append(
      f'note: only the first {report["eval_max_images"]:,} images of each split '
      '(dataset.eval_max_images): not comparable with full evaluations'
    )
  for note in ('positivity_note', 'alignment_note'):
    if report.get(note):
      lines.append(f'note: {report[note]}')
  return '\n'.join(lines)


def _remove_stale(out_dir: str, name: str) -> None:
  """Removes out_dir/name, a plot an earlier evaluation wrote that this one does not (it would mislead)."""
  if os.path.exists(os.path.join(out_dir, name)):
    os.remove(os.path.join(out_dir, name))


def write_outputs(
  report: dict[str, Any], out_dir: str, *, retrieval_images: tuple[Any, Any] | None = None
) -> dict[str, str]:
  """eval.json and the PNG plots into `out_dir`; returns {'json', 'recall_plot'[, 'positivity_plot'][,
  'retrieval_grid']}. retrieval_images: (query images [Q, H, W, C], neighbour images [Q, K, H, W, C]) of
  `report['retrieval_examples']` (`evaluation.retrieval_examples`): drawn as the retrieval grid."""
  paths = {
    'recall_plot': plots.plot_recall_at_k(
      report['recall'],
      os.path.join(out_dir, rundir.EVAL_RECALL_PNG),
      title=f'Recall@K, {report.get("dataset", "")} step {report.get("step", "?")}',
    )
  }
  pos = report.get('positivity')
  if pos is not None:
    paths['positivity_plot'] = plots.plot_positivity(
      pos['lambda'],
      pos['empirical'],
      pos['theoretical'],
      os.path.join(out_dir, rundir.EVAL_POSITIVITY_PNG),
      title=f'Positivity ({report.get("loss", "")}, {report.get("positivity_split", "test")} embeddings)',
    )
    report['positivity'] = {
      **plots.positivity_record(pos['lambda'], pos['empirical'], pos['theoretical']),
      **{k: pos[k] for k in ('num_batches', 'batch_size', 'num_items', 'pair_sets')},
    }
  else:
    _remove_stale(out_dir, rundir.EVAL_POSITIVITY_PNG)
  examples = report.get('retrieval_examples')
  if examples is not None and retrieval_images is not None:
    paths['retrieval_grid'] = plots.plot_retrieval_grid(
      retrieval_images[0],
      retrieval_images[1],
      examples['correct'],
      os.path.join(out_dir, rundir.EVAL_RETRIEVAL_PNG),
      title=f'{report.get("dataset", "")}, {report.get("loss", "")} + mix {report.get("mix", "")}, step '
      f'{report.get("step", "?")}: top-{len(examples["correct"][0])} (green: same class)',
      row_labels=[f'class {label}' for label in examples['query_labels']],
    )
  else:
    _remove_stale(out_dir, rundir.EVAL_RETRIEVAL_PNG)
  report['files'] = {name: os.path.basename(path) for name, path in paths.items()}  # no machine paths
  paths['json'] = jsonio.write_json(os.path.join(out_dir, rundir.EVAL_FILE), report)
  return paths
