"""Mesh, batch sharding and host-local -> global batches: in this process (any device count) and with 4 fake CPU
devices in a subprocess (conftest's fake_devices_runner), where the multi-device path really runs."""

import json

import jax
import numpy as np
import pytest

from metrix_jax import losses, sharding


def test_mesh_and_global_batch():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ('data',) and mesh.devices.size == jax.device_count()
  n = jax.device_count()
  local = {
    'image': np.arange(4 * n * 2 * 2 * 3, dtype=np.uint8).reshape(4 * n, 2, 2, 3),
    'label': np.arange(4 * n, dtype=np.int32),
  }
  batch = sharding.global_batch(local, mesh)
  assert batch['image'].shape == (4 * n * jax.process_count(), 2, 2, 3)
  assert batch['label'].sharding == sharding.batch_sharding(mesh)
  np.testing.assert_array_equal(np.asarray(batch['label']), local['label'])


def test_batch_size_must_split_over_devices():
  mesh = sharding.make_mesh()
  assert sharding.per_host_batch_size(8 * jax.device_count(), mesh) == 8 * jax.device_count()
  if jax.device_count() > 1:  # on 1 device: test_four_fake_devices checks the error
    with pytest.raises(ValueError, match='divisible'):
      sharding.per_host_batch_size(jax.device_count() + 1, mesh)


def test_distributed_is_opt_in(monkeypatch):
  monkeypatch.delenv('METRIX_DISTRIBUTED', raising=False)
  assert not sharding.distributed_requested(False)
  assert sharding.maybe_initialize_distributed(False) is False
  monkeypatch.setenv('METRIX_DISTRIBUTED', '1')
  assert sharding.distributed_requested(False)


BATCH, DIM, NUM_CLASSES = 16, 8, 4
LOSS_NAMES = ('multi_similarity', 'proxy_anchor')  # cross-device mining reductions; replicated proxies


def _data():
  rng = np.random.default_rng(0)
  embeddings = rng.normal(size=(BATCH, DIM)).astype(np.float32)
  embeddings[1] = embeddings[0] + 0.05 * rng.normal(size=DIM).astype(np.float32)  # a pair near the miner's rule
  labels = rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32)
  proxies = rng.normal(size=(NUM_CLASSES, DIM)).astype(np.float32)
  return embeddings, labels, proxies


def _value_and_grads(name, embeddings, labels, proxies):
  loss = losses.get(name)
  fn = lambda e, p: loss(e, labels, p if loss.uses_proxies else None)
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(embeddings, proxies)


_FOUR_DEVICES = """
    import json
    import jax
    import numpy as np
    from metrix_jax import sharding
    import test_sharding as t

    mesh = sharding.make_mesh()
    embeddings, labels, proxies = t._data()
    batch = sharding.global_batch({'embedding': embeddings, 'label': labels}, mesh)
    replicated = sharding.replicate({'proxies': proxies}, mesh)['proxies']
    out = {'device_count': jax.device_count(), 'mesh_devices': int(mesh.devices.size),
           'axis_names': list(mesh.axis_names), 'shape': list(batch['embedding'].shape),
           'same_values': bool(np.array_equal(np.asarray(batch['embedding']), embeddings)),
           'label_sharding_ok': batch['label'].sharding == sharding.batch_sharding(mesh),
           'shards': sorted([s.index[0].start or 0, list(s.data.shape), s.device.id]
                            for s in batch['embedding'].addressable_shards),
           'proxies_replicated': bool(replicated.sharding.is_fully_replicated), 'per_host': {}, 'losses': {}}
    for size in (16, 6):
      try:
        out['per_host'][size] = sharding.per_host_batch_size(size, mesh)
      except ValueError as e:
        out['per_host'][size] = str(e)
    for name in t.LOSS_NAMES:
      value, (g_emb, g_proxies) = t._value_and_grads(name, batch['embedding'], batch['label'], replicated)
      out['losses'][name] = {'value': float(value), 'grad_embeddings': np.asarray(g_emb).tolist(),
                             'grad_proxies': np.asarray(g_proxies).tolist(),
                             'grad_sharded': len(g_emb.sharding.device_set) == 4}
    print('RESULT' + json.dumps(out))
"""


def test_four_fake_devices(fake_devices_runner):
  """4 CPU devices: the mesh spans them, global_batch gives each device its 4 rows, a jitted loss and its
  gradients over the sharded global batch (replicated proxies) equal the 1-device values to float32 rounding."""
  proc = fake_devices_runner(_FOUR_DEVICES, num_devices=4, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  four = json.loads(proc.stdout.split('RESULT', 1)[1])
  assert four['device_count'] == four['mesh_devices'] == 4 and four['axis_names'] == ['data']
  assert four['shape'] == [BATCH, DIM] and four['same_values'] and four['label_sharding_ok']
  starts, shapes, devices = zip(*four['shards'])
  assert list(starts) == [0, 4, 8, 12] and all(s == [4, DIM] for s in shapes) and len(set(devices)) == 4
  assert four['proxies_replicated']
  assert four['per_host']['16'] == 16 and 'divisible' in four['per_host']['6']
  embeddings, labels, proxies = _data()
  for name in LOSS_NAMES:
    got = four['losses'][name]
    value, (g_emb, g_proxies) = _value_and_grads(name, embeddings, labels, proxies)
    assert float(value) > 0 and got['grad_sharded'], name
    # float32, a sharded graph (cross-device reductions) vs a 1-device graph: rounding only
    np.testing.assert_allclose(got['value'], float(value), rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(got['grad_embeddings'], g_emb, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(got['grad_proxies'], g_proxies, rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.abs(np.asarray(g_emb)).max() > 1e-3, name  # gradients are not trivially zero
