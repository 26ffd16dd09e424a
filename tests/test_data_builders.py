"""tfds builders from tiny fake archives with the official layout and file names; Omniglot from the real zips.

Fakes hold a handful of images per class, so the standard-count check is disabled (`check_counts=False`)
except where a test checks that it fires.
"""

import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from metrix_jax import config_lib, data, jsonio
from metrix_jax.data import base, builders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The real small Omniglot zips of the development tree (../shared next to the checkout); tests skip without it.
OMNIGLOT_SMALL = os.path.join(ROOT, '..', 'shared', 'data', 'omniglot_small')
SMALL = base.image_config(32)  # fake images are 40 x 48: resized to 32 x 38 at build time


def jpeg(seed, size=(48, 40), mode='RGB'):
  pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).convert(mode).save(out, format='JPEG')
  return out.getvalue()


def png(seed):
  pixels = np.random.default_rng(seed).random((105, 105)) > 0.2
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format='PNG')
  return out.getvalue()


def write_tar(path, files):
  with tarfile.open(path, 'w:gz') as tf:
    for name, payload in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      tf.addfile(info, io.BytesIO(payload))


def write_zip(path, files):
  with zipfile.ZipFile(path, 'w') as zf:
    for name, payload in files.items():
      zf.writestr(name, payload)


def build(name, data_dir, manual_dir, **kwargs):
  kwargs.setdefault('check_counts', False)
  kwargs.setdefault('config', SMALL)
  builder = data.prepare(name, str(data_dir), str(manual_dir), num_workers=0, **kwargs)
  return builder, {s: builders.RecordSource(builder.data_dir, s) for s in builder.info.splits}


def labels_of(source):
  return sorted(source.labels.tolist())


def leftovers(data_dir):
  return [
    os.path.join(d, f)
    for d, dirs, files in os.walk(data_dir)
    for f in files + dirs
    if 'incomplete' in f or f.endswith('.array_record-00000-of-00001')
  ]


# ----------------------------------------------------------------------------------------------------------
# CUB-200-2011


@pytest.fixture(scope='module')
def cub_manual(tmp_path_factory):
  manual = tmp_path_factory.mktemp('cub_manual')
  files = {'attributes.txt': b'1 has_bill_shape::curved\n', 'CUB_200_2011/images.txt': b'1 001.x/a.jpg\n'}
  for cls in (1, 2, 100, 101, 200):
    for k in range(3):
      files[f'CUB_200_2011/images/{cls:03d}.Bird_{cls}/Bird_{cls}_{k:04d}_1.jpg'] = jpeg(cls * 10 + k)
  files['CUB_200_2011/images/001.Bird_1/._Bird_1_0000_1.jpg'] = b'\x00\x05\x16\x07 mac resource fork'
  files['CUB_200_2011/images/002.Bird_2/Bird_2_corrupt.jpg'] = b'\xff\xd8\xff\xe0 not really a jpeg'
  write_tar(manual / 'CUB_200_2011.tgz', files)
  return manual


def test_cub200_split_labels_resize_and_corrupt_skip(cub_manual, tmp_path, caplog):
  with caplog.at_level(logging.WARNING):
    builder, splits = build('cub200', tmp_path, cub_manual)
  assert labels_of(splits['train']) == [0] * 3 + [1] * 3 + [99] * 3  # corrupt image and ._ file skipped
  assert labels_of(splits['test']) == [100] * 3 + [199] * 3
  assert builder.skipped_files == ['CUB_200_2011/images/002.Bird_2/Bird_2_corrupt.jpg']
  assert 'skipped 1 corrupt image' in caplog.text
  record = splits['train'].record(0)
  np.testing.assert_array_equal(record['original_size'], [40, 48])
  assert Image.open(io.BytesIO(record['image'])).size == (38, 32)  # shorter side 32, int(32 * 48 / 40)
  assert record['file_name'].decode().startswith('CUB_200_2011/images/')
  assert builder.data_dir.endswith(os.path.join('metrix_cub200', 's32', '1.0.0'))
  # Readable through tfds' own data source (grain-compatible), with tfds decoding the JPEG via PIL.
  tfds_source = builder.as_data_source('test')
  assert len(tfds_source) == 6 and tfds_source[0]['image'].shape == (32, 38, 3)


def test_cub200_count_check_fails_and_leaves_nothing(cub_manual, tmp_path):
  with pytest.raises(ValueError, match='expected 5,864 train images, found 10'):
    data.prepare('cub200', str(tmp_path), str(cub_manual), config=SMALL, num_workers=0)
  assert leftovers(tmp_path) == []
  assert not os.path.exists(tmp_path / 'metrix_cub200' / 's32' / '1.0.0')


