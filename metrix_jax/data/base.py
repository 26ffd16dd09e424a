"""The tfds builder base shared by every data set's builder: configs, features, image encoding, archives.

`MetrixBuilder` is a `tfds.core.GeneratorBasedBuilder` that writes `array_record` files (no TensorFlow needed),
takes an explicit manual dir, checks every expected file before writing anything (`find_files`) and the standard
image counts (`check_count`), and encodes images in parallel (`encode_images`, through `parallel_map`). The
benchmark builders (`builders.py`) and the generated `demo` data set (`demo.py`) derive from it; `builders.py`
holds the registry, `prepare` and the split readers.

Archive helpers read tar/tgz (streamed), zip or an extracted folder: `iter_archive` (sequential pass),
`RandomAccess` (read one member by name), `read_text_member`, `is_hidden` (macOS resource forks).

Sources of a build (`MetrixBuilder.source_record()`, written by `builders.prepare` as `SOURCES_FILE` next to the
tfds files): the config and, for every file the builder reads from the manual dir, its size and mtime
(`stat_source`); `builders.prepare` compares them with the manual dir on every use and rebuilds when they differ.

Console: tfds prints "Downloading and preparing dataset ..." / "Dataset ... downloaded and prepared to ..." with
`termcolor.cprint` on stdout, whatever the log levels. `MetrixBuilder` passes them on as INFO lines of the
'tensorflow_datasets' logger instead (shown with `cli.configure_logging(verbose_libraries=True)`, dropped by
default).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
import logging
import multiprocessing
import os
import sys
import tarfile
import zipfile
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

log = logging.getLogger(__name__)

_JPEG_QUALITY = 95
# How a user points the project at the archives (every missing-archive message ends its first line with this).
MANUAL_DIR_HINT = (
  'pass the folder that holds them with --config.dataset.manual_dir=DIR (training, evaluation) '
  'or --manual_dir=DIR (python -m metrix_jax.data.builders)'
)


class _ExpectedTfdsWarnings(logging.Filter):
  """Drops the tfds (absl) warnings that every build of ours triggers; anything else tfds says passes.

  Our configs are always custom ('Using custom data configuration: ...'), and a variant folder that is not built
  yet has no dataset_info.json ('Variant folder ... has no ...').
  """

  EXPECTED = ('Using custom data configuration', 'Variant folder %s has no')

  def filter(self, record: logging.LogRecord) -> bool:
    return not (isinstance(record.msg, str) and record.msg.startswith(self.EXPECTED))


logging.getLogger('absl').addFilter(_ExpectedTfdsWarnings())

# The logger whose level says whether tfds' console lines are wanted (`cli.configure_logging` sets it: INFO with
# --verbose_libraries, WARNING otherwise; unset in a notebook: the root's WARNING).
_TFDS_LOG = logging.getLogger('tensorflow_datasets')


def _tfds_console_lines_to_log(print_lines: Callable[[], None]) -> None:
  """Runs one of tfds' printing hooks; its stdout becomes INFO lines of the 'tensorflow_datasets' logger.

  Nothing runs when that logger drops INFO (the default): the lines are tfds' own, not a warning or an error.
  """
  if not _TFDS_LOG.isEnabledFor(logging.INFO):
    return
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_lines()
  for line in out.getvalue().splitlines():
    if line.strip():
      _TFDS_LOG.info('%s', line)


# ----------------------------------------------------------------------------------------------------------
# What a build is made from: the files of the manual dir (size, mtime) and the config.

SOURCES_FILE = 'metrix_sources.json'  # next to the tfds files of a build; strict JSON (metrix_jax.jsonio)
SOURCES_FORMAT = 1


def stat_source(path: str) -> dict[str, int]:
  """What identifies a source file without reading it: {'size': bytes, 'mtime_ns': ns since the epoch}.

  A folder (an extracted archive): {'files': number of files under it, 'size': their total bytes, 'mtime_ns': the
  latest mtime of any file or folder under it} (a file replaced, added or removed changes one of them).
  """
  if not os.path.isdir(path):
    st = os.stat(path)
    return {'size': st.st_size, 'mtime_ns': st.st_mtime_ns}
  files, size, mtime_ns = 0, 0, os.stat(path).st_mtime_ns
  for dirpath, dirnames, filenames in os.walk(path):
    for name in dirnames:
      mtime_ns = max(mtime_ns, os.stat(os.path.join(dirpath, name)).st_mtime_ns)
    for name in filenames:
      st = os.stat(os.path.join(dirpath, name))
      files, size, mtime_ns = files + 1, size + st.st_size, max(mtime_ns, st.st_mtime_ns)
  return {'files': files, 'size': size, 'mtime_ns': mtime_ns}


def config_fields(config: tfds.core.BuilderConfig) -> dict[str, Any]:
  """The config's name and its own fields (those a subclass adds to tfds' BuilderConfig), JSON-able."""
  own = {f.name for f in dataclasses.fields(config)} - {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
  fields = {'name': config.name}
  for key in sorted(own):
    value = getattr(config, key)
    fields[key] = list(value) if isinstance(value, tuple) else value
  return fields


# ----------------------------------------------------------------------------------------------------------
# Configs and the common builder base.


@dataclasses.dataclass
class ImageConfig(tfds.core.BuilderConfig):
  """Build option of the photo benchmarks: shorter side of the stored images (never upsampled)."""

  short_side: int = 256


def image_config(short_side: int = 256) -> ImageConfig:
  if short_side < 32:
    raise ValueError(f'short_side={short_side} is too small; use >= 32 (default 256).')
  return ImageConfig(
    name=f's{short_side}',
    short_side=short_side,
    description=f'images resized so that the shorter side is {short_side} px',
  )


class MetrixBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base class: array_record output, explicit manual dir, count checks, parallel image processing.

  Subclasses define `name`, `VERSION`, `MANUAL_DOWNLOAD_INSTRUCTIONS`, `SPLITS`, `required_files()` and
  `_split_examples(split)`.
  """

  SPLITS: tuple[str, ...] = ('train', 'test')

  @tfds.core.utils.classproperty
  @classmethod
  def dataset_name(cls) -> str:
    """The name users type ('cub200'); the tfds name adds a prefix ('metrix_cub200')."""
    return cls.name.removeprefix('metrix_')

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):  # no checksums/metadata files next to the code (and editable installs break the lookup)
    return None

  def __init__(
    self,
    *,
    data_dir: str,
    manual_dir: str | None = None,
    check_counts: bool = True,
    num_workers: int | None = None,
    **kwargs,
  ):
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(data_dir=data_dir, **kwargs)
    self._manual_dir = manual_dir
    self.check_counts = check_counts
    self.num_workers = os.cpu_count() if num_workers is None else num_workers
    self.skipped_files: list[str] = []
    self.prepared: str | None = None  # what `builders.prepare` did: 'built', 'rebuilt', 'reused'

  @classmethod
  def default_config(
    cls, short_side: int = 256, manual_dir: str | None = None, data_dir: str | None = None
  ) -> tfds.core.BuilderConfig:
    del manual_dir, data_dir
    return image_config(short_side)

  # -- manual files --------------------------------------------------------------------------------------
  def required_files(self) -> dict[str, Sequence[str]]:
    """{description: candidate paths relative to the manual dir (first existing wins)}."""
    return {}

  def find_files(self) -> dict[str, str]:
    """Resolves `required_files()` in the manual dir; raises FileNotFoundError naming what is missing."""
    manual_dir = self._manual_dir
    found, missing = {}, []
    for key, candidates in self.required_files().items():
      for rel in candidates:
        path = os.path.join(manual_dir or '', rel)
        if manual_dir and os.path.exists(path):
          found[key] = path
          break
      else:
        missing.append(f'{key} (one of: {", ".join(candidates)})')
    if missing:
      where = (
        'no manual dir given'
        if not manual_dir
        else (f'manual dir {manual_dir!r}' + ('' if os.path.isdir(manual_dir) else ', which is not a folder'))
      )
      raise FileNotFoundError(
        f'{self.dataset_name}: the official archives are missing ({where}); {MANUAL_DIR_HINT}.\n'
        'Missing:\n  - ' + '\n  - '.join(missing) + f'\n\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}'
      )
    return found

  @property
  def manual_dir(self) -> str | None:
    return self._manual_dir

  def source_record(self) -> dict[str, Any]:
    """What a build of this builder is made from (checks that every file is there first: `find_files()`).

    {'format': 1, 'dataset': name, 'version': '1.0.0', 'config': `config_fields`, 'files': {path relative to the
    manual dir ('/' separators): `stat_source(path)`}}; 'files' is empty for a generated data set (demo): its
    config is all it is made from.
    """
    files = self.find_files() if self.required_files() else {}
    return {
      'format': SOURCES_FORMAT,
      'dataset': self.dataset_name,
      'version': str(self.version),
      'config': config_fields(self.builder_config),
      'files': {self.relative_source(path): stat_source(path) for path in files.values()},
    }

  def relative_source(self, path: str) -> str:
    return os.path.relpath(path, self._manual_dir).replace(os.sep, '/')

  # -- tfds hooks ----------------------------------------------------------------------------------------
  def _log_download_bytes(self) -> None:  # tfds: "Downloading and preparing dataset ..." (a bold print)
    _tfds_console_lines_to_log(super()._log_download_bytes)

  def _log_download_done(self) -> None:  # tfds: "Dataset ... downloaded and prepared to ..." (a bold print)
    _tfds_console_lines_to_log(super()._log_download_done)

  def _split_generators(self, dl_manager):
    del dl_manager  # files are located through `find_files()` (explicit manual dir, checked up front)
    return {split: self._generate_examples(split) for split in self.SPLITS}

  def _generate_examples(self, split):
    for key, example in self._split_examples(split):
      yield key, example

  def _split_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    raise NotImplementedError

  # -- helpers for subclasses ----------------------------------------------------------------------------
  def check_count(self, what: str, expected: int, found: int):
    if found != expected:
      message = (
        f'{self.name}: expected {expected:,} {what}, found {found:,}: the archive is incomplete or not '
        f'the official release.\n\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}'
      )
      if self.check_counts:
        raise ValueError(message)
      log.warning('%s (count check disabled)', message.split('\n')[0])

  def encode_images(
    self,
    items: Iterable[tuple[str, bytes, dict[str, Any]]],
    short_side: int | None,
  ) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, raw image bytes, other features) -> (key, example); corrupt images skipped and logged.

    `short_side=None` keeps the bytes as they are (after checking that they decode).
    """
    skipped_before = len(self.skipped_files)
    for key, result, extra in parallel_map(encode_image, items, short_side, self.num_workers):
      if isinstance(result, str):
        self.skipped_files.append(key)
        log.warning('%s: skipping corrupt image %s (%s)', self.name, key, result)
        continue
      data, original_size = result
      yield key, dict(extra, image=data, original_size=np.asarray(original_size, np.int32))
    skipped = len(self.skipped_files) - skipped_before
    if skipped:
      log.warning(
        '%s: skipped %d corrupt image(s) in this split: %s',
        self.name,
        skipped,
        ', '.join(self.skipped_files[skipped_before : skipped_before + 20]),
      )


def photo_features(
  image_channels: int = 3, encoding: str = 'jpeg', raw_image_shape: tuple[int, ...] | None = None, **extra
) -> tfds.features.FeaturesDict:
  """Common features; `raw_image_shape` stores small images as raw uint8 pixels instead of encoded bytes."""
  if raw_image_shape is not None:
    image = tfds.features.Tensor(shape=raw_image_shape, dtype=np.uint8, encoding=tfds.features.Encoding.BYTES)
  else:
    image = tfds.features.Image(shape=(None, None, image_channels), encoding_format=encoding)
  return tfds.features.FeaturesDict(
    {
      'image': image,
      'label': tfds.features.Tensor(shape=(), dtype=np.int64),
      'original_size': tfds.features.Tensor(shape=(2,), dtype=np.int32),
      'file_name': tfds.features.Text(),
      **extra,
    }
  )


def encode_image(data: bytes, short_side: int | None):
  """Worker: raw bytes -> (encoded bytes, (height, width)) or an error string."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      width, height = image.size
      if short_side is None:
        return data, (height, width)
      image = image.convert('RGB')
      if min(width, height) > short_side:  # torchvision Resize(int): shorter side -> size, int() on the other
        if width <= height:
          size = (short_side, int(short_side * height / width))
        else:
          size = (int(short_side * width / height), short_side)
        image = image.resize(size, Image.BILINEAR)
      out = io.BytesIO()
      image.save(out, format='JPEG', quality=_JPEG_QUALITY)
      return out.getvalue(), (height, width)
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds on corrupt files)
    return f'{type(e).__name__}: {e}'


