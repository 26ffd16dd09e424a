"""Data: tfds builders (array_record, no TensorFlow) and grain input pipelines for metric learning.

The data sets (`DATASETS`, the one list of them; `check_name(name)` is the one check): 'demo' (generated glyphs,
no download), 'glyphs' (the same generator, every non-Latin glyph class: a pretraining source), 'omniglot',
'cub200', 'cars196', 'sop', 'inshop'. Built under `data_dir` (default $TFDS_DATA_DIR or ~/tensorflow_datasets)
from the official archives in `manual_dir` (default <data_dir>/downloads/manual) on first use;
`download_instructions(name)` says which files and where to get them. Importing this package is cheap (no tfds,
grain or jax): the config validator asks it.

Module layout:
    base.py      the tfds builder base (`MetrixBuilder`), features, image encoding, `parallel_map`, archive readers
    builders.py  the data sets' builders, name -> builder class, `prepare`, `load_split`; its command line builds
    demo.py      the generated `demo` data set (a `MetrixBuilder`)
    pipeline.py  grain samplers, transforms, checkpointable train iterator, padded eval iterable
Training and evaluation read `config.dataset` through `metrix_jax.input_pipeline`, which calls these functions
(all arguments plain values):

    from metrix_jax import data
    data.prepare(name, data_dir=None, manual_dir=None)           # build on first use (call before forking work);
    #   rebuilds when the archives it was built from changed (builders.prepare); rebuild=True always rebuilds
    info = data.get_dataset_info(name, data_dir, manual_dir)
    # -> DatasetInfo(num_classes_train, num_train_examples, eval_splits, has_gallery)
    #    eval_splits: ('test',) or, with a gallery, ('query', 'gallery')
    train_it = data.create_train_iterator(
        name, data_dir=..., manual_dir=..., global_batch_size=..., image_size=..., sampler='random'|'balanced',
        classes_per_batch=20, images_per_class=5, seed=..., process_index=jax.process_index(),
        process_count=jax.process_count(), num_workers=...)
    batch = next(train_it)      # {'image': uint8 [b, S, S, 3], 'label': int32 [b]}, b = global / process_count
    state = train_it.get_state()          # JSON-able dict; save with the checkpoint
    train_it.set_state(state)             # resume: the exact continuation
    for batch in data.create_eval_iterator(name, split, data_dir=..., manual_dir=..., global_batch_size=...,
                                           image_size=..., resize_size=None, process_index=..., process_count=...):
      ...   # + 'mask': bool [b] (False on padding of the last batch), 'index': int32 [b] (-1 on padding)
    x = data.normalize_images(batch['image'])   # on device: float32, ImageNet mean/std

`create_train_iterator` also takes `start_step` (or use `set_state`), `crop_scale`, `crop_ratio`, `flip` (None:
the data set's defaults, `pipeline.augment_defaults`), `with_replacement` (balanced sampler), `num_threads`.
The train iterator is infinite; `it.steps_per_epoch` = floor(N / global_batch_size).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetSpec(NamedTuple):
  """What is known of a data set without building it (its builder class: `builders.builder_class(name)`)."""

  needs_manual_dir: bool  # built from official archives the user downloads (False: generated locally)
  recall_ks: tuple[int, ...]  # the Ks of its Recall@K protocol
  eval_splits: tuple[str, ...] = ('test',)  # ('test',): leave-one-out; ('query', 'gallery'): query -> gallery
  train_split: str = 'train'


# The registry: every data set, in the order the docs list them.
DATASETS: dict[str, DatasetSpec] = {
  'demo': DatasetSpec(needs_manual_dir=False, recall_ks=(1, 2, 4, 8)),
  'glyphs': DatasetSpec(needs_manual_dir=False, recall_ks=(1, 2, 4, 8)),  # the transfer studies' source
  'omniglot': DatasetSpec(needs_manual_dir=True, recall_ks=(1, 2, 4, 8)),
  'cub200': DatasetSpec(needs_manual_dir=True, recall_ks=(1, 2, 4, 8, 16, 32)),
  'cars196': DatasetSpec(needs_manual_dir=True, recall_ks=(1, 2, 4, 8, 16, 32)),
  'sop': DatasetSpec(needs_manual_dir=True, recall_ks=(1, 10, 100, 1000)),
  'inshop': DatasetSpec(needs_manual_dir=True, recall_ks=(1, 10, 20, 30, 40, 50), eval_splits=('query', 'gallery')),
}
DATASET_NAMES = tuple(DATASETS)


class DatasetInfo(NamedTuple):
  num_classes_train: int
  num_train_examples: int
  eval_splits: tuple[str, ...]  # ('test',) or (query, gallery)
  has_gallery: bool


def normalize_images(images, dtype=None):
  """uint8 [..., 3] -> (x / 255 - mean) / std in float32 (or `dtype`), ImageNet statistics; jnp, jit-friendly."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  x = jnp.asarray(images).astype(jnp.float32) * (1.0 / 255.0)
  x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
  return x if dtype is None else x.astype(dtype)


