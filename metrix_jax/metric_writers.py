"""Metrics to disk, process 0 only: TensorBoard scalars (tensorboardX: no TensorFlow) + `metrics.jsonl`.

    tensorboard --logdir WORKDIR        # loss, lr, images/s, Recall@K (NaN values stay NaN there)
    WORKDIR/metrics.jsonl               # one JSON object per write: {"step": ..., "loss": ..., ...}
    WORKDIR/config.json                 # the resolved config of the run
    WORKDIR/results.json                # the final numbers (`write_json`)

Every JSON file goes through `metrix_jax.jsonio`: strict JSON, NaN/inf written as null.

WORKDIR may be a cloud path (gs://bucket/run, for TPU pods: every host sees the same checkpoints). Objects there
cannot be appended to, so TensorBoard events and metrics.jsonl are then written to a local mirror
(`local_dir`, under $TMPDIR) and copied to WORKDIR at every `flush()`/`close()`.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any, Mapping

import jax

from metrix_jax import jsonio

is_remote = jsonio.is_remote  # gs://bucket/run -> True


def resolve_workdir(workdir: str) -> str:
  """Absolute local path (with ~ expanded), or the cloud path unchanged."""
  workdir = str(workdir)
  return workdir.rstrip('/') if is_remote(workdir) else os.path.abspath(os.path.expanduser(workdir))


def _tensorboard_value(value: Any) -> float | None:
  """A Python or numpy/jax scalar as a float for TensorBoard (NaN stays NaN); None for anything else."""
  if hasattr(value, 'item') and getattr(value, 'size', 1) == 1:
    value = value.item()
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  return None


class MetricWriter:
  """Writes scalars to TensorBoard and metrics.jsonl in `workdir`; a no-op on processes other than 0."""

  def __init__(self, workdir: str, *, enabled: bool | None = None, tensorboard: bool = True):
    self.workdir = resolve_workdir(workdir)
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.local_dir = self.workdir
    if is_remote(self.workdir):
      self.local_dir = os.path.join(tempfile.gettempdir(), 'metrix_' + re.sub(r'[^A-Za-z0-9_.-]+', '_', self.workdir))
    self._tb = None
    self._jsonl = None
    if self.enabled:
      os.makedirs(self.local_dir, exist_ok=True)
      self._jsonl = open(os.path.join(self.local_dir, 'metrics.jsonl'), 'a', buffering=1)
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

        self._tb = SummaryWriter(logdir=self.local_dir, flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """One metrics.jsonl line {"step": step, **scalars} (NaN/inf -> null) and, per numeric value (Python or
    numpy/jax scalar), one TensorBoard scalar at `step` (NaN kept: TensorBoard shows it)."""
    if not self.enabled:
      return
    self._jsonl.write(jsonio.jsonl_line({'step': int(step), **scalars}))
    if self._tb is not None:
      for name, value in scalars.items():
        value = _tensorboard_value(value)
        if value is not None:
          # TensorBoard names allow [A-Za-z0-9_./-]: 'eval/recall@1' -> 'eval/recall_1' (tensorboardX would
          # rename it too, logging a line per name and step).
          self._tb.add_scalar(name.replace('@', '_'), value, int(step))

  def write_config(self, config) -> None:
    self.write_json('config.json', config.to_dict() if hasattr(config, 'to_dict') else dict(config))

  def write_json(self, name: str, payload: Mapping[str, Any]) -> str | None:
    """WORKDIR/name (e.g. results.json) through `jsonio.write_json`: strict JSON, atomic locally, one object
    write on cloud storage. Returns the path written (None when disabled)."""
    if not self.enabled:
      return None
    path = f'{self.workdir}/{name}' if is_remote(self.workdir) else os.path.join(self.workdir, name)
    return jsonio.write_json(path, payload)

  def _sync_remote(self) -> None:
    """Copies the local mirror (events, metrics.jsonl) to a cloud workdir."""
    if not (self.enabled and is_remote(self.workdir)):
      return
    from etils import epath  # pylint: disable=g-import-not-at-top

    target = epath.Path(self.workdir)
    for name in os.listdir(self.local_dir):
      source = os.path.join(self.local_dir, name)
      if os.path.isfile(source):
        (target / name).write_bytes(open(source, 'rb').read())

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()
    self._sync_remote()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    self._sync_remote()
