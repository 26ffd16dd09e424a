"""Checkpointer: exact round trip (state, rng, iterator state), keep last n + best by R@1, atomic saves."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metrix_jax import checkpointing
from metrix_jax import sharding


class _Iterator:
  """Stand-in for a grain iterator: get_state() -> bytes (DataLoader) or dict (DatasetIterator)."""

  def __init__(self, as_bytes):
    self.position, self.as_bytes = 0, as_bytes

  def get_state(self):
    state = {'position': self.position, 'seed': 3}
    return json.dumps(state).encode() if self.as_bytes else state

  def set_state(self, state):
    self.position = (json.loads(state) if self.as_bytes else state)['position']


def _state(seed):
  params = {'w': jax.random.normal(jax.random.key(seed), (3, 5)), 'b': jnp.zeros(5)}
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)
  updates, opt_state = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
  return {
    'step': jnp.asarray(7, jnp.int32),
    'params': optax.apply_updates(params, updates),
    'opt_state': opt_state,
    'rng': jax.random.key_data(jax.random.key(seed + 1)),
  }


def test_round_trip_is_exact(tmp_path):
  for as_bytes in (True, False):
    directory = tmp_path / f'bytes_{as_bytes}'
    ckpt = checkpointing.Checkpointer(str(directory), keep=2)
    state, iterator = _state(0), _Iterator(as_bytes)
    iterator.position = 41
    ckpt.save(7, state, data_iterator=iterator, metrics={'recall@1': 0.5})
    ckpt.close()

    ckpt = checkpointing.Checkpointer(str(directory), keep=2)
    assert ckpt.latest_step() == 7
    fresh, restored_iterator = _state(1), _Iterator(as_bytes)
    restored, meta = ckpt.restore(7, fresh, data_iterator=restored_iterator)
    assert restored_iterator.position == 41 and meta['metrics'] == {'recall@1': 0.5} and meta['step'] == 7
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    ckpt.close()


def test_keeps_last_n_and_best(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2, keep_best=1)
  recalls = {10: 0.2, 20: 0.9, 30: 0.4, 40: None, 50: 0.3, 60: None}
  for step, r1 in recalls.items():
    ckpt.save(step, _state(step), metrics=None if r1 is None else {'recall@1': r1})
  ckpt.wait()
  assert sorted(ckpt.all_steps()) == [20, 50, 60]
  assert ckpt.best_step() == 20 and ckpt.latest_step() == 60
  ckpt.close()


def test_restore_onto_a_mesh(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=1)
  state = _state(0)
  ckpt.save(1, state)
  ckpt.close()
  mesh = sharding.make_mesh()
  target = sharding.replicate(_state(5), mesh)
  restored, meta = checkpointing.Checkpointer(str(tmp_path)).restore(1, target)
  assert meta['step'] == 1
  assert restored['params']['w'].sharding == sharding.replicated(mesh)
  np.testing.assert_array_equal(restored['params']['w'], state['params']['w'])


def test_half_written_checkpoint_is_ignored(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=3)
  ckpt.save(1, _state(0))
  ckpt.close()
  # what a process killed mid-save leaves: an orbax temporary directory without the commit marker
  os.makedirs(tmp_path / '2.orbax-checkpoint-tmp-1234' / 'state')
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=3)
  assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
  ckpt.close()