def test_missing_archive_names_the_file_and_the_instructions(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    data.prepare('cub200', str(tmp_path / 'data'), str(tmp_path / 'empty_manual'))
  assert 'CUB_200_2011.tgz' in str(error.value) and 'https://data.caltech.edu' in str(error.value)
  with pytest.raises(FileNotFoundError, match='cars_annos.mat'):
    data.prepare('cars196', str(tmp_path / 'data'), str(tmp_path / 'empty_manual'))
  assert leftovers(tmp_path) == [] and not os.path.exists(tmp_path / 'data' / 'metrix_cub200' / 's256' / '1.0.0')


@pytest.mark.parametrize('name', ['omniglot', 'cub200', 'cars196', 'sop', 'inshop'])
def test_missing_archives_name_the_manual_dir_flag(tmp_path, name):
  (tmp_path / 'empty').mkdir()
  for manual_dir, where in (
    (tmp_path / 'empty', f"(manual dir '{tmp_path / 'empty'}')"),
    (tmp_path / 'nope', f"(manual dir '{tmp_path / 'nope'}', which is not a folder)"),
  ):
    with pytest.raises(FileNotFoundError) as error:
      data.prepare(name, str(tmp_path / 'data'), str(manual_dir))
    first, rest = str(error.value).split('\n', 1)
    assert first == (
      f'{name}: the official archives are missing {where}; pass the folder that holds them with '
      '--config.dataset.manual_dir=DIR (training, evaluation) or --manual_dir=DIR '
      '(python -m metrix_jax.data.builders).'
    )
    assert data.download_instructions(name) in rest and 'http' in rest
  assert leftovers(tmp_path / 'data') == []


def test_the_registry_is_cheap_to_import():
  code = (
    'import sys; from metrix_jax import data; data.check_name("sop"); '
    'print(sorted({"tensorflow_datasets", "grain", "jax"} & set(sys.modules)))'
  )
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, check=True)
  assert proc.stdout.strip() == '[]'


def test_registry_is_the_one_list_of_data_sets(tmp_path):
  assert tuple(builders.BUILDERS) == data.DATASET_NAMES == tuple(data.DATASETS)
  assert tuple(config_lib.RECALL_KS) == data.DATASET_NAMES
  for name, spec in data.DATASETS.items():
    builder = builders.get_builder(name, str(tmp_path))
    assert builder.dataset_name == name
    assert bool(builder.required_files()) == spec.needs_manual_dir, name  # demo: generated, nothing to download
    assert spec.recall_ks[0] == 1 and spec.train_split not in spec.eval_splits
  assert data.DATASETS['inshop'].eval_splits == ('query', 'gallery')
  for check in (data.check_name, builders.builder_class, data.spec):
    with pytest.raises(
      ValueError, match="Unknown dataset 'cub'; valid choices: demo, glyphs, omniglot, cub200, cars196"
    ):
      check('cub')


