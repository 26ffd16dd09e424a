"""grain input pipelines: samplers, train/eval transforms, checkpointable per-host iterators.

Data order is a pure function of (seed, step): the global batch of step `s` is `sampler(seed, s)` (indices
into the split), and the augmentation of its `j`-th image draws from `np.random.default_rng([seed, s, j, 1])`.
Each host takes rows `[process_index * b, (process_index + 1) * b)` of every global batch (b = global / count),
so the hosts' batches partition the global batch, and the result does not depend on the number of grain workers
or threads. The iterator state is `{'step': s, ...}`: a resumed run sees exactly the continuation.

Samplers (`sampler=`):
  * 'random': an epoch is a permutation of the split (`default_rng([seed, epoch, 2])`), cut into
    floor(N / B) batches (remainder dropped), as `DataLoader(shuffle=True, drop_last=True)`.
  * 'balanced': each batch draws `classes_per_batch` classes without replacement and `images_per_class` images of
    each (with replacement, as the official sampler; `with_replacement=False` draws without replacement when a
    class has enough images), groups contiguous; floor(N / B) batches per epoch (epochs only matter for logs).

Transforms (PIL, uint8 out, grey/CMYK/palette -> RGB):
  * train: RandomResizedCrop(image_size, scale, ratio; torchvision's 10-trial algorithm, bilinear) + horizontal
    flip (p = 0.5), defaults per data set (`augment_defaults`): ImageNet recipe for the photo benchmarks,
    milder crops and no flip for glyphs (a flipped glyph can be another class).
  * eval: resize the shorter side to `resize_size` (default round(image_size * 256 / 224)), centre crop
    `image_size` (torchvision Resize + CenterCrop rounding).
JPEGs are decoded at a reduced DCT scale (PIL draft) when that still leaves at least the output resolution.

Worker processes (`num_workers > 0`): grain hands each batch over in POSIX shared memory and unlinks a block
when its array is garbage-collected, from a background thread. Arrays still alive at exit, and unlinks still
queued when the interpreter stops that thread, are left to multiprocessing's resource tracker, which warns
"resource_tracker: There appear to be N leaked shared_memory objects to clean up at shutdown" (google/grain#398).
Our iterators therefore copy every batch out of shared memory (plain numpy arrays; a memcpy: ~5 ms for 100 images
of 224 px on the 2-core development VM), wait for grain's queued unlinks when they close, and close at exit
(`atexit`) if nobody did, so no block is left behind and no worker iterator is torn down half-way through the
interpreter's shutdown. The wait reads grain's private unlinking pool (`_wait_for_shared_memory_unlinks`; a
no-op if a grain release drops it; `test_worker_iterators_leave_nothing_behind_at_exit` would then say so).
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import io
import math
import threading
import weakref
from typing import Any, Sequence

import grain
import numpy as np
from PIL import Image

_MAX_STEPS = 2**40  # "infinite" train stream
_SALT_AUGMENT, _SALT_EPOCH, _SALT_BALANCED = 1, 2, 3


# ----------------------------------------------------------------------------------------------------------
# Augmentation settings.


@dataclasses.dataclass(frozen=True)
class Augment:
  crop_scale: tuple[float, float] = (0.08, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True


_GLYPH_AUGMENT = Augment(crop_scale=(0.6, 1.0), crop_ratio=(0.8, 1.25), flip=False)  # characters: no mirror images
_AUGMENT_DEFAULTS = {'demo': _GLYPH_AUGMENT, 'glyphs': _GLYPH_AUGMENT, 'omniglot': _GLYPH_AUGMENT}


def augment_defaults(name: str) -> Augment:
  """Train augmentation of a data set: the official ImageNet recipe, or milder and flip-free for glyphs."""
  return _AUGMENT_DEFAULTS.get(name, Augment())


def default_resize(image_size: int) -> int:
  """Eval shorter side for a crop size: 256 for 224, scaled for other sizes."""
  return int(round(image_size * 256 / 224))


# ----------------------------------------------------------------------------------------------------------
# Image transforms.


def _open(data: bytes | np.ndarray) -> Image.Image:
  """Encoded bytes (lazy PIL image: size known before decoding) or raw uint8 [H, W, C] pixels."""
  if isinstance(data, np.ndarray):
    return Image.fromarray(data[..., 0] if data.shape[-1] == 1 else data)
  return Image.open(io.BytesIO(data))


def _draft(image: Image.Image, box: tuple[float, float, float, float], out_w: int, out_h: int):
  """Reduced-scale JPEG decoding that keeps >= output resolution inside `box`; returns the rescaled box."""
  if image.format != 'JPEG':
    return box
  width, height = image.size
  x0, y0, x1, y1 = box
  need = (math.ceil(width * out_w / max(x1 - x0, 1e-6)), math.ceil(height * out_h / max(y1 - y0, 1e-6)))
  image.draft('RGB', need)
  sx, sy = image.size[0] / width, image.size[1] / height
  return (x0 * sx, y0 * sy, x1 * sx, y1 * sy)


def random_resized_crop_box(
  width: int, height: int, rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
  """torchvision `RandomResizedCrop.get_params`: (left, top, right, bottom)."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, left + w, top + h
  in_ratio = width / height  # fallback: central crop at the clamped aspect ratio
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  top, left = (height - h) // 2, (width - w) // 2
  return left, top, left + w, top + h


