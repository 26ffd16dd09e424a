"""The losses added for issue 16 (NormalizedSoftmax, CosFace, ArcFace, sub-center ArcFace, SoftTriple, margin, pair
NCA, SupCon, NT-Xent): equal to pytorch-metric-learning 2.9 (values and gradients, float32 and float64, PML's edge
cases), their Metrix mixed terms equal to the float64 loop reference (tests/reference/losses_more_ref.py) with soft
labels, and their parameters (class weights as proxies [C*K, D]), registry and config entries."""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from metrix_jax import config_lib
from metrix_jax import losses
from metrix_jax import mixup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference import losses_more_ref as ref  # pylint: disable=g-import-not-at-top,wrong-import-position

NEW = ref.CLASS_WEIGHT + ref.PAIRS
NUM_CLASSES = 6
# Non-default hyperparameters (each differs from PML's default) so that passing them is tested too.
HP = {
  'normalized_softmax': dict(temperature=0.1),
  'cosface': dict(margin=0.3, scale=30.0),
  'arcface': dict(margin=25.0, scale=40.0),
  'subcenter_arcface': dict(margin=25.0, scale=40.0, sub_centers=2),
  'soft_triple': dict(centers_per_class=3, la=15.0, gamma=0.2, margin=0.05),
  'margin': dict(margin=0.15, beta=1.0),
  'pair_nca': dict(softmax_scale=2.0),
  'supcon': dict(temperature=0.2),
  'ntxent': dict(temperature=0.1),
}
PML = {
  'normalized_softmax': pml_losses.NormalizedSoftmaxLoss,
  'cosface': pml_losses.CosFaceLoss,
  'arcface': pml_losses.ArcFaceLoss,
  'subcenter_arcface': pml_losses.SubCenterArcFaceLoss,
  'soft_triple': pml_losses.SoftTripleLoss,
  'margin': pml_losses.MarginLoss,
  'pair_nca': pml_losses.NCALoss,
  'supcon': pml_losses.SupConLoss,
  'ntxent': pml_losses.NTXentLoss,
}


def make_batch(kind, *, dim=8, seed=0):
  """uneven classes (two singletons, classes 4-5 of 6 empty: class weights without samples); no positive pair;
  one class."""
  rng = np.random.default_rng(seed)
  labels = {
    'uneven': np.array([0] * 5 + [1] * 4 + [2] * 2 + [3]),
    'no_positives': np.arange(NUM_CLASSES),
    'one_class': np.full(7, 2),
  }[kind]
  labels = rng.permutation(labels)
  emb = rng.normal(size=(len(labels), dim))
  emb[1] = emb[0] + 0.05 * rng.normal(size=dim)
  return emb, labels


def _weights(name, hp, dim, seed=3, num_classes=NUM_CLASSES):
  rows = losses.get(name, **hp).num_proxies(num_classes) if name in ref.CLASS_WEIGHT else 0
  return np.random.default_rng(seed).normal(size=(rows, dim))


def _pml(name, hp, emb, labels, weights, dtype, num_classes=NUM_CLASSES):
  """PML value and gradients (embeddings, weights [rows, D]) in torch `dtype`."""
  e = torch.tensor(emb, dtype=dtype, requires_grad=True)
  kw = dict(hp)
  if name in ref.CLASS_WEIGHT:
    fn = PML[name](num_classes=num_classes, embedding_size=emb.shape[1], **kw).to(dtype)
    w = fn.fc if name == 'soft_triple' else fn.W
    w.data = torch.tensor(weights.T, dtype=dtype)
  else:
    fn = PML[name](**kw)
    w = None
  value = fn(e, torch.tensor(labels))
  value.backward()
  grad_w = None if w is None else w.grad.T.numpy()
  return float(value), e.grad.numpy(), grad_w


def _pml_nan_edge(name, v_ref, v, ge):
  """PML NCALoss on a batch without any positive pair averages an empty tensor: NaN. Ours is 0 with zero gradients
  (the row set is empty, as ProxyNCA's `_masked_mean`): a NaN would stop training on such a batch."""
  if name == 'pair_nca' and np.isnan(v_ref):
    assert v == 0.0 and not np.any(ge)
    return True
  return False


@functools.lru_cache(maxsize=None)
def _jax_value_and_grad(name, hp_items):
  loss = losses.get(name, **dict(hp_items))
  if loss.uses_proxies:
    return jax.jit(jax.value_and_grad(lambda e, l, p: loss(e, l, p), argnums=(0, 2)))
  return jax.jit(jax.value_and_grad(lambda e, l, p: loss(e, l), argnums=(0,)))


