"""`metrix_jax.input_pipeline`: config.dataset -> train and eval iterators, on a small generated demo data set."""

import numpy as np
import pytest

from metrix_jax import config_lib, data, input_pipeline
from metrix_jax.data import builders, demo

DEMO = demo.demo_config(num_classes=40, num_train_classes=24, images_per_class=6)  # 144 train / 96 test images


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """A data dir whose `demo` is the small config above (the config's data set is always the default one)."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(demo.Demo, 'default_config', classmethod(lambda cls, **kwargs: DEMO))
    yield str(tmp_path_factory.mktemp('input_pipeline_data'))


def tiny_config(data_dir, **dataset):
  c = config_lib.base_config()
  c.seed = 3
  c.dataset.name = 'demo'
  c.dataset.data_dir = data_dir
  c.dataset.image_size = 24
  c.dataset.eval_resize = 0
  c.dataset.sampler = 'balanced'
  c.dataset.classes_per_batch = 6
  c.dataset.images_per_class = 4
  c.dataset.num_workers = 0
  c.dataset.eval_batch_size = 40
  c.train.batch_size = 24
  for key, value in dataset.items():
    c.dataset[key] = value
  return c


def concat(batches, key):
  return np.concatenate([b[key] for b in batches])


def test_train_data_follows_the_config(data_dir):
  config = tiny_config(data_dir)
  bundle = input_pipeline.build_train_data(config)
  assert (bundle.num_train_images, bundle.num_train_classes) == (144, 24)
  batches = [next(bundle.train_iterator) for _ in range(2)]
  state = bundle.train_iterator.get_state()
  bundle.train_iterator.close()
  assert state == {'step': 2, 'seed': 3, 'global_batch_size': 24, 'num_examples': 144, 'sampler': 'balanced'}
  for batch in batches:
    assert set(batch) == {'image', 'label'}
    assert batch['image'].shape == (24, 24, 24, 3) and batch['image'].dtype == np.uint8
    assert batch['label'].shape == (24,) and batch['label'].dtype == np.int32
    groups = batch['label'].reshape(6, 4)  # 6 classes x 4 images, groups contiguous
    assert (groups == groups[:, :1]).all() and len(set(groups[:, 0])) == 6 and groups.max() < 24
  # The same batches as the data module's iterator called with the config's values by hand.
  direct = data.create_train_iterator(
    'demo',
    data_dir=data_dir,
    global_batch_size=24,
    image_size=24,
    seed=3,
    sampler='balanced',
    classes_per_batch=6,
    images_per_class=4,
  )
  for batch in batches:
    expected = next(direct)
    for key in batch:
      np.testing.assert_array_equal(batch[key], expected[key], err_msg=key)
  direct.close()


def test_eval_splits_hold_every_image_once(data_dir):
  config = tiny_config(data_dir)
  eval_data = input_pipeline.build_eval_data(config, include_train=True)
  assert set(eval_data) == {'test', 'train'}
  for split, size in (('test', 96), ('train', 144)):
    batches = list(eval_data[split])
    labels = builders.RecordSource(builders.prepare('demo', data_dir).data_dir, split).labels
    assert [b['image'].shape for b in batches] == [(40, 24, 24, 3)] * -(-size // 40)
    mask = concat(batches, 'mask')
    assert mask.sum() == size and mask[:size].all()  # padding only at the end
    np.testing.assert_array_equal(concat(batches, 'index')[mask], np.arange(size))
    np.testing.assert_array_equal(concat(batches, 'label')[mask], labels)
  assert set(input_pipeline.build_eval_data(config)) == {'test'}
  # The trainer's eval sets are the same batches as evaluate's.
  bundle = input_pipeline.build_train_data(config)
  bundle.train_iterator.close()
  sets = bundle.eval_sets()
  assert set(sets) == {'test'}
  for ours, theirs in zip(sets['test'], eval_data['test']):
    for key in ours:
      np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_eval_resize_zero_and_none_are_the_pipeline_default(data_dir):
  images = {}
  for resize in (0, None, 27, 32):
    config = tiny_config(data_dir, eval_resize=resize)
    config_lib.validate(config, check_files=False)
    images[resize] = concat(input_pipeline.build_eval_data(config)['test'], 'image')
    assert input_pipeline.eval_resize(config) == (resize or 27)  # round(24 * 256 / 224)
  np.testing.assert_array_equal(images[0], images[None])
  np.testing.assert_array_equal(images[0], images[27])
  assert not np.array_equal(images[0], images[32])  # 32 px glyphs centre-cropped without a resize
