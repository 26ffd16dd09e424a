"""The input pipeline of training and evaluation: `config.dataset` -> the iterators of `metrix_jax.data`.

One adapter for the trainer and for `python -m metrix_jax.evaluate`: both get their eval batches from one function
(`_eval_iterator`), so a split is preprocessed the same way wherever it is read (shorter side resized to
`eval_resize(config)`, centre crop `dataset.image_size`).

    bundle = input_pipeline.build_train_data(config)     # builds the data set on first use
    batch = next(bundle.train_iterator)                  # {'image': uint8 [b, S, S, 3], 'label': int32 [b]}
    for split, batches in bundle.eval_sets().items():    # 'test', or 'query' and 'gallery'
      ...
    eval_data = input_pipeline.build_eval_data(config, include_train=True)   # + 'train' (eval preprocessing)

S = `config.dataset.image_size`. Train: b = `config.train.batch_size` / `jax.process_count()` (this host's rows of
every global batch). Eval batches add 'mask': bool [b] (False on the padding of the last batch, which is never
dropped; 'label' -1 there) and 'index': int32 [b] (position in the split, -1 on padding), with
b = `config.dataset.eval_batch_size` / `jax.process_count()`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from metrix_jax import config_lib
from metrix_jax import data
from metrix_jax.data import pipeline


@dataclasses.dataclass
class DataBundle:
  """What the trainer needs from the data pipeline (built by `metrix_jax.data`, or a stand-in in tests).

  train_iterator: this host's train batches {'image': uint8 [b, H, W, 3], 'label': int32 [b]} (b = per-host batch),
    endless, with get_state()/set_state().
  eval_sets: callable -> {'test': iterable} (leave-one-out) or {'query': ..., 'gallery': ...}; batches add
    'mask': bool [b] (padding); fresh iterables on every call.
  """

  train_iterator: Any
  eval_sets: Callable[[], dict[str, Any]]
  num_train_images: int
  num_train_classes: int


def prepare(config) -> data.DatasetInfo:
  """Builds `config.dataset` on first use (instant afterwards; call before forking work) and describes it."""
  d = config.dataset
  return data.get_dataset_info(d.name, **_where(d))


def eval_resize(config) -> int:
  """Shorter side (px) of eval images before the centre crop: `dataset.eval_resize`; 0 or None: the pipeline's
  default for `dataset.image_size`, round(image_size * 256 / 224)."""
  d = config.dataset
  return int(d.eval_resize or 0) or pipeline.default_resize(int(d.image_size))


def build_train_data(config) -> DataBundle:
  """The endless, checkpointable train iterator of this host and the eval sets of `config.dataset`."""
  d = config.dataset
  info = prepare(config)
  train_iterator = data.create_train_iterator(
    d.name,
    global_batch_size=config.train.batch_size,
    image_size=d.image_size,
    seed=config.seed,
    sampler=d.sampler,
    classes_per_batch=d.classes_per_batch,
    images_per_class=d.images_per_class,
    **_where(d),
    **_hosts(d),
  )
  return DataBundle(
    train_iterator=train_iterator,
    eval_sets=lambda: _eval_sets(config, info.eval_splits),
    num_train_images=info.num_train_examples,
    num_train_classes=info.num_classes_train,
  )


def build_eval_data(config, *, include_train: bool = False) -> dict[str, pipeline.EvalIterable]:
  """{'test': batches} or {'query': ..., 'gallery': ...}, plus 'train' (eval preprocessing) if `include_train`.

  Each value is re-iterable, in split order: every image once, the last batch padded (see the module docstring).
  """
  splits = prepare(config).eval_splits
  if include_train:
    splits += (data.spec(config.dataset.name).train_split,)
  return _eval_sets(config, splits)


def _eval_sets(config, splits: tuple[str, ...]) -> dict[str, pipeline.EvalIterable]:
  return {split: _eval_iterator(config, split) for split in splits}


def _eval_iterator(config, split: str) -> pipeline.EvalIterable:
  """The one place eval batches of a split are made from `config.dataset`."""
  d = config.dataset
  return data.create_eval_iterator(
    d.name,
    split,
    global_batch_size=d.eval_batch_size,
    image_size=d.image_size,
    resize_size=eval_resize(config),
    **_where(d),
    **_hosts(d),
  )


def _where(d) -> dict[str, str | None]:
  """Where the archives and the built data sets are (None: the data module's defaults)."""
  return dict(data_dir=config_lib.optional(d.data_dir), manual_dir=config_lib.optional(d.manual_dir))


def _hosts(d) -> dict[str, int]:
  """This process's share of every global batch, and its grain worker processes."""
  return dict(process_index=jax.process_index(), process_count=jax.process_count(), num_workers=d.num_workers)
