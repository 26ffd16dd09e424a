"""The CPU path of metrix_jax.models (patches + matmul convs, slice max pool) equals the plain XLA path.

Equality is float32 agreement (the same sums in another order): max |a - e| / max |e| per array below RTOL
(1e-5) on activations and single-conv gradients, GRAD_RTOL (3e-5, float32's own noise on them) on whole-network
parameter gradients, for single convs of every shape class, the stem max pool (ties included), and whole
networks (ResNet-18 and the Bottleneck ResNet-50, small images whose last stages run on 2x2 and 1x1 maps, where
the CPU path is taken). Also: the automatic choice (CPU path on the CPU backend only, $METRIX_CONV_IMPL), the
variable tree is the same for every `conv_impl`.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from metrix_jax import models

RTOL = 1e-5  # activations
# Gradients of a whole network: float32's own noise is ~1e-5 there. Measured on ResNet-18, 32 px, against the
# same network in float64: plain XLA path 7.2e-6, CPU path 1.0e-5 max relative error (CPU vs plain 7.1e-6).
GRAD_RTOL = 3e-5
NHWC = ('NHWC', 'HWIO', 'NHWC')


def max_rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  scale = np.abs(expected).max()
  return np.abs(actual - expected).max() / (scale if scale > 0 else 1.0)


def assert_trees_close(actual, expected, rtol=RTOL):
  errors = jax.tree.map(max_rel_err, actual, expected)
  worst = max(jax.tree.leaves(errors))
  assert worst < rtol, f'max rel err {worst:.2e} (tol {rtol}): {errors}'


# (height, width, c_in, c_out, kernel, stride, padding): the ResNet shapes (stem, 3x3 s1/s2, 1x1 s2 shortcut)
# at sizes where XLA:CPU is fast and where it is slow (maps smaller than the kernel), odd sizes, 'SAME' and
# 'VALID', a 1x1 map whose 3x3 conv reads one tap, strides larger than the map (kept taps with gaps; no tap).
CONV_CASES = [
  (32, 32, 3, 16, (7, 7), (2, 2), ((3, 3), (3, 3))),
  (9, 7, 8, 16, (3, 3), (1, 1), ((1, 1), (1, 1))),
  (8, 8, 8, 16, (3, 3), (2, 2), ((1, 1), (1, 1))),
  (8, 8, 8, 16, (1, 1), (2, 2), 'VALID'),
  (4, 4, 16, 32, (3, 3), (2, 2), ((1, 1), (1, 1))),
  (2, 2, 16, 32, (3, 3), (1, 1), ((1, 1), (1, 1))),
  (2, 2, 16, 32, (3, 3), (2, 2), ((1, 1), (1, 1))),
  (1, 1, 32, 32, (3, 3), (1, 1), ((1, 1), (1, 1))),
  (5, 6, 4, 8, (3, 3), (2, 2), 'SAME'),
  (5, 5, 4, 8, (3, 3), (1, 1), 'VALID'),
  (1, 1, 4, 8, (5, 5), (4, 4), ((4, 4), (4, 4))),
  (1, 1, 4, 8, (3, 3), (4, 4), ((3, 3), (3, 3))),
]


@pytest.mark.parametrize('case', CONV_CASES, ids=lambda c: f'{c[0]}x{c[1]}_{c[2]}to{c[3]}_k{c[4][0]}s{c[5][0]}')
def test_conv_patches_equals_lax_conv_values_and_gradients(case):
  height, width, c_in, c_out, kernel, strides, padding = case
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (3, height, width, c_in))
  w = jax.random.normal(kw, kernel + (c_in, c_out)) / np.sqrt(kernel[0] * kernel[1] * c_in)

  def plain(x, w):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)

  def patches(x, w):
    return models.conv_patches(x, w, strides, padding, dimension_numbers=NHWC)

  expected, plain_vjp = jax.vjp(plain, x, w)
  actual, patches_vjp = jax.jit(lambda x, w: jax.vjp(patches, x, w))(x, w)
  assert actual.shape == expected.shape
  g = jax.random.normal(kg, expected.shape)
  assert_trees_close((actual, patches_vjp(g)), (expected, plain_vjp(g)))


def test_conv_patches_falls_back_for_what_it_does_not_cover():
  """Dilation, groups and another layout go to lax.conv_general_dilated: the same result, any shape."""
  x = jax.random.normal(jax.random.key(0), (2, 7, 7, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 2, 6))
  kwargs = dict(dimension_numbers=NHWC, feature_group_count=2)
  np.testing.assert_array_equal(
    models.conv_patches(x, w, (1, 1), 'SAME', **kwargs), lax.conv_general_dilated(x, w, (1, 1), 'SAME', **kwargs)
  )
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 6))
  kwargs = dict(dimension_numbers=NHWC, rhs_dilation=(2, 2))
  np.testing.assert_array_equal(
    models.conv_patches(x, w, (1, 1), 'SAME', **kwargs), lax.conv_general_dilated(x, w, (1, 1), 'SAME', **kwargs)
  )
  x_nchw, w_oihw = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1))
  np.testing.assert_array_equal(
    models.conv_patches(x_nchw, w_oihw, (1, 1), 'SAME'), lax.conv_general_dilated(x_nchw, w_oihw, (1, 1), 'SAME')
  )


def test_xla_cpu_conv_is_slow_rule():
  assert models.xla_cpu_conv_is_slow((2, 2), (2, 2), (3, 3))  # 3x3 on a 2x2 map
  assert models.xla_cpu_conv_is_slow((1, 1), (1, 1), (3, 3))
  assert models.xla_cpu_conv_is_slow((4, 4), (2, 2), (3, 3))  # its input gradient reads a 2x2 map
  assert not models.xla_cpu_conv_is_slow((8, 8), (4, 4), (3, 3))
  assert not models.xla_cpu_conv_is_slow((32, 32), (16, 16), (7, 7))
  assert not models.xla_cpu_conv_is_slow((1, 1), (1, 1), (1, 1))  # 1x1 convs are matmuls for XLA too


@pytest.mark.parametrize('ties', [False, True])
def test_max_pool_slices_equals_nn_max_pool(ties):
  """Values bit-equal; gradients to the same (first) maximum of each window, ties (ReLU zeros, equal values)
  included: only the summation order of overlapping windows differs."""
  x = jax.random.normal(jax.random.key(0), (2, 9, 8, 5))
  if ties:
    x = jnp.maximum(jnp.round(2 * x), 0.0)
  window, strides, padding = (3, 3), (2, 2), ((1, 1), (1, 1))
  expected, plain_vjp = jax.vjp(lambda x: nn.max_pool(x, window, strides=strides, padding=padding), x)
  actual, slices_vjp = jax.vjp(lambda x: models.max_pool_slices(x, window, strides, padding), x)
  np.testing.assert_array_equal(actual, expected)
  g = jax.random.normal(jax.random.key(1), expected.shape)
  assert max_rel_err(slices_vjp(g)[0], plain_vjp(g)[0]) < 1e-6


def _variables_with_random_stats(model, x, key):
  """Init variables, BN statistics randomised (a path that ignored them would be caught)."""
  variables = model.init(key, x[:1])
  leaves, treedef = jax.tree.flatten(variables['batch_stats'])
  keys = jax.random.split(jax.random.key(7), len(leaves))
  stats = [
    jax.random.uniform(k, leaf.shape, minval=0.5, maxval=1.5) if i % 2 else 0.1 * jax.random.normal(k, leaf.shape)
    for i, (k, leaf) in enumerate(zip(keys, leaves))
  ]  # flattened alphabetically: mean, var, mean, var, ...
  return {'params': variables['params'], 'batch_stats': jax.tree.unflatten(treedef, stats)}


def _forward_and_grads(conv_impl, depth, bn_mode, variables, x):
  model = models.EmbeddingNet(depth, embedding_dim=32, bn_mode=bn_mode, conv_impl=conv_impl)
  train = bn_mode == 'trainable'

  def loss_fn(params):
    (emb, fmap), updates = model.apply(
      {'params': params, 'batch_stats': variables['batch_stats']}, x, train=train, mutable=['batch_stats']
    )
    sim = emb @ emb.T
    return jnp.sum(sim * sim) + 1e-3 * jnp.sum(fmap), (emb, fmap, updates)

  @jax.jit
  def run(variables):
    (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables['params'])
    eval_emb = model.apply(variables, x)[0]
    return aux, grads, eval_emb

  return run(variables)


@pytest.mark.parametrize('depth,size', [(18, 32), (50, 32)], ids=['resnet18-32px', 'resnet50-32px'])
def test_cpu_path_equals_plain_path_forward_and_gradients(depth, size):
  """EmbeddingNet with frozen BN (the official recipe): train forward, eval embedding and parameter gradients,
  CPU path ('auto' on this CPU backend; 'patches' everywhere for ResNet-18) vs plain XLA convs, float32."""
  assert jax.default_backend() == 'cpu'
  x = jax.random.normal(jax.random.key(1), (4, size, size, 3))
  model = models.EmbeddingNet(depth, embedding_dim=32, conv_impl='xla')
  variables = _variables_with_random_stats(model, x, jax.random.key(0))
  expected = _forward_and_grads('xla', depth, 'frozen', variables, x)
  for conv_impl in ('auto', 'patches') if (depth, size) == (18, 32) else ('auto',):
    (emb, fmap, updates), grads, eval_emb = _forward_and_grads(conv_impl, depth, 'frozen', variables, x)
    (emb_e, fmap_e, updates_e), grads_e, eval_emb_e = expected
    assert_trees_close((emb, fmap, updates, eval_emb), (emb_e, fmap_e, updates_e, eval_emb_e))
    assert_trees_close(grads, grads_e, rtol=GRAD_RTOL)


def _trainable_bn_grads(conv_impl, dtype, variables, x, r):
  """Parameter gradients of sum(embeddings * r) for a trainable-BN train step (batch statistics) in `dtype`."""
  model = models.EmbeddingNet(18, embedding_dim=32, bn_mode='trainable', conv_impl=conv_impl, dtype=dtype)
  cast = functools.partial(jax.tree.map, lambda a: a.astype(dtype))

  def loss_fn(params):
    (emb, _), _ = model.apply(
      {'params': params, 'batch_stats': cast(variables['batch_stats'])},
      x.astype(dtype),
      train=True,
      mutable=['batch_stats'],
    )
    return jnp.sum(emb * r.astype(dtype))

  return jax.jit(jax.grad(loss_fn))(cast(variables['params']))


def test_trainable_bn_train_step_takes_the_cpu_path_and_is_as_accurate_as_the_plain_path(x64):
  """A trainable-BN train step (batch statistics: the demo and every from-scratch run) takes the CPU path too.
  ResNet-18, batch 16, 32 px (stages 3-4 on 2x2 and 1x1 maps). In float64 the CPU path equals the plain one (the
  same sums in another order); in float32 its error against the float64 network is the plain path's (1.3e-5 vs
  1.5e-5 here). Why not a tighter float32 check: a float32 train step sometimes lands on the other side of a ReLU
  kink than float64 does, and batch-statistics BN spreads that one element over its channel, so either path can
  be 1e-2 off float64 for some inputs (the plain path: 2 of 4 seeds at batch 64); BENCHMARKS.md "CPU
  convolutions" has the measurements that retired the old 'wrong gradients' finding."""
  x = jax.random.normal(jax.random.key(1), (16, 32, 32, 3), jnp.float32)
  r = jax.random.normal(jax.random.key(2), (16, 32), jnp.float32)
  variables = models.EmbeddingNet(18, embedding_dim=32, conv_impl='xla').init(jax.random.key(0), x[:1])
  reference = _trainable_bn_grads('xla', jnp.float64, variables, x, r)
  assert_trees_close(_trainable_bn_grads('auto', jnp.float64, variables, x, r), reference, rtol=1e-11)
  errors = {
    impl: max(
      jax.tree.leaves(jax.tree.map(max_rel_err, _trainable_bn_grads(impl, jnp.float32, variables, x, r), reference))
    )
    for impl in ('xla', 'auto')
  }
  assert errors['auto'] <= max(3 * errors['xla'], 1e-4), errors

  def program(conv_impl):
    model = models.EmbeddingNet(18, embedding_dim=32, bn_mode='trainable', conv_impl=conv_impl)
    return str(jax.make_jaxpr(functools.partial(model.apply, train=True, mutable=['batch_stats']))(variables, x))

  assert 'dot_general' in program('auto') and program('auto') != program('xla')


