"""Orbax checkpoints of a training run: model, optimiser, RNG, step and the data iterators' state.

One `ocp.CheckpointManager` under `WORKDIR/checkpoints/<step>/` with three items:

* `state`: the TrainState pytree (params, batch_stats, opt_state, rng, step), `StandardSave`; restored onto any
  mesh (the abstract target carries the shardings, so a run can resume on another device count);
* `data`: the train iterator state of every process (`JsonSave`, gathered from all hosts: each host restores its
  own entry);
* `meta`: step, epoch and the evaluation metrics of that step (`JsonSave`).

Retention: the last `keep` checkpoints plus the `keep_best` best by R@1 (checkpoints saved with metrics); both
policies at once through Orbax preservation policies. Saves are asynchronous; Orbax writes into a temporary
directory and renames it when complete, so a process killed mid-save leaves the previous checkpoints intact (the
half-written temporary directory is removed at the next start). Call `wait()` / `close()` before exiting.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Protocol

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

BEST_METRIC = 'recall@1'


class Checkpointable(Protocol):
  def get_state(self) -> Any: ...
  def set_state(self, state: Any) -> None: ...


def _encode_iterator_state(state: Any) -> dict[str, Any]:
  if isinstance(state, bytes):
    return {'format': 'bytes', 'value': state.decode('utf-8')}
  return {'format': 'json', 'value': state}


def _decode_iterator_state(entry: dict[str, Any]) -> Any:
  return entry['value'].encode('utf-8') if entry['format'] == 'bytes' else entry['value']


def _gather_strings(text: str) -> list[str]:
  """Every process's `text`, in process order (one string per process; identity on one process)."""
  if jax.process_count() == 1:
    return [text]
  data = np.frombuffer(text.encode('utf-8'), np.uint8)
  lengths = multihost_utils.process_allgather(np.asarray([data.size], np.int32))
  width = int(np.max(lengths))
  padded = np.zeros([width], np.uint8)
  padded[: data.size] = data
  gathered = multihost_utils.process_allgather(padded)
  return [bytes(gathered[i, : int(lengths[i, 0])]).decode('utf-8') for i in range(gathered.shape[0])]


def _preservation_options(keep: int, keep_best: int) -> dict[str, Any]:
  cm = getattr(ocp, 'checkpoint_managers', None)
  if cm is not None and hasattr(cm, 'AnyPreservationPolicy'):
    policy = cm.AnyPreservationPolicy(
      [
        cm.LatestN(n=keep),
        cm.BestN(
          get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=keep_best, keep_checkpoints_without_metrics=False
        ),
      ]
    )
    return {'preservation_policy': policy}
  log.warning(
    'This orbax-checkpoint has no preservation policies: keeping the last %d checkpoints only '
    '(the best-by-R@1 checkpoint may be deleted).',
    keep,
  )
  return {'max_to_keep': keep}


class _ExpectedReadOnlyWarnings(logging.Filter):
  """Drops the two warnings Orbax logs (through absl) for every read-only manager we open on purpose (evaluation,
  embedding, the trainer's look at a workdir); anything else Orbax says passes."""

  EXPECTED = ('CheckpointManagerOptions.read_only=True', 'Given directory is read only')

  def filter(self, record: logging.LogRecord) -> bool:
    return not (isinstance(record.msg, str) and record.msg.startswith(self.EXPECTED))


logging.getLogger('absl').addFilter(_ExpectedReadOnlyWarnings())


def _is_abandoned_read(unraisable: Any) -> bool:
  """True for the error a tensorstore read reports when it completes after the failed restore that started it
  has returned: its done-callback posts to the restore's asyncio loop, which is closed by then."""
  error, frame = unraisable.exc_value, unraisable.exc_traceback
  while frame is not None and frame.tb_next is not None:
    frame = frame.tb_next
  return (
    isinstance(error, RuntimeError)
    and str(error) == 'Event loop is closed'
    and frame is not None
    and frame.tb_frame.f_code.co_name == '_check_closed'
  )


