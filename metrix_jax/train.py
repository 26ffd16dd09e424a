"""The training loop: `train_and_evaluate(config, workdir)`.

config -> data iterators (`input_pipeline`) -> jitted step (`step`: loss + Metrix) -> this loop -> run directory
(`rundir`: config.json, checkpoints/, metrics.jsonl + TensorBoard events, results.json). The run resumes from the
latest checkpoint in WORKDIR (model, optimiser, RNG, step, data iterator): the continuation equals an
uninterrupted run. SIGTERM (pre-emption) saves a checkpoint after the step in flight and stops; rerunning the same
command resumes. Evaluation (Recall@K, MAP@R, R-Precision on the test split(s)) runs every
`train.eval_every_epochs` and at the end.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from metrix_jax import checkpointing
from metrix_jax import cli
from metrix_jax import config_lib
from metrix_jax import embedding
from metrix_jax import evaluation
from metrix_jax import input_pipeline
from metrix_jax import metric_writers
from metrix_jax import optim
from metrix_jax import progress
from metrix_jax import rundir
from metrix_jax import sharding
from metrix_jax import step as step_lib

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  pass


class _PreemptionFlag:
  """SIGTERM (pre-emption) and the first Ctrl-C set `requested`: the loop checkpoints after the step in flight and
  stops. A second Ctrl-C exits at once with status 130 (what was saved stays; the steps since are lost)."""

  def __init__(self):
    self.requested = False
    self._interrupted = False
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self._interrupted:  # the second Ctrl-C: abort now, whatever is running (a
      # KeyboardInterrupt raised here could land in a garbage-collection callback and be swallowed)
      print(
        'aborted by a second Ctrl-C: the steps since the last checkpoint are lost; rerun the same command to resume.',
        file=sys.stderr,
        flush=True,
      )
      os._exit(cli.EXIT_INTERRUPTED)  # pylint: disable=protected-access
    if signum == signal.SIGINT:
      self._interrupted = True
      log.warning('Ctrl-C: saving a checkpoint after this step and stopping (Ctrl-C again aborts at once).')
    else:
      log.warning('SIGTERM: saving a checkpoint after this step and stopping.')
    self.requested = True

  def should_stop(self, step: int, every: int) -> bool:
    """Every step on one process; on several, every `every` steps and by agreement (all stop at one step)."""
    if jax.process_count() == 1:
      return self.requested
    if step % every:
      return False
    return bool(np.any(multihost_utils.process_allgather(np.asarray([self.requested]))))

  def restore(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


class _FiniteCheck:
  """Checks the (loss, grad norm) of the steps since the last check at once (one device sync per window)."""

  def __init__(self, workdir: str, last_good: int | None):
    self.workdir, self.last_good = workdir, last_good
    self.last_loss = math.nan
    self._pending: list[tuple[int, jax.Array]] = []

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self._pending.append((step, jnp.stack([metrics['loss'], metrics['grad_norm']])))

  def check(self) -> None:
    """NonFiniteLossError naming the step, the checked window and the last finite checkpoint."""
    if not self._pending:
      return
    values = jax.device_get([v for _, v in self._pending])
    for (s, _), v in zip(self._pending, values):
      if not np.all(np.isfinite(v)):
        if self.last_good is None:
          where = 'no checkpoint was written before it, so rerunning starts over'
        else:
          where = (
            f'last finite checkpoint: {rundir.checkpoint_dir(self.workdir)}/{self.last_good}; rerunning resumes from it'
          )
        raise NonFiniteLossError(
          f'Loss became {float(v[0])} (gradient norm {float(v[1])}) at step {s} (checked window: steps '
          f'{self._pending[0][0]}-{self._pending[-1][0]}; {where}). Lower --config.optim.lr or check the data.'
        )
    self.last_loss = float(values[-1][0])
    self._pending = []


def evaluate(state: step_lib.TrainState, embed_fn, data: input_pipeline.DataBundle, config, mesh) -> dict[str, float]:
  """{'recall@K', 'map_at_r', 'r_precision'} on the test split(s): leave-one-out, or query -> gallery (In-Shop)."""
  embedded = embedding.embed_splits(
    embed_fn, state.variables(), data.eval_sets(), mesh, int(config.dataset.eval_max_images)
  )
  result = evaluation.split_retrieval_metrics(embedded, tuple(config.dataset.recall_ks))
  return {
    **{f'recall@{k}': float(v) for k, v in result['recall'].items()},
    'map_at_r': float(result['map_at_r']),
    'r_precision': float(result['r_precision']),
  }


def _results(
  config, step: int, spe: int, final: dict[str, float], best, train_loss: float, images_per_second: float, wall_s: float
) -> dict[str, Any]:
  """results.json of a finished run: the last step's metrics, throughput, and the variant that produced them."""
  return {
    'dataset': config.dataset.name,
    'loss': config.loss.name,
    'mix': config.mix.mode,
    'steps': int(step),
    'epochs': step / spe,
    'train_loss': train_loss,
    'recall': {k.split('@')[1]: v for k, v in final.items() if k.startswith('recall@')},
    'map_at_r': final.get('map_at_r'),
    'r_precision': final.get('r_precision'),
    'images_per_second': images_per_second,
    'wall_s': wall_s,
    'model_selection': 'last step (the recall above); best-on-test below is optimistic (spec defect 8)',
    'best_on_test': None if best is None else {'step': best[0], **best[1]},
    'variant': {
      'loss_hparams': config.loss[config.loss.name].to_dict(),
      'mix': config.mix.to_dict() if config.mix.mode != 'none' else {'mode': 'none'},
      'model': {
        'depth': config.model.depth,
        'pretrained': config_lib.optional(config.model.pretrained),
        'embedding_dim': config.model.embedding_dim,
        'dtype': config.model.dtype,
        'bn_freeze': config.model.bn_freeze,
      },
      'optim': config.optim.to_dict(),
      'batch_size': config.train.batch_size,
      'seed': config.seed,
      'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.process_count()} process(es))',
    },
  }


