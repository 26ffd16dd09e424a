"""Small stand-in data for trainer tests: deterministic, checkpointable, class-structured, tiny."""

import os
import time

import numpy as np

from metrix_jax import input_pipeline


class FakeTrainIterator:
  """Endless batches, a pure function of (seed, position, process): get_state/set_state as grain's."""

  def __init__(self, *, seed, batch_size, image_size, num_classes, process_index=0, process_count=1):
    self.seed, self.batch_size, self.image_size, self.num_classes = seed, batch_size, image_size, num_classes
    self.process_index, self.process_count, self.position = process_index, process_count, 0

  def __iter__(self):
    return self

  def _global(self, position):
    rng = np.random.default_rng([self.seed, position])
    per_class = 2
    classes = rng.choice(self.num_classes, self.batch_size * self.process_count // per_class, replace=False)
    labels = np.repeat(classes, per_class).astype(np.int32)
    images = class_images(labels, self.image_size, rng)
    return images, labels

  def __next__(self):
    hang_at = os.environ.get('METRIX_FAKE_DATA_HANG_AT')  # simulates a stuck input pipeline (SIGKILL test)
    if hang_at and self.position + 1 >= int(hang_at):
      time.sleep(3600)
    delay = os.environ.get('METRIX_FAKE_DATA_DELAY_S')  # a slow input pipeline (SIGTERM test)
    if delay:
      time.sleep(float(delay))
    images, labels = self._global(self.position)
    self.position += 1
    lo = self.process_index * self.batch_size
    return {'image': images[lo : lo + self.batch_size], 'label': labels[lo : lo + self.batch_size]}

  def get_state(self):
    return {'position': self.position}

  def set_state(self, state):
    self.position = int(state['position'])


def class_images(labels, image_size, rng):
  """uint8 [B, S, S, 3]: a per-class colour/stripe pattern plus noise."""
  yy, xx = np.meshgrid(np.arange(image_size), np.arange(image_size), indexing='ij')
  out = []
  for label in labels:
    crng = np.random.default_rng(1000 + int(label))
    freq, phase, colour = crng.uniform(0.2, 1.0), crng.uniform(0, 6), crng.uniform(0, 255, 3)
    pattern = 0.5 + 0.5 * np.sin(freq * (xx * np.cos(phase) + yy * np.sin(phase)) + phase)
    image = pattern[..., None] * colour + rng.normal(0, 20, (image_size, image_size, 3))
    out.append(np.clip(image, 0, 255).astype(np.uint8))
  return np.stack(out)


def fake_data_factory(
  *, num_train_images=64, num_train_classes=12, num_test_classes=5, test_per_class=4, gallery=False
):
  def factory(config):
    import jax

    it = FakeTrainIterator(
      seed=config.seed,
      batch_size=config.train.batch_size // jax.process_count(),
      image_size=config.dataset.image_size,
      num_classes=num_train_classes,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )

    def eval_split(offset):
      """Global batches of 8 x device_count rows (the last one padded + masked); this host's rows of each."""
      labels = np.repeat(np.arange(num_test_classes) + 100, test_per_class).astype(np.int32)
      images = class_images(labels, config.dataset.image_size, np.random.default_rng(7 + offset))
      gbs = 8 * jax.device_count()
      rows = gbs // jax.process_count()
      batches = []
      for start in range(0, len(labels), gbs):
        img, lab = images[start : start + gbs], labels[start : start + gbs]
        mask = np.ones(len(lab), bool)
        pad = gbs - len(lab)
        if pad:
          img = np.concatenate([img, np.zeros((pad,) + img.shape[1:], np.uint8)])
          lab = np.concatenate([lab, np.zeros(pad, np.int32)])
          mask = np.concatenate([mask, np.zeros(pad, bool)])
        lo = jax.process_index() * rows
        batches.append({'image': img[lo : lo + rows], 'label': lab[lo : lo + rows], 'mask': mask[lo : lo + rows]})
      return batches

    def eval_sets():
      if gallery:
        return {'query': eval_split(0), 'gallery': eval_split(1)}
      return {'test': eval_split(0)}

    return input_pipeline.DataBundle(
      train_iterator=it, eval_sets=eval_sets, num_train_images=num_train_images, num_train_classes=num_train_classes
    )

  return factory


def tiny_config(loss='contrastive', mode='none', *, steps=2):
  from metrix_jax import config_lib

  c = config_lib.base_config()
  c.dataset.name = 'demo'
  c.dataset.image_size = 32
  c.dataset.eval_resize = 32
  c.dataset.num_workers = 0
  c.dataset.recall_ks = (1, 2)
  c.model.depth = 18
  c.model.embedding_dim = 16
  c.model.bn_freeze = False
  c.loss.name = loss
  c.mix.mode = mode
  c.mix.items_per_anchor = 2
  c.optim.lr = 1e-3
  c.optim.warmup_epochs = 1
  c.train.batch_size = 8
  c.train.num_steps = steps
  c.train.eval_every_epochs = 0
  c.train.checkpoint_every_steps = 1000
  c.train.log_every_steps = 1
  return c


def _define_tiny():
  import flax.linen as nn
  import jax.numpy as jnp
  from metrix_jax import models

  class Tiny(nn.Module):
    """EmbeddingNet's interface (features / head / __call__, same variable collections) at a tiny size."""

    depth: int = 0
    embedding_dim: int = 16
    bn_mode: str = 'trainable'
    dtype: object = jnp.float32

    def setup(self):
      self.conv1 = nn.Conv(8, (3, 3), strides=2, use_bias=False, dtype=self.dtype)
      self.bn1 = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=self.dtype)
      self.conv2 = nn.Conv(16, (3, 3), strides=2, use_bias=False, dtype=self.dtype)
      self.head_dense = nn.Dense(self.embedding_dim, name='head')

    def features(self, x, train=False):
      y = self.conv1(x)
      y = self.bn1(y, use_running_average=self.bn_mode == 'frozen' or not train)
      return self.conv2(nn.relu(y))

    def head(self, feature_map):
      return models.l2_normalize(self.head_dense(models.global_pool(feature_map)))

    def __call__(self, x, train=False):
      fmap = self.features(x, train)
      return self.head(fmap), fmap

  return Tiny


