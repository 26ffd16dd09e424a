"""Mesh, batch sharding and host-local -> global batches (multi-device cases run in test_train's subprocesses)."""
import jax
import numpy as np
import pytest

from metrix_jax import sharding


def test_mesh_and_global_batch():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ('data',) and mesh.devices.size == jax.device_count()
  n = jax.device_count()
  local = {'image': np.arange(4 * n * 2 * 2 * 3, dtype=np.uint8).reshape(4 * n, 2, 2, 3),
           'label': np.arange(4 * n, dtype=np.int32)}
  batch = sharding.global_batch(local, mesh)
  assert batch['image'].shape == (4 * n * jax.process_count(), 2, 2, 3)
  assert batch['label'].sharding == sharding.batch_sharding(mesh)
  np.testing.assert_array_equal(np.asarray(batch['label']), local['label'])


def test_batch_size_must_split_over_devices():
  mesh = sharding.make_mesh()
  assert sharding.per_host_batch_size(8 * jax.device_count(), mesh) == 8 * jax.device_count()
  if jax.device_count() > 1:
    with pytest.raises(ValueError, match='divisible'):
      sharding.per_host_batch_size(jax.device_count() + 1, mesh)


def test_distributed_is_opt_in(monkeypatch):
  monkeypatch.delenv('METRIX_DISTRIBUTED', raising=False)
  assert not sharding.distributed_requested(False)
  assert sharding.maybe_initialize_distributed(False) is False
  monkeypatch.setenv('METRIX_DISTRIBUTED', '1')
  assert sharding.distributed_requested(False)