def _percent(metrics: dict[str, float], *, recall_only: bool = False) -> str:
  """'recall@1 15.54  recall@2 22.49 ...' (values in %), or 'R@1 15.54  R@2 22.49' with recall_only."""
  if recall_only:
    return '  '.join(f'R@{k.split("@")[1]} {100 * v:.2f}' for k, v in metrics.items() if k.startswith('recall@'))
  return '  '.join(f'{k} {100 * v:.2f}' for k, v in metrics.items())


def _log_step(writer, timer: progress.TrainTimer, config, scalars, step: int, total: int, spe: int) -> None:
  images_per_second, steps_per_second = timer.window()  # NaN in a window without a timed step (after compiling)
  lrs = optim.learning_rates(config.optim, steps_per_epoch=spe, total_steps=total, step=step - 1)
  rate = {} if math.isnan(images_per_second) else {'images_per_second': images_per_second}
  writer.write_scalars(step, {**{k: float(v) for k, v in scalars.items()}, **rate, 'epoch': step / spe, **lrs})
  losses = f'loss {scalars["loss"]:.4f} (clean {scalars["clean_loss"]:.4f}, mix {scalars["mix_loss"]:.4f})'
  speed = '-' if math.isnan(images_per_second) else f'{images_per_second:.1f}'
  eta = progress.format_eta((total - step) / steps_per_second)
  log.info('step %d/%d (epoch %.2f)  %s  %s img/s  ETA %s', step, total, step / spe, losses, speed, eta)


