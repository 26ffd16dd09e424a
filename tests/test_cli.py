"""`python -m metrix_jax.evaluate` and `python -m metrix_jax.embed` end to end on a tiny trained run.

A 1-step run of the trainer's tiny stand-ins (tests/trainer_fakes.py: a 2-conv EmbeddingNet-shaped model and
class-pattern images) is trained once into a temporary workdir; the commands run in subprocesses with the tiny model
and fake eval data patched in (`_cli`), and their outputs are checked against embedding the same images directly
with the restored variables and `metrix_jax.evaluation` / numpy.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trainer_fakes  # pylint: disable=g-import-not-at-top,wrong-import-position

from metrix_jax import report as report_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from metrix_jax import cli, embed, evaluation, rundir  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, 'tests')
IMAGE_SIZE = 32  # tiny_config: image_size = eval_resize = 32, so the eval transform of a 32 x 32 image is identity


def _batches(labels, seed, batch_size=8):
  """Eval batches {'image', 'label', 'mask'} of class-pattern images, the last one padded."""
  labels = np.asarray(labels, np.int32)
  images = trainer_fakes.class_images(labels, IMAGE_SIZE, np.random.default_rng(seed))
  out = []
  for start in range(0, len(labels), batch_size):
    img, lab = images[start : start + batch_size], labels[start : start + batch_size]
    pad = batch_size - len(lab)
    out.append(
      {
        'image': np.concatenate([img, np.zeros((pad,) + img.shape[1:], np.uint8)]),
        'label': np.concatenate([lab, np.zeros(pad, np.int32)]),
        'mask': np.arange(batch_size) < len(lab),
      }
    )
  return out, images


TEST_LABELS = np.repeat(np.arange(100, 106), 3)  # 18 test images, 6 classes
TRAIN_LABELS = np.repeat(np.arange(0, 5), 2)  # 10 train images


def fake_eval_data(config, include_train):
  """Stand-in for `input_pipeline.build_eval_data`: fixed test (and train) splits."""
  del config
  sets = {'test': _batches(TEST_LABELS, 7)[0]}
  if include_train:
    sets['train'] = _batches(TRAIN_LABELS, 8)[0]
  return sets


def _cli(module, *args):
  """Runs `python -m metrix_jax.<module> ARGS` with the tiny model and fake eval data patched in."""
  script = (
    f'import sys; sys.path.insert(0, {TESTS!r})\n'
    'import trainer_fakes, test_cli\n'
    'from metrix_jax import embedding, input_pipeline\n'
    'embedding.create_model = trainer_fakes.tiny_model_factory\n'
    'input_pipeline.build_eval_data = test_cli.fake_eval_data\n'
    f'from metrix_jax import {module}\n'
    f'sys.argv = ["{module}"] + sys.argv[1:]\n'
    f'sys.exit({module}.main())\n'
  )
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''), JAX_PLATFORMS='cpu')
  return subprocess.run(
    [sys.executable, '-c', script, *args], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT
  )


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  from metrix_jax import train  # pylint: disable=g-import-not-at-top

  path = str(tmp_path_factory.mktemp('run'))
  config = trainer_fakes.tiny_config(steps=1)
  train.train_and_evaluate(
    config, path, data_factory=trainer_fakes.fake_data_factory(), model_factory=trainer_fakes.tiny_model_factory
  )
  return path


@pytest.fixture(scope='module')
def trained(workdir):
  return rundir.load_trained_model(workdir, model_factory=trainer_fakes.tiny_model_factory)


def _embed_directly(trained, images):
  """Reference: model.apply on ImageNet-normalised images [n, S, S, 3] uint8 -> float64 [n, D]."""
  mean = np.array([0.485, 0.456, 0.406], np.float32)
  std = np.array([0.229, 0.224, 0.225], np.float32)
  x = (images.astype(np.float32) / 255.0 - mean) / std
  embeddings, _ = trained.model.apply(trained.variables, x, train=False)
  return np.asarray(embeddings, np.float64)


# ---------------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------------
def test_load_config_and_best_checkpoint(workdir, trained):
  assert trained.step == 1 and 'best R@1' in trained.selection
  assert trained.config.dataset.recall_ks == (1, 2)  # JSON lists back into tuples
  assert trained.config.model.embedding_dim == 16
  assert set(trained.variables['params']) == {'backbone', 'head'}


def test_loading_leaves_a_save_in_progress_alone(workdir):
  # A training run may be writing a checkpoint into the same directory while we evaluate: its temporary folder
  # must survive (a read-write Orbax manager would delete it at start).
  in_progress = os.path.join(workdir, 'checkpoints', '9.orbax-checkpoint-tmp-1234')
  os.makedirs(in_progress)
  try:
    assert rundir.load_trained_model(workdir, model_factory=trainer_fakes.tiny_model_factory).step == 1
    assert os.path.isdir(in_progress)
  finally:
    os.rmdir(in_progress)


def test_evaluate_command(workdir, trained):
  out_dir = os.path.join(workdir, 'report')
  proc = _cli(
    'evaluate',
    f'--workdir={workdir}',
    f'--out_dir={out_dir}',
    '--config.dataset.recall_ks=(1,2,4)',
    '--retrieval_grid=4',
    '--retrieval_grid_k=3',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Recall@4 (%)' in proc.stdout and 'MAP@R' in proc.stdout and 'uniformity' in proc.stdout
  with open(os.path.join(out_dir, 'eval.json')) as f:
    report = json.load(f)
  for name in ('eval_recall.png', 'eval_positivity.png', 'eval_retrieval.png'):
    with open(os.path.join(out_dir, name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  pos = report['positivity']  # contrastive loss: no theoretical curve
  assert len(pos['lambda']) == len(pos['empirical']) == len(report_lib.DEFAULT_LAMBDAS) and pos['theoretical'] is None
  assert all(v is None or 0 <= v <= 1 for v in pos['empirical']) and pos['num_items'] > 0
  assert report['step'] == 1 and report['protocol'] == 'leave-one-out'
  assert report['num_test'] == len(TEST_LABELS) and report['num_train'] == len(TRAIN_LABELS)

  # Values: the same images embedded directly, metrics from the library and from numpy.
  test = _embed_directly(trained, _batches(TEST_LABELS, 7)[1])
  train_emb = _embed_directly(trained, _batches(TRAIN_LABELS, 8)[1])
  want = evaluation.retrieval_metrics(test, TEST_LABELS, (1, 2, 4))
  assert {int(k): v for k, v in report['recall'].items()} == pytest.approx(want['recall'], abs=1e-9)
  assert report['map_at_r'] == pytest.approx(want['map_at_r'], abs=1e-5)
  assert report['r_precision'] == pytest.approx(want['r_precision'], abs=1e-5)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
  t, r = unit(test), unit(train_emb)
  d_train = ((t[:, None, :] - r[None, :, :]) ** 2).sum(-1)
  assert report['utilization'] == pytest.approx(d_train.min(1).mean(), abs=1e-5)
  d = ((t[:, None, :] - t[None, :, :]) ** 2).sum(-1)
  other = ~np.eye(len(t), dtype=bool)
  same = (TEST_LABELS[:, None] == TEST_LABELS[None, :]) & other
  assert report['alignment'] == pytest.approx(d[same].mean(), abs=1e-5)
  assert report['uniformity'] == pytest.approx(np.log(np.exp(-2 * d[other]).mean()), abs=1e-5)
  # The retrieval grid (--retrieval_grid=4 --retrieval_grid_k=3): brute force, float64 cosine, self excluded.
  examples = report['retrieval_examples']
  assert report['files']['retrieval_grid'] == 'eval_retrieval.png'
  assert len(examples['queries']) == 4 and examples['query_split'] == examples['gallery_split'] == 'test'
  for q, row, row_correct in zip(examples['queries'], examples['neighbours'], examples['correct']):
    cosine = lambda i: float(t[q] @ t[i]) / float(np.linalg.norm(t[q]) * np.linalg.norm(t[i]))  # noqa: B023,E731
    assert row == sorted((i for i in range(len(t)) if i != q), key=lambda i: -cosine(i))[:3]
    assert row_correct == [bool(TEST_LABELS[i] == TEST_LABELS[q]) for i in row]


def test_evaluate_errors_name_the_fix(tmp_path, workdir):
  with pytest.raises(cli.UserError, match='does not exist.*metrix_jax.main'):
    rundir.load_trained_model(str(tmp_path / 'missing'))
  with pytest.raises(cli.UserError, match='config.json is missing'):
    rundir.load_trained_model(str(tmp_path))
  (tmp_path / 'config.json').write_text(open(os.path.join(workdir, 'config.json')).read())
  with pytest.raises(cli.UserError, match='No checkpoint.*Train first'):
    rundir.load_trained_model(str(tmp_path))
  with pytest.raises(cli.UserError, match='No checkpoint at step 7'):
    rundir.load_trained_model(workdir, checkpoint=7)
  for command, extra in (('evaluate', ()), ('embed', (f'--images={tmp_path}', f'--out={tmp_path / "e.npz"}'))):
    proc = _cli(command, f'--workdir={tmp_path / "missing"}', *extra)
    assert proc.returncode == 2 and 'does not exist' in proc.stderr and 'Traceback' not in proc.stderr, command


@pytest.mark.parametrize('gallery', [False, True])
def test_compute_metrics_both_protocols(gallery, tmp_path):
  config = trainer_fakes.tiny_config()
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(40, 8)).astype(np.float32), rng.integers(0, 6, 40)
  train_x = rng.normal(size=(15, 8)).astype(np.float32)
  if gallery:
    embedded = {'query': (x[:15], y[:15]), 'gallery': (x[15:], y[15:]), 'train': (train_x, np.zeros(15))}
    want = evaluation.retrieval_metrics(x[:15], y[:15], (1, 2), gallery_embeddings=x[15:], gallery_labels=y[15:])
  else:
    embedded = {'test': (x, y), 'train': (train_x, np.zeros(15))}
    want = evaluation.retrieval_metrics(x, y, (1, 2))
  got = report_lib.compute_metrics(config, embedded, with_positivity=False)
  assert got['protocol'] == ('query -> gallery' if gallery else 'leave-one-out')
  assert got['recall'] == want['recall'] and got['map_at_r'] == want['map_at_r']
  assert got['utilization'] == pytest.approx(evaluation.utilization(x, train_x), rel=1e-5)  # all test items (+gallery)
  assert got['alignment'] == pytest.approx(evaluation.alignment(x, y), rel=1e-5)
  assert got['uniformity'] == pytest.approx(evaluation.uniformity(x), rel=1e-5)
  assert 'Recall@2 (%)' in report_lib.format_table(got)
  (tmp_path / 'eval_positivity.png').write_bytes(b'stale, from an earlier evaluation')
  paths = report_lib.write_outputs(got, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ['eval.json', 'eval_recall.png'] and set(paths) == {'json', 'recall_plot'}
  with open(paths['json']) as f:
    assert json.load(f)['recall'] == {str(k): v for k, v in want['recall'].items()}


# ---------------------------------------------------------------------------------------------------------
# embed
# ---------------------------------------------------------------------------------------------------------
def test_embed_command(tmp_path, workdir, trained):
  folder = tmp_path / 'images'
  images = trainer_fakes.class_images(np.array([0, 1, 2, 3, 4, 5, 6]), IMAGE_SIZE, np.random.default_rng(3))
  names = ['a.png', 'sub/b.PNG', 'sub/deeper/c.png', 'd.png', 'sub/e.png', 'f.png', 'g.png']
  for name, image in zip(names, images):
    (folder / os.path.dirname(name)).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / name)
  big = trainer_fakes.class_images(np.array([9]), 48, np.random.default_rng(4))[0][:40]  # 40 x 48: resized
  Image.fromarray(big).save(folder / 'sub' / 'big.jpg', quality=95)
  (folder / 'broken.jpg').write_bytes(b'not an image')
  (folder / 'notes.txt').write_text('ignored: not an image extension')
  out = tmp_path / 'out' / 'emb.npz'

  proc = _cli('embed', f'--workdir={workdir}', f'--images={folder}', f'--out={out}', '--batch_size=3')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'skipped 1 unreadable file' in proc.stdout and 'broken.jpg' in proc.stdout
  with np.load(out) as npz:  # no pickle needed
    paths, embeddings, step = list(npz['paths']), npz['embeddings'], int(npz['step'])
  assert step == 1 and embeddings.dtype == np.float32
  assert paths == sorted(names + ['sub/big.jpg'])
  want = dict(zip(names, _embed_directly(trained, images)))
  from metrix_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  big_pixels = pipeline.eval_transform((folder / 'sub' / 'big.jpg').read_bytes(), IMAGE_SIZE, IMAGE_SIZE)
  want['sub/big.jpg'] = _embed_directly(trained, big_pixels[None])[0]
  np.testing.assert_allclose(embeddings, np.stack([want[p] for p in paths]), atol=1e-5)


def test_embed_errors(tmp_path, workdir):
  (tmp_path / 'empty' / 'sub').mkdir(parents=True)
  (tmp_path / 'empty' / 'sub' / 'readme.txt').write_text('no images here')
  with pytest.raises(ValueError, match='No image files under'):
    embed.run(workdir, str(tmp_path / 'empty'), str(tmp_path / 'x.npz'))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    embed.list_images(str(tmp_path / 'nowhere'))
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / 'x.png').write_bytes(b'garbage')
  with pytest.raises(ValueError, match='None of the 1 image files'):
    embed.run(workdir, str(tmp_path / 'bad'), str(tmp_path / 'x.npz'), model_factory=trainer_fakes.tiny_model_factory)
  with pytest.raises(ValueError, match='.npz'):
    embed.run(workdir, str(tmp_path / 'bad'), str(tmp_path / 'x.txt'))


def test_positivity_averages_batches_weighted_by_item_count(monkeypatch):
  from metrix_jax import analysis  # pylint: disable=g-import-not-at-top

  calls = []

  def fake_curve(loss, embeddings, labels, key, *, lambdas, pair_sets, proxies, mask_mode):
    del key, proxies
    calls.append((loss.name, embeddings.shape, np.unique(labels, return_counts=True)[1], pair_sets, mask_mode))
    i = len(calls)
    empirical = np.full(len(lambdas), 0.1 * i)
    empirical[0] = np.nan if i == 1 else empirical[0]  # an empty bin in the first batch only
    return {'lambdas': lambdas, 'empirical': empirical, 'theoretical': np.full(len(lambdas), 0.5), 'num_items': i}

  monkeypatch.setattr(analysis, 'positivity_curve', fake_curve)
  config = trainer_fakes.tiny_config('multi_similarity')
  config.dataset.classes_per_batch, config.dataset.images_per_class = 3, 4
  labels = np.repeat(np.arange(6), [4, 4, 4, 5, 2, 9])  # class 4 has too few items to be drawn
  x = np.random.default_rng(0).normal(size=(len(labels), 8)).astype(np.float32)
  got = report_lib.positivity(config, x, labels, lambdas=(0.2, 0.5, 0.8), num_batches=3)
  assert len(calls) == 3
  for name, shape, counts, pair_sets, mask_mode in calls:
    assert name == 'multi_similarity' and shape == (12, 8) and list(counts) == [4, 4, 4]
    assert pair_sets == ('pos_neg',) and mask_mode == 'own'
  # weights 1, 2, 3: (0.1 + 0.4 + 0.9) / 6 where all batches count; (0.4 + 0.9) / 5 where batch 1 is empty
  np.testing.assert_allclose(got['empirical'], [1.3 / 5, 1.4 / 6, 1.4 / 6])
  np.testing.assert_allclose(got['theoretical'], 0.5)
  assert got['num_items'] == 6 and got['batch_size'] == 12 and got['num_batches'] == 3


@pytest.mark.parametrize('loss', ['proxy_nca', 'proxy_anchor'])
def test_positivity_of_proxy_losses_runs_on_the_train_split(loss):
  """Proxy losses: the proxies anchor the training classes, so the report measures positivity on the train split;
  at lambda = 1 the mixed item is x itself and is pulled towards its class's proxy (positive: 1), at lambda = 0 it
  is x' of another class and is pushed away (0). Without a train split the report says why it skipped."""
  from metrix_jax import analysis, losses  # pylint: disable=g-import-not-at-top

  config = trainer_fakes.tiny_config(loss)
  rng = np.random.default_rng(0)
  proxies = rng.normal(size=(6, 16)).astype(np.float32)
  train_labels = np.repeat(np.arange(6), 4)
  train = (proxies[train_labels] + 0.3 * rng.normal(size=(24, 16))).astype(np.float32)
  import jax  # pylint: disable=g-import-not-at-top

  curve = analysis.positivity_curve(
    losses.get(loss), train, train_labels, jax.random.key(0), lambdas=(0.0, 1.0), num_mixed=4, proxies=proxies
  )
  assert curve['num_items'] > 0
  np.testing.assert_allclose(curve['empirical'], [0.0, 1.0])
  embedded = {'test': (train[:12], train_labels[:12] + 100), 'train': (train, train_labels)}
  got = report_lib.compute_metrics(config, embedded, proxies=proxies)
  assert got['positivity_split'] == 'train' and np.all(np.isfinite(got['positivity']['empirical']))
  got = report_lib.compute_metrics(config, {'test': embedded['test']}, proxies=proxies)
  assert got['positivity'] is None and 'train split' in got['positivity_note']
