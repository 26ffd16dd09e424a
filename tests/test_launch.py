"""The launchers parse (bash -n), print their usage, and in dry-run print the exact commands they would run; the TPU
pod launcher's preflight (benchmarks/tpu_aot.py) stops a run whose step cannot fit or whose batch cannot split
before anything is created."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHERS = ('launch/multi_gpu.sh', 'launch/tpu_pod.sh')
pytestmark = pytest.mark.skipif(shutil.which('bash') is None, reason='bash is not installed')


def _bash(*args, env=None):
  return subprocess.run(
    ['bash', *args], cwd=ROOT, env=dict(os.environ, **(env or {})), text=True, capture_output=True, timeout=120
  )


# The preflight runs this interpreter (metrix_jax installed) and never compiles here (AOT_COMPILE=no: the recorded
# table; where libtpu is installed it would otherwise compile, minutes).
PREFLIGHT_ENV = {'PYTHON': sys.executable, 'AOT_COMPILE': 'no'}


@pytest.mark.parametrize('path', LAUNCHERS)
def test_syntax_and_usage(path):
  assert _bash('-n', path).returncode == 0, _bash('-n', path).stderr
  helped = _bash(path, '--help')
  assert helped.returncode == 0 and 'Usage: launch/' in helped.stdout, helped.stdout + helped.stderr
  bare = _bash(path)
  assert bare.returncode == 2 and 'Usage: launch/' in bare.stdout


def test_multi_gpu_dry_run_passes_overrides_through():
  proc = _bash(
    'launch/multi_gpu.sh', 'configs/cub200.py:ms,feature', '/tmp/w', '--config.mix.alpha=1.0', env={'DRY_RUN': '1'}
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == (
    'python -m metrix_jax.main --config=configs/cub200.py:ms,feature --workdir=/tmp/w --config.mix.alpha=1.0'
  )


TPU_ENV = {
  'DRY_RUN': '1',
  'TPU_NAME': 'pod',
  'ZONE': 'us-central2-b',
  'CONFIG': 'configs/sop.py:ms,feature',
  'WORKDIR': 'gs://bucket/sop',
  'DATA_DIR': 'gs://bucket/tfds',
  **PREFLIGHT_ENV,
}
BATCH_160 = ('--config.train.batch_size=160', '--config.dataset.classes_per_batch=32')


def test_tpu_pod_dry_run_runs_on_every_worker(tmp_path):
  proc = _bash(os.path.join(ROOT, 'launch/tpu_pod.sh'), 'all', *BATCH_160, env=TPU_ENV)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  preflight = [l for l in proc.stdout.splitlines() if l.startswith('preflight:')]
  assert preflight and 'v4-32 (16 chips of TPU v4, 32 GiB HBM each)' in preflight[0], proc.stdout
  assert 'global batch 160 (10/chip)' in preflight[0]
  lines = [l for l in proc.stdout.splitlines() if l.startswith('+ ')]
  assert lines[0].startswith('+ gcloud compute tpus tpu-vm create pod --zone=us-central2-b --accelerator-type=v4-32')
  assert proc.stdout.index('preflight:') < proc.stdout.index('+ gcloud compute tpus tpu-vm create')
  run = [l for l in lines if 'metrix_jax.main' in l]
  assert len(run) == 1 and '--worker=all' in run[0] and 'METRIX_DISTRIBUTED=1' in run[0]
  assert (
    "'--config=configs/sop.py:ms,feature' '--workdir=gs://bucket/sop' '--config.train.batch_size=160' "
    "'--config.dataset.classes_per_batch=32' '--config.dataset.data_dir=gs://bucket/tfds'"
  ) in run[0]
  assert any('gcloud storage cp gs://bucket/sop/results.json' in l for l in lines)
  missing = _bash('launch/tpu_pod.sh', 'create', env={'TPU_NAME': '', 'ZONE': 'z'})
  assert missing.returncode != 0 and 'TPU_NAME' in missing.stderr


def _no_gcloud(proc):
  return not any(l.startswith('+ ') for l in proc.stdout.splitlines())


def test_tpu_pod_preflight_prints_the_recorded_memory_row_and_stops_what_cannot_fit():
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import tpu_aot  # pylint: disable=g-import-not-at-top

  fitting = [k for k, v in tpu_aot.RECORDED.items() if v[1]]
  too_big = [k for k, v in tpu_aot.RECORDED.items() if not v[1]]
  if not fitting or not too_big:
    pytest.skip('the recorded AOT table has no fitting / non-fitting row')

  def launch(key):
    family, chips, loss, mix, bn, batch, size, depth, dtype = key
    accelerator = f'{family}-{2 * chips}' if family in ('v4', 'v5p') else f'{family}-{chips}'
    args = [f'--config.train.batch_size={batch}', f'--config.dataset.classes_per_batch={batch // 5}']
    args += [f'--config.model.dtype={dtype}', f'--config.model.depth={depth}', f'--config.dataset.image_size={size}']
    recipe = {'multi_similarity': 'ms', 'contrastive': 'contrastive', 'proxy_anchor': 'pa'}[loss]
    env = dict(TPU_ENV, ACCELERATOR=accelerator, CONFIG=f'configs/sop.py:{recipe},{mix}')
    return _bash('launch/tpu_pod.sh', 'create', *args, env=env), tpu_aot.RECORDED[key]

  proc, (gib, _, hbm) = launch(fitting[0])
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert f'recorded AOT compile: {gib:.2f} GiB per chip of {hbm:g} GiB HBM' in proc.stdout
  assert '+ gcloud compute tpus tpu-vm create' in proc.stdout
  proc, (gib, _, hbm) = launch(too_big[0])
  assert proc.returncode == 3, proc.stdout + proc.stderr
  assert 'DOES NOT FIT' in proc.stdout and 'nothing was created' in proc.stderr and _no_gcloud(proc)


def test_tpu_pod_preflight_stops_mistakes_before_creating_anything():
  split = _bash('launch/tpu_pod.sh', 'all', *BATCH_160, env=dict(TPU_ENV, ACCELERATOR='v4-128'))  # 64 chips
  assert split.returncode == 2 and _no_gcloud(split), split.stdout + split.stderr
  assert 'does not split over the 64 chips of v4-128' in split.stdout
  unknown = _bash('launch/tpu_pod.sh', 'create', env=dict(TPU_ENV, ACCELERATOR='v4-100'))
  assert unknown.returncode == 2 and _no_gcloud(unknown) and 'supported: v4-8' in unknown.stdout
  invalid = _bash('launch/tpu_pod.sh', 'create', '--config.train.batch_size=128', env=TPU_ENV)  # 20 x 5 != 128
  assert invalid.returncode == 2 and _no_gcloud(invalid) and 'classes_per_batch' in invalid.stdout
  skipped = _bash('launch/tpu_pod.sh', 'create', env=dict(TPU_ENV, PREFLIGHT='0'))
  assert skipped.returncode == 0 and 'preflight: skipped (PREFLIGHT=0)' in skipped.stdout
  assert '+ gcloud compute tpus tpu-vm create' in skipped.stdout
