"""Tests for metrix_jax.models: parity with a torchvision-layout torch ResNet, BN modes, head, dtypes, init.

Parity uses random weights AND random BN statistics (a port that swaps mean/var or scale/bias fails), loaded
through `metrix_jax.weights.load_torchvision` from a `.pth`, at 224 px (even: 'SAME' padding would shift every
stride-2 window) and at an odd size.
"""

import copy
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip('torch')
sys.path.insert(0, str(Path(__file__).parent))
from reference import torch_resnet  # noqa: E402

from metrix_jax import models, weights  # noqa: E402

RTOL = 1e-4


def relative_errors(actual, expected):
  """(max |a - e| / max |e|, ||a - e|| / ||e||)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  diff = actual - expected
  return np.abs(diff).max() / np.abs(expected).max(), np.linalg.norm(diff) / np.linalg.norm(expected)


def assert_close(actual, expected, rtol=RTOL):
  max_rel, l2_rel = relative_errors(actual, expected)
  assert max_rel < rtol and l2_rel < rtol, f'max rel err {max_rel:.2e}, l2 rel err {l2_rel:.2e} (tol {rtol})'


def nchw_to_nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  """depth -> (torch model in eval mode, torch Linear head, path of its saved state dict); built lazily."""
  cache = {}
  root = tmp_path_factory.mktemp('torch_ckpt')

  def get(depth):
    if depth not in cache:
      model = torch_resnet.random_resnet(depth, seed=depth)
      path = root / f'resnet{depth}.pth'
      torch.save(model.state_dict(), path)
      linear = torch.nn.Linear(models.feature_channels(depth), 512)
      cache[depth] = (model, linear, str(path))
    return cache[depth]

  return get


def embedding_variables(depth, checkpoint_path, linear):
  """EmbeddingNet variables: backbone from the checkpoint (via load_torchvision), head from the torch Linear."""
  shapes = jax.eval_shape(models.EmbeddingNet(depth).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  variables = weights.with_backbone(shapes, weights.load_torchvision(checkpoint_path, depth=depth))
  variables['params']['head'] = {
    'kernel': jnp.asarray(linear.weight.detach().numpy().T),
    'bias': jnp.asarray(linear.bias.detach().numpy()),
  }
  return variables


def images(batch, size, seed=0):
  return np.random.RandomState(seed).randn(batch, 3, size, size).astype(np.float32)  # NCHW, as torch


@pytest.mark.parametrize(
  'depth,size,batch',
  [
    pytest.param(50, 224, 1, marks=pytest.mark.slow),
    pytest.param(50, 193, 1, marks=pytest.mark.slow),
    (18, 224, 2),
    (18, 225, 2),
  ],
)
def test_parity_with_torch(checkpoints, depth, size, batch):
  model_t, linear, path = checkpoints(depth)
  x = images(batch, size, seed=size)
  with torch.no_grad():
    fmap_t = model_t.forward_features(torch.from_numpy(x))
    emb_t = torch_resnet.embedding_head(fmap_t, linear).numpy()
  fmap_t = nchw_to_nhwc(fmap_t)

  variables = embedding_variables(depth, path, linear)
  with jax.default_matmul_precision('highest'):  # no TF32 when run on a GPU
    emb, fmap = models.EmbeddingNet(depth).apply(variables, jnp.asarray(nchw_to_nhwc(x)))
    fmap_backbone = models.ResNet(depth).apply(
      weights.load_torchvision(path, depth=depth), jnp.asarray(nchw_to_nhwc(x))
    )
  assert fmap.shape == fmap_t.shape == (batch, -(-size // 32), -(-size // 32), models.feature_channels(depth))
  assert emb.dtype == jnp.float32 and emb.shape == (batch, 512)
  assert_close(fmap, fmap_t)
  assert_close(fmap_backbone, fmap_t)
  assert_close(emb, emb_t)
  (fmap_max, fmap_l2), (emb_max, emb_l2) = relative_errors(fmap, fmap_t), relative_errors(emb, emb_t)
  print(
    f'ResNet-{depth} {size}px rel err (max, l2): feature map {fmap_max:.1e}, {fmap_l2:.1e}; '
    f'embedding {emb_max:.1e}, {emb_l2:.1e}'
  )


@pytest.mark.parametrize('depth,channels', [(18, 512), (34, 512), (50, 2048)])
@pytest.mark.parametrize('size,out', [(224, 7), (225, 8), (64, 2)])
def test_feature_map_shapes(depth, channels, size, out):
  model = models.EmbeddingNet(depth, embedding_dim=128)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  emb, fmap = jax.eval_shape(model.apply, variables, jnp.zeros((3, size, size, 3)))
  assert fmap.shape == (3, out, out, channels) and emb.shape == (3, 128)
  assert set(variables) == {'params', 'batch_stats'}
  assert set(variables['params']) == {'backbone', 'head'} and set(variables['batch_stats']) == {'backbone'}
  assert variables['params']['head']['kernel'].shape == (channels, 128)


def test_invalid_options():
  with pytest.raises(ValueError, match='valid depths'):
    models.ResNet(depth=101).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="'frozen', 'trainable'"):
    models.ResNet(depth=18, bn_mode='freeze').init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


@pytest.fixture(scope='module')
def r18(checkpoints):
  """EmbeddingNet(18) variables (random checkpoint backbone), images [4, 64, 64, 3], their float32
  (embeddings, feature_map) in eval mode."""
  _, linear, path = checkpoints(18)
  variables = embedding_variables(18, path, linear)
  x = jnp.asarray(nchw_to_nhwc(images(4, 64, seed=1)))
  return variables, x, models.EmbeddingNet(18).apply(variables, x)


def test_random_init_matches_torchvision_scheme():
  # 'rbg' keys: threefry init of every kernel shape takes ~2 s each to compile on a loaded 2-core CPU.
  init = jax.jit(models.EmbeddingNet(18, embedding_dim=512).init)
  variables = init(jax.random.key(0, impl='rbg'), jnp.zeros((1, 32, 32, 3)))
  params = variables['params']
  kernel = np.asarray(params['backbone']['layer4_1']['conv2']['kernel'])  # HWIO 3x3x512x512
  np.testing.assert_allclose(kernel.std(), np.sqrt(2 / (3 * 3 * 512)), rtol=0.02)
  assert np.abs(kernel).max() > 4.5 * kernel.std()  # untruncated normal
  head = np.asarray(params['head']['kernel'])
  np.testing.assert_allclose(head.std(), np.sqrt(2 / 512), rtol=0.02)
  np.testing.assert_array_equal(params['head']['bias'], 0)
  bn = {
    jax.tree_util.keystr(path): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params['backbone'])
    if '_bn' in str(path) or 'bn' in str(path[-2])
  }
  assert len(bn) == 2 * 20  # scale and bias of 20 BN layers
  for path, leaf in bn.items():
    np.testing.assert_array_equal(leaf, 1 if path.endswith("'scale']") else 0, err_msg=path)


def test_head_alone_equals_full_forward(r18):
  variables, x, (emb, fmap) = r18
  model = models.EmbeddingNet(18)
  np.testing.assert_array_equal(model.apply(variables, x, method='features'), fmap)
  np.testing.assert_array_equal(model.apply(variables, fmap, method='head'), emb)
  np.testing.assert_array_equal(model.apply(variables, fmap, method=models.EmbeddingNet.head), emb)
  np.testing.assert_allclose(model.apply(variables, models.global_pool(fmap), method='project'), emb, atol=1e-7)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, rtol=1e-6)


def test_head_on_mixed_feature_maps_batched_equals_one_by_one(r18):
  variables, _, (_, fmap) = r18
  model = models.EmbeddingNet(18)
  firsts, seconds, lam = np.array([0, 2, 1, 3]), np.array([1, 3, 2, 0]), np.array([0.3, 0.7, 0.5, 0.9])
  lam_b = jnp.asarray(lam, jnp.float32)[:, None, None, None]
  mixed = lam_b * fmap[firsts] + (1 - lam_b) * fmap[seconds]
  batched = model.apply(variables, mixed, method='head')
  one_by_one = np.concatenate([model.apply(variables, mixed[i : i + 1], method='head') for i in range(4)])
  # float32 Dense 512 -> 512 at batch 4 vs batch 1 (gemm vs gemv blocking; 1.1e-7 seen here on entries ~0.1)
  np.testing.assert_allclose(batched, one_by_one, rtol=1e-5, atol=1e-6)
  # GMP is non-linear: the embedding of a mix is not the mix of pooled features (spec 2.3).
  pooled = models.global_pool(fmap)
  naive = model.apply(variables, lam[:, None] * pooled[firsts] + (1 - lam[:, None]) * pooled[seconds], method='project')
  assert np.abs(np.asarray(naive) - np.asarray(batched)).max() > 1e-4


def _loss(embeddings):
  return -jnp.sum(embeddings[0] * embeddings[1]) + jnp.sum(embeddings[2] * embeddings[3])


@pytest.mark.slow  # compiles value_and_grad of a ResNet-18
def test_frozen_bn_step_keeps_batch_stats_bit_identical(r18):
  variables, x, (emb_eval, _) = r18
  model = models.EmbeddingNet(18, bn_mode='frozen')

  def loss_fn(params):
    (emb, _), updates = model.apply(
      {'params': params, 'batch_stats': variables['batch_stats']}, x, train=True, mutable=['batch_stats']
    )
    return _loss(emb), (emb, updates['batch_stats'])

  (_, (emb_train, new_stats)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])
  tx = optax.adam(1e-3)
  updates, _ = tx.update(grads, tx.init(variables['params']), variables['params'])
  new_params = optax.apply_updates(variables['params'], updates)

  jax.tree.map(np.testing.assert_array_equal, new_stats, variables['batch_stats'])
  gamma_old = variables['params']['backbone']['layer2_0']['bn1']['scale']
  assert np.abs(np.asarray(new_params['backbone']['layer2_0']['bn1']['scale'] - gamma_old)).max() > 0
  # train=True and train=False are the same function in frozen mode (float32 ResNet-18: jitted vs eager graph;
  # a frozen-mode bug using batch statistics moves embeddings by > 1e-2).
  np.testing.assert_allclose(emb_train, emb_eval, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_trainable_bn_matches_torch_train_mode(checkpoints):
  model_t, _, path = checkpoints(18)
  model_t = copy.deepcopy(model_t).train()
  counts = {}  # torch BN module name -> elements per channel n = B * H * W
  for name, module in model_t.named_modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      module.register_forward_hook(lambda m, i, o, name=name: counts.__setitem__(name, i[0][:, 0].numel()))
  x = images(2, 64, seed=3)
  old = {k: v.clone() for k, v in model_t.state_dict().items()}
  with torch.no_grad():
    fmap_t = nchw_to_nhwc(model_t.forward_features(torch.from_numpy(x)))
  new_t = {k: v.numpy() for k, v in model_t.state_dict().items()}

  variables = weights.load_torchvision(path, depth=18)
  model = models.ResNet(18, bn_mode='trainable')
  with jax.default_matmul_precision('highest'):
    fmap, updates = model.apply(variables, jnp.asarray(nchw_to_nhwc(x)), train=True, mutable=['batch_stats'])
  assert_close(fmap, fmap_t)

  # Flax: running = 0.9 running + 0.1 biased batch var; torch: the same with the unbiased var.
  expected = dict(new_t)
  for name, n in counts.items():
    old_var = old[name + '.running_var'].numpy()
    unbiased = (new_t[name + '.running_var'] - 0.9 * old_var) / 0.1
    expected[name + '.running_var'] = 0.9 * old_var + 0.1 * unbiased * (n - 1) / n
  expected_stats = weights.convert_state_dict(expected, depth=18)['batch_stats']
  torch_stats = weights.convert_state_dict(new_t, depth=18)['batch_stats']
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), updates['batch_stats'], expected_stats
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a['mean'], b['mean'], rtol=1e-4, atol=1e-5),
    updates['batch_stats'],
    torch_stats,
    is_leaf=lambda t: isinstance(t, dict) and 'mean' in t,
  )
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), updates['batch_stats'], variables['batch_stats'])
  assert all(jax.tree.leaves(changed))
  # Eval mode of a trainable-BN model uses the running statistics, like frozen mode.
  np.testing.assert_array_equal(
    model.apply(variables, jnp.asarray(nchw_to_nhwc(x)), train=False),
    models.ResNet(18).apply(variables, jnp.asarray(nchw_to_nhwc(x)), train=True),
  )


def test_bfloat16_runs_and_is_close_to_float32(r18):
  variables, x, (emb32, fmap32) = r18
  emb16, fmap16 = models.EmbeddingNet(18, dtype=jnp.bfloat16).apply(variables, x)
  assert fmap16.dtype == jnp.bfloat16 and emb16.dtype == jnp.float32
  assert relative_errors(fmap16, fmap32)[1] < 0.05
  cosine = np.sum(np.asarray(emb16) * np.asarray(emb32), axis=1)
  assert np.all(cosine > 0.99), cosine
  # Head on a bf16 feature map computes in float32.
  head16 = models.EmbeddingNet(18, dtype=jnp.bfloat16).apply(variables, fmap16, method='head')
  assert head16.dtype == jnp.float32
  np.testing.assert_allclose(head16, emb16, atol=1e-6)