def parallel_map(
  fn: Callable, items: Iterable[tuple[str, bytes, Any]], arg, num_workers: int, chunk: int = 64
) -> Iterator[tuple[str, Any, Any]]:
  """Ordered map of fn(data, arg) over (key, data, extra) with bounded memory; in-process if num_workers < 2."""
  if num_workers < 2:
    for key, data, extra in items:
      yield key, fn(data, arg), extra
    return
  # fork is fast and needs no `if __name__ == '__main__'` guard, but is unsafe once jax runs its threads.
  ctx = multiprocessing.get_context('spawn' if 'jax' in sys.modules else 'fork')
  with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
    block: list = []
    pending: list = []  # at most two blocks in flight

    def flush(block):
      return block, [
        pool.submit(_map_chunk, fn, [d for _, d, _ in block[i : i + chunk]], arg) for i in range(0, len(block), chunk)
      ]

    for item in items:
      block.append(item)
      if len(block) == chunk * num_workers * 2:
        pending.append(flush(block))
        block = []
        if len(pending) > 1:
          yield from _drain(pending.pop(0))
    if block:
      pending.append(flush(block))
    for p in pending:
      yield from _drain(p)


def _map_chunk(fn, datas, arg):
  return [fn(d, arg) for d in datas]


def _drain(pending):
  block, futures = pending
  results = [r for f in futures for r in f.result()]
  for (key, _, extra), result in zip(block, results):
    yield key, result, extra


