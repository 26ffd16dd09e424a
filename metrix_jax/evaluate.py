r"""Evaluation report of a trained run: `python -m metrix_jax.evaluate --workdir=DIR`.

Loads the run's config (DIR/config.json, written by the trainer) and its best checkpoint (highest R@1 among the
kept ones; `--checkpoint=latest` or a step number to choose another), embeds the test split(s) with the eval
preprocessing and prints every metric of `metrix_jax.report` (spec section 6):

* Recall@K at the data set's Ks (`config.dataset.recall_ks`), MAP@R, R-Precision: leave-one-out over the test
  split (CUB, Cars, SOP, demo, Omniglot) or query -> gallery (In-Shop);
* utilization of the test embeddings w.r.t. the clean training set (the train split embedded with the eval
  preprocessing; `--utilization=False` skips it);
* alignment and uniformity of the test embeddings (In-Shop: query and gallery together);
* positivity: fraction of mixed items that act as positives for their anchor vs lambda, with the configured loss
  on batches of test embeddings (`metrix_jax.analysis`), next to the paper's theoretical curve.

Writes DIR/eval.json (every number, the checkpoint step and the options), DIR/eval_recall.png and
DIR/eval_positivity.png (`--out_dir` to write elsewhere); with `--retrieval_grid=Q` also DIR/eval_retrieval.png:
Q test queries (a fixed sample, the same for every run over the same split) and their top `--retrieval_grid_k`
retrievals, framed green (same class) or red. Any config value can be overridden like in training,
e.g. `--config.dataset.data_dir=/data/tfds --config.dataset.eval_batch_size=128`. The run's
`train.distributed` applies (multi-host evaluation on every host); a run trained on several hosts evaluates on
one with `--config.train.distributed=False`.

Library use (notebooks, tests): `run(workdir, ...)` returns the report dict; `rundir.load_trained_model(workdir)`
gives (config, model, variables, step) for your own embedding code (`metrix_jax.embed` uses it).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from absl import app
from absl import flags

from metrix_jax import cli
from metrix_jax import config_lib
from metrix_jax import embedding
from metrix_jax import evaluation
from metrix_jax import input_pipeline
from metrix_jax import report as report_lib
from metrix_jax import rundir
from metrix_jax import sharding


def run(
  workdir: str,
  *,
  checkpoint: str | int = 'best',
  config=None,
  out_dir: str | None = None,
  with_utilization: bool = True,
  with_positivity: bool = True,
  model_factory: Callable[[Any], Any] | None = None,
  eval_data_factory: Callable[..., Mapping[str, Any]] | None = None,
  verbose: bool = True,
  retrieval_grid: int = 0,
  retrieval_grid_k: int = 5,
) -> dict[str, Any]:
  """Loads the checkpoint, embeds, computes every metric, writes eval.json + plots (process 0); returns the report.

  retrieval_grid > 0: that many test queries (a fixed sample: the same for every run over the same split) and
  their top-`retrieval_grid_k` retrievals go into eval.json ('retrieval_examples') and DIR/eval_retrieval.png
  (one more pass over the test images to fetch them; single-process evaluation only).

  Test seams: `model_factory(config)` (default `embedding.create_model`), `eval_data_factory(config,
  include_train=bool)` -> {split: batches} (default `input_pipeline.build_eval_data`).
  """
  workdir = rundir.check_workdir(workdir)
  trained = rundir.load_trained_model(workdir, checkpoint=checkpoint, config=config, model_factory=model_factory)
  config = trained.config
  eval_data = (eval_data_factory or input_pipeline.build_eval_data)(config, include_train=with_utilization)
  mesh = sharding.make_mesh()
  embedded = embedding.embed_splits(
    embedding.make_embed_fn(trained.model, config, mesh),
    sharding.replicate(trained.variables, mesh),
    eval_data,
    mesh,
    int(config.dataset.get('eval_max_images', 0) or 0),
  )
  report = {
    'run': os.path.basename(workdir),
    'dataset': config.dataset.name,
    'loss': config.loss.name,
    'mix': config.mix.mode,
    'step': trained.step,
    'checkpoint_selection': trained.selection,
    'train_metrics_at_step': trained.train_metrics,
    'eval_max_images': int(config.dataset.get('eval_max_images', 0) or 0) or None,
  }
  report.update(report_lib.compute_metrics(config, embedded, proxies=trained.proxies, with_positivity=with_positivity))
  report['devices'] = f'{jax.device_count()} x {jax.devices()[0].device_kind}'
  retrieval_images = None
  if retrieval_grid > 0:
    report['retrieval_examples'], retrieval_images = retrieval_examples(
      embedded, eval_data, num_queries=retrieval_grid, k=retrieval_grid_k
    )
  if jax.process_index() == 0:
    out_dir = os.path.abspath(os.path.expanduser(out_dir or workdir))
    os.makedirs(out_dir, exist_ok=True)
    paths = report_lib.write_outputs(report, out_dir, retrieval_images=retrieval_images)
    if verbose:
      print(report_lib.format_table(report))
      print('wrote ' + ', '.join(paths.values()))
  return report


def retrieval_examples(
  embedded: Mapping[str, tuple[Any, Any]], eval_data: Mapping[str, Any], *, num_queries: int, k: int
) -> tuple[dict[str, Any], tuple[Any, Any]]:
  """(`evaluation.retrieval_examples` of the evaluated splits, (query images [Q, H, W, C], neighbour images
  [Q, K, H, W, C])): the images fetched from the eval batches by the items' indices."""
  if jax.process_count() > 1:
    raise cli.UserError(
      '--retrieval_grid needs single-process evaluation (each host holds only its rows of every batch); '
      'rerun with --config.train.distributed=False on one host.'
    )
  splits = {name: embedded[name] for name in ('test', 'query', 'gallery') if name in embedded}
  examples = evaluation.retrieval_examples(splits, num_queries=num_queries, k=k)
  if examples['query_split'] == examples['gallery_split']:  # leave-one-out: one pass over the split for both
    queries = neighbours = embedding.collect_images(
      eval_data[examples['query_split']], examples['queries'] + sum(examples['neighbours'], [])
    )
  else:
    queries = embedding.collect_images(eval_data[examples['query_split']], examples['queries'])
    neighbours = embedding.collect_images(eval_data[examples['gallery_split']], examples['neighbours'])
  query_images = np.stack([queries[i] for i in examples['queries']])
  neighbour_images = np.stack([np.stack([neighbours[i] for i in row]) for row in examples['neighbours']])
  return examples, (query_images, neighbour_images)


