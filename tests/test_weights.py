"""Tests for metrix_jax.weights: torchvision state dict -> Flax variables, formats, CLI, errors."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
sys.path.insert(0, str(Path(__file__).parent))
from reference import torch_resnet  # noqa: E402

from metrix_jax import models, weights  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def r18_checkpoint(tmp_path_factory):
  """(torch ResNet-18 with random weights and BN statistics, path of its saved state dict)."""
  model = torch_resnet.random_resnet(18, seed=5)
  path = tmp_path_factory.mktemp('ckpt') / 'resnet18.pth'
  torch.save(model.state_dict(), path)
  return model, str(path)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_resnet50_tree_and_parameter_count_match_torchvision():
  state = torch_resnet.resnet(50).state_dict()
  assert len(state) == 320
  assert sum(v.numel() for k, v in state.items() if 'running' not in k and 'num_batches' not in k) == 25_557_032
  variables = jax.eval_shape(models.ResNet(50).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  params, stats = jax.tree.leaves(variables['params']), jax.tree.leaves(variables['batch_stats'])
  fc = 2048 * 1000 + 1000
  assert sum(p.size for p in params) + fc == 25_557_032
  num_bn = 53
  assert len(params) + 2 + len(stats) + num_bn == 320  # + fc weight/bias + num_batches_tracked


def test_layout_conversion(r18_checkpoint):
  model_t, path = r18_checkpoint
  state = {k: v.numpy() for k, v in model_t.state_dict().items()}
  variables = weights.load_torchvision(path, depth=18)
  assert set(variables) == {'params', 'batch_stats'} and 'fc' not in variables['params']
  p, s = variables['params'], variables['batch_stats']
  np.testing.assert_array_equal(p['conv1']['kernel'], state['conv1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p['bn1']['scale'], state['bn1.weight'])
  np.testing.assert_array_equal(p['bn1']['bias'], state['bn1.bias'])
  np.testing.assert_array_equal(s['bn1']['mean'], state['bn1.running_mean'])
  np.testing.assert_array_equal(s['bn1']['var'], state['bn1.running_var'])
  np.testing.assert_array_equal(
    p['layer2_0']['downsample_conv']['kernel'], state['layer2.0.downsample.0.weight'].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(s['layer4_1']['bn2']['var'], state['layer4.1.bn2.running_var'])
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  expected = jax.eval_shape(models.ResNet(18).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert jax.tree.map(lambda x: x.shape, expected) == jax.tree.map(lambda x: x.shape, variables)


def test_convert_cli_npz_round_trip(r18_checkpoint, tmp_path):
  _, path = r18_checkpoint
  npz = tmp_path / 'resnet18.npz'
  result = subprocess.run(
    [sys.executable, '-m', 'metrix_jax.weights', 'convert', path, str(npz)],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  assert 'ResNet-18' in result.stdout and npz.exists()
  with np.load(npz) as data:
    assert 'fc.weight' in data.files and not any(k.endswith('num_batches_tracked') for k in data.files)
  assert_trees_equal(weights.load_torchvision(str(npz), depth=18), weights.load_torchvision(path, depth=18))
  # In-process entry point, errors go to stderr with exit status 1.
  assert weights.main(['convert', str(tmp_path / 'missing.pth'), str(tmp_path / 'x.npz')]) == 2  # a user mistake


def test_npz_loads_without_torch(r18_checkpoint, tmp_path, monkeypatch):
  _, path = r18_checkpoint
  npz = str(tmp_path / 'r18.npz')
  assert weights.convert_file(path, npz) == 18
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now raises ImportError
  assert_trees_equal(weights.load_torchvision(npz, depth=18), weights.load_torchvision(npz, depth=18))
  with pytest.raises(ImportError, match=r'needs torch.*convert.*\.npz'):
    weights.load_torchvision(path, depth=18)


def test_wrapped_and_ddp_state_dicts(r18_checkpoint, tmp_path):
  model_t, path = r18_checkpoint
  wrapped = tmp_path / 'ddp.pth'
  torch.save({'epoch': 3, 'state_dict': {'module.' + k: v for k, v in model_t.state_dict().items()}}, wrapped)
  assert_trees_equal(weights.load_torchvision(str(wrapped), depth=18), weights.load_torchvision(path, depth=18))


def test_safetensors_round_trip(r18_checkpoint, tmp_path):
  pytest.importorskip('safetensors', reason='safetensors is not installed (optional reader: pip install safetensors)')
  from safetensors.torch import save_file

  model_t, path = r18_checkpoint
  st_path = tmp_path / 'r18.safetensors'
  save_file(model_t.state_dict(), str(st_path))
  assert_trees_equal(weights.load_torchvision(str(st_path), depth=18), weights.load_torchvision(path, depth=18))


def test_safetensors_without_the_package_says_how_to_install(tmp_path, monkeypatch):
  st_path = tmp_path / 'r18.safetensors'
  st_path.write_bytes(b'\0' * 8)  # never parsed: the reader is missing
  monkeypatch.setitem(sys.modules, 'safetensors', None)  # `import safetensors...` now raises ImportError
  monkeypatch.setitem(sys.modules, 'safetensors.numpy', None)
  with pytest.raises(ImportError, match='pip install safetensors'):
    weights.load_torchvision(str(st_path), depth=18)


def test_missing_file_says_how_to_produce_it(tmp_path):
  missing = str(tmp_path / 'resnet50.npz')
  for call in (
    lambda: weights.load_torchvision(missing, depth=50),
    lambda: weights.init_embedding_variables(models.EmbeddingNet(50), jax.random.key(0), pretrained=missing),
  ):
    with pytest.raises(FileNotFoundError) as info:
      call()
    message = str(info.value)
    assert missing in message
    assert "resnet50(weights='IMAGENET1K_V1').state_dict()" in message
    assert 'python -m metrix_jax.weights convert resnet50.pth resnet50.npz' in message


def test_wrong_depth_names_the_checkpoint_depth(r18_checkpoint):
  _, path = r18_checkpoint
  with pytest.raises(ValueError, match=r'looks like a ResNet-18, but depth=50') as info:
    weights.load_torchvision(path, depth=50)
  assert 'missing keys' in str(info.value) and 'layer1.0.conv3.weight' in str(info.value)
  with pytest.raises(ValueError, match=r'looks like a ResNet-18, but depth=34'):
    weights.load_torchvision(path, depth=34)


def test_unexpected_keys_and_wrong_shapes(r18_checkpoint):
  model_t, _ = r18_checkpoint
  state = {k: v.numpy() for k, v in model_t.state_dict().items()}
  with pytest.raises(ValueError, match=r'unexpected keys \(1\): head\.weight'):
    weights.convert_state_dict({**state, 'head.weight': np.zeros((3, 3))}, depth=18)
  with pytest.raises(ValueError, match=r'missing keys \(1\): bn1\.running_var'):
    weights.convert_state_dict({k: v for k, v in state.items() if k != 'bn1.running_var'}, depth=18)
  shape_error = r'(?s)wrong shapes.*conv1\.weight: \(64, 3, 3, 3\) \(expected \(64, 3, 7, 7\)\)'
  with pytest.raises(ValueError, match=shape_error):
    weights.convert_state_dict({**state, 'conv1.weight': np.zeros((64, 3, 3, 3))}, depth=18)
  with pytest.raises(ValueError, match='Unknown weights format'):
    weights.read_state_dict(__file__)


@pytest.mark.slow  # two ResNet-18 inits
def test_init_embedding_variables(r18_checkpoint, caplog):
  _, path = r18_checkpoint
  model = models.EmbeddingNet(18, embedding_dim=64)
  key = jax.random.key(0, impl='rbg')  # fast to compile on CPU
  with caplog.at_level(logging.WARNING):
    random_vars = weights.init_embedding_variables(model, key, pretrained=None, image_size=32)
  assert 'NOT comparable with the paper' in caplog.text
  loaded = weights.init_embedding_variables(model, key, pretrained=path)
  backbone = weights.load_torchvision(path, depth=18)
  assert_trees_equal(loaded['params']['backbone'], backbone['params'])
  assert_trees_equal(loaded['batch_stats']['backbone'], backbone['batch_stats'])
  # The head is initialised exactly as a full model.init with the same key would.
  assert_trees_equal(loaded['params']['head'], random_vars['params']['head'])
  assert jax.tree.structure(loaded) == jax.tree.structure(random_vars)
  with pytest.raises(ValueError, match='different depth'):
    weights.with_backbone(
      random_vars,
      weights.load_torchvision(path, depth=18)
      | {'params': jax.eval_shape(models.ResNet(34).init, key, jnp.zeros((1, 32, 32, 3)))['params']},
    )


def test_infer_depth():
  for depth in (18, 34, 50):
    assert weights.infer_depth(torch_resnet.resnet(depth).state_dict().keys()) == depth
  assert weights.infer_depth(['conv1.weight']) is None


@pytest.mark.skipif(not os.environ.get('METRIX_TORCHVISION_PARITY'), reason='needs torchvision; opt-in')
@pytest.mark.parametrize('depth,size', [(50, 224), (50, 193), (18, 224)])
def test_parity_with_torchvision_itself(depth, size, tmp_path):
  """Opt-in (METRIX_TORCHVISION_PARITY=1, torchvision installed): torchvision.models.resnet{depth}() itself,
  random weights and random BN statistics, last feature map to 1e-4 relative."""
  torchvision = pytest.importorskip('torchvision')
  model_t = getattr(torchvision.models, f'resnet{depth}')()
  torch_resnet.randomize_batchnorm(model_t, torch.Generator().manual_seed(0))
  model_t.eval()
  path = str(tmp_path / f'tv{depth}.pth')
  torch.save(model_t.state_dict(), path)
  x = np.random.RandomState(0).randn(2, 3, size, size).astype(np.float32)
  with torch.no_grad():
    body = torch.nn.Sequential(*list(model_t.children())[:-2])
    expected = body(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  with jax.default_matmul_precision('highest'):
    variables = weights.load_torchvision(path, depth=depth)
    actual = models.ResNet(depth).apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert actual.shape == expected.shape
  err = np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max()
  print(f'torchvision {torchvision.__version__} resnet{depth} at {size} px: max rel err {err:.2e}')
  assert err < 1e-4
