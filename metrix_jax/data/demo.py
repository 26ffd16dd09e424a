"""`demo`: the embedded default data set, glyph classes rendered locally (no download, deterministic).

A class is one Unicode character; its images are that character rendered by PIL from the fonts matplotlib
ships (12 DejaVu faces + 4 STIX General faces), each instance with its own font (among the faces that cover the
character), size, stroke width, rotation, shear, scale, translation, ink/background grey levels and pixel noise.
Characters come from Latin, IPA, Greek, Cyrillic, Armenian, Georgian, letterlike symbols, arrows, mathematical
operators, technical and geometric shapes, miscellaneous symbols and Braille. Precomposed accented letters are
left out, and characters whose reference rendering (DejaVu Sans) is pixel-identical to an earlier one (Latin A,
Greek Alpha, Cyrillic A, ...) are merged away, so each class looks different from the others.

Default config: 1,000 classes (500 train / 500 test, a seeded random split so both halves mix all blocks),
20 images per class, 32 x 32 grey pixels stored raw (uint8 [32, 32, 1]: nothing to decode; the pipeline
turns grey into RGB): 10,000 train / 10,000 test images,
built in ~20 s on one core into `<data_dir>/metrix_demo/<config>/1.0.0` and reused afterwards. Recall@1 by
chance is 19 / 9,999 = 0.19%.

Determinism: the bytes are a function of the config (seed included), of matplotlib's font files and of
Pillow/FreeType's rasteriser; the build records the versions in the dataset description.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import unicodedata

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw, ImageFont

from metrix_jax.data import base

# (first, last) code points of the blocks drawn from.
_BLOCKS = (
  (0x0021, 0x007E),  # Basic Latin
  (0x00A1, 0x00FF),  # Latin-1 Supplement
  (0x0100, 0x024F),  # Latin Extended-A/B
  (0x0250, 0x02AF),  # IPA Extensions
  (0x0370, 0x03FF),  # Greek
  (0x0400, 0x04FF),  # Cyrillic
  (0x0531, 0x058F),  # Armenian
  (0x10A0, 0x10FF),  # Georgian
  (0x2100, 0x214F),  # Letterlike Symbols
  (0x2190, 0x21FF),  # Arrows
  (0x2200, 0x22FF),  # Mathematical Operators
  (0x2300, 0x23FF),  # Miscellaneous Technical
  (0x25A0, 0x25FF),  # Geometric Shapes
  (0x2600, 0x26FF),  # Miscellaneous Symbols
  (0x2800, 0x28FF),  # Braille Patterns
)
# Latin script and Latin-derived letterforms: Basic Latin (its digits and signs too), Latin-1, Latin Extended-A/B,
# IPA, Letterlike Symbols (double-struck and script letters, the Kelvin sign, ...). Greek and Cyrillic letters that
# render like a Latin one were merged into it (an earlier block wins), so without Latin they are absent as well.
_LATIN_BLOCKS = _BLOCKS[:4] + ((0x2100, 0x214F),)
_MIN_FONTS = 4  # a class needs at least this many faces (instance diversity)
_REFERENCE_FONT = 'DejaVuSans.ttf'


@dataclasses.dataclass
class DemoConfig(tfds.core.BuilderConfig):
  num_classes: int = 1000
  num_train_classes: int = 500
  images_per_class: int = 20
  image_size: int = 32
  seed: int = 0
  latin: bool = True  # False: none of `_LATIN_BLOCKS` (Latin script, IPA, letterlike symbols)


def demo_config(
  num_classes: int = 1000,
  num_train_classes: int | None = None,
  images_per_class: int = 20,
  image_size: int = 32,
  seed: int = 0,
  latin: bool = True,
) -> DemoConfig:
  """A named config; the name encodes every field so different configs never share a directory."""
  if num_train_classes is None:
    num_train_classes = num_classes // 2
  if not 0 < num_train_classes < num_classes:
    raise ValueError(f'num_train_classes={num_train_classes} must be in (0, num_classes={num_classes}).')
  if image_size < 16 or images_per_class < 2:
    raise ValueError(f'image_size={image_size} must be >= 16 and images_per_class={images_per_class} >= 2.')
  name = (
    'default'
    if (num_classes, num_train_classes, images_per_class, image_size, seed, latin) == (1000, 500, 20, 32, 0, True)
    else f'c{num_classes}_t{num_train_classes}_n{images_per_class}_s{image_size}_seed{seed}'
    + ('' if latin else '_nolatin')
  )
  return DemoConfig(
    name=name,
    num_classes=num_classes,
    num_train_classes=num_train_classes,
    images_per_class=images_per_class,
    image_size=image_size,
    seed=seed,
    latin=latin,
    description=f'{num_classes} glyph classes ({num_train_classes} train), {images_per_class} '
    f'images each, {image_size}px, seed {seed}' + ('' if latin else ', no Latin-script characters'),
  )


@functools.lru_cache(maxsize=None)
def font_files() -> tuple[str, ...]:
  import matplotlib  # pylint: disable=g-import-not-at-top

  font_dir = os.path.join(matplotlib.get_data_path(), 'fonts', 'ttf')
  names = sorted(
    f
    for f in os.listdir(font_dir)
    if (f.startswith('DejaVuSans') or f.startswith('DejaVuSerif')) and 'Display' not in f or f.startswith('STIXGeneral')
  )
  if _REFERENCE_FONT not in names:
    raise RuntimeError(f'matplotlib fonts not found in {font_dir}: the demo data set renders them.')
  return tuple(os.path.join(font_dir, f) for f in names)


@functools.lru_cache(maxsize=None)
def _charmaps() -> tuple[frozenset, ...]:
  from matplotlib import ft2font  # pylint: disable=g-import-not-at-top

  return tuple(frozenset(ft2font.FT2Font(f).get_charmap()) for f in font_files())


@functools.lru_cache(maxsize=4096)
def _font(index: int, size: int) -> ImageFont.FreeTypeFont:
  return ImageFont.truetype(font_files()[index], size)


def _reference_bitmap(codepoint: int) -> bytes | None:
  """24x24 rendering in the reference face; None when (nearly) empty."""
  image = Image.new('L', (24, 24), 0)
  ImageDraw.Draw(image).text((12, 12), chr(codepoint), fill=255, font=_font(_reference_index(), 16), anchor='mm')
  data = np.asarray(image)
  return data.tobytes() if (data > 127).sum() >= 4 else None


@functools.lru_cache(maxsize=None)
def _reference_index() -> int:
  return [os.path.basename(f) for f in font_files()].index(_REFERENCE_FONT)


@functools.lru_cache(maxsize=None)
def candidate_characters() -> tuple[tuple[int, tuple[int, ...]], ...]:
  """Sorted (code point, indices of the faces covering it) of every usable, visually distinct character."""
  charmaps = _charmaps()
  reference = charmaps[_reference_index()]
  seen, out = set(), []
  for first, last in _BLOCKS:
    for cp in range(first, last + 1):
      ch = chr(cp)
      if unicodedata.category(ch)[0] not in 'LNS' or unicodedata.normalize('NFD', ch) != ch:
        continue
      faces = tuple(i for i, m in enumerate(charmaps) if cp in m)
      if len(faces) < _MIN_FONTS or cp not in reference:
        continue
      bitmap = _reference_bitmap(cp)
      if bitmap is None or bitmap in seen:
        continue
      seen.add(bitmap)
      out.append((cp, faces))
  return tuple(out)


def is_latin(codepoint: int) -> bool:
  """Whether `codepoint` lies in one of the Latin-script blocks drawn from (`_LATIN_BLOCKS`)."""
  return any(first <= codepoint <= last for first, last in _LATIN_BLOCKS)


def available_characters(latin: bool = True) -> tuple[tuple[int, tuple[int, ...]], ...]:
  """`candidate_characters()`, without the Latin-script blocks when `latin` is False."""
  return tuple(c for c in candidate_characters() if latin or not is_latin(c[0]))


def select_classes(config: DemoConfig) -> list[tuple[int, tuple[int, ...]]]:
  """The config's classes in label order: train classes first (labels 0..T-1), then eval classes."""
  candidates = available_characters(config.latin)
  if config.num_classes > len(candidates):
    raise ValueError(f'num_classes={config.num_classes} > {len(candidates)} available glyph classes.')
  order = np.random.default_rng([config.seed, 0xC1A55]).permutation(len(candidates))[: config.num_classes]
  train = sorted(order[: config.num_train_classes])
  test = sorted(order[config.num_train_classes :])
  return [candidates[i] for i in train] + [candidates[i] for i in test]


