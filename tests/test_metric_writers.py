"""metrix_jax.metric_writers: metrics.jsonl / config.json / results.json are strict JSON with the values written
(NaN -> null), TensorBoard events appear, a disabled writer writes nothing, and a cloud workdir gets the files of
its local mirror."""

import json
import os
import tempfile

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from metrix_jax import jsonio
from metrix_jax import metric_writers


def _strict_loads(text):
  def reject(token):
    raise AssertionError(f'non-standard token {token}')

  return json.loads(text, parse_constant=reject)


def _lines(path):
  with open(path) as f:
    return [_strict_loads(line) for line in f]


def test_scalars_to_jsonl_and_tensorboard(tmp_path):
  writer = metric_writers.MetricWriter(str(tmp_path), enabled=True)
  writer.write_scalars(
    np.int64(1),
    {
      'loss': np.float32(0.5),
      'lr': 1e-3,
      'images_per_second': float('nan'),
      'eval/recall@1': jnp.float32(0.25),
      'count': np.int32(3),
    },
  )
  writer.write_scalars(2, {'loss': jnp.asarray(np.inf), 'note': 'text'})
  writer.close()
  assert _lines(tmp_path / 'metrics.jsonl') == [
    {'step': 1, 'loss': 0.5, 'lr': 1e-3, 'images_per_second': None, 'eval/recall@1': 0.25, 'count': 3},
    {'step': 2, 'loss': None, 'note': 'text'},
  ]
  events = [n for n in os.listdir(tmp_path) if n.startswith('events.out.tfevents')]
  assert len(events) == 1 and os.path.getsize(tmp_path / events[0]) > 0


def test_tensorboard_values_keep_nan():
  value = metric_writers._tensorboard_value  # pylint: disable=protected-access
  assert value(np.float32(0.5)) == 0.5 and value(jnp.int32(3)) == 3.0 and value(2) == 2.0
  assert np.isnan(value(float('nan'))) and np.isnan(value(jnp.asarray(np.nan)))
  assert value('text') is None and value(True) is None and value([1.0, 2.0]) is None


def test_jsonl_appends_across_writers(tmp_path):
  for step in (1, 2):
    writer = metric_writers.MetricWriter(tmp_path, enabled=True, tensorboard=False)
    writer.write_scalars(step, {'loss': float(step)})
    writer.close()
  assert _lines(tmp_path / 'metrics.jsonl') == [{'step': 1, 'loss': 1.0}, {'step': 2, 'loss': 2.0}]
  assert os.listdir(tmp_path) == ['metrics.jsonl']


def test_config_and_results_are_strict_json(tmp_path):
  writer = metric_writers.MetricWriter(tmp_path, enabled=True, tensorboard=False)
  config = ml_collections.ConfigDict(
    {'model': {'dtype': jnp.bfloat16, 'depth': 18}, 'optim': {'betas': (0.9, 0.999), 'clip': float('nan')}}
  )
  writer.write_config(config)
  path = writer.write_json(
    'results.json',
    {
      'recall': {1: np.float32(0.5)},
      'images_per_second': float('nan'),
      'wall_s': np.float64(12.5),
      'steps': np.int64(2),
    },
  )
  writer.close()
  assert path == os.path.join(str(tmp_path), 'results.json')
  with open(tmp_path / 'config.json') as f:
    assert _strict_loads(f.read()) == {
      'model': {'depth': 18, 'dtype': 'bfloat16'},
      'optim': {'betas': [0.9, 0.999], 'clip': None},
    }
  with open(tmp_path / 'results.json') as f:
    assert _strict_loads(f.read()) == {'recall': {'1': 0.5}, 'images_per_second': None, 'wall_s': 12.5, 'steps': 2}
  assert sorted(os.listdir(tmp_path)) == ['config.json', 'metrics.jsonl', 'results.json']  # no temp file left
  metric_writers.MetricWriter(tmp_path, enabled=True, tensorboard=False).write_config({'plain': (1, 2)})
  assert jsonio.read_json(tmp_path / 'config.json') == {'plain': [1, 2]}


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / 'run'
  writer = metric_writers.MetricWriter(workdir, enabled=False)
  writer.write_config(ml_collections.ConfigDict({'a': 1}))
  writer.write_scalars(1, {'loss': 1.0})
  assert writer.write_json('results.json', {'a': 1}) is None
  writer.flush()
  writer.close()
  assert not workdir.exists() and os.listdir(tmp_path) == []


def test_resolve_workdir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert metric_writers.resolve_workdir('runs/a') == str(tmp_path / 'runs' / 'a')
  assert metric_writers.resolve_workdir('~/runs/b/') == str(tmp_path / 'home' / 'runs' / 'b')
  assert metric_writers.resolve_workdir(tmp_path / 'c') == str(tmp_path / 'c')
  assert metric_writers.resolve_workdir('gs://bucket/run/') == 'gs://bucket/run'
  assert metric_writers.is_remote('gs://bucket/run') and not metric_writers.is_remote(str(tmp_path))


class _FakeCloudPath:
  """etils.epath.Path for gs://BUCKET/...: objects stored as files under ROOT/BUCKET/..."""

  root = None

  def __init__(self, path):
    self.path = str(path)

  def __truediv__(self, name):
    return _FakeCloudPath(f'{self.path}/{name}')

  def _local(self):
    assert self.path.startswith('gs://'), self.path
    return os.path.join(self.root, self.path[len('gs://') :])

  def write_bytes(self, data):
    os.makedirs(os.path.dirname(self._local()), exist_ok=True)
    with open(self._local(), 'wb') as f:
      f.write(data)

  def write_text(self, text):
    self.write_bytes(text.encode())


@pytest.fixture()
def fake_cloud(tmp_path, monkeypatch):
  from etils import epath

  monkeypatch.setattr(_FakeCloudPath, 'root', str(tmp_path / 'cloud'))
  monkeypatch.setattr(epath, 'Path', _FakeCloudPath)
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'tmp'))
  os.makedirs(tmp_path / 'tmp')
  return tmp_path


def test_cloud_workdir_mirrors_to_local_dir(fake_cloud):
  writer = metric_writers.MetricWriter('gs://bucket/study/run/', enabled=True)
  assert writer.workdir == 'gs://bucket/study/run'
  assert writer.local_dir == str(fake_cloud / 'tmp' / 'metrix_gs_bucket_study_run')
  writer.write_config({'seed': np.int64(3)})
  writer.write_scalars(1, {'loss': float('nan')})
  cloud = fake_cloud / 'cloud' / 'bucket' / 'study' / 'run'
  assert jsonio.read_json(cloud / 'config.json') == {'seed': 3}  # JSON files: one object write, at once
  assert not (cloud / 'metrics.jsonl').exists()  # appended locally, copied at flush/close
  writer.flush()
  assert _lines(cloud / 'metrics.jsonl') == [{'step': 1, 'loss': None}]
  writer.write_scalars(2, {'loss': 0.5})
  writer.write_json('results.json', {'r': np.float32(0.25)})
  writer.close()
  assert _lines(cloud / 'metrics.jsonl') == [{'step': 1, 'loss': None}, {'step': 2, 'loss': 0.5}]
  assert jsonio.read_json(cloud / 'results.json') == {'r': 0.25}
  assert any(n.startswith('events.out.tfevents') for n in os.listdir(cloud))
  assert sorted(os.listdir(writer.local_dir)) == sorted(
    n for n in os.listdir(cloud) if n != 'results.json' and n != 'config.json'
  )
