"""The optimiser against torch.optim.Adam / AdamW (coupled L2, clip by value, group lr, warm-up freezing)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metrix_jax import config_lib
from metrix_jax import optim

torch = pytest.importorskip('torch')


def _params(rng):
  return {
    'backbone': {
      'conv1': {'kernel': rng.normal(size=(3, 3, 2, 4))},
      'bn1': {'scale': 1.0 + 0.1 * rng.normal(size=(4,)), 'bias': 0.1 * rng.normal(size=(4,))},
    },
    'head': {'kernel': rng.normal(size=(4, 3)), 'bias': np.zeros(3)},
    'proxies': 0.3 * rng.normal(size=(5, 3)),
  }


def _optim_config(**overrides):
  o = config_lib.base_config().optim
  o.update(
    dict(
      lr=1e-2,
      step_epochs=1,
      gamma=0.5,
      warmup_epochs=2,
      head_lr_mult=2.0,
      proxy_lr_mult=100.0,
      weight_decay=1e-2,
      proxy_weight_decay=3e-2,
    )
  )  # large decays so a coupling error shows
  o.update(overrides)
  return o


def _torch_run(params0, grads, o, steps_per_epoch, *, freeze_bn_affine=False):
  """PyTorch as the official code runs it: requires-grad groups, clip_grad_value_, Adam, StepLR per epoch."""
  flat = {}
  for group, tree in params0.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      flat[(group, jax.tree_util.keystr(path))] = torch.tensor(np.asarray(leaf, np.float64), requires_grad=True)
  groups = []
  for g, mult, wd in (
    ('backbone', 1.0, o.weight_decay),
    ('head', o.head_lr_mult, o.weight_decay),
    ('proxies', o.proxy_lr_mult, o.proxy_weight_decay),
  ):
    ps = [t for (gg, _), t in flat.items() if gg == g]
    groups.append({'params': ps, 'lr': o.lr * mult, 'weight_decay': wd, 'mult': mult})
  cls = torch.optim.Adam if o.name == 'adam' else torch.optim.AdamW
  opt = cls(groups, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
  frozen_steps = o.warmup_epochs * steps_per_epoch
  history = []
  for step, grad in enumerate(grads):
    epoch = step // steps_per_epoch
    for group in opt.param_groups:
      group['lr'] = o.lr * group['mult'] * o.gamma ** (epoch // o.step_epochs)
    for (g, key), t in flat.items():
      is_bn = g == 'backbone' and key.endswith(("['scale']", "['bias']"))
      if (g == 'backbone' and step < frozen_steps) or (is_bn and freeze_bn_affine):
        t.grad = None
      else:
        t.grad = torch.tensor(np.asarray(grad[(g, key)], np.float64))
    torch.nn.utils.clip_grad_value_([t for t in flat.values() if t.grad is not None], o.clip_value)
    opt.step()
    history.append({k: t.detach().numpy().copy() for k, t in flat.items()})
  return history


def _jax_run(params0, grads, o, steps_per_epoch, total_steps, *, freeze_bn_affine=False):
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params0)
  tx = optim.make_optimizer(
    o, params=params, steps_per_epoch=steps_per_epoch, total_steps=total_steps, freeze_bn_affine=freeze_bn_affine
  )
  state = tx.init(params)
  traces = []

  @jax.jit
  def step_fn(params, state, grad):
    traces.append(1)
    updates, state = tx.update(grad, state, params)
    return optax_apply(params, updates), state

  history = []
  for grad in grads:
    grad_tree = {}
    for group, tree in params0.items():
      leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
      vals = [jnp.asarray(grad[(group, jax.tree_util.keystr(p))], jnp.float32) for p, _ in leaves]
      grad_tree[group] = jax.tree.unflatten(jax.tree.structure(tree), vals)
    params, state = step_fn(params, state, grad_tree)
    flat = {}
    for group, tree in params.items():
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat[(group, jax.tree_util.keystr(path))] = np.asarray(leaf)
    history.append(flat)
  return history, len(traces)


def optax_apply(params, updates):
  import optax

  return optax.apply_updates(params, updates)


def _grads(params0, rng, num_steps):
  out = []
  for _ in range(num_steps):
    g = {}
    for group, tree in params0.items():
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        # some entries far outside [-10, 10] so that clipping matters
        g[(group, jax.tree_util.keystr(path))] = rng.normal(size=np.shape(leaf)) * rng.choice([0.1, 1.0, 30.0])
    out.append(g)
  return out


@pytest.mark.parametrize('name', ['adam', 'adamw'])
@pytest.mark.parametrize('freeze_bn_affine', [False, True])
def test_matches_torch_across_unfreeze(name, freeze_bn_affine):
  rng = np.random.default_rng(0)
  params0 = _params(rng)
  steps_per_epoch, num_steps = 2, 9  # frozen for steps 0-3, lr halves every epoch
  o = _optim_config(name=name)
  grads = _grads(params0, rng, num_steps)
  expected = _torch_run(params0, grads, o, steps_per_epoch, freeze_bn_affine=freeze_bn_affine)
  got, num_traces = _jax_run(params0, grads, o, steps_per_epoch, num_steps, freeze_bn_affine=freeze_bn_affine)
  assert num_traces == 1  # the freeze and the schedule live in the state: no recompiles
  for step in range(num_steps):
    for key, want in expected[step].items():
      np.testing.assert_allclose(got[step][key], want, rtol=2e-5, atol=2e-6, err_msg=f'step {step} {key}')
  # the backbone did not move while frozen; the head did
  for step in range(4):
    np.testing.assert_array_equal(
      got[step][('backbone', "['conv1']['kernel']")], np.asarray(params0['backbone']['conv1']['kernel'], np.float32)
    )
  assert not np.allclose(got[0][('head', "['kernel']")], params0['head']['kernel'])


def test_backbone_adam_state_starts_at_unfreeze():
  rng = np.random.default_rng(1)
  params = jax.tree.map(jnp.asarray, _params(rng))
  tx = optim.make_optimizer(_optim_config(), params=params, steps_per_epoch=2, total_steps=10)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(4):
    _, state = tx.update(grads, state, params)
  backbone = state.inner_states['backbone'].inner_state
  frozen_state = backbone[0]
  assert int(frozen_state.count) == 4
  adam = frozen_state.inner[-1]
  assert int(adam.count) == 0 and float(jnp.abs(adam.mu['backbone']['conv1']['kernel']).max()) == 0.0
  head_adam = state.inner_states['head'].inner_state[0][-1]
  assert int(head_adam.count) == 4
  _, state = tx.update(grads, state, params)
  assert int(state.inner_states['backbone'].inner_state[0].inner[-1].count) == 1


def test_schedules():
  step = optim.make_schedule(lr=1.0, schedule='step', steps_per_epoch=10, total_steps=1000, step_epochs=5, gamma=0.5)
  assert [float(step(s)) for s in (0, 49, 50, 99, 100, 149, 150)] == [1, 1, 0.5, 0.5, 0.25, 0.25, 0.125]
  cos = optim.make_schedule(lr=2.0, schedule='cosine', steps_per_epoch=10, total_steps=100)
  np.testing.assert_allclose([float(cos(s)) for s in (0, 50, 100, 200)], [2.0, 1.0, 0.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(float(cos(25)), 1.0 + math.cos(math.pi / 4), rtol=1e-6)
  const = optim.make_schedule(lr=3.0, schedule='constant', steps_per_epoch=10, total_steps=100)
  assert float(const(77)) == 3.0
  lrs = optim.learning_rates(_optim_config(), steps_per_epoch=2, total_steps=10, step=3)
  assert lrs['lr_backbone'] == 0.0 and lrs['lr_head'] == pytest.approx(2 * 1e-2 * 0.5)


def test_unknown_group_is_an_error():
  with pytest.raises(ValueError, match='backbone'):
    optim.param_labels({'encoder': {'w': jnp.zeros(2)}})


@pytest.mark.parametrize('bn_freeze,warmup_epochs', [(True, 0), (True, 2), (False, 0)])
def test_step_optimizer_factory_is_the_trainers_optimiser(bn_freeze, warmup_epochs):
  """`step.optimizer_factory` (the trainer's, the benchmarks' and the TPU compiles' one builder) gives the updates
  of `optim.make_optimizer` with BN affine frozen exactly when BN is frozen and there is no warm-up."""
  from metrix_jax import step  # pylint: disable=g-import-not-at-top

  config = config_lib.base_config()
  config.optim = _optim_config(warmup_epochs=warmup_epochs)
  config.model.bn_freeze = bn_freeze
  params = jax.tree.map(jnp.asarray, _params(np.random.default_rng(0)))
  grads = jax.tree.map(jnp.ones_like, params)
  tx = step.optimizer_factory(config, steps_per_epoch=3, total_steps=30)(params)
  freeze = bn_freeze and warmup_epochs == 0
  expected_tx = optim.make_optimizer(
    config.optim, params=params, steps_per_epoch=3, total_steps=30, freeze_bn_affine=freeze
  )
  state, expected_state = tx.init(params), expected_tx.init(params)
  for _ in range(2 * 3 + 2):  # through the warm-up and past it
    updates, state = tx.update(grads, state, params)
    expected, expected_state = expected_tx.update(grads, expected_state, params)
    jax.tree.map(np.testing.assert_array_equal, updates, expected)
  bn_moved = np.abs(np.asarray(updates['backbone']['bn1']['scale'])).max() > 0
  assert bn_moved == (not freeze)
  assert np.abs(np.asarray(updates['backbone']['conv1']['kernel'])).max() > 0