def train_transform(data: bytes, rng: np.random.Generator, image_size: int, augment: Augment) -> np.ndarray:
  """Encoded image -> uint8 [image_size, image_size, 3]: RandomResizedCrop (bilinear) + random flip."""
  image = _open(data)
  box = random_resized_crop_box(*image.size, rng, augment.crop_scale, augment.crop_ratio)
  flip = augment.flip and rng.random() < 0.5
  box = _draft(image, box, image_size, image_size)
  out = image.convert('RGB').resize((image_size, image_size), Image.BILINEAR, box=box)
  if flip:
    out = out.transpose(Image.FLIP_LEFT_RIGHT)
  return np.asarray(out, np.uint8)


def eval_transform(data: bytes, image_size: int, resize_size: int | None = None) -> np.ndarray:
  """Encoded image -> uint8 [image_size, image_size, 3]: Resize(shorter side) + CenterCrop, torchvision-style."""
  resize_size = resize_size or default_resize(image_size)
  if resize_size < image_size:
    raise ValueError(f'resize_size={resize_size} must be >= image_size={image_size}.')
  image = _open(data)
  width, height = image.size
  if width <= height:
    new_w, new_h = resize_size, int(resize_size * height / width)
  else:
    new_w, new_h = int(resize_size * width / height), resize_size
  box = _draft(image, (0, 0, width, height), new_w, new_h)
  image = image.convert('RGB')
  if (new_w, new_h) != image.size or box != (0, 0, width, height):
    image = image.resize((new_w, new_h), Image.BILINEAR, box=box)
  top = int(round((new_h - image_size) / 2.0))
  left = int(round((new_w - image_size) / 2.0))
  return np.asarray(image.crop((left, top, left + image_size, top + image_size)), np.uint8)


# ----------------------------------------------------------------------------------------------------------
# Samplers: step -> global batch indices.


class RandomSampler:
  """Shuffled epochs, drop remainder. `__call__(step) -> int64 [B]`."""

  def __init__(self, num_examples: int, global_batch_size: int, seed: int):
    if num_examples < global_batch_size:
      raise ValueError(f'global_batch_size={global_batch_size} > {num_examples} training examples.')
    self.num_examples, self.global_batch_size, self.seed = num_examples, global_batch_size, seed
    self.steps_per_epoch = num_examples // global_batch_size

    self._cache = (None, None)  # (epoch, permutation) of the last epoch used, per process

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._cache[0] != epoch:
      self._cache = (epoch, np.random.default_rng([self.seed, epoch, _SALT_EPOCH]).permutation(self.num_examples))
    return self._cache[1]

  def __call__(self, step: int) -> np.ndarray:
    epoch, position = divmod(step, self.steps_per_epoch)
    b = self.global_batch_size
    return self._permutation(epoch)[position * b : (position + 1) * b]

  def __getstate__(self):
    return dict(self.__dict__, _cache=(None, None))