def _ours(name, hp, emb, labels, weights, dtype):
  fn = _jax_value_and_grad(name, tuple(sorted(hp.items())))
  p = jnp.asarray(weights, dtype) if name in ref.CLASS_WEIGHT else None
  value, grads = fn(jnp.asarray(emb, dtype), jnp.asarray(labels), p)
  return float(value), np.asarray(grads[0]), None if p is None else np.asarray(grads[1])


@pytest.mark.parametrize('name', NEW)
def test_equals_pml_float32_values_and_gradients(name):
  """Every batch kind (PML's edge cases: a singleton class, classes without samples, no positive pair, one class),
  float32 with PML's default hyperparameters: value within 1e-5 (relative) of PML float32, gradients within 1e-4
  (atol scaled to their size). The other hyperparameters (`HP`) are checked in float64 below, to 1e-9."""
  hp = {}
  for kind in ('uneven', 'no_positives', 'one_class'):
    emb, labels = make_batch(kind, seed=len(name))
    w = _weights(name, hp, emb.shape[1])
    v_ref, ge_ref, gw_ref = _pml(name, hp, emb, labels, w, torch.float32)
    v, ge, gw = _ours(name, hp, emb, labels, w, jnp.float32)
    if _pml_nan_edge(name, v_ref, v, ge):
      continue
    np.testing.assert_allclose(v, v_ref, rtol=1e-5, atol=1e-6, err_msg=f'{name} {kind}')
    scale = max(np.abs(ge_ref).max(), 1e-3)
    np.testing.assert_allclose(ge, ge_ref, rtol=1e-4, atol=1e-4 * scale, err_msg=f'{name} {kind} grad')
    if gw_ref is not None:
      scale = max(np.abs(gw_ref).max(), 1e-3)
      np.testing.assert_allclose(gw, gw_ref, rtol=1e-4, atol=1e-4 * scale, err_msg=f'{name} {kind} weight grad')


@pytest.mark.parametrize('name', NEW)
def test_equals_pml_and_loop_reference_float64(name, x64):
  """float64: PML, the jitted loss and the explicit-loop reference agree to 1e-9 (values) / 1e-7 (gradients)."""
  hp = HP[name]
  for kind in ('uneven', 'no_positives', 'one_class'):
    emb, labels = make_batch(kind, seed=7 + len(name))
    w = _weights(name, hp, emb.shape[1])
    v_ref, ge_ref, gw_ref = _pml(name, hp, emb, labels, w, torch.float64)
    v, ge, gw = _ours(name, hp, emb, labels, w, jnp.float64)
    v_loop = ref.loss(name, emb, labels, proxies=w if name in ref.CLASS_WEIGHT else None, hp=hp)
    np.testing.assert_allclose(v, v_loop, rtol=1e-9, atol=1e-12, err_msg=f'{name} {kind} loop')
    if _pml_nan_edge(name, v_ref, v, ge):
      continue
    tol = 1e-7 if name == 'margin' else 1e-9  # PML's LpDistance goes through a matmul expansion of ||a - b||^2
    np.testing.assert_allclose(v, v_ref, rtol=tol, atol=1e-12, err_msg=f'{name} {kind} pml')
    np.testing.assert_allclose(ge, ge_ref, rtol=1e-6, atol=1e-7 * max(np.abs(ge_ref).max(), 1.0))
    if gw_ref is not None:
      np.testing.assert_allclose(gw, gw_ref, rtol=1e-6, atol=1e-7 * max(np.abs(gw_ref).max(), 1.0))


@pytest.mark.parametrize('name', ref.CLASS_WEIGHT)
def test_one_class_weight_gives_zero(name):
  """C = 1: the cross entropy over one class is 0 (PML too), with finite gradients."""
  emb, labels = make_batch('one_class')
  labels = np.zeros_like(labels)
  w = _weights(name, {}, emb.shape[1], num_classes=1)
  v_ref, _, _ = _pml(name, {}, emb, labels, w, torch.float32, num_classes=1)
  v, ge, gw = _ours(name, {}, emb, labels, w, jnp.float32)
  assert v == pytest.approx(v_ref, abs=1e-6) and abs(v) < 1e-6
  assert np.all(np.isfinite(ge)) and np.all(np.isfinite(gw))


# ----------------------------------------------------------------------------------------------------------
# Metrix: mixed terms vs the float64 loop reference, lambda limits, metrix_loss.
# ----------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _mixed_fn(name):
  loss = losses.get(name, **HP[name])

  def fn(emb, labels, plan, proxies):
    proxies = proxies if loss.uses_proxies else None
    closed = mixup.mixed_loss(loss, emb, labels, plan, proxies=proxies)
    materialised = mixup.mixed_loss(
      loss, emb, labels, plan, mixed_embeddings=mixup.mix_embeddings(emb, plan), proxies=proxies
    )
    return closed, materialised

  return jax.jit(fn)


