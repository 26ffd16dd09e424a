"""The trainer end to end at tiny size: results.json, exact resume (also after SIGKILL and SIGTERM), 1 vs 4 devices,
multi-host.

Tiny stand-ins (tests/trainer_fakes.py: a 2-conv EmbeddingNet-shaped model, deterministic class-pattern data with a
checkpointable iterator) keep every run to seconds; `test_demo_config_end_to_end` runs the real demo config.
"""

import functools
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from metrix_jax import checkpointing
from metrix_jax import data as data_lib
from metrix_jax import losses
from metrix_jax import mixup
from metrix_jax import step as step_lib
from metrix_jax import train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trainer_fakes  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKES = os.path.join(ROOT, 'tests', 'trainer_fakes.py')
STEPS = 4


def _run(workdir, **kwargs):
  config = trainer_fakes.tiny_config(kwargs.pop('loss', 'contrastive'), kwargs.pop('mode', 'none'), steps=STEPS)
  return train.train_and_evaluate(
    config,
    str(workdir),
    data_factory=trainer_fakes.fake_data_factory(),
    model_factory=trainer_fakes.tiny_model_factory,
    **kwargs,
  )


def _final_params(workdir):
  ckpt = checkpointing.Checkpointer(os.path.join(str(workdir), 'checkpoints'))
  step = ckpt.latest_step()
  state = ckpt.restore_raw(step)
  ckpt.close()
  return step, state


def _logged_steps(workdir):
  """Steps with a train log line in metrics.jsonl (appended by every run in the workdir)."""
  return [l['step'] for l in map(json.loads, open(os.path.join(str(workdir), 'metrics.jsonl'))) if 'loss' in l]


def _subprocess(args, *, devices=1, env_extra=None, timeout=300, **popen):
  env = dict(
    os.environ,
    PYTHONPATH=ROOT,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
    **(env_extra or {}),
  )
  return subprocess.Popen(
    [sys.executable, FAKES] + [str(a) for a in args],
    env=env,
    cwd=ROOT,
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    **popen,
  )


def _wait_for_checkpoint(proc, workdir, *, step, poll_s, timeout_s=240):
  """Blocks until checkpoint `step` of the subprocess run in `workdir` is committed (fails if the run exits)."""
  committed = workdir / 'checkpoints' / str(step) / 'commit_success.txt'
  deadline = time.time() + timeout_s
  while not committed.exists():
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    assert time.time() < deadline, f'no checkpoint within {timeout_s} s'
    time.sleep(poll_s)


def _results_of(proc, timeout=300):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-4000:]
  line = [l for l in out.splitlines() if l.startswith('RESULTS ')][-1]
  return json.loads(line[len('RESULTS ') :]), out


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
  """STEPS steps without interruption (the reference of the resume and device-count tests)."""
  workdir = tmp_path_factory.mktemp('straight')
  results = _run(workdir)
  return workdir, results


def test_results_and_outputs(straight_run):
  workdir, results = straight_run
  with open(workdir / 'results.json') as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(results))
  for key in ('dataset', 'loss', 'mix', 'steps', 'train_loss', 'recall', 'images_per_second', 'wall_s', 'variant'):
    assert key in saved, key
  assert saved['steps'] == STEPS and saved['loss'] == 'contrastive' and saved['mix'] == 'none'
  assert set(saved['recall']) == {'1', '2'} and all(0 <= v <= 1 for v in saved['recall'].values())
  assert np.isfinite(saved['train_loss']) and saved['images_per_second'] > 0
  with open(workdir / 'config.json') as f:
    assert json.load(f)['train']['num_steps'] == STEPS
  lines = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  assert [l['step'] for l in lines if 'loss' in l] == list(range(1, STEPS + 1))
  assert any('eval/recall@1' in l for l in lines)
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))