class BalancedSampler:
  """`classes_per_batch` classes (without replacement) x `images_per_class` images; groups contiguous."""

  def __init__(
    self, labels: np.ndarray, classes_per_batch: int, images_per_class: int, seed: int, with_replacement: bool = True
  ):
    classes, inverse = np.unique(labels, return_inverse=True)
    if classes_per_batch > len(classes):
      raise ValueError(f'classes_per_batch={classes_per_batch} > {len(classes)} classes in the split.')
    order = np.argsort(inverse, kind='stable')
    counts = np.bincount(inverse)
    self.members = np.split(order, np.cumsum(counts)[:-1])  # indices of each class
    self.classes_per_batch, self.images_per_class = classes_per_batch, images_per_class
    self.seed, self.with_replacement = seed, with_replacement
    self.global_batch_size = classes_per_batch * images_per_class
    self.steps_per_epoch = max(len(labels) // self.global_batch_size, 1)

  def __call__(self, step: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, step, _SALT_BALANCED])
    chosen = rng.choice(len(self.members), self.classes_per_batch, replace=False)
    out = []
    for c in chosen:
      members = self.members[c]
      replace = self.with_replacement or len(members) < self.images_per_class
      out.append(rng.choice(members, self.images_per_class, replace=replace))
    return np.concatenate(out)


# ----------------------------------------------------------------------------------------------------------
# Batch functions (picklable: they travel to grain worker processes).


def _host_rows(global_batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
  if global_batch_size % process_count:
    raise ValueError(f'global batch size {global_batch_size} is not divisible by process_count={process_count}.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count}).')
  b = global_batch_size // process_count
  return process_index * b, b


class _TrainBatch:
  """step -> {'image': uint8 [b, S, S, 3], 'label': int32 [b]} for this host."""

  def __init__(self, source, sampler, image_size: int, augment: Augment, seed: int, first_row: int, rows: int):
    self.source, self.sampler, self.image_size, self.augment = source, sampler, image_size, augment
    self.seed, self.first_row, self.rows = seed, first_row, rows

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    step = int(step)
    indices = self.sampler(step)[self.first_row : self.first_row + self.rows]
    images = np.empty((self.rows, self.image_size, self.image_size, 3), np.uint8)
    for j, index in enumerate(indices):
      rng = np.random.default_rng([self.seed, step, self.first_row + j, _SALT_AUGMENT])
      images[j] = train_transform(self.source.image_bytes(index), rng, self.image_size, self.augment)
    return {'image': images, 'label': self.source.labels[indices].astype(np.int32)}


class _EvalBatch:
  """batch number -> {'image', 'label' (-1 on padding), 'mask' (False on padding), 'index' (-1 on padding)}."""

  def __init__(self, source, global_batch_size: int, image_size: int, resize_size: int, first_row: int, rows: int):
    self.source, self.global_batch_size, self.image_size = source, global_batch_size, image_size
    self.resize_size, self.first_row, self.rows = resize_size, first_row, rows

  def __call__(self, batch: int) -> dict[str, np.ndarray]:
    start = int(batch) * self.global_batch_size + self.first_row
    positions = np.arange(start, start + self.rows)
    mask = positions < len(self.source)
    images = np.zeros((self.rows, self.image_size, self.image_size, 3), np.uint8)
    for j in np.flatnonzero(mask):
      images[j] = eval_transform(self.source.image_bytes(positions[j]), self.image_size, self.resize_size)
    labels = np.full(self.rows, -1, np.int32)
    labels[mask] = self.source.labels[positions[mask]]
    return {'image': images, 'label': labels, 'mask': mask, 'index': np.where(mask, positions, -1).astype(np.int32)}


def _grain_iter(ds: grain.MapDataset, num_workers: int, num_threads: int | None):
  threads = num_threads if num_threads is not None else (2 if num_workers else 4)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2 * threads, 2)))
  if num_workers > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top

    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults outside an absl app)
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2))
    return _WorkerBatches(iter(it_ds))
  return iter(it_ds)