@pytest.mark.parametrize('name', NEW)
def test_mixed_term_matches_loop_reference(name, x64):
  """Sampled plans (every pair set, lambda per item, 'own' and 'all' masks) and an all-pairs plan: the closed form
  and the materialised mixed embeddings give the float64 loop reference (soft labels y in [0, 1])."""
  from reference import mixup_ref  # pylint: disable=g-import-not-at-top

  emb, labels = make_batch('uneven', seed=11)
  w = _weights(name, HP[name], emb.shape[1])
  e, l, p = jnp.asarray(emb), jnp.asarray(labels), jnp.asarray(w if name in ref.CLASS_WEIGHT else np.zeros((1, 8)))
  plans = []
  for i, (pair_sets, mask_mode) in enumerate(
    [(('pos_neg', 'anc_neg'), 'own'), (mixup.PAIR_SETS, 'own'), (('pos_neg', 'pos_pos'), 'all')]
  ):
    plans.append(
      mixup.make_plan(jax.random.key(i), l, pair_sets=pair_sets, num_mixed=3, lambda_mode='item', mask_mode=mask_mode)
    )
  plans.append(mixup.all_pairs_plan(jax.random.key(9), l, pair_sets=('pos_neg', 'anc_neg'), lambda_mode='item'))
  for plan, mask_mode in zip(plans, ('own', 'own', 'all', 'pairs')):
    closed, materialised = _mixed_fn(name)(e, l, plan, p)
    first, second, lam, anchor, valid = (np.asarray(a) for a in plan[:5])
    if name in ref.CLASS_WEIGHT:
      items = [(int(x), int(x2), float(v)) for x, x2, v, ok in zip(first, second, lam, valid) if ok]
    elif mask_mode == 'pairs':
      mask = np.asarray(plan.mask)
      items = [
        [(int(first[m]), int(second[m]), float(lam[m])) for m in range(len(first)) if mask[a, m]]
        for a in range(len(labels))
      ]
    else:
      items = mixup_ref.items_from_plan(first, second, lam, anchor, valid, len(labels), mask_mode)
    expected = ref.loss(name, emb, labels, proxies=w, items=items, hp=HP[name])
    np.testing.assert_allclose(float(closed), expected, rtol=1e-9, atol=1e-12, err_msg=f'{name} {mask_mode}')
    np.testing.assert_allclose(float(materialised), expected, rtol=1e-9, atol=1e-12, err_msg=f'{name} {mask_mode}')


@pytest.mark.parametrize('name', ['supcon', 'ntxent', 'margin'])
def test_paper_form_matches_loop_reference(name, x64):
  emb, labels = make_batch('uneven', seed=4)
  loss = losses.get(name, form='paper', **HP[name])
  plan = mixup.make_plan(jax.random.key(0), jnp.asarray(labels), num_mixed=3, lambda_mode='item')
  from reference import mixup_ref  # pylint: disable=g-import-not-at-top

  first, second, lam, anchor, valid = (np.asarray(a) for a in plan[:5])
  items = mixup_ref.items_from_plan(first, second, lam, anchor, valid, len(labels))
  got = mixup.mixed_loss(loss, jnp.asarray(emb), jnp.asarray(labels), plan)
  np.testing.assert_allclose(float(got), ref.pair_loss(name, emb, labels, items, HP[name], 'paper'), rtol=1e-9)
  clean = loss(jnp.asarray(emb), jnp.asarray(labels))
  np.testing.assert_allclose(float(clean), ref.pair_loss(name, emb, labels, None, HP[name], 'paper'), rtol=1e-9)


@pytest.mark.parametrize('name', ref.CLASS_WEIGHT)
def test_class_weight_mixed_term_at_lambda_one_and_zero(name, x64):
  """lam = 1 (0): y is one-hot on c(x) (c(x')) and the mixed term is the loss of the items x (x') themselves."""
  emb, labels = make_batch('uneven', seed=2)
  w = jnp.asarray(_weights(name, HP[name], emb.shape[1]))
  loss = losses.get(name, **HP[name])
  e, l = jnp.asarray(emb), jnp.asarray(labels)
  for lam in (1.0, 0.0):
    plan = mixup.make_plan(jax.random.key(3), l, num_mixed=2, lam=lam)
    src = plan.first if lam == 1.0 else plan.second
    got = mixup.mixed_loss(loss, e, l, plan, proxies=w)
    np.testing.assert_allclose(float(got), float(loss(e[src], l[src], w)), rtol=1e-10)