@pytest.mark.slow
def test_resume_equals_straight_run(straight_run, tmp_path):
  ref_dir, ref = straight_run
  stopped = _run(tmp_path, stop_after_steps=STEPS // 2)
  assert stopped == {'stopped_at': STEPS // 2}
  resumed = _run(tmp_path)
  assert resumed['steps'] == STEPS and resumed['train_loss'] == ref['train_loss']
  assert _logged_steps(tmp_path) == list(range(1, STEPS + 1))  # steps 3-4 only: resumed, not restarted
  assert resumed['recall'] == ref['recall']
  (step_a, a), (step_b, b) = _final_params(ref_dir), _final_params(tmp_path)
  assert step_a == step_b == STEPS
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_resume_after_sigkill(straight_run, tmp_path):
  """Killed (SIGKILL) while stuck after the step-2 checkpoint; the rerun resumes and matches the straight run."""
  ref_dir, ref = straight_run
  proc = _subprocess([tmp_path, '--steps', STEPS, '--checkpoint-every', 2], env_extra={'METRIX_FAKE_DATA_HANG_AT': '3'})
  _wait_for_checkpoint(proc, tmp_path, step=2, poll_s=0.5)
  time.sleep(0.5)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  resumed = _run(tmp_path)  # in this process (no second interpreter start): the same command's continuation
  assert resumed['steps'] == STEPS
  assert _logged_steps(tmp_path) == list(range(1, STEPS + 1))  # steps 3-4 only: resumed, not restarted
  np.testing.assert_allclose(resumed['train_loss'], ref['train_loss'], rtol=1e-5)  # float32, another process
  (_, a), (_, b) = _final_params(ref_dir), _final_params(tmp_path)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), a, b)


@pytest.mark.slow
def test_sigterm_checkpoints_stops_cleanly_and_resumes(straight_run, tmp_path):
  """SIGTERM (a pre-emption notice) after the step-2 checkpoint: the run finishes the step in flight, saves a
  checkpoint there, exits 0 with the resume hint; the rerun continues to the straight run's parameters."""
  ref_dir, ref = straight_run
  proc = _subprocess(
    [tmp_path, '--steps', STEPS, '--checkpoint-every', 2], env_extra={'METRIX_FAKE_DATA_DELAY_S': '1.5'}
  )
  _wait_for_checkpoint(proc, tmp_path, step=2, poll_s=0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  assert 'SIGTERM: saving a checkpoint' in out and 'rerun the same command to resume' in out, out[-3000:]
  stopped_at = json.loads([l for l in out.splitlines() if l.startswith('RESULTS ')][-1][len('RESULTS ') :])
  assert stopped_at['stopped_at'] in (2, 3), stopped_at  # the step in flight when the signal came
  assert _final_params(tmp_path)[0] == stopped_at['stopped_at']
  resumed = _run(tmp_path)
  assert resumed['steps'] == STEPS
  assert _logged_steps(tmp_path) == list(range(1, STEPS + 1))
  np.testing.assert_allclose(resumed['train_loss'], ref['train_loss'], rtol=1e-5)  # float32, another process
  (_, a), (_, b) = _final_params(ref_dir), _final_params(tmp_path)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), a, b)


@pytest.mark.slow
def test_four_devices_match_one(straight_run, tmp_path):
  _, ref = straight_run
  four, out = _results_of(_subprocess([tmp_path, '--steps', STEPS], devices=4))
  assert '4 x cpu' in four['variant']['devices'], out[-2000:]
  np.testing.assert_allclose(four['train_loss'], ref['train_loss'], rtol=1e-4, atol=1e-4)
  for k, v in ref['recall'].items():
    assert abs(four['recall'][k] - v) < 1e-6