def _drop_abandoned_read_errors() -> None:
  """Stops the reads a failed restore abandoned from printing one traceback each (dozens per damaged checkpoint).

  Orbax gathers the array reads of a restore and closes its event loop as soon as one read fails; every read still
  in flight then reports `RuntimeError: Event loop is closed` through `sys.unraisablehook`, seconds later and from a
  tensorstore thread. Those results are unwanted by construction, so they are counted at debug level; every other
  unraisable exception goes to the hook that was installed before. Installed once, by the first `Checkpointer`
  (before any restore: an abandoned read can report before the failed restore has returned).
  """
  previous = sys.unraisablehook
  if getattr(previous, 'drops_abandoned_reads', False):
    return

  def hook(unraisable):
    if _is_abandoned_read(unraisable):
      log.debug('Dropped the result of a checkpoint read abandoned by a failed restore.')
    else:
      previous(unraisable)

  hook.drops_abandoned_reads = True
  sys.unraisablehook = hook


class UnreadableCheckpointError(Exception):
  """Checkpoint `step` exists but does not read back (a truncated or missing file: disk full, a killed copy)."""

  def __init__(self, step: int, cause: BaseException):
    root = cause  # the innermost cause says what is wrong (e.g. 'Requested byte range ... of size 1000')
    while root.__cause__ is not None or root.__context__ is not None:
      root = root.__cause__ or root.__context__
    first_line = (str(root).strip().splitlines() or [''])[0]
    super().__init__(f'checkpoint {step} is unreadable ({type(root).__name__}: {first_line[:240]})')
    self.step, self.moved_to = int(step), None


