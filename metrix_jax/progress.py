"""Progress reporting: training throughput and ETA between log lines, and ETA lines for long loops (embedding).

`TrainTimer` counts the steps run since the last log line and the time they took, with evaluation and checkpoint
time excluded (`with timer.paused():`), so images/s is the train step's rate and the ETA extrapolates it.
`LoopProgress` logs `<what>: done/total (rate, ETA)` at most every `every_s` seconds, so a loop that takes
minutes (embedding an evaluation set) never looks hung.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

log = logging.getLogger(__name__)


def format_eta(seconds: float) -> str:
  """Seconds -> 'H:MM:SS' (negative -> 0:00:00, NaN/inf -> '?')."""
  if not math.isfinite(seconds):
    return '?'
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


class TrainTimer:
  """Images/s of the train steps between log lines (the first, compiling step excluded) and over the run."""

  def __init__(self, batch_size: int):
    self.batch_size = int(batch_size)
    self._since: float | None = None  # when the current window started (after the first step)
    self._steps = 0  # steps in the current window
    self._paused = 0.0  # seconds of evaluation / saving inside the current window
    self.total_images = 0
    self.total_seconds = 0.0

  @property
  def started(self) -> bool:
    return self._since is not None

  def start(self) -> None:
    """Call once the first (compiling) step has finished: the timed windows begin here."""
    self._since = time.time()

  def count_step(self) -> None:
    if self._since is not None:
      self._steps += 1

  @contextlib.contextmanager
  def paused(self):
    """Time spent inside is excluded from the rate (evaluation, checkpoint saves)."""
    start = time.time()
    try:
      yield
    finally:
      self._paused += time.time() - start

  def window(self) -> tuple[float, float]:
    """(images/s, steps/s) of the window since the last call (NaN when no step was timed); starts a new window."""
    if self._since is None:
      return math.nan, math.nan
    elapsed = time.time() - self._since - self._paused
    rates = (math.nan, math.nan)
    if self._steps and elapsed > 0:
      rates = (self._steps * self.batch_size / elapsed, self._steps / elapsed)
      self.total_images += self._steps * self.batch_size
      self.total_seconds += elapsed
    self._since, self._steps, self._paused = time.time(), 0, 0.0
    return rates

  @property
  def images_per_second(self) -> float:
    """Over every timed window of the run (NaN before the first one)."""
    return self.total_images / self.total_seconds if self.total_seconds > 0 else math.nan


class LoopProgress:
  """`update(n)` after each item batch; logs '<what>: done/total (x/s, ETA)' at most every `every_s` seconds."""

  def __init__(
    self,
    what: str,
    total: int | None,
    *,
    unit: str = 'images',
    every_s: float = 10.0,
    logger: logging.Logger | None = None,
  ):
    self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
    self.done = 0
    self._log = logger or log
    self._start = self._last = time.time()

  def update(self, count: int) -> None:
    self.done += int(count)
    now = time.time()
    if now - self._last < self.every_s:
      return
    self._last = now
    rate = self.done / max(now - self._start, 1e-9)
    if self.total:
      self._log.info(
        '%s: %d/%d %s (%.0f/s, ETA %s)',
        self.what,
        self.done,
        self.total,
        self.unit,
        rate,
        format_eta((self.total - self.done) / rate if rate > 0 else math.inf),
      )
    else:
      self._log.info('%s: %d %s (%.0f/s)', self.what, self.done, self.unit, rate)
