"""Checkpointer: exact round trip (state, rng, iterator state), keep last n + best by R@1, atomic saves."""

import asyncio
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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


def _unraisable(raise_it):
  """What `sys.unraisablehook` receives for the exception `raise_it()` raises."""
  try:
    raise_it()
  except Exception as error:  # pylint: disable=broad-except
    return types.SimpleNamespace(exc_type=type(error), exc_value=error, exc_traceback=error.__traceback__, object=None)
  raise AssertionError('raise_it did not raise')


def _post_to_closed_loop():
  loop = asyncio.new_event_loop()
  loop.close()
  loop.call_soon_threadsafe(print)  # what a tensorstore read's done-callback does after a failed restore


def _other_runtime_error():
  raise RuntimeError('Event loop is closed')  # same message, not from asyncio: must still be reported


def test_reads_abandoned_by_a_failed_restore_are_dropped_and_everything_else_is_reported(tmp_path, monkeypatch):
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', seen.append)
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=3)
  ckpt.save(1, _state(0))
  ckpt.wait()
  for root, _, files in os.walk(tmp_path / '1' / 'state'):
    for name in files:
      if os.path.basename(root) == 'd':
        with open(os.path.join(root, name), 'r+b') as f:
          f.truncate(10)
  with pytest.raises(checkpointing.UnreadableCheckpointError, match=r'^checkpoint 1 is unreadable \('):
    ckpt.restore(1, _state(0))
  ckpt.close()
  abandoned, other, unrelated = (
    _unraisable(_post_to_closed_loop),
    _unraisable(_other_runtime_error),
    _unraisable(lambda: 1 / 0),
  )
  assert checkpointing._is_abandoned_read(abandoned)
  assert not checkpointing._is_abandoned_read(other) and not checkpointing._is_abandoned_read(unrelated)
  for args in (abandoned, other, unrelated):
    sys.unraisablehook(args)
  assert [args.exc_value for args in seen if args in (abandoned, other, unrelated)] == [
    other.exc_value,
    unrelated.exc_value,
  ]
  hook = sys.unraisablehook
  checkpointing._drop_abandoned_read_errors()  # a second damaged checkpoint does not wrap the hook again
  assert sys.unraisablehook is hook
