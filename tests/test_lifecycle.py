"""A run's lifecycle through the real command line (issue 14), one subprocess per user action.

`python -m metrix_jax.main` runs as a user runs it, with the tiny model and the fake data patched in (the loop,
checkpoints, config handling, signals and messages are the real ones): rerunning a finished run, a damaged
checkpoint, Ctrl-C (once, twice), a changed config, typos and unusable paths, a non-finite loss. Each test checks
the exit status, the first line of the message and what is on disk afterwards.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from metrix_jax import checkpointing

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
CONFIG = '--config=tests/tiny_run_config.py'


def _script(module):
  return (
    f'import sys; sys.path.insert(0, {TESTS!r})\n'
    'import trainer_fakes, test_cli\n'
    'from metrix_jax import embedding, input_pipeline\n'
    'embedding.create_model = trainer_fakes.tiny_model_factory\n'
    'input_pipeline.build_train_data = trainer_fakes.fake_data_factory()\n'
    'input_pipeline.build_eval_data = test_cli.fake_eval_data\n'
    f'from metrix_jax import {module}\n'
    f'sys.argv = ["{module}"] + sys.argv[1:]\n'
    + ('main.run()\n' if module == 'main' else f'sys.exit({module}.main())\n')
  )


def _env(extra=None):
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', **(extra or {}))


def _cli(module, *args, env=None, timeout=900):
  return subprocess.run(
    [sys.executable, '-c', _script(module), *args],
    capture_output=True,
    text=True,
    env=_env(env),
    cwd=ROOT,
    timeout=timeout,
  )


def _train(workdir, *args, env=None):
  return _cli('main', CONFIG, f'--workdir={workdir}', *args, env=env)


def _error_line(proc_or_stderr):
  """The first line of stderr that is not a log line (absl: 'I1130 ...', 'W1130 ...')."""
  stderr = proc_or_stderr if isinstance(proc_or_stderr, str) else proc_or_stderr.stderr
  lines = [l for l in stderr.splitlines() if l and not (l[0] in 'IWEF' and l[1:5].isdigit())]
  return lines[0] if lines else ''


def _digests(folder):
  """{relative path: sha256} of every file under `folder` (what must stay byte-identical)."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A finished 4-step run (checkpoints 2 and 4, results.json); tests copy it before changing anything."""
  workdir = tmp_path_factory.mktemp('finished') / 'run'
  proc = _train(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def _copy(finished, tmp_path):
  target = tmp_path / 'run'
  shutil.copytree(finished, target)
  return target


def test_rerunning_a_finished_run_prints_its_results_and_changes_nothing(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  before = _digests(workdir)
  proc = _train(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'This run has finished (step 4' in proc.stderr and 'Nothing to train' in proc.stderr
  assert 'Traceback' not in proc.stderr and 'compiling' not in proc.stderr  # no retraining, no re-evaluation
  assert _digests(workdir) == before


def test_a_damaged_newest_checkpoint_is_moved_aside_and_training_resumes_from_the_previous(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  os.remove(workdir / 'results.json')  # as if killed right after the last save
  for root, _, files in os.walk(workdir / 'checkpoints' / '4' / 'state'):
    for name in files:  # every data file: which one holds the parameters depends on Orbax's write concurrency
      if os.path.basename(root) == 'd':
        with open(os.path.join(root, name), 'r+b') as f:
          f.truncate(100)  # disk full / a killed copy
  kept_2 = _digests(workdir / 'checkpoints' / '2')
  proc = _cli('evaluate', f'--workdir={workdir}', '--checkpoint=latest')
  assert proc.returncode == 2
  assert _error_line(proc).startswith('error: checkpoint 4 is unreadable (') and '--checkpoint=2' in _error_line(proc)
  proc = _train(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  warnings = [l for l in proc.stderr.splitlines() if 'unreadable' in l]
  assert len(warnings) == 1 and 'checkpoint 4 is unreadable' in warnings[0] and 'moved aside' in warnings[0]
  assert 'Traceback' not in proc.stderr and 'Event loop is closed' not in proc.stderr
  assert 'Resumed from' in proc.stderr and '/checkpoints/2 (step 2 of 4)' in proc.stderr
  assert os.path.isdir(workdir / 'checkpoints_unreadable' / '4')  # moved aside, not deleted
  assert _digests(workdir / 'checkpoints' / '2') == kept_2
  assert json.load(open(workdir / 'results.json'))['steps'] == 4


def _start_slow(workdir, *args, delay_s=1.0):
  env = _env({'METRIX_FAKE_DATA_DELAY_S': str(delay_s)})
  return subprocess.Popen(
    [sys.executable, '-c', _script('main'), CONFIG, f'--workdir={workdir}', '--config.train.num_steps=40', *args],
    env=env,
    cwd=ROOT,
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
  )


def _wait_for_step(proc, workdir, step, timeout_s=240):
  deadline = time.time() + timeout_s
  jsonl = workdir / 'metrics.jsonl'
  while True:
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() < deadline
    if jsonl.exists() and any(json.loads(l).get('step', 0) >= step for l in open(jsonl) if 'loss' in l):
      return
    time.sleep(0.2)


def test_ctrl_c_saves_like_a_preemption_and_prints_the_resume_command(tmp_path):
  workdir = tmp_path / 'run'
  proc = _start_slow(workdir)
  _wait_for_step(proc, workdir, 3)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert 'Ctrl-C: saving a checkpoint after this step' in err and 'KeyboardInterrupt' not in err
  stopped = int(out.split('stopped at step ')[1].split()[0])
  assert stopped >= 3 and os.path.isdir(workdir / 'checkpoints' / str(stopped))
  assert 'to resume, rerun:' in out and f'--workdir={workdir}' in out


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
  workdir = tmp_path / 'run'
  # 4 s per data read: the second Ctrl-C comes while the step in flight still runs (not after the stop)
  proc = _start_slow(workdir, '--config.train.checkpoint_every_steps=1', delay_s=4.0)
  _wait_for_step(proc, workdir, 2)
  lines = []
  reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
  reader.start()
  time.sleep(1.0)  # inside the next 4 s data read, not between steps
  proc.send_signal(signal.SIGINT)
  deadline = time.time() + 120
  while not any('Ctrl-C: saving' in line for line in list(lines)):  # the first one is handled: now the second
    assert proc.poll() is None and time.time() < deadline, ''.join(lines)[-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  proc.wait(timeout=120)
  reader.join(timeout=60)
  err = ''.join(lines)
  assert proc.returncode == 130, err[-3000:]
  assert _error_line(err).startswith('aborted by a second Ctrl-C') and 'Traceback' not in err
  assert os.listdir(workdir / 'checkpoints')  # what was saved stays


def test_a_changed_config_stops_before_work_unless_allowed(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  before = _digests(workdir)
  proc = _train(workdir, '--config.optim.lr=0.01', '--config.train.num_steps=6')
  assert proc.returncode == 2
  line = _error_line(proc)
  assert line.startswith('error: ') and 'optim.lr: 0.001 -> 0.01' in line and 'train.num_steps: 4 -> 6' in line
  assert '--allow_config_change' in line
  assert _digests(workdir) == before  # nothing written
  proc = _train(workdir, '--config.train.log_every_steps=2')  # operational keys may change
  assert proc.returncode == 0 and 'This run has finished' in proc.stderr
  proc = _train(workdir, '--config.train.num_steps=6', '--allow_config_change')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'config changed after step 4' in proc.stderr and 'train.num_steps: 4 -> 6' in proc.stderr
  with open(workdir / 'config.4.json', 'rb') as f:  # the earlier record, byte for byte
    assert hashlib.sha256(f.read()).hexdigest() == before['config.json']
  with open(workdir / 'results.4.json', 'rb') as f:
    assert hashlib.sha256(f.read()).hexdigest() == before['results.json']
  assert json.load(open(workdir / 'config.json'))['train']['num_steps'] == 6
  assert json.load(open(workdir / 'results.json'))['steps'] == 6


@pytest.mark.parametrize(
  'args,first_line',
  [
    (('--config.train.num_step=5',), "error: a --config.KEY override names no key of the config: 'num_step'"),
    (('--config.train.num_steps=abc',), 'error: flag --config.train.num_steps=abc: invalid literal'),
    (('--config.mix.mode=features',), 'error: Invalid config'),
  ],
)
def test_config_mistakes_are_one_line_and_exit_2(tmp_path, args, first_line):
  proc = _train(tmp_path / 'run', *args)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert _error_line(proc).startswith(first_line), proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert not (tmp_path / 'run').exists()


def test_missing_config_file_and_unusable_workdirs(tmp_path):
  proc = _cli('main', '--config=configs/nope.py', f'--workdir={tmp_path}/run')
  assert (
    proc.returncode == 2
    and _error_line(proc) == 'error: the config file configs/nope.py does not exist (e.g. --config=configs/demo.py).'
  )
  (tmp_path / 'file').write_text('x')
  proc = _train(tmp_path / 'file')
  assert proc.returncode == 2 and _error_line(proc).startswith(f'error: --workdir={tmp_path}/file is a file')
  proc = _train(tmp_path / 'file' / 'sub')
  assert proc.returncode == 2 and _error_line(proc).startswith(f'error: --workdir={tmp_path}/file/sub cannot be used')
  assert 'Traceback' not in proc.stderr


def test_missing_data_names_the_manual_dir_flag(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'metrix_jax.main',
      '--config=configs/cars196.py',
      f'--workdir={tmp_path}/run',
      f'--config.dataset.manual_dir={empty}',
    ],
    capture_output=True,
    text=True,
    env=_env(),
    cwd=ROOT,
    timeout=300,
  )
  assert proc.returncode == 2
  assert _error_line(proc).startswith('error: cars196: the official archives are missing')
  assert '--config.dataset.manual_dir=DIR' in _error_line(proc) and 'Traceback' not in proc.stderr


def test_a_non_finite_loss_without_any_checkpoint_says_rerunning_starts_over(tmp_path):
  proc = _train(
    tmp_path / 'run',
    '--config.optim.lr=1e30',
    '--config.optim.schedule=constant',
    '--config.optim.warmup_epochs=0',
    '--config.train.checkpoint_every_steps=1000',
    '--config.train.num_steps=8',
  )
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert 'no checkpoint was written before it, so rerunning starts over' in proc.stderr
  assert 'last finite checkpoint' not in proc.stderr


def _logged_steps(workdir):
  jsonl = workdir / 'metrics.jsonl'
  return [json.loads(l)['step'] for l in open(jsonl) if 'loss' in l] if jsonl.exists() else []


@pytest.mark.slow
def test_sigkill_at_any_moment_loses_at_most_the_steps_since_the_last_save(tmp_path):
  """Killed (SIGKILL) at arbitrary moments of a run that saves every step (some kills land inside a save): each
  rerun resumes from a committed checkpoint and says which, and the run ends where the uninterrupted one ends."""
  args = ('--config.train.checkpoint_every_steps=1', '--config.train.num_steps=8')
  reference = tmp_path / 'straight'
  assert _train(reference, *args).returncode == 0
  workdir = tmp_path / 'run'
  for kill_after_s in (0.3, 0.7):  # 0.5 s per step: inside a step, a save or the next data read
    target = max(_logged_steps(workdir), default=0) + 1
    proc = subprocess.Popen(
      [sys.executable, '-c', _script('main'), CONFIG, f'--workdir={workdir}', *args],
      env=_env({'METRIX_FAKE_DATA_DELAY_S': '0.5'}),
      cwd=ROOT,
      text=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
    )
    _wait_for_step(proc, workdir, target)  # a new step trained by this process
    time.sleep(kill_after_s)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
  assert max(_logged_steps(workdir)) < 8  # the kills came before the end
  proc = _train(workdir, *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Resumed from' in proc.stderr and 'Traceback' not in proc.stderr
  assert json.load(open(workdir / 'results.json'))['steps'] == 8
  ckpts = [checkpointing.Checkpointer(str(d / 'checkpoints')) for d in (reference, workdir)]
  a, b = (c.restore_raw(8) for c in ckpts)
  for c in ckpts:
    c.close()
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a['params'], b['params'])