def tiny_model_factory(config):
  import jax.numpy as jnp

  tiny_cls = _define_tiny()
  model = tiny_cls(
    embedding_dim=config.model.embedding_dim,
    dtype=jnp.dtype(config.model.dtype),
    bn_mode='frozen' if config.model.bn_freeze else 'trainable',
  )
  return _BackboneNamed(model)


class _BackboneNamed:
  """Wraps Tiny so its variables read {'params': {'backbone': ..., 'head': ...}} like EmbeddingNet's."""

  def __init__(self, model):
    self.model, self.depth = model, 0

  @staticmethod
  def _to_inner(variables):
    out = {}
    for col, tree in variables.items():
      inner = dict(tree.get('backbone', {}))
      if 'head' in tree:
        inner['head'] = tree['head']
      out[col] = inner
    return out

  @staticmethod
  def _to_outer(variables):
    out = {}
    for col, tree in variables.items():
      tree = dict(tree)
      head = tree.pop('head', None)
      out[col] = {'backbone': tree, **({'head': head} if head is not None else {})}
    return out

  def init(self, key, x, method=None):
    return self._to_outer(self.model.init(key, x, method=method))

  def apply(self, variables, *args, mutable=False, method=None, **kwargs):
    out = self.model.apply(self._to_inner(variables), *args, mutable=mutable, method=method, **kwargs)
    if mutable:
      out, updates = out
      return out, self._to_outer(updates)
    return out


def main():
  """python tests/trainer_fakes.py WORKDIR [--steps N] [--stop-after K] [--loss L] [--mode M]: a tiny run."""
  import argparse
  import json
  import logging
  import sys

  parser = argparse.ArgumentParser()
  parser.add_argument('workdir')
  parser.add_argument('--steps', type=int, default=4)
  parser.add_argument('--stop-after', type=int, default=None)
  parser.add_argument('--loss', default='contrastive')
  parser.add_argument('--mode', default='none')
  parser.add_argument('--checkpoint-every', type=int, default=1000)
  parser.add_argument('--sleep-after-save', type=float, default=0.0)
  parser.add_argument('--distributed', action='store_true')
  args = parser.parse_args()
  from metrix_jax import sharding

  sharding.maybe_initialize_distributed(args.distributed)
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger('metrix_jax').setLevel(logging.INFO)
  from metrix_jax import train

  config = tiny_config(args.loss, args.mode, steps=args.steps)
  config.train.checkpoint_every_steps = args.checkpoint_every
  results = train.train_and_evaluate(
    config,
    args.workdir,
    data_factory=fake_data_factory(),
    model_factory=tiny_model_factory,
    stop_after_steps=args.stop_after,
  )
  sys.stdout.write('RESULTS ' + json.dumps(results, default=float) + '\n')


if __name__ == '__main__':
  main()