class _WorkerBatches:
  """A multi-worker grain iterator whose batches are plain numpy arrays and whose shared memory is freed.

  `next()` copies each shared-memory array of the batch into a plain one (grain unlinks the block as soon as its
  array is dropped, which is at once); `close()` closes grain's iterator, then waits until grain's background
  thread has unlinked every block it was handed (see the module docstring). Open ones are closed at exit.
  """

  _open: weakref.WeakSet = weakref.WeakSet()
  _lock = threading.Lock()
  _atexit_registered = False

  def __init__(self, it):
    self._it = it
    with self._lock:
      self._open.add(self)
      if not _WorkerBatches._atexit_registered:
        # Registered after multiprocessing's own exit hook, so it runs first (atexit: last in, first out),
        # while grain's workers and its unlinking thread still run.
        atexit.register(_WorkerBatches.close_all)
        _WorkerBatches._atexit_registered = True

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      raise StopIteration
    batch = next(self._it)
    return {key: np.array(value) if _in_shared_memory(value) else value for key, value in batch.items()}

  def close(self) -> None:
    it, self._it = self._it, None
    self._open.discard(self)
    if it is not None:
      it.close()
      del it  # grain's iterators and the batches they still hold go now, not at interpreter shutdown
      gc.collect()  # (they hold each other in cycles: threads, bound methods)
      _wait_for_shared_memory_unlinks()

  @classmethod
  def close_all(cls) -> None:
    for it in list(cls._open):
      it.close()


def _in_shared_memory(value) -> bool:
  """A grain `SharedMemoryArray` (an ndarray subclass with the `SharedMemory` block as `.shm`)."""
  return isinstance(value, np.ndarray) and type(value) is not np.ndarray and getattr(value, 'shm', None) is not None


def _wait_for_shared_memory_unlinks() -> None:
  """Returns once grain's background thread has unlinked every shared-memory block queued so far.

  grain (0.2.x) queues the unlinks on one `ThreadPool(1)` thread (first in, first out): a no-op task queued after
  them finishes after them. Nothing to wait for where grain has no such pool.
  """
  try:
    from grain._src.python.ipc import shared_memory_array  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  pool = getattr(shared_memory_array.SharedMemoryArray, '_del_thread_pool', None)
  if pool is not None:
    try:
      pool.apply(int)
    except ValueError:  # the pool was already stopped (interpreter shutdown): nothing left to wait for
      pass


# ----------------------------------------------------------------------------------------------------------
# Iterators.