@pytest.mark.parametrize('name', NEW)
def test_metrix_loss_every_level_shape_finite_and_weight_zero(name):
  """mixup.metrix_loss (embedding level, sampled and all pairs) and mixup.objective with mixed embeddings (as at
  input/feature level): finite values and gradients (embeddings and class weights); weight 0 is the clean loss."""
  emb, labels = make_batch('uneven', seed=5)
  loss = losses.get(name)
  e, l = jnp.asarray(emb, jnp.float32), jnp.asarray(labels)
  p = loss.init_proxies(jax.random.key(0), NUM_CLASSES, emb.shape[1]) if loss.uses_proxies else None

  @jax.jit
  def run(e, p):
    def total(e, p, all_pairs, weight):
      return mixup.metrix_loss(loss, e, l, jax.random.key(1), proxies=p, all_pairs=all_pairs, weight=weight)

    plan = mixup.make_plan(jax.random.key(2), l, num_mixed=2)
    obj = lambda e, p: mixup.objective(loss, e, l, plan, mixed_embeddings=mixup.mix(e, plan) * 1.3, proxies=p)[0]
    values = jnp.stack([total(e, p, False, 0.4), total(e, p, True, 0.4), obj(e, p), total(e, p, False, 0.0)])
    grads = jax.grad(lambda e, p: total(e, p, False, 0.4) + obj(e, p), argnums=(0, 1))(e, p)
    return values, grads, loss(e, l, p)

  values, grads, clean = run(e, p)
  assert np.all(np.isfinite(np.asarray(values))), values
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
  np.testing.assert_allclose(float(values[3]), float(clean), rtol=1e-6)
  assert float(values[0]) != float(clean)  # the mixed term contributes


# ----------------------------------------------------------------------------------------------------------
# Parameters, registry, configs.
# ----------------------------------------------------------------------------------------------------------
def test_class_weights_as_proxies_shape_init_and_row_classes():
  key = jax.random.key(0)
  for name, k in (('normalized_softmax', 1), ('arcface', 1), ('subcenter_arcface', 3), ('soft_triple', 10)):
    loss = losses.get(name)
    assert loss.uses_proxies and not loss.proxies_are_anchors and loss.proxies_per_class == k
    assert loss.init_proxies(key, 7, 16).shape == (7 * k, 16)
    np.testing.assert_array_equal(np.asarray(loss.proxy_classes(7 * k)), np.repeat(np.arange(7), k))
  big = np.asarray(losses.get('arcface').init_proxies(key, 200, 64))
  assert abs(big.std() - 1.0) < 0.02  # PML: torch.nn.init.normal_
  st = np.asarray(losses.get('soft_triple').init_proxies(key, 20, 64))
  assert np.abs(st).max() <= 1 / np.sqrt(200) and st.std() > 0.5 / np.sqrt(3 * 200)  # kaiming_uniform_(a=sqrt 5)
  pa = losses.get('proxy_anchor')
  np.testing.assert_array_equal(np.asarray(pa.init_proxies(key, 5, 4)), np.asarray(losses.init_proxies(key, 5, 4)))
  with pytest.raises(ValueError, match='sub_centers a positive int'):
    losses.get('subcenter_arcface', sub_centers=0)
  with pytest.raises(ValueError, match='temperature > 0'):
    losses.get('supcon', temperature=0.0)
  with pytest.raises(ValueError, match='init_proxies'):
    losses.get('soft_triple')(jnp.ones((2, 4)), jnp.array([0, 1]))


def test_registry_and_configs_know_the_new_losses():
  assert set(NEW) <= set(losses.LOSS_NAMES)
  assert set(ref.CLASS_WEIGHT) <= set(losses.PROXY_LOSS_NAMES)
  for name in NEW:
    assert losses.default_hparams(name) == {**ref.DEFAULTS[name], 'form': 'pml'}
    assert config_lib.base_config().loss[name].to_dict() == losses.default_hparams(name)
  aliases = {
    'nsoftmax': 'normalized_softmax',
    'cosface': 'cosface',
    'arcface': 'arcface',
    'subcenter': 'subcenter_arcface',
    'softtriple': 'soft_triple',
    'margin': 'margin',
    'pair_nca': 'pair_nca',
    'supcon': 'supcon',
    'ntxent': 'ntxent',
    'nca': 'proxy_nca',  # unchanged
  }
  for alias, name in aliases.items():
    assert config_lib.parse_recipe_arg(f'{alias},feature') == (name, 'feature')
  import importlib.util  # pylint: disable=g-import-not-at-top

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location('cub200_config', os.path.join(root, 'configs', 'cub200.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for alias, name in aliases.items():
    config = module.get_config(f'{alias},embedding')
    assert config.loss.name == name
    config_lib.validate(config, check_files=False)
