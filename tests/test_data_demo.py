"""The embedded `demo` data set, generated for real: counts, class split, determinism, caching."""

import hashlib
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from metrix_jax import data, jsonio
from metrix_jax.data import base, builders, demo


def _record_files_digest(dataset_dir):
  digest = hashlib.sha256()
  for name in sorted(os.listdir(dataset_dir)):
    if '.array_record' in name:
      with open(os.path.join(dataset_dir, name), 'rb') as f:
        digest.update(name.encode() + f.read())
  return digest.hexdigest()


# What tfds prints while it builds (termcolor, on stdout) and logs (absl INFO): none of it by default.
TFDS_NOISE = ('Downloading and preparing dataset', 'downloaded and prepared to', 'Generating dataset', 'absl')


@pytest.fixture(scope='module')
def default_demo(tmp_path_factory):
  """The default demo, built by the documented command (a subprocess), which must print only our lines."""
  data_dir = str(tmp_path_factory.mktemp('demo_data'))
  start = time.time()
  proc = subprocess.run(
    [sys.executable, '-m', 'metrix_jax.data.builders', 'demo', f'--data_dir={data_dir}'],
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  seconds = time.time() - start
  assert proc.returncode == 0, proc.stderr
  dataset_dir = os.path.join(data_dir, 'metrix_demo', 'default', '1.0.0')
  assert proc.stdout.splitlines() == [
    'demo/train: 10,000 images, 500 classes',
    'demo/test: 10,000 images, 500 classes',
    f'built: {dataset_dir}',
  ]
  assert [line.split('] ', 1)[1] for line in proc.stderr.splitlines()] == [f'Building demo into {dataset_dir} ...']
  for noise in TFDS_NOISE:
    assert noise not in proc.stdout + proc.stderr, noise
  builder = data.prepare('demo', data_dir)
  assert builder.prepared == 'reused' and builder.data_dir == dataset_dir
  return data_dir, builder, seconds


def test_default_demo_counts_and_split(default_demo):
  data_dir, builder, seconds = default_demo
  info = data.get_dataset_info('demo', data_dir)
  assert info == data.DatasetInfo(
    num_classes_train=500, num_train_examples=10_000, eval_splits=('test',), has_gallery=False
  )
  train = builders.RecordSource(builder.data_dir, 'train')
  test = builders.RecordSource(builder.data_dir, 'test')
  assert len(test) == 10_000
  np.testing.assert_array_equal(np.bincount(train.labels), np.full(500, 20))
  np.testing.assert_array_equal(np.bincount(test.labels)[500:], np.full(500, 20))
  assert test.labels.min() == 500  # eval classes follow the train classes: disjoint
  # Records carry what the label cache says; one class = one code point; raw grey 32x32 pixels.
  for source in (train, test):
    for i in (0, 1234, len(source) - 1):
      record = source.record(i)
      assert record['label'] == source.labels[i]
      assert record['image'].shape == (32, 32, 1) and record['image'].dtype == np.uint8
      np.testing.assert_array_equal(source.image_bytes(i), record['image'])  # fast reader == tfds decoding
      np.testing.assert_array_equal(record['original_size'], [32, 32])
  codepoints = {}
  for i in range(0, 10_000, 97):
    record = train.record(i)
    codepoints.setdefault(int(record['label']), set()).add(record['file_name'].split(b'/')[0])
  assert all(len(c) == 1 for c in codepoints.values())
  print(f'default demo built in {seconds:.1f}s')


def test_demo_is_cached(default_demo):
  data_dir, builder, _ = default_demo
  assert jsonio.read_json(os.path.join(builder.data_dir, base.SOURCES_FILE)) == {
    'format': 1,
    'dataset': 'demo',
    'version': '1.0.0',
    'config': {
      'name': 'default',
      'image_size': 32,
      'images_per_class': 20,
      'latin': True,
      'num_classes': 1000,
      'num_train_classes': 500,
      'seed': 0,
    },
    'files': {},  # generated: its config is all it is made from
  }
  stamp = os.path.getmtime(os.path.join(builder.data_dir, builders.LABELS_FILE))
  start = time.time()
  again = data.prepare('demo', data_dir)
  assert time.time() - start < 5
  assert again.data_dir == builder.data_dir
  assert os.path.getmtime(os.path.join(builder.data_dir, builders.LABELS_FILE)) == stamp


def test_demo_is_deterministic(tmp_path):
  config = demo.demo_config(num_classes=30, num_train_classes=20, images_per_class=5)
  digests = [
    _record_files_digest(data.prepare('demo', str(tmp_path / name), config=config).data_dir) for name in ('a', 'b')
  ]
  assert digests[0] == digests[1]
  other_seed = demo.demo_config(num_classes=30, num_train_classes=20, images_per_class=5, seed=1)
  assert _record_files_digest(data.prepare('demo', str(tmp_path / 'c'), config=other_seed).data_dir) != digests[0]


def test_glyph_classes_are_many_and_distinct():
  candidates = demo.candidate_characters()
  assert len(candidates) >= 1000
  assert len({cp for cp, _ in candidates}) == len(candidates)
  assert all(len(faces) >= 4 for _, faces in candidates)
  classes = demo.select_classes(demo.demo_config())
  assert len(classes) == 1000 and len(set(classes)) == 1000


def test_instances_differ_within_a_class():
  codepoint, faces = demo.select_classes(demo.demo_config())[0]
  images = [demo.render_glyph(codepoint, faces, np.random.default_rng([0, codepoint, k]), 32)[0] for k in range(4)]
  assert all(im.shape == (32, 32) and im.dtype == np.uint8 for im in images)
  assert all(np.abs(images[0].astype(int) - im).mean() > 2 for im in images[1:])


def test_bad_config_is_rejected():
  with pytest.raises(ValueError, match='num_train_classes'):
    demo.demo_config(num_classes=10, num_train_classes=10)


def test_glyphs_source_has_no_latin_and_holds_out_an_eighth_of_its_classes(tmp_path):
  import unicodedata  # pylint: disable=g-import-not-at-top

  config = demo.glyphs_config()
  classes = demo.select_classes(config)
  assert config.num_classes == len(demo.available_characters(latin=False)) >= 1000
  assert config.num_train_classes == config.num_classes - config.num_classes // 8 and config.name.endswith('_nolatin')
  names = [unicodedata.name(chr(cp), '') for cp, _ in classes]
  # Omniglot's test alphabets: Latin, Japanese katakana, Early Aramaic, Tagalog; and no Latin-derived letterforms.
  for word in ('LATIN', 'KATAKANA', 'ARAMAIC', 'TAGALOG', 'DOUBLE-STRUCK', 'DIGIT'):
    assert not any(word in n for n in names), word
  assert all(not (0x21 <= cp <= 0x2AF or 0x2100 <= cp <= 0x214F) for cp, _ in classes)
  assert len({cp for cp, _ in classes}) == len(classes)
  # the demo data set keeps Latin; the glyph source is the rest of the same candidates
  every = {cp for cp, _ in demo.available_characters(latin=True)}
  assert {cp for cp, _ in classes} == {cp for cp in every if not demo.is_latin(cp)}
  assert demo.is_latin(ord('A')) and demo.is_latin(0x211D) and not demo.is_latin(0x0391 + 1)
  # a small build through the registry: split sizes and disjoint classes
  small = demo.demo_config(num_classes=12, num_train_classes=9, images_per_class=3, latin=False)
  builder = data.prepare('glyphs', str(tmp_path), config=small)
  assert builders.split_counts(builder) == {'train': (27, 9), 'test': (9, 3)}
  assert data.spec('glyphs').needs_manual_dir is False and builders.builder_class('glyphs') is demo.Glyphs
