"""Smoke tests of the benchmark scripts (tiny sizes, CPU): tables print, numbers are finite. No timing assertions.

The PyTorch reference's written-out Multi-Similarity loss is checked against pytorch-metric-learning.
"""

import math
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

torch = pytest.importorskip('torch')


def test_torch_reference_ms_loss_matches_pytorch_metric_learning():
  pml = pytest.importorskip('pytorch_metric_learning')
  from pytorch_metric_learning import losses, miners  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top

  del pml
  hp = torch_reference.MS_HPARAMS
  reference = losses.MultiSimilarityLoss(alpha=hp['alpha'], beta=hp['beta'], base=hp['base'])
  miner = miners.MultiSimilarityMiner(epsilon=hp['epsilon'])
  generator = torch.Generator().manual_seed(0)
  for trial in range(4):
    e = torch.nn.functional.normalize(torch.randn(20, 6, generator=generator, dtype=torch.float64), dim=1)
    y = torch.randint(0, 4, (20,), generator=generator)
    y[0] = 99  # an anchor without positives
    if trial == 3:
      y[:] = 1  # no negatives at all: every term empty
    expected = float(reference(e, y, miner(e, y)))
    got = float(torch_reference.multi_similarity_loss(e, y, **hp))
    assert math.isclose(got, expected, rel_tol=1e-10, abs_tol=1e-12), (trial, got, expected)


def test_torch_reference_step_runs_and_learns_nothing_from_frozen_bn():
  import torch_reference  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  model = torch_reference.EmbeddingNet(depth=18)
  bn = model.backbone.bn1
  stats = (bn.running_mean.clone(), bn.weight.clone())
  step = torch_reference.make_step(model, variant='fp32')
  images = torch_reference.normalized_nchw(np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), np.uint8))
  labels = torch.arange(10) // 5
  before = model.linear.weight.detach().clone()
  loss = step(images, labels)
  assert math.isfinite(float(loss.detach()))
  assert not torch.equal(before, model.linear.weight)  # the head trains
  torch.testing.assert_close(bn.running_mean, stats[0], rtol=0, atol=0)  # bn_freeze: statistics frozen
  torch.testing.assert_close(bn.weight, stats[1], rtol=0, atol=0)  # warm-up 0 + bn_freeze: gamma frozen
  with pytest.raises(ValueError, match='valid choices: fp32, bf16_cl'):
    torch_reference.make_step(model, variant='fp16')


@pytest.mark.slow
def test_bench_train_quick_prints_a_finite_table(capsys, tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  import bench_train  # pylint: disable=g-import-not-at-top

  out = tmp_path / 'rows.json'
  rows = bench_train.main(
    [
      '--quick',
      '--losses=ms',
      '--modes=none,feature',
      '--torch=fp32',
      '--dtype=float32',
      '--e2e_workers=0',
      '--e2e_photos=40',
      f'--data_dir={tmp_path / "data"}',
      f'--json_out={out}',
    ]
  )
  printed = capsys.readouterr().out
  assert '| framework | loss | mix |' in printed and '| jax | multi_similarity | feature | 16 |' in printed
  kinds = {(r['framework'], r['mix']) for r in rows}
  assert kinds == {
    ('torch', 'none (fp32)'),
    ('jax', 'none'),
    ('jax', 'feature'),
    ('jax', 'eval embed'),
    ('jax', 'feature, end to end (0 workers)'),
  }
  assert 'end to end (grain pipeline' in printed
  for r in rows:
    assert math.isfinite(r['images_per_s']) and r['images_per_s'] > 0 and math.isfinite(r['loss_value'])
  feature = [r for r in rows if r['mix'] == 'feature'][0]
  assert math.isfinite(feature['overhead_pct']) and feature['vs_torch_fp32'] > 0
  clean = [r for r in rows if r['framework'] == 'jax' and r['mix'] == 'none'][0]
  assert clean['flops'] > 1e8 and feature['flops'] > clean['flops']  # XLA's cost model: Metrix adds work
  assert 0 < feature['flop_overhead_pct'] < 50 and '| GFLOP/step (XLA) |' in printed
  assert json.loads(out.read_text())['rows'][0]['framework'] == 'torch'


@pytest.mark.slow
def test_bench_train_compile_only_reports_flops_without_running(capsys):
  import bench_train  # pylint: disable=g-import-not-at-top

  rows = bench_train.main(
    ['--quick', '--compile_only', '--losses=contrastive', '--modes=none,embedding', '--dtype=float32']
  )
  assert [(r['framework'], r['mix']) for r in rows] == [('jax', 'none'), ('jax', 'embedding')]
  assert all(r['images_per_s'] is None and r['loss_value'] is None and r['flops'] > 1e8 for r in rows)
  assert 0 <= rows[1]['flop_overhead_pct'] < 5  # embedding-level Metrix: no extra backbone work
  assert 'overhead_pct' not in rows[1] and '| jax | contrastive | embedding | 16 | - | - |' in capsys.readouterr().out


def test_bench_train_rejects_unknown_levels():
  import bench_train  # pylint: disable=g-import-not-at-top

  with pytest.raises(SystemExit):
    bench_train.parse_args(['--modes=pixel'])
  with pytest.raises(SystemExit, match='valid choices'):
    bench_train.parse_args(['--losses=triplet'])


def test_first_step_timing_stops_at_the_first_step_line_and_kills_the_run():
  """bench_train --first_step's timer: wall time to the trainer's 'compiled and ran the first step' line, the
  logged seconds, and the run (a stand-in that would sleep for a minute) killed right after."""
  import time  # pylint: disable=g-import-not-at-top

  import bench_train  # pylint: disable=g-import-not-at-top

  script = (
    'import sys, time\n'
    "print('I1130 train.py] compiling the train step (first step)...', file=sys.stderr, flush=True)\n"
    'time.sleep(0.5)\n'
    "print('I1130 train.py] compiled and ran the first step in 12.5s.', file=sys.stderr, flush=True)\n"
    'time.sleep(60)\n'
  )
  start = time.perf_counter()
  r = bench_train.run_to_first_step([sys.executable, '-c', script])
  assert r['logged_s'] == 12.5 and 0.5 <= r['wall_s'] < 30 and time.perf_counter() - start < 30
  with pytest.raises(RuntimeError, match='ended before its first step'):
    bench_train.run_to_first_step([sys.executable, '-c', "import sys; print('no step', file=sys.stderr)"])
  args = bench_train.parse_args(['--first_step', '--first_step_cache=cold'])
  command = bench_train.first_step_command(args, '/tmp/w', 'off')
  assert command[1:4] == ['-m', 'metrix_jax.main', '--config=configs/demo.py'] and '--compilation_cache=off' in command