class TrainIterator(grain.DatasetIterator):
  """Infinite, checkpointable iterator over this host's train batches (a `grain.DatasetIterator`).

  `get_state()` -> `{'step', 'seed', 'global_batch_size', 'num_examples', 'sampler'}` (JSON-able; the grain
  Orbax handler saves it). `set_state(state)` continues at `state['step']` (the same global order, for any
  process count or worker count); it refuses a state from a different seed, batch size, sampler or split size.
  """

  def __init__(
    self,
    source,
    sampler,
    *,
    image_size: int,
    augment: Augment,
    seed: int,
    process_index: int,
    process_count: int,
    num_workers: int = 0,
    num_threads: int | None = None,
    start_step: int = 0,
  ):
    super().__init__()
    self._it = None
    self._source, self._sampler, self._seed = source, sampler, seed
    self._num_workers, self._num_threads = num_workers, num_threads
    first_row, rows = _host_rows(sampler.global_batch_size, process_index, process_count)
    self._fn = _TrainBatch(source, sampler, image_size, augment, seed, first_row, rows)
    self._sampler_name = 'balanced' if isinstance(sampler, BalancedSampler) else 'random'
    self._it = None
    self._step = int(start_step)

  @property
  def step(self) -> int:
    """The step of the next batch."""
    return self._step

  @property
  def steps_per_epoch(self) -> int:
    return self._sampler.steps_per_epoch

  def _ensure_started(self):
    if self._it is None:
      ds = grain.MapDataset.range(self._step, _MAX_STEPS).map(self._fn)
      self._it = _grain_iter(ds, self._num_workers, self._num_threads)

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    self._ensure_started()
    batch = next(self._it)
    self._step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {
      'step': self._step,
      'seed': self._seed,
      'global_batch_size': self._sampler.global_batch_size,
      'num_examples': len(self._source),
      'sampler': self._sampler_name,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    mine = self.get_state()
    wrong = [
      f'{k}: saved {state.get(k)!r} != current {mine[k]!r}' for k in mine if k != 'step' and state.get(k) != mine[k]
    ]
    if wrong:
      raise ValueError(
        'Cannot resume the data iterator: the saved state is from a different input pipeline ('
        + '; '.join(wrong)
        + '). Use the same dataset, seed, sampler and batch size.'
      )
    self._close_inner()
    self._step = int(state['step'])

  def _close_inner(self):
    if self._it is not None:
      self._it.close()
      self._it = None

  def close(self) -> None:
    self._close_inner()
    super().close()

  def __str__(self):
    return f'TrainIterator(step={self._step}, {self.get_state()})'


class EvalIterable:
  """Re-iterable eval batches in split order; the last partial batch is padded (mask False), never dropped.

  `len(it)` = number of batches = ceil(N / global_batch_size); `num_examples` = N.
  """

  def __init__(
    self,
    source,
    *,
    global_batch_size: int,
    image_size: int,
    resize_size: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    num_threads: int | None = None,
  ):
    first_row, rows = _host_rows(global_batch_size, process_index, process_count)
    self._fn = _EvalBatch(
      source, global_batch_size, image_size, resize_size or default_resize(image_size), first_row, rows
    )
    self.num_examples = len(source)
    self.global_batch_size = global_batch_size
    self._num_workers, self._num_threads = num_workers, num_threads

  def __len__(self) -> int:
    return -(-self.num_examples // self.global_batch_size)

  def __iter__(self):
    ds = grain.MapDataset.range(len(self)).map(self._fn)
    it = _grain_iter(ds, self._num_workers if len(self) > 1 else 0, self._num_threads)
    try:
      yield from it
    finally:
      it.close()


def make_sampler(
  labels: np.ndarray,
  *,
  sampler: str,
  global_batch_size: int,
  classes_per_batch: int,
  images_per_class: int,
  seed: int,
  with_replacement: bool = True,
):
  """The global-batch sampler over `labels` [N] (int): 'random' (a fresh permutation per epoch) or 'balanced'
  (`classes_per_batch` classes x `images_per_class` images, = global_batch_size). Each step's indices [B] are a
  pure function of (seed, step), so resumed and multi-host runs draw the same batches."""
  if sampler == 'random':
    return RandomSampler(len(labels), global_batch_size, seed)
  if sampler == 'balanced':
    if classes_per_batch * images_per_class != global_batch_size:
      raise ValueError(
        f'balanced sampler: classes_per_batch={classes_per_batch} x images_per_class='
        f'{images_per_class} must equal global_batch_size={global_batch_size}.'
      )
    return BalancedSampler(labels, classes_per_batch, images_per_class, seed, with_replacement)
  raise ValueError(f'Unknown sampler {sampler!r}; valid choices: random, balanced.')


def check_crop(augment: Augment, image_size: int) -> Augment:
  """`augment` if its RandomResizedCrop scale/ratio ranges are valid for `image_size` px; ValueError otherwise."""
  lo, hi = augment.crop_scale
  if not 0 < lo <= hi <= 1:
    raise ValueError(f'crop_scale={augment.crop_scale} must satisfy 0 < min <= max <= 1.')
  if not 0 < augment.crop_ratio[0] <= augment.crop_ratio[1]:
    raise ValueError(f'crop_ratio={augment.crop_ratio} must satisfy 0 < min <= max.')
  if image_size < 8:
    raise ValueError(f'image_size={image_size} is too small (>= 8).')
  return augment


def replace_augment(
  name: str, crop_scale: Sequence[float] | None, crop_ratio: Sequence[float] | None, flip: bool | None
) -> Augment:
  base = augment_defaults(name)
  return Augment(
    crop_scale=tuple(crop_scale) if crop_scale is not None else base.crop_scale,
    crop_ratio=tuple(crop_ratio) if crop_ratio is not None else base.crop_ratio,
    flip=base.flip if flip is None else bool(flip),
  )