def test_truncated_archive_is_reported(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  write_tar(manual / 'CUB_200_2011.tgz', {f'CUB_200_2011/images/001.A/{k}.jpg': jpeg(k) for k in range(30)})
  payload = (manual / 'CUB_200_2011.tgz').read_bytes()
  (manual / 'CUB_200_2011.tgz').write_bytes(payload[: len(payload) // 2])
  with pytest.raises(ValueError, match='truncated or corrupt'):
    build('cub200', tmp_path / 'data', manual)
  assert leftovers(tmp_path / 'data') == []


# ----------------------------------------------------------------------------------------------------------
# Cars196


def write_cars_annos(path, entries):
  from scipy import io as sio  # pylint: disable=g-import-not-at-top

  fields = ['relative_im_path', 'bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2', 'class', 'test']
  annotations = np.zeros((1, len(entries)), dtype=[(f, 'O') for f in fields])
  for i, (name, cls) in enumerate(entries):
    annotations[0, i] = (
      np.array([name]),
      np.array([[1]]),
      np.array([[2]]),
      np.array([[30]]),
      np.array([[20]]),
      np.array([[cls]], np.uint8),
      np.array([[i % 2]], np.uint8),
    )
  sio.savemat(path, {'annotations': annotations, 'class_names': np.array([['a', 'b']], dtype=object)})


def test_cars196_split_by_class_number_and_missing_image(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  entries = [(f'car_ims/{i + 1:06d}.jpg', cls) for i, cls in enumerate([1, 1, 98, 98, 99, 99, 196, 196])]
  write_cars_annos(manual / 'cars_annos.mat', entries + [('car_ims/000099.jpg', 2)])  # not in the archive
  write_tar(manual / 'car_ims.tgz', {name: jpeg(i) for i, (name, _) in enumerate(entries)})
  builder, splits = build('cars196', tmp_path / 'data', manual)
  assert labels_of(splits['train']) == [0, 0, 97, 97]
  assert labels_of(splits['test']) == [98, 98, 195, 195]
  with pytest.raises(ValueError, match='expected 16,185 annotated images, found 9'):
    data.prepare('cars196', str(tmp_path / 'data2'), str(manual), config=SMALL, num_workers=0)
  assert leftovers(tmp_path / 'data2') == []


# ----------------------------------------------------------------------------------------------------------
# Stanford Online Products


def test_sop_train_test_from_ebay_lists(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  files, rows = {}, {'train': [], 'test': []}
  image_id = 0
  for class_id, split, super_class in (
    (1, 'train', 'bicycle'),
    (2, 'train', 'bicycle'),
    (3, 'train', 'chair'),
    (4, 'test', 'chair'),
    (5, 'test', 'mug'),
  ):
    for k in range(2):
      image_id += 1
      path = f'{super_class}_final/{1000 + class_id}_{k}.JPG'
      files[f'Stanford_Online_Products/{path}'] = jpeg(image_id, mode='L' if class_id == 5 else 'RGB')
      rows[split].append(f'{image_id} {class_id} 1 {path}')
  for split in rows:
    files[f'Stanford_Online_Products/Ebay_{split}.txt'] = (
      'image_id class_id super_class_id path\n' + '\n'.join(rows[split]) + '\n'
    ).encode()
  write_zip(manual / 'Stanford_Online_Products.zip', files)
  builder, splits = build('sop', tmp_path / 'data', manual)
  assert labels_of(splits['train']) == [0, 0, 1, 1, 2, 2]
  assert labels_of(splits['test']) == [3, 3, 4, 4]
  grey = [splits['test'].record(i) for i in range(4) if splits['test'].labels[i] == 4][0]
  assert Image.open(io.BytesIO(grey['image'])).mode == 'RGB'  # grey stored as RGB
  info = data.get_dataset_info('sop', str(tmp_path / 'data'), str(manual), config=SMALL)
  assert info == data.DatasetInfo(3, 6, ('test',), False)


# ----------------------------------------------------------------------------------------------------------
# In-Shop


def test_inshop_query_gallery_share_one_label_map(tmp_path):
  manual = tmp_path / 'manual'
  (manual / 'Img').mkdir(parents=True)
  (manual / 'Eval').mkdir()
  rows, files = [], {}
  layout = [
    ('id_00000001', 'train', 2),
    ('id_00000003', 'train', 2),
    ('id_00000002', 'query', 1),
    ('id_00000002', 'gallery', 2),
    ('id_00000004', 'query', 1),
    ('id_00000004', 'gallery', 1),
  ]
  n = 0
  for item, status, count in layout:
    for _ in range(count):
      n += 1
      name = f'img/WOMEN/Dresses/{item}/{n:02d}_1_front.jpg'
      files[name] = jpeg(n)
      rows.append(f'{name} {item} {status}')
  write_zip(manual / 'Img' / 'img.zip', files)
  (manual / 'Eval' / 'list_eval_partition.txt').write_text(
    f'{len(rows)}\nimage_name item_id evaluation_status\n' + '\n'.join(rows) + '\n'
  )
  builder, splits = build('inshop', tmp_path / 'data', manual)
  assert set(splits) == {'train', 'query', 'gallery'}
  assert labels_of(splits['train']) == [0, 0, 1, 1]
  assert labels_of(splits['query']) == [2, 3]
  assert labels_of(splits['gallery']) == [2, 2, 3]
  info = data.get_dataset_info('inshop', str(tmp_path / 'data'), str(manual), config=SMALL)
  assert info == data.DatasetInfo(2, 4, ('query', 'gallery'), True)
  with pytest.raises(ValueError, match='expected 3,997 train items, found 2'):
    data.prepare('inshop', str(tmp_path / 'data2'), str(manual), config=SMALL, num_workers=0)
  assert leftovers(tmp_path / 'data2') == []


# ----------------------------------------------------------------------------------------------------------
# Omniglot


def omniglot_zip(path, stem, alphabets, characters=2, drawers=3):
  files = {}
  for alphabet in alphabets:
    for c in range(1, characters + 1):
      for d in range(1, drawers + 1):
        files[f'{stem}/{alphabet}/character{c:02d}/{c:02d}{d:02d}_{d:02d}.png'] = png(hash((alphabet, c, d)) % 1000)
  write_zip(path / f'{stem}.zip', files)


def test_omniglot_fake_zips_split_by_alphabet(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  omniglot_zip(manual, 'images_background_small1', ['Alpha', 'Beta', 'Gamma', 'Delta'])
  omniglot_zip(manual, 'images_background_small2', ['Alpha', 'Epsilon'])  # Alpha again: de-duplicated
  builder, splits = build('omniglot', tmp_path / 'data', manual, config=None)
  assert builder.builder_config.name == 'images_background_small1+images_background_small2'
  alphabets = {s: {splits[s].record(i)['alphabet'].decode() for i in range(len(splits[s]))} for s in splits}
  assert alphabets == {'train': {'Alpha', 'Delta', 'Gamma'}, 'test': {'Beta', 'Epsilon'}}  # sorted, alternating
  assert len(splits['train']) == 3 * 2 * 3 and labels_of(splits['train'])[-1] == 5
  assert labels_of(splits['test']) == sorted(list(range(6, 10)) * 3)
  record = splits['train'].record(0)
  assert Image.open(io.BytesIO(record['image'])).size == (105, 105)
  # With the evaluation zip, background alphabets train and evaluation alphabets test, in a new variant.
  omniglot_zip(manual, 'images_evaluation', ['Zeta'])
  builder2, splits2 = build('omniglot', tmp_path / 'data', manual, config=None)
  assert builder2.data_dir != builder.data_dir
  assert {splits2['test'].record(i)['alphabet'] for i in range(len(splits2['test']))} == {b'Zeta'}
  assert len(splits2['train']) == 5 * 2 * 3


def test_omniglot_without_any_zip(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    data.prepare('omniglot', str(tmp_path / 'data'), str(tmp_path))
  for stem in ('images_background', 'images_evaluation', 'images_background_small1', 'images_background_small2'):
    assert f'{stem}.zip' in str(error.value)  # every file named, with where to get it
  assert 'github.com/brendenlake/omniglot' in str(error.value)


def test_omniglot_corrupt_png_skipped_and_truncated_zip_named(tmp_path, caplog):
  manual = tmp_path / 'manual'
  manual.mkdir()
  files = {f'images_background/Alpha/character01/01{d:02d}_{d:02d}.png': png(d) for d in range(1, 4)}
  files['images_background/Beta/character01/0101_01.png'] = png(7)
  files['images_background/Beta/character01/0102_02.png'] = b'\x89PNG\r\n\x1a\n truncated'
  write_zip(manual / 'images_background.zip', files)
  with caplog.at_level(logging.WARNING):
    builder, splits = build('omniglot', tmp_path / 'data', manual, config=None)
  assert builder.skipped_files == ['Beta/character01/0102_02.png']
  assert 'skipped 1 corrupt image' in caplog.text
  assert len(splits['train']) == 3 and len(splits['test']) == 1  # never kept with a wrong label
  payload = (manual / 'images_background.zip').read_bytes()
  (manual / 'images_background.zip').write_bytes(payload[: len(payload) // 3])
  with pytest.raises(ValueError, match='images_background.zip: .*truncated or corrupt'):
    build('omniglot', tmp_path / 'data2', manual, config=None)
  assert leftovers(tmp_path / 'data2') == []


@pytest.mark.skipif(not os.path.isdir(OMNIGLOT_SMALL), reason='../shared/data/omniglot_small not present')
def test_omniglot_real_small_zips(tmp_path):
  builder, splits = build('omniglot', tmp_path, OMNIGLOT_SMALL, config=None, check_counts=True)
  train, test = splits['train'], splits['test']
  assert len(train) + len(test) == 4840  # union of the two zips, Greek and Latin once
  assert len(set(train.labels)) + len(set(test.labels)) == 242
  assert set(train.labels) == set(range(len(set(train.labels))))
  assert np.bincount(train.labels).max() == 20
  alphabet = lambda s, i: s.record(i)['alphabet']  # noqa: E731
  assert not {alphabet(train, i) for i in range(0, len(train), 50)} & {
    alphabet(test, i) for i in range(0, len(test), 50)
  }
  info = data.get_dataset_info('omniglot', str(tmp_path), OMNIGLOT_SMALL)
  assert info.num_train_examples == len(train) and not info.has_gallery
  batch = next(
    iter(
      data.create_eval_iterator(
        'omniglot', 'test', data_dir=str(tmp_path), manual_dir=OMNIGLOT_SMALL, global_batch_size=8, image_size=64
      )
    )
  )
  assert batch['image'].shape == (8, 64, 64, 3) and batch['mask'].all()


# ----------------------------------------------------------------------------------------------------------
# Pipelines over a JPEG data set.


def test_pipelines_read_a_jpeg_benchmark(cub_manual, tmp_path):
  build('cub200', tmp_path, cub_manual)
  kwargs = dict(data_dir=str(tmp_path), manual_dir=str(cub_manual), config=SMALL)
  it = data.create_train_iterator('cub200', global_batch_size=4, image_size=24, seed=0, **kwargs)
  batch = next(it)
  it.close()
  assert batch['image'].shape == (4, 24, 24, 3) and set(batch['label']) <= {0, 1, 99}
  batches = list(data.create_eval_iterator('cub200', 'test', global_batch_size=4, image_size=24, **kwargs))
  assert [b['mask'].sum() for b in batches] == [4, 2]


def test_build_command_line(tmp_path, capsys, monkeypatch):
  manual = tmp_path / 'manual'
  manual.mkdir()
  monkeypatch.setitem(builders._OMNIGLOT_ZIPS, 'images_background_small1', (4, 8))  # the fake's counts
  omniglot_zip(manual, 'images_background_small1', ['Alpha', 'Beta'], characters=2, drawers=2)
  status = builders.main(['omniglot', f'--manual_dir={manual}', f'--data_dir={tmp_path / "data"}', '--num_workers=0'])
  out = capsys.readouterr().out
  assert status == 0
  assert 'omniglot/train: 4 images, 2 classes' in out and 'omniglot/test: 4 images, 2 classes' in out
  assert builders.main(['cub200', f'--manual_dir={tmp_path / "nothing"}', f'--data_dir={tmp_path / "data"}']) == 2
  assert capsys.readouterr().err.startswith('error: cub200: the official archives are missing')


def _builders_command(*args):
  return subprocess.run(
    [sys.executable, '-m', 'metrix_jax.data.builders', *args], capture_output=True, text=True, timeout=300, check=False
  )


def test_build_command_line_user_mistakes_are_one_line_and_exit_2(tmp_path):
  proc = _builders_command('omniglot', f'--manual_dir={tmp_path / "nothing"}', f'--data_dir={tmp_path / "data"}')
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.splitlines()[0] == (
    f"error: omniglot: the official archives are missing (manual dir '{tmp_path / 'nothing'}', which is not a "
    'folder); pass the folder that holds them with --config.dataset.manual_dir=DIR (training, evaluation) or '
    '--manual_dir=DIR (python -m metrix_jax.data.builders).'
  )
  assert 'https://github.com/brendenlake/omniglot' in proc.stderr and proc.stdout == ''
  proc = _builders_command('cub', f'--data_dir={tmp_path / "data"}')
  assert proc.returncode == 2
  assert proc.stderr.splitlines() == [
    "error: argument name: invalid choice: 'cub' (choose from 'demo', 'glyphs', 'omniglot', "
    "'cub200', 'cars196', 'sop', 'inshop') (see: python -m "
    'metrix_jax.data.builders --help)'
  ]
  assert not os.path.exists(tmp_path / 'data')


def test_omniglot_config_has_no_development_default_and_names_the_flag(tmp_path):
  import importlib.util  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location('omniglot_config', os.path.join(ROOT, 'configs', 'omniglot.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert config.dataset.manual_dir is None
  config_lib.validate(config)  # None: the builder looks in <data_dir>/downloads/manual
  config.dataset.manual_dir = str(tmp_path / 'nope')
  with pytest.raises(ValueError) as error:
    config_lib.validate(config)
  message = str(error.value)
  assert (
    f"dataset.manual_dir='{tmp_path / 'nope'}' is not a folder; pass the folder that holds the official "
    'archives of omniglot with --config.dataset.manual_dir=DIR.'
  ) in message
  for expected in ('images_background.zip', 'images_evaluation.zip', 'https://github.com/brendenlake/omniglot'):
    assert expected in message


# ----------------------------------------------------------------------------------------------------------
# A build records its sources; prepare rebuilds when they change (Omniglot zips with the official counts of
# images_background_small1.zip, 136 characters x 20 drawers = 2,720 tiny PNGs: the real count check runs).


def tiny_png(seed):
  out = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).random((8, 8)) > 0.5).save(out, format='PNG')
  return out.getvalue()


def small1_zip(folder, prefix, seed=0):
  """images_background_small1.zip: alphabets `prefix`0..3, 34 characters x 20 drawers each (2,720 images)."""
  payloads = [tiny_png(seed), tiny_png(seed + 1)]
  files = {}
  for a in range(4):
    for c in range(1, 35):
      for d in range(1, 21):
        files[f'images_background_small1/{prefix}{a}/character{c:02d}/{c:02d}{d:02d}_{d:02d}.png'] = payloads[d % 2]
  write_zip(folder / 'images_background_small1.zip', files)
  return folder / 'images_background_small1.zip'


@pytest.fixture(scope='module')
def small1_zips(tmp_path_factory):
  """{'old': zip, 'new': zip of the same name and size, other alphabets, 'corrupt': not a zip}."""
  root = tmp_path_factory.mktemp('small1')
  zips = {}
  for version, prefix in (('old', 'Old'), ('new', 'New')):
    (root / version).mkdir()
    zips[version] = small1_zip(root / version, prefix, seed=len(zips))
  old_mtime = os.stat(zips['old']).st_mtime_ns
  os.utime(zips['new'], ns=(old_mtime + 10**9, old_mtime + 10**9))  # replaced a second later (any file system)
  (root / 'corrupt').mkdir()
  zips['corrupt'] = root / 'corrupt' / 'images_background_small1.zip'
  zips['corrupt'].write_bytes(b'PK\x03\x04 not a zip any more')
  return zips


def put(archive, manual):
  """Copies `archive` into the manual dir with its mtime (shutil.copy2), as `cp -p` does."""
  manual.mkdir(exist_ok=True)
  return shutil.copy2(archive, manual / archive.name)


def snapshot(folder):
  """{relative path: (size, mtime_ns, inode)} of every file under `folder`."""
  out = {}
  for d, _, files in os.walk(folder):
    for f in files:
      st = os.stat(os.path.join(d, f))
      out[os.path.relpath(os.path.join(d, f), folder)] = (st.st_size, st.st_mtime_ns, st.st_ino)
  return out


def alphabets(builder):
  source = builders.RecordSource(builder.data_dir, 'train')
  return sorted({source.record(i)['alphabet'].decode() for i in range(0, len(source), 20)})


def prepare_omniglot(data_dir, manual, **kwargs):
  return data.prepare('omniglot', str(data_dir), str(manual), num_workers=0, **kwargs)


def test_build_records_its_sources_and_an_unchanged_build_is_reused(small1_zips, tmp_path, caplog):
  manual = tmp_path / 'manual'
  archive = put(small1_zips['old'], manual)
  builder = prepare_omniglot(tmp_path / 'data', manual)
  assert builder.prepared == 'built'
  st = os.stat(archive)
  assert jsonio.read_json(os.path.join(builder.data_dir, base.SOURCES_FILE)) == {
    'format': 1,
    'dataset': 'omniglot',
    'version': '1.0.0',
    'config': {'name': 'images_background_small1', 'zips': ['images_background_small1']},
    'files': {'images_background_small1.zip': {'size': st.st_size, 'mtime_ns': st.st_mtime_ns}},
  }
  before = snapshot(tmp_path / 'data')
  caplog.clear()
  with caplog.at_level(logging.INFO, logger='metrix_jax'):
    again = prepare_omniglot(tmp_path / 'data', manual)
  assert again.prepared == 'reused' and again.data_dir == builder.data_dir
  assert snapshot(tmp_path / 'data') == before  # nothing rewritten: same files, sizes, mtimes, inodes
  assert caplog.records == []
  assert alphabets(again) == ['Old0', 'Old2']


def test_a_replaced_archive_is_rebuilt_on_prepare(small1_zips, tmp_path, caplog):
  manual = tmp_path / 'manual'
  put(small1_zips['old'], manual)
  old = prepare_omniglot(tmp_path / 'data', manual)
  old_labels = os.stat(os.path.join(old.data_dir, builders.LABELS_FILE))
  archive = put(small1_zips['new'], manual)  # same name and size, other content and mtime
  assert os.path.getsize(archive) == os.path.getsize(small1_zips['old'])
  caplog.clear()
  with caplog.at_level(logging.INFO, logger='metrix_jax'):
    new = prepare_omniglot(tmp_path / 'data', manual)
  assert new.prepared == 'rebuilt' and new.data_dir == old.data_dir
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(warnings) == 1
  assert warnings[0].startswith(f'omniglot: changed since the build in {old.data_dir}: images_background_small1.zip ')
  assert '(modified ' in warnings[0] and 'size' not in warnings[0]
  assert alphabets(new) == ['New0', 'New2']  # the records and labels come from the new archive
  assert os.stat(os.path.join(new.data_dir, builders.LABELS_FILE)).st_ino != old_labels.st_ino
  recorded = jsonio.read_json(os.path.join(new.data_dir, base.SOURCES_FILE))['files']
  assert recorded['images_background_small1.zip']['mtime_ns'] == os.stat(archive).st_mtime_ns
  assert sorted(os.listdir(tmp_path / 'data')) == ['downloads', 'metrix_omniglot']  # no staging folder left
  assert os.listdir(tmp_path / 'data' / 'metrix_omniglot' / 'images_background_small1') == ['1.0.0']
  assert prepare_omniglot(tmp_path / 'data', manual).prepared == 'reused'


def test_a_build_without_its_archives_is_used_as_it_is(small1_zips, tmp_path, caplog):
  manual = tmp_path / 'manual'
  put(small1_zips['old'], manual)
  built = prepare_omniglot(tmp_path / 'data', manual)
  # Only the built data, copied to another machine: no manual dir there (the default one does not exist).
  shutil.copytree(tmp_path / 'data', tmp_path / 'elsewhere')
  before = snapshot(tmp_path / 'elsewhere')
  caplog.clear()
  with caplog.at_level(logging.INFO, logger='metrix_jax'):
    copy = data.prepare('omniglot', str(tmp_path / 'elsewhere'), num_workers=0)
    data.prepare('omniglot', str(tmp_path / 'elsewhere'), num_workers=0)
  assert copy.prepared == 'reused' and copy.builder_config.name == built.builder_config.name
  assert snapshot(tmp_path / 'elsewhere') == before
  assert [(r.levelname, r.getMessage().split(';')[0]) for r in caplog.records] == [
    (
      'INFO',
      f'omniglot: the manual dir {tmp_path / "elsewhere" / "downloads" / "manual"} does not hold the archives '
      f'the build in {copy.data_dir} was made from',
    )
  ]  # once per process


def test_a_build_from_before_source_records_is_used_as_it_is(small1_zips, tmp_path, caplog):
  manual = tmp_path / 'manual'
  put(small1_zips['old'], manual)
  built = prepare_omniglot(tmp_path / 'data', manual)
  os.remove(os.path.join(built.data_dir, base.SOURCES_FILE))  # as builds made before this change
  put(small1_zips['new'], manual)
  caplog.clear()
  with caplog.at_level(logging.INFO, logger='metrix_jax'):
    legacy = prepare_omniglot(tmp_path / 'data', manual)
    prepare_omniglot(tmp_path / 'data', manual)
  assert legacy.prepared == 'reused' and alphabets(legacy) == ['Old0', 'Old2']
  assert [r.levelname for r in caplog.records] == ['INFO']
  assert (
    caplog.records[0]
    .getMessage()
    .endswith(
      f'To rebuild it from the archives: python -m metrix_jax.data.builders omniglot --rebuild '
      f'--manual_dir={manual} --data_dir={tmp_path / "data"}'
    )
  )
  rebuilt = prepare_omniglot(tmp_path / 'data', manual, rebuild=True)
  assert rebuilt.prepared == 'rebuilt' and alphabets(rebuilt) == ['New0', 'New2']
  assert os.path.exists(os.path.join(rebuilt.data_dir, base.SOURCES_FILE))


def test_an_extracted_folder_is_recorded_file_by_file(tmp_path):
  manual = tmp_path / 'manual'
  folder = manual / 'CUB_200_2011' / 'images'
  for cls in (1, 101):
    (folder / f'{cls:03d}.Bird').mkdir(parents=True)
    for k in range(2):
      (folder / f'{cls:03d}.Bird' / f'{k}.jpg').write_bytes(jpeg(cls + k))
  builder, splits = build('cub200', tmp_path / 'data', manual)
  assert labels_of(splits['train']) == [0, 0] and labels_of(splits['test']) == [100, 100]
  recorded = jsonio.read_json(os.path.join(builder.data_dir, base.SOURCES_FILE))['files']
  assert list(recorded) == ['CUB_200_2011'] and recorded['CUB_200_2011']['files'] == 4
  assert builders.source_changes(builder) == []
  (folder / '001.Bird' / '2.jpg').write_bytes(jpeg(7))
  assert builders.source_changes(builder) == [
    f'CUB_200_2011 (4 -> 5 files, size {recorded["CUB_200_2011"]["size"]:,} -> '
    f'{base.stat_source(str(manual / "CUB_200_2011"))["size"]:,} bytes, modified '
    + builders.source_changes(builder)[0].split('modified ')[1]
  ]
  write_tar(manual / 'CUB_200_2011.tgz', {})  # read before the folder from now on
  assert builders.source_changes(builder) == [
    'CUB_200_2011 is no longer the file read',
    'CUB_200_2011.tgz is new (not read by the build)',
  ]


def _fake_small1_command(*args):
  return _builders_command('omniglot', *args, '--num_workers=0')


def test_rebuild_command_line(small1_zips, tmp_path):
  manual = tmp_path / 'manual'
  put(small1_zips['old'], manual)
  paths = (f'--manual_dir={manual}', f'--data_dir={tmp_path / "data"}')
  proc = _fake_small1_command(*paths)
  assert proc.returncode == 0, proc.stderr
  dataset_dir = tmp_path / 'data' / 'metrix_omniglot' / 'images_background_small1' / '1.0.0'
  assert proc.stdout.splitlines() == [
    'omniglot/train: 1,360 images, 68 classes',
    'omniglot/test: 1,360 images, 68 classes',
    f'built: {dataset_dir}',
  ]
  before = snapshot(dataset_dir)
  proc = _fake_small1_command(*paths)
  assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == f'already built, up to date: {dataset_dir}'
  assert snapshot(dataset_dir) == before
  proc = _fake_small1_command(*paths, '--rebuild')
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines()[-1] == f'rebuilt: {dataset_dir}'
  assert f'omniglot: rebuilding {dataset_dir} (rebuild requested) ...' in proc.stderr.splitlines()[0]
  after = snapshot(dataset_dir)
  assert after.keys() == before.keys() and all(after[f][2] != before[f][2] for f in after)  # new files
  assert sorted(os.listdir(tmp_path / 'data')) == ['downloads', 'metrix_omniglot']


def test_a_failed_rebuild_keeps_the_old_build(small1_zips, tmp_path):
  manual = tmp_path / 'manual'
  put(small1_zips['old'], manual)
  paths = (f'--manual_dir={manual}', f'--data_dir={tmp_path / "data"}')
  assert _fake_small1_command(*paths).returncode == 0
  dataset_dir = tmp_path / 'data' / 'metrix_omniglot' / 'images_background_small1' / '1.0.0'
  before = snapshot(tmp_path / 'data')
  put(small1_zips['corrupt'], manual)  # a broken download of the same name
  for extra, why in (((), 'W'), (('--rebuild',), 'I')):
    proc = _fake_small1_command(*paths, *extra)
    first = proc.stderr.splitlines()[0]
    if why == 'W':  # found on its own: one warning names the file
      assert first.startswith('W ') and first.endswith(
        f'omniglot: changed since the build in {dataset_dir}: images_background_small1.zip (size '
        f'{os.path.getsize(small1_zips["old"]):,} -> {os.path.getsize(small1_zips["corrupt"])} bytes, modified '
        + first.split(', modified ')[1]
      )
    else:
      assert first.startswith('I ') and first.endswith(f'omniglot: rebuilding {dataset_dir} (rebuild requested) ...')
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if not line.startswith(('I ', 'W ', '  '))]
    assert errors == [
      f'error: omniglot: the rebuild failed; the previous build in {dataset_dir} is unchanged. Cannot read '
      f'{manual / "images_background_small1.zip"}: BadZipFile: File is not a zip file. The file is truncated or '
      'corrupt; download it again.'
    ]
    assert 'Traceback' not in proc.stderr and proc.stdout == ''
    assert snapshot(tmp_path / 'data') == before  # the old build untouched, no staging folder left
  # The old build is still complete and readable; with the archive it was made from back, it is used as it is.
  assert alphabets(tfds_builder_at(dataset_dir)) == ['Old0', 'Old2']
  put(small1_zips['old'], manual)
  assert prepare_omniglot(tmp_path / 'data', manual).prepared == 'reused'
  assert snapshot(tmp_path / 'data') == before


def tfds_builder_at(dataset_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds.builder_from_directory(str(dataset_dir))


# ----------------------------------------------------------------------------------------------------------
# Console: tfds' "Downloading and preparing dataset ..." prints only with --verbose_libraries.

TFDS_PRINTS = ('Downloading and preparing dataset', 'downloaded and prepared to', 'Subsequent calls will reuse')


def test_building_prints_no_tfds_lines_unless_verbose(small1_zips, tmp_path):
  manual = tmp_path / 'manual'
  put(small1_zips['old'], manual)
  proc = _fake_small1_command(f'--manual_dir={manual}', f'--data_dir={tmp_path / "quiet"}')
  assert proc.returncode == 0, proc.stderr
  for noise in TFDS_PRINTS + ('INFO:absl', 'absl]'):
    assert noise not in proc.stdout + proc.stderr, noise
  lines = proc.stderr.splitlines()  # our own progress lines only
  assert lines[0].endswith(
    f'metrix_jax.data.builders] Building omniglot into {tmp_path / "quiet"}/metrix_omniglot/'
    'images_background_small1/1.0.0 ...'
  )
  assert all(line.startswith('I ') and ' metrix_jax.data.builders] ' in line for line in lines), lines
  proc = _fake_small1_command(f'--manual_dir={manual}', f'--data_dir={tmp_path / "verbose"}', '--verbose_libraries')
  assert proc.returncode == 0, proc.stderr
  lines = proc.stderr.splitlines()
  for noise in TFDS_PRINTS:
    assert [line for line in lines if noise in line and line.startswith('I ') and 'tensorflow_datasets]' in line]
  assert any('absl] Generating dataset metrix_omniglot' in line for line in lines)
  assert len(lines) == len(set(lines))  # every line once (absl adds no second handler)
  assert TFDS_PRINTS[0] not in proc.stdout