def render_glyph(codepoint: int, faces: tuple[int, ...], rng: np.random.Generator, size: int) -> tuple[np.ndarray, int]:
  """One instance: uint8 [size, size] grey image (dark ink on light paper) and the face index used."""
  canvas = 2 * size  # render at 2x, then downsample (antialiasing)
  u = rng.random(11)  # every scalar draw at once (one call: a Generator call costs microseconds)
  face = faces[min(int(u[0] * len(faces)), len(faces) - 1)]
  font_size = int(round(canvas * (0.42 + 0.18 * u[1])))
  stroke = min(int(u[2] * 3), 2) * canvas // 64
  image = Image.new('L', (canvas, canvas), 0)
  ImageDraw.Draw(image).text(
    (canvas / 2, canvas / 2),
    chr(codepoint),
    fill=255,
    font=_font(face, font_size),
    anchor='mm',
    stroke_width=stroke,
    stroke_fill=255,
  )
  bbox = image.getbbox() or (0, 0, canvas, canvas)
  # Affine jitter about the ink centre: rotation +-12 deg, shear +-0.2, scale 0.85-1.1, shift +-6%.
  angle = math.radians(24 * u[3] - 12)
  shear = 0.4 * u[4] - 0.2
  scale = 0.85 + 0.25 * u[5]
  shift_x, shift_y = (0.12 * u[6] - 0.06) * canvas, (0.12 * u[7] - 0.06) * canvas
  c, s = math.cos(angle) / scale, math.sin(angle) / scale
  a, b, d, e = c, (shear - math.sin(angle)) / scale, s, c  # output -> input (PIL's convention)
  ox, oy = canvas / 2 + shift_x, canvas / 2 + shift_y
  cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
  image = image.transform(
    (canvas, canvas), Image.AFFINE, (a, b, cx - a * ox - b * oy, d, e, cy - d * ox - e * oy), resample=Image.BILINEAR
  )
  ink = np.asarray(image.resize((size, size), Image.BILINEAR), np.float32) * (1.0 / 255.0)
  paper, pen, sigma = 0.65 + 0.35 * u[8], 0.35 * u[9], 0.01 + 0.05 * u[10]
  pixels = paper + (pen - paper) * ink + rng.normal(0.0, sigma, ink.shape).astype(np.float32)
  return np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8), face