class _Profiler:
  """A jax.profiler trace of `config.train.profile_steps` steps, starting after the first log line."""

  def __init__(self, config, step: int, directory: str):
    every = config.train.log_every_steps
    self.start, self.count, self.directory = (step // every + 1) * every, int(config.train.profile_steps), directory

  def after_step(self, step: int, metrics) -> None:
    if not self.count or step not in (self.start, self.start + self.count):
      return
    if step == self.start:
      jax.profiler.start_trace(self.directory)
      return
    jax.block_until_ready(metrics['loss'])
    jax.profiler.stop_trace()
    log.info(
      'profiled steps %d-%d -> %s (tensorboard --logdir %s)', self.start + 1, step, self.directory, self.directory
    )


class _Setup(NamedTuple):
  mesh: Any
  data: input_pipeline.DataBundle
  steps_per_epoch: int
  total_steps: int
  model: Any
  state: step_lib.TrainState
  step_fn: Callable
  checkpointer: checkpointing.Checkpointer
  restored_step: int | None


def _setup(config, workdir: str, data_factory, model_factory) -> _Setup:
  """Mesh, data, model, loss, optimiser, jitted step, and the state (restored from the latest checkpoint)."""
  mesh = sharding.make_mesh()
  sharding.log_startup(mesh)
  per_host = sharding.per_host_batch_size(config.train.batch_size, mesh)
  sharding.per_host_batch_size(config.dataset.eval_batch_size, mesh)  # checks divisibility
  data = (data_factory or input_pipeline.build_train_data)(config)
  spe = config_lib.steps_per_epoch(data.num_train_images, config.train.batch_size)
  total = config_lib.total_steps(config, spe)
  model, loss_fn = (model_factory or embedding.create_model)(config), step_lib.create_loss(config)

  tx_factory = step_lib.optimizer_factory(config, spe, total)
  state = step_lib.init_state(config, model, loss_fn, tx_factory, data.num_train_classes, mesh)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  log.info(
    '%s + %s loss, mix=%s; %s parameters; global batch %d (%d per host); %d steps/epoch, %d steps.',
    f'ResNet-{config.model.depth}',
    config.loss.name,
    config.mix.mode,
    f'{num_params:,}',
    config.train.batch_size,
    per_host,
    spe,
    total,
  )
  ckpt = checkpointing.Checkpointer(rundir.checkpoint_dir(workdir), keep=config.train.keep)
  state, latest, damaged = ckpt.restore_newest_readable(
    state, data_iterator=data.train_iterator, quarantine=rundir.quarantine_dir(workdir)
  )
  for error in damaged:
    log.warning('%s; moved aside to %s (not deleted).', error, error.moved_to or 'nowhere (remote workdir)')
  if latest is not None:
    log.info('Resumed from %s/%d (step %d of %d).', rundir.checkpoint_dir(workdir), latest, latest, total)
  elif damaged:
    log.warning('No readable checkpoint is left: training starts from step 0.')
  step_fn = step_lib.make_train_step(config, model, loss_fn, tx_factory(state.params), mesh)
  return _Setup(mesh, data, spe, total, model, state, step_fn, ckpt, latest)


def _check_workdir(config, workdir: str, allow_config_change: bool) -> dict[str, Any] | None:
  """Before any work: the workdir is usable and holds the same config (or an allowed change: the earlier records
  kept); returns the stored results when the run has already finished (nothing to train), else None."""
  rundir.prepare_workdir(workdir)
  trained_to = rundir.trained_step(workdir)
  changes = rundir.check_config(workdir, config, step=trained_to, allow_change=allow_config_change)
  finished = rundir.finished_results(workdir, config)
  if finished is not None:
    log.info(
      'This run has finished (step %d; %s/%s): R@%s. Nothing to train%s. Evaluate it again with '
      '`python -m metrix_jax.evaluate --workdir=%s`.',
      finished['steps'],
      workdir,
      rundir.RESULTS_FILE,
      '  R@'.join(f'{k} {100 * v:.2f}' for k, v in finished['recall'].items()),
      ' (the changed config is not applied)' if changes else '',
      workdir,
    )
    return finished
  if changes:
    kept = rundir.archive_records(workdir, trained_to)
    log.warning(
      'config changed after step %d (--allow_config_change; kept %s): %s',
      trained_to,
      ', '.join(kept),
      '; '.join(changes),
    )
  return None


def train_and_evaluate(
  config,
  workdir: str,
  *,
  data_factory: Callable[[Any], input_pipeline.DataBundle] | None = None,
  model_factory: Callable[[Any], Any] | None = None,
  stop_after_steps: int | None = None,
  allow_config_change: bool = False,
) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its latest checkpoint) and returns the results dict.

  A finished run returns its stored results.json (nothing is retrained or re-evaluated). A run that continues
  checkpoints trained with another config stops with cli.UserError unless `allow_config_change` (`rundir.check_config`).
  Test seams: `data_factory(config) -> DataBundle` replaces the project's pipelines, `model_factory(config)` the
  EmbeddingNet; `stop_after_steps` stops (with a checkpoint) as a pre-emption would.
  """
  config_lib.validate(config)
  start_time = time.time()
  workdir = metric_writers.resolve_workdir(workdir)  # local: absolute path; gs://...: as given
  finished = _check_workdir(config, workdir, allow_config_change)
  if finished is not None:
    return finished
  mesh, data, spe, total, model, state, step_fn, ckpt, latest = _setup(config, workdir, data_factory, model_factory)
  writer = metric_writers.MetricWriter(workdir)
  writer.write_config(config)
  step, embed_fn = int(state.step), embedding.make_embed_fn(model, config, mesh)
  eval_every, nan_every = int(config.train.eval_every_epochs) * spe, int(config.train.nan_check_every_steps)
  finite, timer = _FiniteCheck(workdir, latest), progress.TrainTimer(config.train.batch_size)
  profiler = _Profiler(config, step, os.path.join(writer.local_dir, 'profile'))
  history: dict[str, Any] = {'eval': {}, 'best': None}

  def save(step, metrics=None):
    with timer.paused():
      finite.check()
      extra = {'epoch': step / spe, 'dataset': config.dataset.name}
      ckpt.save(step, state, data_iterator=data.train_iterator, metrics=metrics, extra=extra)
      finite.last_good = step
      writer.flush()

  def run_eval(step):
    with timer.paused():
      t0 = time.time()
      metrics = evaluate(state, embed_fn, data, config, mesh)
      history['eval'][step] = metrics
      if history['best'] is None or metrics['recall@1'] > history['best'][1]['recall@1']:
        history['best'] = (step, metrics)
      writer.write_scalars(step, {f'eval/{k}': v for k, v in metrics.items()})
      log.info('eval @ step %d (epoch %.2f, %.1fs): %s', step, step / spe, time.time() - t0, _percent(metrics))
    return metrics

  log.info('compiling the train step (first step)...')
  compile_start, stop_at = time.time(), total if stop_after_steps is None else min(total, int(stop_after_steps))
  preempted = _PreemptionFlag()
  try:
    while step < stop_at and not preempted.should_stop(step, config.train.log_every_steps):
      local = next(data.train_iterator)
      state, metrics = step_fn(state, sharding.global_batch({'image': local['image'], 'label': local['label']}, mesh))
      step += 1
      finite.add(step, metrics)
      if nan_every and step % nan_every == 0:
        finite.check()
      profiler.after_step(step, metrics)
      if not timer.started:
        jax.block_until_ready(metrics['loss'])
        log.info('compiled and ran the first step in %.1fs.', time.time() - compile_start)
        timer.start()
      else:
        timer.count_step()
      is_last = step == total
      if step % config.train.log_every_steps == 0 or is_last:
        scalars = jax.device_get(metrics)
        finite.check()
        _log_step(writer, timer, config, scalars, step, total, spe)
      evaluated = run_eval(step) if is_last or (eval_every and step % eval_every == 0) else None
      if evaluated is not None or step % config.train.checkpoint_every_steps == 0 or is_last:
        save(step, evaluated)
    finite.check()
    if step < total:  # stopped early (pre-emption or stop_after_steps): checkpoint and leave
      if ckpt.latest_step() != step:
        save(step)
      log.info('Stopped at step %d/%d with a checkpoint; rerun the same command to resume.', step, total)
      writer.close()
      return {'stopped_at': step}
    if step not in history['eval']:  # resumed after the end (killed before results.json): evaluate the final state
      evaluated = run_eval(step)
      if step not in ckpt.all_steps():
        save(step, evaluated)
  finally:
    preempted.restore()
    ckpt.close()
    writer.flush()

  final, wall_s = history['eval'].get(step) or {}, time.time() - start_time
  results = _results(config, step, spe, final, history['best'], finite.last_loss, timer.images_per_second, wall_s)
  writer.write_json(rundir.RESULTS_FILE, results)
  writer.close()
  log.info(
    'results: %s  (%.1f img/s, %.0fs) -> %s/%s',
    _percent(final, recall_only=True),
    results['images_per_second'],
    wall_s,
    workdir,
    rundir.RESULTS_FILE,
  )
  return results
