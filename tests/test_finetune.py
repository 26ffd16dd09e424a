"""Fine-tuning from a metrix_jax run: `model.pretrained=WORKDIR[:STEP]` loads that run's backbone and BN statistics
(values checked against the checkpoint), re-initialises the head unless `model.pretrained_head`, and says clearly
when the depth differs, the step is missing or the path is no run."""

import os
import sys

import jax
import numpy as np
import optax
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trainer_fakes  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from metrix_jax import checkpointing, cli, rundir, sharding, step, train  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.fixture(scope='module')
def source_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('source') / 'run')
  config = trainer_fakes.tiny_config(steps=4)
  config.train.checkpoint_every_steps = 2
  train.train_and_evaluate(
    config, workdir, data_factory=trainer_fakes.fake_data_factory(), model_factory=trainer_fakes.tiny_model_factory
  )
  return workdir


def _init(pretrained, *, head=False, depth=18, seed=5):
  config = trainer_fakes.tiny_config()
  config.seed, config.model.depth, config.model.pretrained, config.model.pretrained_head = seed, depth, pretrained, head
  model, loss = trainer_fakes.tiny_model_factory(config), step.create_loss(config)
  state = step.init_state(config, model, loss, lambda params: optax.sgd(0.1), 12, sharding.make_mesh())
  return jax.device_get(state)


def _saved(workdir, at):
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  raw = ckpt.restore_raw(at)
  ckpt.close()
  return raw


def _assert_equal_trees(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_backbone_and_bn_statistics_come_from_the_run_and_the_head_is_new(source_run):
  saved = _saved(source_run, 4)
  state = _init(source_run)
  _assert_equal_trees(state.params['backbone'], saved['params']['backbone'])
  _assert_equal_trees(state.batch_stats['backbone'], saved['batch_stats']['backbone'])
  fresh = _init(None)  # the same seed without a source: the head is initialised exactly like this
  _assert_equal_trees(state.params['head'], fresh.params['head'])
  assert not np.allclose(state.params['head']['kernel'], saved['params']['head']['kernel'])


def test_a_step_and_the_head_can_be_chosen(source_run):
  saved = _saved(source_run, 2)
  for spec in (f'{source_run}:2', os.path.join(source_run, 'checkpoints', '2')):
    state = _init(spec, head=True)
    _assert_equal_trees(state.params['backbone'], saved['params']['backbone'])
    _assert_equal_trees(state.params['head'], saved['params']['head'])


def test_mistakes_are_clear(source_run, tmp_path):
  with pytest.raises(
    cli.UserError, match='trained a ResNet-18; this config builds a ResNet-50: set --config.model.depth=18'
  ):
    _init(source_run, depth=50)
  with pytest.raises(cli.UserError, match=r'No checkpoint at step 3 .*kept steps: \[2, 4\]'):
    _init(f'{source_run}:3')
  assert rundir.parse_run_reference(str(tmp_path)) is None  # no config.json: not a run (a weights path then)
  assert rundir.parse_run_reference(f'{source_run}:7') == (source_run, 7)


@pytest.mark.parametrize('loss_name', ['proxy_anchor', 'soft_triple', 'subcenter_arcface'])
def test_init_state_gives_each_loss_its_own_proxy_rows(loss_name):
  """Class-weight losses own K rows per class ([C * K, D], the loss's own init); Proxy Anchor keeps [C, D] and the
  values it always had (losses.init_proxies with the same key)."""
  from metrix_jax import losses  # pylint: disable=g-import-not-at-top

  config = trainer_fakes.tiny_config(loss_name)
  model, loss = trainer_fakes.tiny_model_factory(config), step.create_loss(config)
  state = jax.device_get(step.init_state(config, model, loss, lambda p: optax.sgd(0.1), 12, sharding.make_mesh()))
  _, proxy_key = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 1))
  assert state.params['proxies'].shape == (loss.num_proxies(12), config.model.embedding_dim)
  np.testing.assert_array_equal(state.params['proxies'], loss.init_proxies(proxy_key, 12, config.model.embedding_dim))
  if loss_name == 'proxy_anchor':
    np.testing.assert_array_equal(state.params['proxies'], losses.init_proxies(proxy_key, 12, 16))
  else:
    assert loss.num_proxies(12) > 12