def test_nan_loss_stops_and_leaves_the_last_good_checkpoint(tmp_path):
  """lr = 1e30 blows the loss up within a few steps: a clear error naming the step and the last checkpoint whose
  steps all had finite losses; that checkpoint is on disk and finite, and no later one was written."""
  config = trainer_fakes.tiny_config(steps=6)
  config.optim.lr = 1e30
  config.optim.schedule = 'constant'
  config.optim.warmup_epochs = 0
  config.train.checkpoint_every_steps = 1
  with pytest.raises(train.NonFiniteLossError, match=r'at step \d+ \(checked window: steps') as info:
    train.train_and_evaluate(
      config,
      str(tmp_path),
      data_factory=trainer_fakes.fake_data_factory(),
      model_factory=trainer_fakes.tiny_model_factory,
    )
  message = str(info.value)
  bad_step = int(message.split(' at step ')[1].split()[0])
  assert 'Lower --config.optim.lr' in message
  last_good, state = _final_params(tmp_path)
  assert last_good == bad_step - 1 and f'checkpoints/{last_good}' in message, message
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state['params']))


# ----------------------------------------------------------------------------------------------------------------
# Every loss x mix mode: two jitted steps of the real train step at tiny size.
# ----------------------------------------------------------------------------------------------------------------
MIX_MODES = ('none', 'input', 'feature', 'embedding')


@pytest.fixture(scope='module')
def tiny_variables():
  """The tiny model's variables at 16 px (shared by every loss)."""
  config = trainer_fakes.tiny_config()
  model = trainer_fakes.tiny_model_factory(config)
  return model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))