def check_name(name: str) -> str:
  """`name` if it is a data set of the registry; else ValueError listing the valid choices."""
  if name not in DATASETS:
    raise ValueError(f'Unknown dataset {name!r}; valid choices: {", ".join(DATASET_NAMES)}.')
  return name


def spec(name: str) -> DatasetSpec:
  return DATASETS[check_name(name)]


def download_instructions(name: str) -> str:
  """Which files the manual dir needs and where to download them (imports the builders: tfds)."""
  from metrix_jax.data import builders  # pylint: disable=g-import-not-at-top

  return builders.builder_class(name).MANUAL_DOWNLOAD_INSTRUCTIONS


def prepare(name: str, data_dir: str | None = None, manual_dir: str | None = None, **builder_kwargs):
  """Builds the data set on first use, rebuilds it when its archives changed (`rebuild=True`: always); returns
  the tfds builder. See `builders.prepare`."""
  from metrix_jax.data import builders  # pylint: disable=g-import-not-at-top

  return builders.prepare(check_name(name), data_dir, manual_dir, **builder_kwargs)


def get_dataset_info(
  name: str, data_dir: str | None = None, manual_dir: str | None = None, **builder_kwargs
) -> DatasetInfo:
  """(num_classes_train, num_train_examples, eval_splits, has_gallery); builds the data set if needed."""
  from metrix_jax.data import builders  # pylint: disable=g-import-not-at-top

  dataset = spec(name)
  train = builders.load_split(name, dataset.train_split, data_dir, manual_dir, **builder_kwargs)
  return DatasetInfo(
    num_classes_train=int(train.labels.max()) + 1,
    num_train_examples=len(train),
    eval_splits=dataset.eval_splits,
    has_gallery=len(dataset.eval_splits) == 2,
  )


def create_train_iterator(
  name: str,
  *,
  global_batch_size: int,
  image_size: int,
  seed: int,
  data_dir: str | None = None,
  manual_dir: str | None = None,
  sampler: str = 'random',
  classes_per_batch: int = 20,
  images_per_class: int = 5,
  with_replacement: bool = True,
  process_index: int = 0,
  process_count: int = 1,
  num_workers: int = 0,
  num_threads: int | None = None,
  start_step: int = 0,
  crop_scale: Sequence[float] | None = None,
  crop_ratio: Sequence[float] | None = None,
  flip: bool | None = None,
  **builder_kwargs,
):
  """Infinite checkpointable iterator of this host's train batches; see the module docstring."""
  from metrix_jax.data import builders, pipeline  # pylint: disable=g-import-not-at-top

  source = builders.load_split(name, spec(name).train_split, data_dir, manual_dir, **builder_kwargs)
  sampler_fn = pipeline.make_sampler(
    source.labels,
    sampler=sampler,
    global_batch_size=global_batch_size,
    classes_per_batch=classes_per_batch,
    images_per_class=images_per_class,
    seed=seed,
    with_replacement=with_replacement,
  )
  augment = pipeline.check_crop(pipeline.replace_augment(name, crop_scale, crop_ratio, flip), image_size)
  return pipeline.TrainIterator(
    source,
    sampler_fn,
    image_size=image_size,
    augment=augment,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    num_workers=num_workers,
    num_threads=num_threads,
    start_step=start_step,
  )


def create_eval_iterator(
  name: str,
  split: str,
  *,
  global_batch_size: int,
  image_size: int,
  resize_size: int | None = None,
  data_dir: str | None = None,
  manual_dir: str | None = None,
  process_index: int = 0,
  process_count: int = 1,
  num_workers: int = 0,
  num_threads: int | None = None,
  **builder_kwargs,
):
  """Re-iterable eval batches of `split` (any split, 'train' included) in a fixed order, padded + masked."""
  from metrix_jax.data import builders, pipeline  # pylint: disable=g-import-not-at-top

  source = builders.load_split(check_name(name), split, data_dir, manual_dir, **builder_kwargs)
  return pipeline.EvalIterable(
    source,
    global_batch_size=global_batch_size,
    image_size=image_size,
    resize_size=resize_size,
    process_index=process_index,
    process_count=process_count,
    num_workers=num_workers,
    num_threads=num_threads,
  )