def test_variable_tree_is_the_same_for_every_conv_impl():
  x = jnp.zeros((1, 32, 32, 3))
  trees = [
    jax.eval_shape(models.EmbeddingNet(50, conv_impl=impl).init, jax.random.key(0), x) for impl in models.CONV_IMPLS
  ]
  for tree in trees[1:]:
    assert jax.tree.structure(tree) == jax.tree.structure(trees[0])
    assert jax.tree.leaves(tree) == jax.tree.leaves(trees[0])
  same_init = [models.ResNet(18, conv_impl=impl).init(jax.random.key(3), x) for impl in ('xla', 'auto')]
  jax.tree.map(np.testing.assert_array_equal, same_init[0], same_init[1])


def _primitives(conv_impl, monkeypatch=None, backend=None):
  if backend is not None:
    monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  model = models.ResNet(18, conv_impl=conv_impl)
  x = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  jaxpr = jax.make_jaxpr(model.apply)(variables, x)
  return [str(eqn.primitive) for eqn in jaxpr.eqns], str(jaxpr)


def test_auto_takes_the_cpu_path_on_cpu_only(monkeypatch):
  monkeypatch.delenv(models.CONV_IMPL_ENV, raising=False)
  assert jax.default_backend() == 'cpu'
  assert models.resolve_conv_impl('auto') == 'cpu'
  assert models.conv_function('auto') is models.conv_cpu
  cpu_prims, _ = _primitives('auto')
  # ResNet-18 at 32 px: stage 3-4 3x3 convs (2x2 and 1x1 maps) become matmuls, the rest stay convs.
  assert 'dot_general' in cpu_prims and 'conv_general_dilated' in cpu_prims
  assert 'reduce_window_max' not in cpu_prims
  for backend in ('gpu', 'tpu'):
    assert models.resolve_conv_impl('auto') == 'cpu'
    monkeypatch.setattr(jax, 'default_backend', lambda backend=backend: backend)
    assert models.resolve_conv_impl('auto') == 'xla'
    assert models.conv_function('auto') is None  # Flax's own lax.conv_general_dilated
    prims, text = _primitives('auto')
    assert 'dot_general' not in prims and 'reduce_window_max' in prims
    assert text == _primitives('xla')[1]  # the plain path, equation for equation
    monkeypatch.undo()
    monkeypatch.delenv(models.CONV_IMPL_ENV, raising=False)


def test_environment_variable_overrides_auto(monkeypatch):
  monkeypatch.setenv(models.CONV_IMPL_ENV, 'xla')
  assert models.resolve_conv_impl('auto') == 'xla'
  assert _primitives('auto')[1] == _primitives('xla')[1]
  assert models.resolve_conv_impl('patches') == 'patches'  # an explicit choice wins
  monkeypatch.setenv(models.CONV_IMPL_ENV, 'patches')
  assert models.resolve_conv_impl('auto') == 'patches'
  monkeypatch.setenv(models.CONV_IMPL_ENV, 'fast')
  with pytest.raises(ValueError, match='METRIX_CONV_IMPL'):
    models.resolve_conv_impl('auto')
  monkeypatch.delenv(models.CONV_IMPL_ENV)
  with pytest.raises(ValueError, match='conv_impl'):
    models.ResNet(18, conv_impl='im2col').init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