# ----------------------------------------------------------------------------------------------------------
# Reading archives (tar/tgz streamed, zip or an extracted folder), yielding (name, bytes).


def iter_archive(path: str, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
  """Yields (member name with '/' separators, bytes) for wanted regular files, in archive order.

  For a folder, names are relative to the folder's parent (so they start with the folder's own name, as the
  archive's members do). Errors in a truncated/corrupt archive are re-raised naming the file.
  """
  try:
    if os.path.isdir(path):
      root = os.path.dirname(os.path.abspath(path))
      for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for fname in sorted(filenames):
          full = os.path.join(dirpath, fname)
          name = os.path.relpath(full, root).replace(os.sep, '/')
          if wanted(name):
            with open(full, 'rb') as f:
              yield name, f.read()
    elif zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
          if not info.is_dir() and wanted(info.filename):
            yield info.filename, zf.read(info)
    else:
      with tarfile.open(path, 'r|*') as tf:  # streaming: one sequential pass over a .tgz
        for member in tf:
          name = member.name[2:] if member.name.startswith('./') else member.name
          if member.isfile() and wanted(name):
            yield name, tf.extractfile(member).read()
  except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
    raise ValueError(
      f'Cannot read {path}: {type(e).__name__}: {e}. The file is truncated or corrupt; download it again.'
    ) from e


def read_text_member(path: str, name: str) -> str:
  """One text file from a zip/folder/tar archive (`name` as `iter_archive` names it)."""
  for _, data in iter_archive(path, lambda n: n == name):
    return data.decode('utf-8')
  raise FileNotFoundError(f'{name} not found in {path}: the archive is incomplete or not the official one.')


def is_hidden(name: str) -> bool:
  return any(part.startswith('._') or part == '__MACOSX' for part in name.split('/'))


class RandomAccess:
  """read(name) from a zip or an extracted folder (names as `iter_archive` gives them); None when absent."""

  def __init__(self, path: str):
    self.path = path
    self._zip = None if os.path.isdir(path) else zipfile.ZipFile(path)
    self._root = os.path.dirname(os.path.abspath(path))

  def read(self, name: str) -> bytes | None:
    try:
      if self._zip is not None:
        return self._zip.read(name)
      with open(os.path.join(self._root, *name.split('/')), 'rb') as f:
        return f.read()
    except (KeyError, FileNotFoundError):
      return None

  def close(self):
    if self._zip is not None:
      self._zip.close()