@pytest.mark.parametrize('loss', sorted(losses.LOSS_NAMES))
def test_every_loss_and_mix_mode_runs_two_steps(loss, tiny_variables):
  """Two optimiser steps of `step.train_step` for each mix mode (one jit per loss holding the four modes):
  finite, objective = clean + w * mixed, and the clean term equals the loss evaluated directly on a plain forward
  of the same images (the step's plumbing of parameters, proxies and heads). BN runs on its running statistics
  (bn_freeze) so that the clean embeddings do not depend on the mode."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from metrix_jax import optim  # pylint: disable=g-import-not-at-top

  config = trainer_fakes.tiny_config(loss)
  config.model.bn_freeze = True
  config.optim.warmup_epochs = 0
  config.mix.input_items_per_anchor = 2
  model, loss_fn = trainer_fakes.tiny_model_factory(config), step_lib.create_loss(config)
  params = {'backbone': tiny_variables['params']['backbone'], 'head': tiny_variables['params']['head']}
  if loss_fn.uses_proxies:
    # the loss's own proxies: [12 * K, D] (K rows per class for SoftTriple / sub-center ArcFace); for Proxy Anchor
    # and ProxyNCA exactly losses.init_proxies(key, 12, D)
    params['proxies'] = loss_fn.init_proxies(jax.random.key(1), 12, config.model.embedding_dim)
  tx = optim.make_optimizer(config.optim, params=params, steps_per_epoch=8, total_steps=16)
  state = step_lib.TrainState(
    step=jnp.zeros([], jnp.int32),
    params=params,
    batch_stats=tiny_variables['batch_stats'],
    opt_state=tx.init(params),
    rng=jax.random.key_data(jax.random.key(2)),
  )
  steps = {}
  for mode in MIX_MODES:
    config.mix.mode = mode
    steps[mode] = functools.partial(
      step_lib.train_step,
      model=model,
      loss_fn=loss_fn,
      tx=tx,
      mix=step_lib.mix_settings(config.mix),
      train_bn=False,
      dtype=jnp.float32,
    )

  @jax.jit
  def step_per_mode(states, batch):  # one compilation holding the four modes' steps, run twice
    out = {mode: step(states[mode], batch) for mode, step in steps.items()}
    return {mode: s for mode, (s, _) in out.items()}, {mode: m for mode, (_, m) in out.items()}

  data = trainer_fakes.FakeTrainIterator(seed=0, batch_size=8, image_size=16, num_classes=12)
  batch1, batch2 = next(data), next(data)
  images = np.asarray(data_lib.normalize_images(batch1['image'], jnp.float32))
  embeddings, _ = model.apply(tiny_variables, images, train=False)
  expected_clean = float(loss_fn(embeddings, batch1['label'], params.get('proxies')))
  states, metrics1 = step_per_mode({mode: state for mode in steps}, batch1)
  states, metrics2 = step_per_mode(states, batch2)
  states, metrics1, metrics2 = jax.device_get((states, metrics1, metrics2))
  results = {mode: (states[mode].step, states[mode].params, metrics1[mode], metrics2[mode]) for mode in steps}
  for mode, (step, new_params, m1, m2) in results.items():
    for m in (m1, m2):
      assert all(np.isfinite(v) for v in m.values()), (mode, m)
      np.testing.assert_allclose(
        m['loss'], m['clean_loss'] + config.mix.weight * m['mix_loss'], rtol=1e-5, atol=1e-6, err_msg=mode
      )
    np.testing.assert_allclose(m1['clean_loss'], expected_clean, rtol=1e-5, atol=1e-6, err_msg=mode)
    assert (m1['mix_loss'] == 0.0) == (mode == 'none'), (mode, m1)
    assert int(step) == 2
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - np.asarray(b)))), new_params, params)
    assert max(jax.tree.leaves(moved['head'])) > 0, mode
    if loss_fn.uses_proxies:
      assert moved['proxies'] > 0, mode


@pytest.mark.parametrize(
  'loss,train_bn', [('multi_similarity', False), ('multi_similarity', True), ('contrastive', True)]
)
def test_input_level_step_equals_two_explicit_forwards(loss, train_bn, tiny_variables):
  """Input-level Metrix in the step == the objective on (clean forward, forward of the mixed images built by hand
  in float64 from the plan), with MS mined on the clean embeddings of that same forward (no third pass). With
  trainable BN the mixed images use their own batch statistics and the running statistics follow the clean
  images only."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  config = trainer_fakes.tiny_config(loss, 'input')
  config.mix.input_items_per_anchor = 2
  model, loss_fn = trainer_fakes.tiny_model_factory(config), step_lib.create_loss(config)
  mix = step_lib.mix_settings(config.mix)
  batch = next(trainer_fakes.FakeTrainIterator(seed=3, batch_size=8, image_size=16, num_classes=12))
  images, labels, key = data_lib.normalize_images(batch['image'], jnp.float32), batch['label'], jax.random.key(7)
  params = dict(tiny_variables['params'])
  loss_value, (new_stats, parts) = jax.jit(
    functools.partial(step_lib.compute_loss, model=model, loss_fn=loss_fn, mix=mix, train_bn=train_bn)
  )(params, tiny_variables['batch_stats'], images, labels, key)

  def forward(x):
    if train_bn:
      (emb, _), updates = model.apply(tiny_variables, x, train=True, mutable=['batch_stats'])
      return emb, updates['batch_stats']
    emb, _ = model.apply(tiny_variables, x, train=False)
    return emb, tiny_variables['batch_stats']

  clean, clean_stats = forward(images)
  plan = mixup.plan_for(key, loss_fn, labels, mix, embeddings=clean)  # MS: mined on this clean forward
  assert plan.first.shape == (8 * 2,)
  x, lam = np.asarray(images, np.float64), np.asarray(plan.lam, np.float64)
  mixed_images = np.stack(
    [lam[m] * x[int(plan.first[m])] + (1 - lam[m]) * x[int(plan.second[m])] for m in range(lam.shape[0])]
  )
  mixed, _ = forward(jnp.asarray(mixed_images, jnp.float32))
  expected, expected_parts = mixup.objective(
    loss_fn, clean, labels, plan, mixed_embeddings=mixed, weight=config.mix.weight
  )
  np.testing.assert_allclose(parts['clean_loss'], expected_parts['clean'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(parts['mix_loss'], expected_parts['mixed'], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(loss_value, expected, rtol=1e-4, atol=1e-6)
  assert float(parts['mix_loss']) > 0
  # float32 BN statistics from two differently compiled graphs: rtol 1e-5.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new_stats, clean_stats)


def test_consecutive_steps_draw_different_mixing_plans(tiny_variables):
  """The step's key is fold_in(base key, step): two steps from the same parameters on the same batch draw
  different plans (different mixed terms, the same clean term), each equal to the objective recomputed from
  `mixup.plan_for` with that step's key. (Dropping the fold_in would mix the same pairs with the same lambda at
  every step.)"""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from metrix_jax import optim  # pylint: disable=g-import-not-at-top

  config = trainer_fakes.tiny_config('contrastive', 'embedding')
  config.model.bn_freeze = True
  model, loss_fn = trainer_fakes.tiny_model_factory(config), step_lib.create_loss(config)
  params = {'backbone': tiny_variables['params']['backbone'], 'head': tiny_variables['params']['head']}
  tx = optim.make_optimizer(config.optim, params=params, steps_per_epoch=8, total_steps=16)
  base = jax.random.key(2)
  mix = step_lib.mix_settings(config.mix)
  step_fn = jax.jit(
    functools.partial(
      step_lib.train_step, model=model, loss_fn=loss_fn, tx=tx, mix=mix, train_bn=False, dtype=jnp.float32
    )
  )
  batch = next(trainer_fakes.FakeTrainIterator(seed=0, batch_size=8, image_size=16, num_classes=12))
  embeddings, _ = model.apply(tiny_variables, data_lib.normalize_images(batch['image']), train=False)
  got = {}
  for step in (0, 1):
    state = step_lib.TrainState(
      step=jnp.asarray(step, jnp.int32),
      params=params,
      opt_state=tx.init(params),
      batch_stats=tiny_variables['batch_stats'],
      rng=jax.random.key_data(base),
    )
    _, metrics = step_fn(state, batch)
    plan = mixup.plan_for(jax.random.fold_in(base, step), loss_fn, batch['label'], mix, embeddings=embeddings)
    _, expected = mixup.objective(loss_fn, embeddings, batch['label'], plan, weight=mix.weight)
    np.testing.assert_allclose(metrics['mix_loss'], expected['mixed'], rtol=1e-4, atol=1e-6)
    got[step] = (float(metrics['clean_loss']), float(metrics['mix_loss']))
  assert got[0][0] == pytest.approx(got[1][0], rel=1e-5)
  assert abs(got[0][1] - got[1][1]) > 1e-4, got


def test_query_gallery_evaluation_and_keep_best_mid_run(tmp_path):
  """In-Shop protocol in the trainer (query -> gallery) at every mid-run evaluation: the logged Recall@K equals
  `evaluation.recall_at_k` on the checkpoint's embeddings, and the best-R@1 checkpoint is kept with its metrics."""
  from metrix_jax import evaluation, rundir  # pylint: disable=g-import-not-at-top

  config = trainer_fakes.tiny_config(steps=0)  # train by epochs
  config.train.num_epochs = 2
  config.train.eval_every_epochs = 1  # 32 fake train images / batch 8 = 4 steps per epoch: evaluations at 4 and 8
  config.train.keep = 1
  config.train.checkpoint_every_steps = 2
  factory = trainer_fakes.fake_data_factory(num_train_images=32, gallery=True)
  results = train.train_and_evaluate(
    config, str(tmp_path), data_factory=factory, model_factory=trainer_fakes.tiny_model_factory
  )
  evals = [l for l in map(json.loads, open(tmp_path / 'metrics.jsonl')) if 'eval/recall@1' in l]
  assert [l['step'] for l in evals] == [4, 8]
  best = max(evals, key=lambda l: l['eval/recall@1'])  # the first one on ties, as the trainer
  assert results['best_on_test']['step'] == best['step']
  assert results['best_on_test']['recall@1'] == best['eval/recall@1']
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'))
  kept = ckpt.all_steps()
  assert 8 in kept and len(kept) <= 2, kept  # keep=1 latest + the best by R@1
  assert max(ckpt.metrics(s)['recall@1'] for s in kept) == best['eval/recall@1']
  ckpt.close()
  trained = rundir.load_trained_model(
    str(tmp_path), checkpoint=8, config=config, model_factory=trainer_fakes.tiny_model_factory
  )
  sets = factory(config).eval_sets()
  embedded = {}
  for split in ('query', 'gallery'):
    batches = sets[split]
    images = np.concatenate([b['image'][b['mask']] for b in batches])
    embedded[split] = (
      np.asarray(trained.model.apply(trained.variables, data_lib.normalize_images(images), train=False)[0], np.float64),
      np.concatenate([b['label'][b['mask']] for b in batches]),
    )
  expected = evaluation.recall_at_k(
    embedded['query'][0],
    embedded['query'][1],
    (1, 2),
    gallery_embeddings=embedded['gallery'][0],
    gallery_labels=embedded['gallery'][1],
  )
  assert {int(k): v for k, v in results['recall'].items()} == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# The real entry point on the real demo data (few steps, a slice of the test split).
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_config_end_to_end_via_main(tmp_path):
  workdir = tmp_path / 'demo'
  cmd = [
    sys.executable,
    '-m',
    'metrix_jax.main',
    '--config=configs/demo.py',
    f'--workdir={workdir}',
    '--config.loss.name=multi_similarity',
    '--config.mix.mode=feature',
    '--config.train.num_steps=2',
    '--config.train.batch_size=16',
    '--config.dataset.classes_per_batch=4',
    '--config.dataset.eval_max_images=200',
    '--config.dataset.eval_batch_size=100',
    '--config.train.log_every_steps=1',
  ]
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=600)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-4000:]
  assert 'step 2/2' in out and 'results: R@1' in out, out[-3000:]
  with open(workdir / 'results.json') as f:
    results = json.load(f)
  assert (results['dataset'], results['loss'], results['mix'], results['steps']) == (
    'demo',
    'multi_similarity',
    'feature',
    2,
  )
  assert set(results['recall']) == {'1', '2', '4', '8'}
  assert all(0.0 <= v <= 1.0 for v in results['recall'].values())
  assert np.isfinite(results['train_loss']) and results['wall_s'] > 0
  assert results['variant']['mix']['mode'] == 'feature'
  assert (workdir / 'checkpoints' / '2').is_dir() and (workdir / 'config.json').exists()


def test_main_rejects_a_bad_value_before_any_work(tmp_path):
  cmd = [
    sys.executable,
    '-m',
    'metrix_jax.main',
    '--config=configs/demo.py',
    f'--workdir={tmp_path}',
    '--config.mix.mode=features',
  ]
  proc = subprocess.run(
    cmd,
    cwd=ROOT,
    env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'),
    text=True,
    capture_output=True,
    timeout=300,
  )
  assert proc.returncode == 2
  assert "mix.mode='features'" in proc.stderr and 'feature' in proc.stderr and 'embedding' in proc.stderr
  assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Multi-host: two processes (one CPU device each) joined by jax.distributed over localhost.
# ----------------------------------------------------------------------------------------------------------------
def _free_port():
  import socket  # pylint: disable=g-import-not-at-top

  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_over_localhost_match_one(straight_run, tmp_path):
  """Per-host input slices + jax.distributed (gloo CPU collectives): same loss and recall as one process."""
  if not hasattr(jax.distributed, 'initialize'):
    pytest.skip('this jax has no jax.distributed.initialize')
  _, ref = straight_run
  port = _free_port()
  procs = [
    _subprocess(
      [tmp_path, '--steps', STEPS, '--distributed'],
      devices=1,
      env_extra={'METRIX_COORDINATOR': f'127.0.0.1:{port}', 'METRIX_NUM_PROCESSES': '2', 'METRIX_PROCESS_ID': str(i)},
    )
    for i in range(2)
  ]
  try:
    outs = [_results_of(p) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for results, out in outs:
    assert '2 x cpu' in results['variant']['devices'] and '2 process' in results['variant']['devices'], out[-2000:]
    np.testing.assert_allclose(results['train_loss'], ref['train_loss'], rtol=1e-4, atol=1e-4)
    for k, v in ref['recall'].items():
      assert abs(results['recall'][k] - v) < 1e-6
  assert (tmp_path / 'results.json').exists()  # written by process 0 only