class Checkpointer:
  """Save/restore of (state, data iterator states, metrics) under `directory`."""

  def __init__(
    self, directory: str, *, keep: int = 2, keep_best: int = 1, async_save: bool = True, read_only: bool = False
  ):
    # read_only (evaluation, embedding export): never writes, and leaves the temporary directory of a save in
    # progress alone (a training run may be writing into the same directory).
    self.directory = os.path.abspath(directory)
    if not read_only and os.path.isdir(self.directory):  # what a process killed while saving left (removed below)
      for name in sorted(os.listdir(self.directory)):
        if '.orbax-checkpoint-tmp' in name:
          log.warning('Discarding the unfinished save %s/%s (the process stopped while saving it).', directory, name)
    options = ocp.CheckpointManagerOptions(
      create=not read_only,
      cleanup_tmp_directories=not read_only,
      read_only=read_only,
      enable_async_checkpointing=async_save and not read_only,
      **_preservation_options(keep, keep_best),
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'data', 'meta'))
    _drop_abandoned_read_errors()  # before any restore: an abandoned read can report before the failure returns

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def best_step(self) -> int | None:
    """The kept step with the highest R@1 (None if no checkpoint has metrics)."""
    best, best_value = None, -np.inf
    for step in self.all_steps():
      try:
        metrics = self.metrics(step)
      except UnreadableCheckpointError:  # a damaged checkpoint is nobody's best
        continue
      if metrics and BEST_METRIC in metrics and metrics[BEST_METRIC] > best_value:
        best, best_value = step, metrics[BEST_METRIC]
    return best

  def metrics(self, step: int) -> dict[str, float] | None:
    """The evaluation metrics saved with checkpoint `step` (None if it was saved without)."""
    self._manager.wait_until_finished()
    try:
      meta = self._manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as error:  # pylint: disable=broad-except  # see _read
      raise UnreadableCheckpointError(step, error) from error
    return meta.get('metrics')

  def save(
    self,
    step: int,
    state: Any,
    *,
    data_iterator: Checkpointable | None = None,
    metrics: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
    force: bool = True,
  ) -> bool:
    """Starts an asynchronous save of `state` (+ every host's iterator state) at `step`; returns whether saved.

    Every process must call this (Orbax coordinates the hosts); only the primary host writes the JSON items.
    """
    iterator_state = '' if data_iterator is None else json.dumps(_encode_iterator_state(data_iterator.get_state()))
    per_process = _gather_strings(iterator_state)
    data = {'process_count': len(per_process), 'iterators': [json.loads(s) if s else None for s in per_process]}
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    meta = {'step': int(step), 'metrics': metrics, **(extra or {})}
    return self._manager.save(
      int(step),
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data), meta=ocp.args.JsonSave(meta)
      ),
      metrics=metrics,
      force=force,
    )

  def restore(
    self, step: int, abstract_state: Any, *, data_iterator: Checkpointable | None = None
  ) -> tuple[Any, dict[str, Any]]:
    """Restores the state at `step` into the structure/shardings of `abstract_state` and the iterator in place.

    `abstract_state`: a pytree of `jax.ShapeDtypeStruct` (with `.sharding`) or of arrays (their shardings are used).
    Returns (state, meta). A damaged checkpoint raises `UnreadableCheckpointError`.
    """
    restored = self._read(step, abstract_state)
    if data_iterator is not None:
      entries = restored['data']['iterators']
      if len(entries) != jax.process_count():
        raise ValueError(
          f'Checkpoint {self.directory}/{step} holds data-iterator states of {len(entries)} '
          f'processes but this run has {jax.process_count()}; resume with the same number of '
          f'hosts (the model and optimiser restore on any device count).'
        )
      entry = entries[jax.process_index()]
      if entry is None:
        raise ValueError(f'Checkpoint {self.directory}/{step} has no data-iterator state.')
      data_iterator.set_state(_decode_iterator_state(entry))
    return restored['state'], restored['meta']

  def _read(self, step: int, abstract_state: Any | None) -> dict[str, Any]:
    """Every item of checkpoint `step` (state into `abstract_state`'s structure, or raw when None)."""
    self._manager.wait_until_finished()
    target = None if abstract_state is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    args = ocp.args.Composite(
      state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
    )
    try:
      return self._manager.restore(int(step), args=args)
    except Exception as error:  # pylint: disable=broad-except  # tensorstore, OCDBT, JSON: damage shows many ways
      raise UnreadableCheckpointError(step, error) from error

  def restore_newest_readable(
    self, abstract_state: Any, *, data_iterator: Checkpointable | None = None, quarantine: str
  ) -> tuple[Any, int | None, list[UnreadableCheckpointError]]:
    """Restores the newest checkpoint that reads back; damaged newer ones are moved to `quarantine`/<step>.

    Returns (state or `abstract_state` when none is readable, its step or None, the damaged checkpoints' errors).
    Process 0 moves the folders (local checkpoints); every process skips the same steps.
    """
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, _ = self.restore(step, abstract_state, data_iterator=data_iterator)
        return state, step, damaged
      except UnreadableCheckpointError as error:
        damaged.append(error)
        if jax.process_index() == 0 and os.path.isdir(os.path.join(self.directory, str(step))):
          os.makedirs(quarantine, exist_ok=True)
          target = os.path.join(quarantine, str(step))
          suffix = 1
          while os.path.exists(target):  # an earlier quarantine of the same step: keep both
            target, suffix = os.path.join(quarantine, f'{step}.{suffix}'), suffix + 1
          os.replace(os.path.join(self.directory, str(step)), target)
          error.moved_to = target
        self._manager.reload()
    return abstract_state, None, damaged

  def restore_raw(self, step: int) -> Any:
    """The saved state as nested dicts of numpy/jax arrays, without a target (inspection, evaluation)."""
    return self._read(step, None)['state']

  def restore_params(self, step: int) -> tuple[dict[str, Any], Any]:
    """(params {'backbone', 'head'[, 'proxies']}, batch_stats) at `step`, without the optimiser (evaluation)."""
    state = self.restore_raw(step)
    return state['params'], state['batch_stats']

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