class Demo(base.MetrixBuilder, skip_registration=True):
  """Generated glyph classes; see the module docstring."""

  name = 'metrix_demo'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'Nothing to download: the demo data set is generated locally.'

  @classmethod
  def default_config(cls, short_side: int = 256, manual_dir=None, data_dir=None) -> DemoConfig:
    del short_side, manual_dir, data_dir
    return demo_config()

  def _info(self):
    config = self.builder_config
    import matplotlib  # pylint: disable=g-import-not-at-top
    import PIL  # pylint: disable=g-import-not-at-top

    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        f'{self.builder_config.description}; rendered with Pillow {PIL.__version__} from the fonts '
        f'of matplotlib {matplotlib.__version__}.'
      ),
      features=base.photo_features(
        raw_image_shape=(config.image_size, config.image_size, 1), font=tfds.features.Text()
      ),
      supervised_keys=('image', 'label'),
    )

  def _split_examples(self, split):
    config = self.builder_config
    classes = select_classes(config)
    labels = (
      range(config.num_train_classes) if split == 'train' else range(config.num_train_classes, config.num_classes)
    )
    items = (
      (f'U+{classes[label][0]:04X}/{k:03d}', (classes[label], k), label)
      for label in labels
      for k in range(config.images_per_class)
    )
    num_items = len(labels) * config.images_per_class
    workers = self.num_workers if num_items >= 4000 else 0  # process start-up costs more than small builds
    names = [os.path.basename(f) for f in font_files()]
    for key, (pixels, face), label in base.parallel_map(_render_item, items, (config.seed, config.image_size), workers):
      yield (
        key,
        {
          'image': pixels[:, :, None],
          'label': label,
          'original_size': np.array(pixels.shape, np.int32),
          'file_name': key,
          'font': names[face],
        },
      )


def glyphs_config(images_per_class: int = 30, image_size: int = 32, seed: int = 0) -> DemoConfig:
  """The `glyphs` source: every non-Latin glyph class the fonts give (1,291 with matplotlib 3.10's fonts), 1/8 of
  them held out (their images are the test split: the source model's own retrieval on unseen source classes)."""
  num_classes = len(available_characters(latin=False))
  return demo_config(
    num_classes=num_classes,
    num_train_classes=num_classes - num_classes // 8,
    images_per_class=images_per_class,
    image_size=image_size,
    seed=seed,
    latin=False,
  )


class Glyphs(Demo, skip_registration=True):
  """`glyphs`: the large labelled source for transfer studies (`configs/pretrain_glyphs.py`): the demo generator
  over every non-Latin glyph class (Greek, Cyrillic, Armenian, Georgian, arrows, mathematical operators,
  technical and geometric shapes, miscellaneous symbols, Braille), 30 images each. None of Omniglot's test
  alphabets (Latin, Japanese katakana, Early Aramaic, Tagalog) is among its scripts: Latin, IPA and the letterlike
  symbols are left out, and the fonts cover no katakana, Aramaic or Tagalog."""

  name = 'metrix_glyphs'
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'Nothing to download: the glyphs data set is generated locally.'

  @classmethod
  def default_config(cls, short_side: int = 256, manual_dir=None, data_dir=None) -> DemoConfig:
    del short_side, manual_dir, data_dir
    return glyphs_config()


def _render_item(item, arg):
  """Worker: ((codepoint, faces), instance), (seed, size) -> (uint8 [size, size], face index)."""
  ((codepoint, faces), k), (seed, size) = item, arg
  return render_glyph(codepoint, faces, np.random.default_rng([seed, codepoint, k]), size)
