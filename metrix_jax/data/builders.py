"""The data sets' tfds builders, name -> builder (`BUILDERS`), `prepare` / `load_split`, and a build command.

Each data set is a `base.MetrixBuilder` (a `tfds.core.GeneratorBasedBuilder`) written as `array_record` files and
read back through `RecordSource` (random access, what grain needs); nothing here imports TensorFlow. Images are
stored as encoded bytes (JPEG for the photo benchmarks, PNG for glyphs) and decoded by `pipeline.py` with PIL.
The names and what is known of each data set without building it live in `metrix_jax.data.DATASETS`.

    python -m metrix_jax.data.builders NAME [--manual_dir=DIR] [--data_dir=DIR] [--short_side=256] [--rebuild]

builds NAME once (or checks that its build is up to date; `--rebuild` builds it again) and prints its splits; a
user mistake (unknown name, missing or corrupt archives) is one line on stderr and exit status 2.

| name       | source (manual dir)                               | splits                     | classes train / eval |
|------------|---------------------------------------------------|----------------------------|----------------------|
| `demo`     | generated glyphs (`demo.py`), no download         | train / test               | 500 / 500            |
| `glyphs`   | generated non-Latin glyphs (`demo.py`), no download | train / test             | 1,130 / 161          |
| `omniglot` | `images_background*.zip`, `images_evaluation*.zip` | train / test (by alphabet) | depends on the zips  |
| `cub200`   | `CUB_200_2011.tgz`                                | train / test               | 100 / 100            |
| `cars196`  | `car_ims.tgz`, `cars_annos.mat`                   | train / test               | 98 / 98              |
| `sop`      | `Stanford_Online_Products.zip`                    | train / test               | 11,318 / 11,316      |
| `inshop`   | `img.zip`, `list_eval_partition.txt`              | train / query / gallery    | 3,997 / 3,985        |

Labels are int64, unique across splits (eval classes follow the train classes), and the train labels are
0..num_classes_train-1. Features: `image` (encoded bytes), `label`, `original_size` ([height, width] before the
build-time resize), `file_name` (path inside the archive).

The benchmark images are resized once at build time so that the shorter side is `short_side` (default 256;
never upsampled) with PIL bilinear, as torchvision's `Resize(256)` does, and re-encoded as JPEG (quality 95).
`short_side` is part of the tfds config name (`s256`), so several sizes can live side by side.

Build safety: every expected file is checked before anything is written (a missing file raises
`FileNotFoundError` naming it, the `--config.dataset.manual_dir` flag and the download instructions); tfds
writes into `incomplete.*` and renames on success, removing it on failure; the standard image counts are checked
(`check_counts=False` only for tests with fake archives); an image that fails to decode is skipped and counted
in the build log (never kept with a wrong label). After a build, a small `metrix_labels.npz` (labels per split,
in record order) is written next to the tfds files so samplers need not read every record.

Up to date: a build records what it was made from in `metrix_sources.json` next to the tfds files (strict JSON:
the config, and the size and mtime in ns of every file read from the manual dir; `base.MetrixBuilder.
source_record`). Every `prepare` compares that record with the manual dir and rebuilds when a file changed
(size or mtime), is missing, or another file would be read now (e.g. `CUB_200_2011.tgz` next to a folder that was
read); one WARNING line names the files. A manual dir that is gone (only the built data copied to another
machine; none of the recorded files there) is no reason to rebuild: the build is used as it is. `rebuild=True`
(`--rebuild`) always rebuilds. A rebuild builds into a staging folder of the data dir and replaces the old build
only once the new one is complete: a failed rebuild leaves the old build in place (the error says so). Builds
made before builds recorded their sources are used as they are (one INFO line says how to rebuild them).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import re
import shutil
import sys
import tempfile
import zipfile
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from metrix_jax import cli, jsonio
from metrix_jax import data as data_lib
from metrix_jax.data import demo
from metrix_jax.data.base import (
  SOURCES_FILE,
  MetrixBuilder,
  RandomAccess,
  is_hidden,
  iter_archive,
  photo_features,
  read_text_member,
  stat_source,
)

log = logging.getLogger(__name__)

LABELS_FILE = 'metrix_labels.npz'


def default_data_dir(data_dir: str | None = None) -> str:
  """`data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets (tfds' convention; always passed explicitly)."""
  return os.path.expanduser(data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets')


def default_manual_dir(data_dir: str, manual_dir: str | None = None) -> str:
  return os.path.expanduser(manual_dir or os.path.join(data_dir, 'downloads', 'manual'))


# ----------------------------------------------------------------------------------------------------------
# Prepare, split access.


def get_builder(
  name: str,
  data_dir: str | None = None,
  manual_dir: str | None = None,
  *,
  config: tfds.core.BuilderConfig | None = None,
  short_side: int = 256,
  check_counts: bool = True,
  num_workers: int | None = None,
) -> MetrixBuilder:
  """The builder object (nothing built). `config` overrides the default config (`short_side` for photos)."""
  cls = builder_class(name)
  data_dir = default_data_dir(data_dir)
  manual_dir = default_manual_dir(data_dir, manual_dir)
  if config is None:
    config = cls.default_config(short_side=short_side, manual_dir=manual_dir, data_dir=data_dir)
  return cls(
    data_dir=data_dir, manual_dir=manual_dir, config=config, check_counts=check_counts, num_workers=num_workers
  )


def prepare(
  name: str, data_dir: str | None = None, manual_dir: str | None = None, *, rebuild: bool = False, **builder_kwargs
) -> MetrixBuilder:
  """Builds `name` under `data_dir` on first use, rebuilds it when its sources changed; returns the builder.

  Afterwards it is instant (a few `stat` calls compare the build's `metrix_sources.json` with the manual dir; see
  the module docstring). `rebuild=True` always rebuilds (the old build is replaced only by a complete new one).
  `builder.prepared` says what happened: 'built', 'rebuilt' or 'reused'.

  `builder_kwargs`: `config`, `short_side` (photos, default 256), `check_counts` (default True; False only
  for tests with fake archives), `num_workers` (build processes; default all cores).
  """
  builder = get_builder(name, data_dir, manual_dir, **builder_kwargs)
  labels_path = os.path.join(builder.data_dir, LABELS_FILE)
  if not os.path.exists(labels_path) and not builder.is_prepared():
    _build(builder)
    builder.prepared = 'built'
    return builder
  if not os.path.exists(labels_path):  # tfds files complete, label file not written yet (an interrupted build)
    _write_labels(builder, labels_path)
  if rebuild:
    log.info('%s: rebuilding %s (rebuild requested) ...', name, builder.data_dir)
    return _rebuild(builder, builder_kwargs)
  changes = source_changes(builder)
  if changes:
    log.warning(
      '%s: changed since the build in %s: %s; rebuilding (the old build stays until the new one is complete).',
      name,
      builder.data_dir,
      '; '.join(changes),
    )
    return _rebuild(builder, builder_kwargs)
  builder.prepared = 'reused'
  return builder


def _build(builder: MetrixBuilder) -> None:
  """tfds files, then `metrix_sources.json`, then the label file (its presence marks a complete build)."""
  sources = builder.source_record()  # every file there (fails before writing anything), stat before reading
  tfds.disable_progress_bar()
  log.info('Building %s into %s ...', builder.dataset_name, builder.data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=builder.manual_dir))
  if builder.skipped_files:
    log.warning('%s: %d corrupt image(s) skipped in total.', builder.dataset_name, len(builder.skipped_files))
  jsonio.write_json(os.path.join(builder.data_dir, SOURCES_FILE), sources)
  _write_labels(builder, os.path.join(builder.data_dir, LABELS_FILE))


def _rebuild(builder: MetrixBuilder, builder_kwargs: dict[str, Any]) -> MetrixBuilder:
  """Builds again into a staging folder of the data dir, then swaps it in; the old build is kept on failure."""
  name, final = builder.dataset_name, builder.data_dir
  root = os.fspath(builder.data_dir_root)
  kwargs = {k: v for k, v in builder_kwargs.items() if k not in ('config', 'short_side')}
  kwargs['config'] = builder.builder_config  # the same variant (Omniglot's config depends on the folders)
  staging = tempfile.mkdtemp(prefix=f'.metrix-rebuild-{name}-', dir=root)
  try:
    fresh = get_builder(name, staging, builder.manual_dir, **kwargs)
    try:
      _build(fresh)
    except cli.USER_ERRORS as error:
      raise type(error)(f'{name}: the rebuild failed; the previous build in {final} is unchanged. {error}') from error
    previous = os.path.join(staging, 'previous')
    os.rename(final, previous)
    try:
      os.rename(fresh.data_dir, final)
    except BaseException:
      os.rename(previous, final)
      raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  log.info('%s: rebuilt in %s.', name, final)
  rebuilt = get_builder(name, root, builder.manual_dir, **kwargs)
  rebuilt.prepared = 'rebuilt'
  return rebuilt


_NOTED: set[tuple[str, str]] = set()  # (build, note): INFO notes given once per process


def _note_once(build: str, note: str, *args) -> None:
  if (build, note) not in _NOTED:
    _NOTED.add((build, note))
    log.info(note, *args)


def source_changes(builder: MetrixBuilder) -> list[str]:
  """What differs between a build's recorded sources and the manual dir now: one entry per file ([] if none).

  Nothing to compare (no entry): a generated data set (demo: its config is its folder), a build made before
  builds recorded their sources (an INFO note says how to rebuild it), a manual dir that is gone or holds none of
  the recorded files (the build is used as it is).
  """
  name, manual_dir = builder.dataset_name, builder.manual_dir
  if not builder.required_files():
    return []
  path = os.path.join(builder.data_dir, SOURCES_FILE)
  if not os.path.exists(path):
    _note_once(
      builder.data_dir,
      '%s: the build in %s does not record its source archives (it was made before builds did); using it as it '
      'is. To rebuild it from the archives: python -m metrix_jax.data.builders %s --rebuild --manual_dir=%s '
      '--data_dir=%s',
      name,
      builder.data_dir,
      name,
      manual_dir,
      os.fspath(builder.data_dir_root),
    )
    return []
  recorded = jsonio.read_json(path)['files']
  present = {rel: os.path.join(manual_dir, *rel.split('/')) for rel in recorded}
  present = {rel: p for rel, p in present.items() if os.path.exists(p)}
  try:
    current = {builder.relative_source(p): p for p in builder.find_files().values()}
  except FileNotFoundError:
    current = dict(present)
  if not present and not current:
    _note_once(
      builder.data_dir,
      '%s: the manual dir %s does not hold the archives the build in %s was made from; using the build as it is.',
      name,
      manual_dir,
      builder.data_dir,
    )
    return []
  changes = []
  for rel, old in recorded.items():
    if rel not in current:
      changes.append(f'{rel} is {"no longer the file read" if rel in present else "missing"}')
      continue
    new = stat_source(current[rel])
    if new != old:
      changes.append(f'{rel} ({_describe_change(old, new)})')
  changes.extend(f'{rel} is new (not read by the build)' for rel in sorted(set(current) - set(recorded)))
  return changes


def _describe_change(old: dict[str, int], new: dict[str, int]) -> str:
  parts = []
  if old.get('files') != new.get('files'):
    parts.append(f'{old.get("files", 0):,} -> {new.get("files", 0):,} files')
  if old.get('size') != new.get('size'):
    parts.append(f'size {old.get("size", 0):,} -> {new.get("size", 0):,} bytes')
  if old.get('mtime_ns') != new.get('mtime_ns'):
    parts.append(f'modified {_utc(old.get("mtime_ns"))} -> {_utc(new.get("mtime_ns"))}')
  return ', '.join(parts) or 'changed'


def _utc(mtime_ns: int | None) -> str:
  if mtime_ns is None:
    return '?'
  stamp = datetime.datetime.fromtimestamp(mtime_ns / 1e9, datetime.timezone.utc)
  return stamp.strftime('%Y-%m-%d %H:%M:%S.%f UTC')


def _write_labels(builder: MetrixBuilder, path: str):
  """One pass over the serialized records (nothing decoded); written atomically."""
  arrays = {}
  for split in builder.info.splits:
    reader = _SplitReader(builder, split)
    arrays[split] = np.fromiter((reader.label(i) for i in range(len(reader))), np.int64, len(reader))
  fd, tmp = tempfile.mkstemp(dir=builder.data_dir, suffix='.npz.tmp')
  with os.fdopen(fd, 'wb') as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


class _SplitReader:
  """Reads tfds' serialized tf.Example records directly (upb protobuf): ~10x less Python than tfds' decoding.

  Falls back to the tfds data source if its array_record reader is not exposed.
  """

  def __init__(self, builder, split: str):
    self.source = builder.as_data_source(split, decoders=_image_decoders(builder))
    feature = builder.info.features['image']
    self.raw_shape = None if isinstance(feature, tfds.features.Image) else tuple(feature.shape)
    self.raw = getattr(self.source, 'data_source', None)

  def __len__(self):
    return len(self.source)

  def _example(self, index: int):
    return tf_example_pb2.Example.FromString(self.raw[index]).features.feature

  def label(self, index: int) -> int:
    if self.raw is None:
      return int(self.source[index]['label'])
    return self._example(index)['label'].int64_list.value[0]

  def image(self, index: int) -> bytes | np.ndarray:
    if self.raw is None:
      return self.source[index]['image']
    value = self._example(index)['image'].bytes_list.value[0]
    return value if self.raw_shape is None else np.frombuffer(value, np.uint8).reshape(self.raw_shape)


def _image_decoders(builder):
  """Keep encoded images as bytes (decoded by the pipeline); raw pixel tensors decode for free."""
  if isinstance(builder.info.features['image'], tfds.features.Image):
    return {'image': tfds.decode.SkipDecoding()}
  return None


class RecordSource:
  """Picklable random access to one built split: `len`, `labels` (int64 [N]), `image_bytes(i)`, `record(i)`.

  Opens the tfds files lazily (also in grain worker processes), through `builder_from_directory`.
  """

  def __init__(self, dataset_dir: str, split: str):
    self.dataset_dir, self.split = dataset_dir, split
    with np.load(os.path.join(dataset_dir, LABELS_FILE)) as f:
      if split not in f.files:
        raise ValueError(f'Split {split!r} not in {dataset_dir}; available: {", ".join(f.files)}.')
      self.labels = f[split]
    self._source = None

  def __len__(self) -> int:
    return len(self.labels)

  def __getstate__(self):
    return dict(self.__dict__, _source=None)

  def _reader(self) -> _SplitReader:
    if self._source is None:
      self._source = _SplitReader(tfds.builder_from_directory(self.dataset_dir), self.split)
    return self._source

  def record(self, index: int) -> dict[str, Any]:
    """The full tfds-decoded record (image left encoded)."""
    return self._reader().source[int(index)]

  def image_bytes(self, index: int) -> bytes | np.ndarray:
    """Encoded bytes (JPEG/PNG), or raw uint8 [H, W, C] pixels for data sets stored raw (demo)."""
    return self._reader().image(int(index))


def load_split(
  name: str, split: str, data_dir: str | None = None, manual_dir: str | None = None, **builder_kwargs
) -> RecordSource:
  builder = prepare(name, data_dir, manual_dir, **builder_kwargs)
  return RecordSource(builder.data_dir, split)


# ----------------------------------------------------------------------------------------------------------
# The four benchmarks.


class _PhotoBuilder(MetrixBuilder, skip_registration=True):
  """Benchmarks built from official archives: JPEG resized to `short_side`, label/original size/file name."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  DESCRIPTION = ''

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      description=f'{self.DESCRIPTION} {self.builder_config.description}.',
      features=photo_features(),
      supervised_keys=('image', 'label'),
    )

  def _encode(self, items, split: str, expected: int | None, expected_classes: int | None = None):
    """items: (key, bytes or None when missing from the archive, label) -> examples; counts checked at the end."""
    listed, missing, classes = 0, [], set()

    def examples():
      nonlocal listed
      for key, data, label in items:
        listed += 1
        classes.add(label)
        if data is None:
          missing.append(key)
          continue
        yield key, data, {'label': label, 'file_name': key}

    yield from self.encode_images(examples(), self.builder_config.short_side)
    if missing:
      message = (
        f'{self.name}: {len(missing)} image(s) of the {split} split listed in the annotations are missing '
        f'from the archive (first: {", ".join(missing[:5])}).'
      )
      if self.check_counts:
        raise ValueError(f'{message}\n\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
      log.warning(message)
    if expected is not None:
      self.check_count(f'{split} images', expected, listed)
    if expected_classes is not None:
      self.check_count(f'{split} classes', expected_classes, len(classes))
    log.info('%s/%s: %d images listed, %d classes.', self.name, split, listed, len(classes))


class Cub200(_PhotoBuilder, skip_registration=True):
  """CUB-200-2011: classes 1-100 train (5,864 images), 101-200 test (5,924); label = class number - 1."""

  name = 'metrix_cub200'
  DESCRIPTION = 'CUB-200-2011, metric-learning split (classes 0-99 train, 100-199 test).'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
cub200 needs, in the manual dir:
  CUB_200_2011.tgz (1,150,585,339 bytes; or the extracted folder CUB_200_2011/ with images/ inside)
Download it from the Caltech data repository: https://data.caltech.edu/records/65de6-vp158
(file CUB_200_2011.tgz). Do not extract it: the builder streams the archive once per split."""
  COUNTS = {'train': 5864, 'test': 5924}
  _IMAGE = re.compile(r'^CUB_200_2011/images/(\d{3})\.[^/]+/[^/]+\.jpg$', re.IGNORECASE)

  def required_files(self):
    return {'CUB_200_2011.tgz': ('CUB_200_2011.tgz', 'CUB_200_2011.tar.gz', 'CUB_200_2011')}

  def _split_examples(self, split):
    archive = self.find_files()['CUB_200_2011.tgz']

    def items():
      for name, data in iter_archive(archive, lambda n: not is_hidden(n) and self._IMAGE.match(n) is not None):
        label = int(self._IMAGE.match(name).group(1)) - 1
        if (label < 100) == (split == 'train'):
          yield name, data, label

    return self._encode(items(), split, self.COUNTS[split], 100)


class Cars196(_PhotoBuilder, skip_registration=True):
  """Cars196: classes 1-98 train (8,054 images), 99-196 test (8,131); label = `class` - 1 (`test` flag unused)."""

  name = 'metrix_cars196'
  DESCRIPTION = 'Cars196 (Stanford Cars), metric-learning split (classes 0-97 train, 98-195 test).'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
cars196 needs, in the manual dir:
  car_ims.tgz     (all 16,185 images, ~1.9 GB; or the extracted folder car_ims/)
  cars_annos.mat  (annotations of all images: relative_im_path, class)
Both were published on the Stanford Cars page, http://ai.stanford.edu/~jkrause/cars/car_dataset.html
(http://ai.stanford.edu/~jkrause/car196/car_ims.tgz and .../car196/cars_annos.mat); that server is no longer
maintained, so use a copy of these same two files (e.g. an Internet Archive snapshot of those URLs). The
train/test archives with the devkit (cars_train.tgz, cars_test.tgz) are a different split and are not used."""
  COUNTS = {'train': 8054, 'test': 8131}

  def required_files(self):
    return {'car_ims.tgz': ('car_ims.tgz', 'car_ims.tar.gz', 'car_ims'), 'cars_annos.mat': ('cars_annos.mat',)}

  def annotations(self) -> dict[str, int]:
    """{'car_ims/000001.jpg': label}."""
    import scipy.io  # pylint: disable=g-import-not-at-top  (a jax dependency)

    mat = scipy.io.loadmat(self.find_files()['cars_annos.mat'], squeeze_me=True)
    annotations = np.atleast_1d(mat['annotations'])
    out = {str(a['relative_im_path']).lstrip('./'): int(a['class']) - 1 for a in annotations}
    self.check_count('annotated images', sum(self.COUNTS.values()), len(out))
    return out

  def _split_examples(self, split):
    labels = self.annotations()
    wanted = {n: y for n, y in labels.items() if (y < 98) == (split == 'train')}

    def items():
      seen = set()
      for name, data in iter_archive(self.find_files()['car_ims.tgz'], lambda n: n in wanted):
        seen.add(name)
        yield name, data, wanted[name]
      for name in sorted(set(wanted) - seen):
        yield name, None, wanted[name]

    return self._encode(items(), split, self.COUNTS[split], 98)


class Sop(_PhotoBuilder, skip_registration=True):
  """Stanford Online Products: Ebay_train.txt (11,318 classes, 59,551 images) / Ebay_test.txt (11,316, 60,502)."""

  name = 'metrix_sop'
  DESCRIPTION = 'Stanford Online Products, Ebay_train / Ebay_test (label = class_id - 1).'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
sop needs, in the manual dir:
  Stanford_Online_Products.zip (3,083,860,082 bytes; or the extracted folder Stanford_Online_Products/)
Download it from the project page https://cvgl.stanford.edu/projects/lifted_struct/ (Stanford Online Products
data set). It holds Ebay_train.txt, Ebay_test.txt and the images."""
  COUNTS = {'train': (59551, 11318), 'test': (60502, 11316)}

  def required_files(self):
    return {'Stanford_Online_Products.zip': ('Stanford_Online_Products.zip', 'Stanford_Online_Products')}

  def _split_examples(self, split):
    archive = self.find_files()['Stanford_Online_Products.zip']
    listing = read_text_member(archive, f'Stanford_Online_Products/Ebay_{split}.txt')
    rows = [line.split() for line in listing.splitlines()[1:] if line.strip()]
    entries = [(f'Stanford_Online_Products/{path}', int(class_id) - 1) for _, class_id, _, path in rows]
    if split == 'train' and entries and sorted({y for _, y in entries}) != list(range(len({y for _, y in entries}))):
      raise ValueError('sop: Ebay_train.txt class ids are not 1..N; not the official file.')

    def items():
      reader = RandomAccess(archive)
      try:
        for name, label in entries:
          yield name, reader.read(name), label
      finally:
        reader.close()

    return self._encode(items(), split, *self.COUNTS[split])


class InShop(_PhotoBuilder, skip_registration=True):
  """In-Shop Clothes Retrieval (DeepFashion): train / query / gallery from Eval/list_eval_partition.txt.

  Labels: train items sorted -> 0..3,996; query and gallery share one map, test items sorted -> 3,997...
  """

  name = 'metrix_inshop'
  SPLITS = ('train', 'query', 'gallery')
  DESCRIPTION = 'In-Shop Clothes Retrieval (DeepFashion): train / query / gallery.'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
inshop needs, in the manual dir (flat, or in the benchmark's own Img/ and Eval/ sub-folders):
  img.zip                  (Img/img.zip: the low-resolution images, folder img/; or the extracted folder img/)
  list_eval_partition.txt  (Eval/list_eval_partition.txt)
Download them from the DeepFashion In-shop Clothes Retrieval Benchmark,
https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html (Google Drive folder
"In-shop Clothes Retrieval Benchmark"; the image archive may require the password the authors send on request)."""
  COUNTS = {'train': 25882, 'query': 14218, 'gallery': 12612}
  ITEMS = {'train': 3997, 'test': 3985}

  def required_files(self):
    return {
      'img.zip': ('img.zip', 'Img/img.zip', 'img', 'Img/img'),
      'list_eval_partition.txt': ('list_eval_partition.txt', 'Eval/list_eval_partition.txt'),
    }

  def partition(self) -> dict[str, list[tuple[str, int]]]:
    with open(self.find_files()['list_eval_partition.txt'], encoding='utf-8') as f:
      lines = f.read().splitlines()
    rows = [line.split() for line in lines[2:] if line.strip()]  # line 1: count, line 2: header
    by_status = {s: [(name, item) for name, item, status in rows if status == s] for s in self.SPLITS}
    train_items = sorted({item for _, item in by_status['train']})
    test_items = sorted({item for s in ('query', 'gallery') for _, item in by_status[s]})
    label_of = {item: i for i, item in enumerate(train_items)}
    label_of.update({item: len(train_items) + i for i, item in enumerate(test_items)})
    if set(train_items) & set(test_items):
      raise ValueError('inshop: train and test items overlap; not the official list_eval_partition.txt.')
    self.check_count('train items', self.ITEMS['train'], len(train_items))
    self.check_count('query/gallery items', self.ITEMS['test'], len(test_items))
    return {s: [(name, label_of[item]) for name, item in by_status[s]] for s in self.SPLITS}

  def _split_examples(self, split):
    entries = self.partition()[split]
    archive = self.find_files()['img.zip']

    def items():
      reader = RandomAccess(archive)
      try:
        for name, label in entries:
          yield name, reader.read(name), label
      finally:
        reader.close()

    return self._encode(items(), split, self.COUNTS[split])


# ----------------------------------------------------------------------------------------------------------
# Omniglot.


@dataclasses.dataclass
class OmniglotConfig(tfds.core.BuilderConfig):
  zips: tuple[str, ...] = ()


_OMNIGLOT_ZIPS = {  # archive stem -> (characters, images) for the count check
  'images_background': (964, 19280),
  'images_evaluation': (659, 13180),
  'images_background_small1': (136, 2720),
  'images_background_small2': (156, 3120),
}


class Omniglot(MetrixBuilder, skip_registration=True):
  """Omniglot from any subset of the official zips; class = (alphabet, character); classes split by alphabet.

  With `images_evaluation.zip` present (and a background zip), background alphabets train and evaluation
  alphabets test (the official background/evaluation split). Otherwise the sorted alphabets alternate: even
  positions train, odd positions test. Greek/Latin in both small zips are the same images (de-duplicated).
  The config name lists the zips used, so adding a zip later builds a new variant instead of mixing.
  """

  name = 'metrix_omniglot'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
omniglot needs, in the manual dir, any one or more of (MIT licence, https://github.com/brendenlake/omniglot):
  images_background.zip         (30 alphabets, 964 characters, 19,280 PNGs)
  images_evaluation.zip         (20 alphabets, 659 characters, 13,180 PNGs)
  images_background_small1.zip  (5 alphabets, 136 characters, 2,720 PNGs)
  images_background_small2.zip  (5 alphabets, 156 characters, 3,120 PNGs)
each at https://github.com/brendenlake/omniglot/raw/master/python/<file name>. Do not extract them."""
  _IMAGE = re.compile(r'^([^/]+)/([^/]+)/([^/]+)/([^/]+\.png)$')

  @classmethod
  def default_config(
    cls, short_side: int = 256, manual_dir: str | None = None, data_dir: str | None = None
  ) -> OmniglotConfig:
    del short_side
    zips = tuple(z for z in _OMNIGLOT_ZIPS if manual_dir and os.path.exists(os.path.join(manual_dir, z + '.zip')))
    if not zips and data_dir:  # nothing to build from: reuse the one variant already built, if unique
      built = (
        sorted(os.listdir(os.path.join(data_dir, cls.name))) if os.path.isdir(os.path.join(data_dir, cls.name)) else []
      )
      if len(built) == 1:
        zips = tuple(built[0].split('+'))
    return OmniglotConfig(name='+'.join(zips) or 'none', zips=zips, description=f'zips: {", ".join(zips)}')

  def required_files(self):
    zips = self.builder_config.zips
    if not zips:
      return {'an Omniglot zip': tuple(z + '.zip' for z in _OMNIGLOT_ZIPS)}
    return {z + '.zip': (z + '.zip',) for z in zips}

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      description=f'Omniglot, classes split by alphabet; {self.builder_config.description}.',
      features=photo_features(
        image_channels=1, encoding='png', alphabet=tfds.features.Text(), character=tfds.features.Text()
      ),
      supervised_keys=('image', 'label'),
    )

  def _scan(self):
    """{(alphabet, character): {file: (zip stem, member)}} and {alphabet: set of zip stems}; counts checked."""
    files = self.find_files()
    classes, alphabet_sets = {}, {}
    for key, path in files.items():
      stem = os.path.basename(path)[:-4]
      try:
        with zipfile.ZipFile(path) as zf:
          names = [n for n in zf.namelist() if not is_hidden(n) and self._IMAGE.match(n)]
      except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(
          f'Cannot read {path}: {type(e).__name__}: {e}. The file is truncated or corrupt; '
          f'download it again.\n\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}'
        ) from e
      characters = set()
      for member in names:
        _, alphabet, character, fname = self._IMAGE.match(member).groups()
        characters.add((alphabet, character))
        classes.setdefault((alphabet, character), {}).setdefault(fname, (path, member))
        alphabet_sets.setdefault(alphabet, set()).add(stem)
      expected = _OMNIGLOT_ZIPS.get(stem)
      if expected:
        self.check_count(f'characters in {key}', expected[0], len(characters))
        self.check_count(f'images in {key}', expected[1], len(names))
    return classes, alphabet_sets

  def split_alphabets(self, alphabet_sets) -> tuple[list[str], list[str]]:
    alphabets = sorted(alphabet_sets)
    evaluation = {a for a, stems in alphabet_sets.items() if 'images_evaluation' in stems}
    if evaluation and len(evaluation) < len(alphabets):
      return [a for a in alphabets if a not in evaluation], sorted(evaluation)
    return alphabets[0::2], alphabets[1::2]

  def _split_examples(self, split):
    classes, alphabet_sets = self._scan()
    train_alphabets, test_alphabets = self.split_alphabets(alphabet_sets)
    ordered = sorted(c for c in classes if c[0] in train_alphabets) + sorted(
      c for c in classes if c[0] in test_alphabets
    )
    label_of = {c: i for i, c in enumerate(ordered)}
    wanted = set(train_alphabets if split == 'train' else test_alphabets)

    def items():
      opened = {}
      try:
        for alphabet, character in ordered:
          if alphabet not in wanted:
            continue
          for fname, (path, member) in sorted(classes[(alphabet, character)].items()):
            if path not in opened:
              opened[path] = zipfile.ZipFile(path)
            yield (
              f'{alphabet}/{character}/{fname}',
              opened[path].read(member),
              {
                'label': label_of[(alphabet, character)],
                'file_name': f'{alphabet}/{character}/{fname}',
                'alphabet': alphabet,
                'character': character,
              },
            )
      finally:
        for zf in opened.values():
          zf.close()

    log.info('omniglot/%s: alphabets %s', split, ', '.join(sorted(wanted)))
    return self.encode_images(items(), None)


# ----------------------------------------------------------------------------------------------------------
# Registry: data set name -> builder class (the names and what is known of them: `metrix_jax.data.DATASETS`).


BUILDERS: dict[str, type[MetrixBuilder]] = {
  'demo': demo.Demo,
  'glyphs': demo.Glyphs,
  'omniglot': Omniglot,
  'cub200': Cub200,
  'cars196': Cars196,
  'sop': Sop,
  'inshop': InShop,
}


def builder_class(name: str) -> type[MetrixBuilder]:
  """The builder class of data set `name` (ValueError listing the valid names for an unknown one)."""
  return BUILDERS[data_lib.check_name(name)]


# ----------------------------------------------------------------------------------------------------------
# Command line: build once, print the splits.


class _ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage mistakes are user errors (one line on stderr, exit 2 through `cli`)."""

  def error(self, message):
    raise cli.UserError(f'{message} (see: python -m metrix_jax.data.builders --help)')


def split_counts(builder: MetrixBuilder) -> dict[str, tuple[int, int]]:
  """{split: (images, classes)} of a built data set (from its label file: nothing decoded)."""
  with np.load(os.path.join(builder.data_dir, LABELS_FILE)) as f:
    return {split: (len(f[split]), len(np.unique(f[split]))) for split in f.files}


_OUTCOME = {'built': 'built', 'rebuilt': 'rebuilt', 'reused': 'already built, up to date'}
# The shared log format of our commands (as `cli.configure_logging` prints metrix_jax's lines).
_LOG_FORMAT, _LOG_DATE_FORMAT = '%(levelname).1s %(asctime)s %(name)s] %(message)s', '%H:%M:%S'


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m metrix_jax.data.builders NAME [--manual_dir=DIR] [--data_dir=DIR] [--short_side=256] [--rebuild]`.

  Builds NAME once (rebuilds it if its archives changed, or with --rebuild) and prints its splits; returns the
  exit status (2: a user mistake, one line on stderr).
  """
  parser = _ArgumentParser(
    prog='python -m metrix_jax.data.builders',
    description='Build a data set from its official archives (once) and print its splits.',
  )
  parser.add_argument('name', choices=data_lib.DATASET_NAMES)
  parser.add_argument(
    '--manual_dir', default=None, help='folder with the archives (default: <data_dir>/downloads/manual)'
  )
  parser.add_argument(
    '--data_dir', default=None, help='where built data sets live (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)'
  )
  parser.add_argument('--short_side', type=int, default=256, help='photo benchmarks: stored shorter side (px)')
  parser.add_argument('--num_workers', type=int, default=None, help='build processes (default: all cores)')
  parser.add_argument(
    '--rebuild', action='store_true', help='build again even if up to date (the old build stays until it is done)'
  )
  parser.add_argument('--verbose_libraries', action='store_true', help="keep tfds' INFO log lines")

  def work():
    args = parser.parse_args(argv)
    # One root handler in our format: absl (tfds logs through it) would otherwise add a second one of its own
    # (`logging.basicConfig()` on its first log call) and every line would print twice.
    logging.basicConfig(format=_LOG_FORMAT, datefmt=_LOG_DATE_FORMAT)
    cli.configure_logging(verbose_libraries=args.verbose_libraries, process_index=0)
    builder = prepare(
      args.name,
      args.data_dir,
      args.manual_dir,
      rebuild=args.rebuild,
      short_side=args.short_side,
      num_workers=args.num_workers,
    )
    for split, (images, classes) in split_counts(builder).items():
      print(f'{args.name}/{split}: {images:,} images, {classes:,} classes')
    print(f'{_OUTCOME[builder.prepared]}: {builder.data_dir}')

  return cli.run_user_command(work)


if __name__ == '__main__':
  # Run the package's module, not this `__main__` copy: its loggers are 'metrix_jax.data.builders'.
  from metrix_jax.data import builders as _builders  # pylint: disable=g-import-not-at-top

  sys.exit(_builders.main())
