"""The launchers parse (bash -n), print their usage, and in dry-run print the exact commands they would run."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHERS = ('launch/multi_gpu.sh', 'launch/tpu_pod.sh')
pytestmark = pytest.mark.skipif(shutil.which('bash') is None, reason='bash is not installed')


def _bash(*args, env=None):
  return subprocess.run(
    ['bash', *args], cwd=ROOT, env=dict(os.environ, **(env or {})), text=True, capture_output=True, timeout=60
  )


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


def test_tpu_pod_dry_run_runs_on_every_worker(tmp_path):
  env = {
    'DRY_RUN': '1',
    'TPU_NAME': 'pod',
    'ZONE': 'us-central2-b',
    'CONFIG': 'configs/sop.py:ms,feature',
    'WORKDIR': 'gs://bucket/sop',
    'DATA_DIR': 'gs://bucket/tfds',
  }
  proc = _bash(os.path.join(ROOT, 'launch/tpu_pod.sh'), 'all', '--config.train.batch_size=128', env=env)
  assert proc.returncode == 0, proc.stderr
  lines = [l for l in proc.stdout.splitlines() if l.startswith('+ ')]
  assert lines[0].startswith('+ gcloud compute tpus tpu-vm create pod --zone=us-central2-b --accelerator-type=v4-32')
  run = [l for l in lines if 'metrix_jax.main' in l]
  assert len(run) == 1 and '--worker=all' in run[0] and 'METRIX_DISTRIBUTED=1' in run[0]
  assert (
    "'--config=configs/sop.py:ms,feature' '--workdir=gs://bucket/sop' '--config.train.batch_size=128' "
    "'--config.dataset.data_dir=gs://bucket/tfds'"
  ) in run[0]
  assert any('gcloud storage cp gs://bucket/sop/results.json' in l for l in lines)
  missing = _bash('launch/tpu_pod.sh', 'create', env={'TPU_NAME': '', 'ZONE': 'z'})
  assert missing.returncode != 0 and 'TPU_NAME' in missing.stderr
