"""metrix_jax.progress: ETA formatting, the train timer's windows (paused time excluded) and loop progress lines."""

import logging
import math

import pytest

from metrix_jax import progress


def test_format_eta():
  assert progress.format_eta(0) == '0:00:00'
  assert progress.format_eta(3723.9) == '1:02:03'
  assert progress.format_eta(-5) == '0:00:00'
  assert progress.format_eta(math.nan) == '?' and progress.format_eta(math.inf) == '?'


def test_train_timer_excludes_the_first_step_and_paused_time(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(progress.time, 'time', lambda: now[0])
  timer = progress.TrainTimer(batch_size=8)
  timer.count_step()  # the compiling step: not timed
  assert all(math.isnan(v) for v in timer.window())
  timer.start()
  for _ in range(4):  # 4 steps of 0.5 s
    now[0] += 0.5
    timer.count_step()
  with timer.paused():  # an evaluation of 10 s inside the window
    now[0] += 10.0
  images_per_second, steps_per_second = timer.window()
  assert images_per_second == pytest.approx(4 * 8 / 2.0) and steps_per_second == pytest.approx(2.0)
  now[0] += 1.0
  timer.count_step()  # a second window: 1 step in 1 s
  assert timer.window()[0] == pytest.approx(8.0)
  assert timer.images_per_second == pytest.approx(40 / 3.0)  # over both windows: 40 images in 3 s


def test_loop_progress_logs_at_most_every_interval(monkeypatch, caplog):
  now = [0.0]
  monkeypatch.setattr(progress.time, 'time', lambda: now[0])
  meter = progress.LoopProgress('embedding test', 100, every_s=10.0)
  with caplog.at_level(logging.INFO, logger='metrix_jax.progress'):
    for _ in range(7):
      now[0] += 4.0
      meter.update(10)
  lines = [r.getMessage() for r in caplog.records]
  # 4, 8 s: quiet; 12 s: a line (30 of 100 at 2.5/s -> ETA 28 s); 16, 20 s: quiet; 24 s: a line (ETA 16 s)
  assert lines == [
    'embedding test: 30/100 images (2/s, ETA 0:00:28)',
    'embedding test: 60/100 images (2/s, ETA 0:00:16)',
  ]
  assert meter.done == 70
