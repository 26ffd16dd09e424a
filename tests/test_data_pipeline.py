"""grain pipelines: determinism, samplers, host sharding, resume, eval padding, transforms."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from metrix_jax import data
from metrix_jax.data import demo, pipeline

CONFIG = demo.demo_config(num_classes=40, num_train_classes=24, images_per_class=6)  # 144 train / 96 test


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('pipeline_data'))
  data.prepare('demo', path, config=CONFIG)
  return path


def train_it(data_dir, **kwargs):
  args = dict(global_batch_size=24, image_size=32, seed=0, data_dir=data_dir, config=CONFIG)
  args.update(kwargs)
  return data.create_train_iterator('demo', **args)


def take(it, n):
  out = [next(it) for _ in range(n)]
  it.close()
  return out


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_train_batches_shape_dtype(data_dir):
  batch = take(train_it(data_dir), 1)[0]
  assert set(batch) == {'image', 'label'}
  assert batch['image'].shape == (24, 32, 32, 3) and batch['image'].dtype == np.uint8
  assert batch['label'].shape == (24,) and batch['label'].dtype == np.int32
  assert batch['label'].max() < 24  # train classes only
  np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 2])  # grey -> RGB


@pytest.mark.parametrize('sampler', ['random', 'balanced'])
def test_determinism_per_seed(data_dir, sampler):
  kwargs = dict(sampler=sampler, classes_per_batch=6, images_per_class=4)
  first = take(train_it(data_dir, **kwargs), 3)
  assert_batches_equal(first, take(train_it(data_dir, **kwargs), 3))
  other = take(train_it(data_dir, seed=1, **kwargs), 1)[0]
  assert not np.array_equal(first[0]['image'], other['image'])


def test_balanced_batches_hold_n_classes_times_m(data_dir):
  it = train_it(data_dir, sampler='balanced', classes_per_batch=6, images_per_class=4)
  for batch in take(it, 5):
    labels = batch['label']
    classes, counts = np.unique(labels, return_counts=True)
    assert len(classes) == 6 and (counts == 4).all()
    assert (labels.reshape(6, 4) == labels.reshape(6, 4)[:, :1]).all()  # groups are contiguous


def test_balanced_sampler_replacement_modes():
  labels = np.repeat(np.arange(10), [2, 8, 8, 8, 8, 8, 8, 8, 8, 8])
  strict = pipeline.BalancedSampler(labels, 10, 5, seed=0, with_replacement=False)
  indices = strict(0).reshape(10, 5)
  for group in indices:
    if labels[group[0]] != 0:  # enough images: no repeats
      assert len(set(group)) == 5
    assert (labels[group] == labels[group[0]]).all()
  official = pipeline.BalancedSampler(labels, 10, 5, seed=0)
  assert any(len(set(g)) < 5 for s in range(20) for g in official(s).reshape(10, 5))  # with replacement


def test_random_sampler_epochs_are_permutations():
  sampler = pipeline.RandomSampler(103, 10, seed=3)
  assert sampler.steps_per_epoch == 10  # remainder dropped
  epoch0 = np.concatenate([sampler(s) for s in range(10)])
  assert len(set(epoch0)) == 100
  epoch1 = np.concatenate([sampler(s) for s in range(10, 20)])
  assert len(set(epoch1)) == 100 and not np.array_equal(epoch0, epoch1)
  np.testing.assert_array_equal(sampler(12), pipeline.RandomSampler(103, 10, seed=3)(12))  # pure in (seed, step)


@pytest.mark.parametrize('sampler', ['random', 'balanced'])
def test_host_shards_partition_the_global_batch(data_dir, sampler):
  kwargs = dict(sampler=sampler, classes_per_batch=6, images_per_class=4)
  whole = take(train_it(data_dir, **kwargs), 2)
  shards = [take(train_it(data_dir, process_index=p, process_count=3, **kwargs), 2) for p in range(3)]
  for step in range(2):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(np.concatenate([s[step][key] for s in shards]), whole[step][key])


def test_resume_reproduces_the_continuation(data_dir):
  reference = take(train_it(data_dir), 6)
  it = train_it(data_dir)
  take_two = [next(it), next(it)]
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  assert state['step'] == 2
  it.close()
  resumed = train_it(data_dir)
  resumed.set_state(state)
  assert_batches_equal(take_two + take(resumed, 4), reference)
  assert_batches_equal(take(train_it(data_dir, start_step=4), 2), reference[4:])


def test_worker_processes_give_the_same_batches_and_resume(data_dir):
  reference = take(train_it(data_dir), 5)
  it = train_it(data_dir)
  assert_batches_equal([next(it), next(it)], reference[:2])
  state = it.get_state()
  it.close()
  resumed = train_it(data_dir, num_workers=2)  # 2 processes interleave steps 2, 3, 4
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 3), reference[2:])


def test_set_state_rejects_another_pipeline(data_dir):
  state = train_it(data_dir).get_state()
  other = train_it(data_dir, seed=5)
  with pytest.raises(ValueError, match='seed'):
    other.set_state(state)
  other.close()


def test_grain_checkpoint_handler_roundtrip(data_dir, tmp_path):
  import grain  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top

  it = train_it(data_dir)
  next(it)
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), item=it)
  expected = next(it)
  restored = handler.restore(epath.Path(tmp_path), item=train_it(data_dir))
  assert restored.step == 1
  assert_batches_equal(take(restored, 1), [expected])
  it.close()


def test_eval_pads_the_last_batch_and_keeps_every_image(data_dir):
  loader = data.create_eval_iterator(
    'demo', 'test', data_dir=data_dir, config=CONFIG, global_batch_size=40, image_size=32
  )
  batches = list(loader)
  assert len(loader) == len(batches) == 3 and loader.num_examples == 96
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.dtype == bool and mask.sum() == 96 and not mask[96:].any()
  np.testing.assert_array_equal(np.concatenate([b['index'] for b in batches])[:96], np.arange(96))
  assert (batches[-1]['label'][16:] == -1).all() and (batches[-1]['image'][16:] == 0).all()
  assert_batches_equal(batches, list(loader))  # deterministic, re-iterable
  # Two hosts: row slices of the same global batches.
  hosts = [
    list(
      data.create_eval_iterator(
        'demo',
        'test',
        data_dir=data_dir,
        config=CONFIG,
        global_batch_size=40,
        image_size=32,
        process_index=p,
        process_count=2,
      )
    )
    for p in range(2)
  ]
  for i, batch in enumerate(batches):
    for key in batch:
      np.testing.assert_array_equal(np.concatenate([hosts[0][i][key], hosts[1][i][key]]), batch[key])


def _jpeg(width, height, mode='RGB'):
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).convert(mode).save(out, format='JPEG', quality=95)
  return out.getvalue()


def test_eval_transform_matches_torchvision_resize_and_center_crop():
  raw = _jpeg(500, 375)
  out = pipeline.eval_transform(raw, 224)
  image = Image.open(io.BytesIO(raw)).convert('RGB').resize((341, 256), Image.BILINEAR)  # int(256 * 500 / 375)
  expected = np.asarray(image)[16:240, 58:282]  # round((256 - 224) / 2), round((341 - 224) / 2)
  assert out.shape == (224, 224, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, expected)
  assert pipeline.default_resize(224) == 256 and pipeline.default_resize(32) == 37
  grey = pipeline.eval_transform(_jpeg(64, 80, 'L'), 32)
  assert grey.shape == (32, 32, 3) and (grey[..., 0] == grey[..., 1]).all()


def test_random_resized_crop_box_follows_scale_and_ratio():
  rng = np.random.default_rng(0)
  for _ in range(300):
    left, top, right, bottom = pipeline.random_resized_crop_box(300, 200, rng, (0.08, 1.0), (3 / 4, 4 / 3))
    w, h = right - left, bottom - top
    assert 0 <= left < right <= 300 and 0 <= top < bottom <= 200
    if (w, h) != (266, 200):  # not the fallback
      assert 0.08 * 60000 - 600 <= w * h <= 60000 and 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
  out = pipeline.train_transform(_jpeg(300, 200), np.random.default_rng(1), 224, pipeline.Augment())
  assert out.shape == (224, 224, 3) and out.dtype == np.uint8


def test_normalize_images():
  images = np.array([[[[0, 128, 255]]]], np.uint8)
  out = np.asarray(data.normalize_images(images))
  expected = (np.array([0, 128, 255]) / 255 - np.array(data.IMAGENET_MEAN)) / np.array(data.IMAGENET_STD)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-5, atol=1e-6)  # float32 mean subtraction


def test_bad_arguments_name_the_choices(data_dir):
  with pytest.raises(ValueError, match='valid choices: demo, glyphs, omniglot, cub200, cars196, sop, inshop'):
    data.get_dataset_info('cub', data_dir)
  with pytest.raises(ValueError, match='valid choices: random, balanced'):
    train_it(data_dir, sampler='uniform')
  with pytest.raises(ValueError, match='must equal global_batch_size'):
    train_it(data_dir, sampler='balanced', classes_per_batch=5, images_per_class=4)
  with pytest.raises(ValueError, match='not divisible'):
    train_it(data_dir, process_count=5)


# What grain leaves on stderr at exit when shared memory outlives its iterators (google/grain#398), and what a
# worker iterator torn down during the interpreter's shutdown prints.
EXIT_NOISE = ('leaked shared_memory', 'resource_tracker', 'Exception ignored', 'Traceback')

_WORKERS_SCRIPT = """
import sys
import numpy as np
from metrix_jax import data
from metrix_jax.data import demo
config = demo.demo_config(num_classes=40, num_train_classes=24, images_per_class=6)
kwargs = dict(data_dir=sys.argv[1], config=config)
loader = data.create_eval_iterator('demo', 'test', global_batch_size=16, image_size=32, num_workers=2, **kwargs)
kept = list(loader)  # every batch kept alive until exit
print('eval', sum(int(b['image'].sum()) for b in kept), {type(v).__name__ for b in kept for v in b.values()})
kwargs['num_workers'] = 1  # (one worker process hands batches over in shared memory too)
partial = iter(data.create_eval_iterator('demo', 'test', global_batch_size=16, image_size=32, **kwargs))
print('partial', int(next(partial)['image'].sum()))  # a generator left open, its workers running
train = data.create_train_iterator('demo', global_batch_size=24, image_size=32, seed=0, **kwargs)
print('train', [int(next(train)['image'].sum()) for _ in range(2)])  # never closed
"""


def test_worker_iterators_leave_nothing_behind_at_exit(data_dir):
  """Multi-worker eval and train iterators, kept or left open until exit: right batches, a silent exit."""
  proc = subprocess.run(
    [sys.executable, '-c', _WORKERS_SCRIPT, data_dir], capture_output=True, text=True, timeout=300, check=False
  )
  assert proc.returncode == 0, proc.stderr
  for noise in EXIT_NOISE:
    assert noise not in proc.stderr, proc.stderr
  eval_batches = list(
    data.create_eval_iterator('demo', 'test', data_dir=data_dir, config=CONFIG, global_batch_size=16, image_size=32)
  )
  train = take(train_it(data_dir), 2)
  assert proc.stdout.splitlines() == [
    f"eval {sum(int(b['image'].sum()) for b in eval_batches)} {{'ndarray'}}",  # plain arrays, not shared memory
    f'partial {int(eval_batches[0]["image"].sum())}',
    f'train {[int(b["image"].sum()) for b in train]}',
  ]
