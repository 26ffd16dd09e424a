"""Every config file loads and validates; validate() lists every problem; typos in overrides are readable."""

import glob
import importlib.util
import os

from absl import flags
from ml_collections import config_flags
import pytest

from metrix_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))
# Configs of a data set that take a '<loss>,<mix mode>' recipe argument (pretrain_*.py: one fixed recipe).
RECIPE_CONFIGS = [f for f in CONFIG_FILES if not os.path.basename(f).startswith('pretrain_')]


def _load(path, arg=None):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_all_config_files_present():
  names = {os.path.basename(f)[:-3] for f in CONFIG_FILES}
  assert {'demo', 'omniglot', 'cub200', 'cars196', 'sop', 'inshop'} <= names


@pytest.mark.parametrize('path', RECIPE_CONFIGS, ids=lambda p: os.path.basename(p))
@pytest.mark.parametrize('arg', [None, 'contrastive', 'ms', 'pa', 'ms,feature', 'contrastive,input', 'pa,embedding'])
def test_config_loads_and_validates(path, arg):
  config = _load(path, arg)
  config_lib.validate(config, check_files=False)
  assert config.dataset.name == os.path.basename(path)[:-3]
  for key in (
    'dataset.manual_dir',
    'model.depth',
    'model.pretrained',
    'loss.name',
    'mix.mode',
    'mix.pairs',
    'mix.alpha',
    'mix.weight',
    'train.batch_size',
    'train.num_epochs',
    'train.num_steps',
    'seed',
  ):
    node = config
    for part in key.split('.'):
      assert part in node, key
      node = node[part]
  assert isinstance(config.mix.pairs, tuple) and isinstance(config.dataset.recall_ks, tuple)


def test_glyph_pretraining_config_is_a_resumable_source_run_without_latin():
  config = _load(os.path.join(ROOT, 'configs', 'pretrain_glyphs.py'))
  config_lib.validate(config, check_files=False)
  assert (config.dataset.name, config.dataset.image_size, config.model.depth) == ('glyphs', 32, 18)
  assert config_lib.optional(config.model.pretrained) is None and not config.model.bn_freeze  # from scratch
  assert config.mix.mode == 'none' and config.loss.name == 'proxy_anchor'
  assert config.train.checkpoint_every_steps <= 250 and config.train.num_steps == 4000  # resumable, ~1 h
  batch = config.dataset.classes_per_batch * config.dataset.images_per_class
  assert batch == config.train.batch_size


def test_recipes_follow_the_spec_table():
  cub = os.path.join(ROOT, 'configs', 'cub200.py')
  sop = os.path.join(ROOT, 'configs', 'sop.py')
  inshop = os.path.join(ROOT, 'configs', 'inshop.py')
  c = _load(cub, 'contrastive')
  assert (
    c.train.num_epochs,
    c.optim.lr,
    c.optim.step_epochs,
    c.optim.gamma,
    c.optim.warmup_epochs,
    c.model.bn_freeze,
    c.dataset.sampler,
  ) == (60, 1e-4, 10, 0.1, 5, True, 'random')
  c = _load(cub, 'ms,feature')
  assert (c.train.num_epochs, c.optim.step_epochs, c.optim.gamma) == (100, 10, 0.5)
  assert c.loss.name == 'multi_similarity' and c.mix.mode == 'feature'
  c = _load(sop, 'ms')
  assert (c.optim.lr, c.optim.step_epochs, c.optim.warmup_epochs, c.model.bn_freeze, c.dataset.sampler) == (
    6e-4,
    20,
    1,
    False,
    'balanced',
  )
  assert c.dataset.classes_per_batch * c.dataset.images_per_class == c.train.batch_size == 100
  c = _load(inshop, 'contrastive,feature')
  assert (c.optim.lr, c.optim.step_epochs, c.optim.gamma, c.optim.warmup_epochs, c.model.bn_freeze) == (
    1e-4,
    10,
    0.25,
    5,
    True,
  )
  assert c.dataset.recall_ks == (1, 10, 20, 30, 40, 50)
  c = _load(cub, 'ms')
  assert c.optim.weight_decay == 1e-4 and c.optim.clip_value == 10.0 and c.optim.proxy_lr_mult == 100.0
  assert c.seed == 1 and c.model.embedding_dim == 512 and c.model.depth == 50


def test_bad_recipe_argument_lists_choices():
  with pytest.raises(ValueError, match='contrastive'):
    _load(os.path.join(ROOT, 'configs', 'cub200.py'), 'triplet')


def test_validate_lists_every_problem_with_choices():
  c = config_lib.base_config()
  c.mix.mode = 'features'
  c.model.depth = 51
  c.dataset.name = 'cub'
  c.train.batch_size = 0
  c.mix.pairs = ('pos_neg', 'pos_anchor')
  c.loss.name = 'triplet'
  with pytest.raises(ValueError) as err:
    config_lib.validate(c, check_files=False)
  msg = str(err.value)
  for expected in (
    "mix.mode='features'",
    "'embedding'",
    'model.depth=51',
    '18',
    "dataset.name='cub'",
    "'cub200'",
    'train.batch_size=0',
    "'pos_anchor'",
    "'anc_neg'",
    "loss.name='triplet'",
    "'multi_similarity'",
  ):
    assert expected in msg, (expected, msg)


def test_validate_checks_files_and_balanced_batches(tmp_path):
  c = config_lib.base_config()
  c.model.pretrained = str(tmp_path / 'resnet50.npz')
  c.dataset.manual_dir = str(tmp_path / 'nope')
  c.dataset.sampler = 'balanced'
  c.train.batch_size = 64
  with pytest.raises(ValueError) as err:
    config_lib.validate(c)
  msg = str(err.value)
  assert 'metrix_jax.weights convert' in msg and 'manual_dir' in msg and '20 x 5 != 64' in msg


def test_unknown_key_in_a_config_file_is_rejected():
  c = config_lib.base_config()
  c.train.learning_rate = 0.1
  with pytest.raises(ValueError, match="unknown key 'train.learning_rate'"):
    config_lib.validate(c, check_files=False)


def _parse(argv):
  fv = flags.FlagValues()
  argv = ['prog'] + argv
  holder = config_flags.DEFINE_config_file('config', flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return holder.value


def test_command_line_overrides_and_typos():
  path = os.path.join(ROOT, 'configs', 'cub200.py')
  c = _parse(
    [
      f'--config={path}:ms',
      '--config.mix.mode=feature',
      '--config.train.num_steps=7',
      '--config.model.pretrained=None',
      "--config.mix.pairs=('pos_neg',)",
    ]
  )
  assert c.loss.name == 'multi_similarity' and c.mix.mode == 'feature' and c.train.num_steps == 7
  assert c.mix.pairs == ('pos_neg',) and config_lib.optional(c.model.pretrained) is None
  config_lib.validate(c, check_files=False)
  c = _parse([f'--config={path}', '--config.dataset.manual_dir=/data/cub'])
  assert c.dataset.manual_dir == '/data/cub'
  with pytest.raises(Exception) as err:  # absl wraps the config's KeyError/AttributeError
    _parse([f'--config={path}', '--config.mix.mdoe=feature'])
  assert 'mdoe' in str(err.value)
  c = _parse([f'--config={path}', '--config.mix.mode=features'])
  with pytest.raises(ValueError, match="'none', 'input', 'feature', 'embedding'"):
    config_lib.validate(c, check_files=False)