def main() -> int:
  """`python -m metrix_jax.evaluate --workdir=DIR [--checkpoint=best|latest|STEP] [--config.KEY=VALUE ...]`."""
  flags.DEFINE_string('out_dir', None, 'Where eval.json and the plots go (default: the workdir).')
  flags.DEFINE_bool('utilization', True, 'Embed the train split (eval preprocessing) for utilization.')
  flags.DEFINE_bool('positivity', True, 'Run the positivity analysis on test embeddings.')
  flags.DEFINE_integer(
    'retrieval_grid', 0, 'Draw this many test queries and their top-K retrievals (eval_retrieval.png); 0: off.'
  )
  flags.DEFINE_integer('retrieval_grid_k', 5, 'K of --retrieval_grid.')
  flags.DEFINE_string('compilation_cache', None, cli.COMPILATION_CACHE_HELP)
  status = rundir.define_run_flags(sys.argv[1:], example='--config.dataset.data_dir=/data')
  if status:
    return status

  def _main(argv):
    cli.reject_arguments(argv)
    FLAGS = flags.FLAGS  # pylint: disable=invalid-name
    # Multi-host (--config.train.distributed=True or METRIX_DISTRIBUTED=1 on every host): before device queries.
    sharding.maybe_initialize_distributed(FLAGS.config.train.distributed)
    cli.configure_logging(verbose_libraries=FLAGS.verbose_libraries)
    cli.enable_compilation_cache(FLAGS.compilation_cache)  # before the first compilation

    def work():
      config_lib.validate(FLAGS.config, check_files=False)
      run(
        FLAGS.workdir,
        checkpoint=FLAGS.checkpoint,
        config=FLAGS.config,
        out_dir=FLAGS.out_dir,
        with_utilization=FLAGS.utilization,
        with_positivity=FLAGS.positivity,
        retrieval_grid=FLAGS.retrieval_grid,
        retrieval_grid_k=FLAGS.retrieval_grid_k,
      )

    return cli.run_user_command(work)

  app.run(_main, flags_parser=cli.parse_flags)  # exits with _main's return value
  return 0


if __name__ == '__main__':
  sys.exit(main())
