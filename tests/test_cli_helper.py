"""metrix_jax.cli (what every entry point shares) and the small pieces the restructure gave one home:
evaluation.split_retrieval_metrics (which protocol), embedding.embed_dataset (masking, order, max_items),
rundir.select_step (checkpoint choice)."""

import logging
import subprocess
import sys

import numpy as np
import pytest

from metrix_jax import cli
from metrix_jax import embedding
from metrix_jax import evaluation
from metrix_jax import rundir
from metrix_jax import sharding


def test_run_user_command_turns_user_errors_into_one_line_and_exit_2(capsys):
  assert cli.run_user_command(lambda: None) == 0
  assert cli.run_user_command(lambda: 3) == 3

  def bad():
    raise cli.UserError('Workdir /x does not exist.\nTrain first.')

  assert cli.run_user_command(bad) == cli.EXIT_USER_ERROR == 2
  assert capsys.readouterr().err == 'error: Workdir /x does not exist.\n  Train first.\n'
  assert cli.run_user_command(lambda: (_ for _ in ()).throw(FileNotFoundError('no zips in DIR'))) == 2
  assert capsys.readouterr().err == 'error: no zips in DIR\n'

  def bug():
    raise RuntimeError('a bug of ours keeps its traceback')

  with pytest.raises(RuntimeError):
    cli.run_user_command(bug)


def test_error_line_unquotes_key_errors():
  assert cli.error_line(KeyError('no key x')) == 'error: no key x'
  assert cli.error_line(ValueError('')) == 'error: ValueError'


def test_configure_logging_levels():
  cli.configure_logging(process_index=0)
  assert logging.getLogger('metrix_jax').level == logging.INFO
  assert all(logging.getLogger(name).level == logging.WARNING for name in cli.LIBRARY_LOGGERS)
  cli.configure_logging(process_index=1, verbose_libraries=True)
  assert logging.getLogger('metrix_jax').level == logging.WARNING  # only process 0 logs progress
  assert logging.getLogger('absl').level == logging.INFO
  cli.configure_logging(process_index=0)


def test_reject_arguments():
  from absl import app  # pylint: disable=g-import-not-at-top

  cli.reject_arguments(['prog'])
  with pytest.raises(app.UsageError, match='Unexpected arguments: extra'):
    cli.reject_arguments(['prog', 'extra'])


def test_importing_cli_loads_no_jax():
  code = 'import sys, metrix_jax.cli; print("jax" in sys.modules)'
  assert subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout == 'False\n'


def _loo_recall_at_1(emb, labels):
  """float64 brute force: a hit iff the nearest other item (ties: a same-class one) shares the label."""
  sim = emb @ emb.T
  np.fill_diagonal(sim, -np.inf)
  hits = [np.any(labels[sim[i] == sim[i].max()] == labels[i]) for i in range(len(labels))]
  return float(np.mean(hits))


def test_split_retrieval_metrics_picks_the_protocol():
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(30, 4))
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  labels = rng.integers(0, 5, 30)
  loo = evaluation.split_retrieval_metrics({'test': (emb, labels), 'train': (emb[:3], labels[:3])}, (1,))
  assert loo['protocol'] == 'leave-one-out' and loo['num_test'] == 30
  assert loo['recall'][1] == pytest.approx(_loo_recall_at_1(emb, labels), abs=1e-6)
  qg = evaluation.split_retrieval_metrics({'query': (emb[:10], labels[:10]), 'gallery': (emb[10:], labels[10:])}, (1,))
  sim = emb[:10] @ emb[10:].T
  expected = np.mean([labels[10:][np.argmax(sim[i])] == labels[i] for i in range(10)])
  assert qg['protocol'] == 'query -> gallery' and (qg['num_query'], qg['num_gallery']) == (10, 20)
  assert qg['recall'][1] == pytest.approx(expected, abs=1e-6)
  with pytest.raises(ValueError, match="needs a 'test' split"):
    evaluation.split_retrieval_metrics({'train': (emb, labels)}, (1,))


def test_embed_dataset_keeps_valid_rows_in_order_and_stops_at_max_items():
  mesh = sharding.make_mesh()
  n = mesh.size * 4
  fake_embed = lambda variables, images: images[:, 0, 0, :2].astype(np.float32) * variables  # noqa: E731
  batches = []
  for start in range(0, 3 * n, n):
    image = np.zeros((n, 1, 1, 3), np.uint8)
    image[:, 0, 0, 0] = np.arange(start, start + n)
    mask = np.arange(start, start + n) < 2 * n + 3  # the last batch is padded after 3 rows
    batches.append({'image': image, 'label': np.arange(start, start + n) % 7, 'mask': mask})
  emb, labels = embedding.embed_dataset(fake_embed, 2.0, batches, mesh)
  np.testing.assert_array_equal(emb[:, 0], 2.0 * np.arange(2 * n + 3))
  np.testing.assert_array_equal(labels, np.arange(2 * n + 3) % 7)
  emb, labels = embedding.embed_dataset(fake_embed, 1.0, batches, mesh, max_items=n + 1)
  np.testing.assert_array_equal(emb[:, 0], np.arange(n + 1))
  with pytest.raises(ValueError, match='empty'):
    embedding.embed_dataset(fake_embed, 1.0, [], mesh)


def test_collect_images_fetches_valid_items_by_the_embedding_index():
  batches = []
  for start in (0, 4, 8):
    image = np.zeros((4, 2, 2, 3), np.uint8)
    image[:, 0, 0, 0] = np.arange(start, start + 4)
    batches.append({'image': image, 'label': np.zeros(4, np.int32), 'mask': np.arange(start, start + 4) != 5})
  # valid items in order: 0 1 2 3 4 6 7 8 9 10 11 -> embedding index 5 is the image numbered 6
  found = embedding.collect_images(batches, [[5, 0], [10, 5]])
  assert sorted(found) == [0, 5, 10]
  assert [int(found[i][0, 0, 0]) for i in (0, 5, 10)] == [0, 6, 11]
  with pytest.raises(ValueError, match=r'items \[11\] are not in the split \(11 items\)'):
    embedding.collect_images(batches, [11])


class _FakeCheckpoints:
  directory = '/run/checkpoints'

  def __init__(self, metrics):
    self._metrics = metrics

  def all_steps(self):
    return sorted(self._metrics)

  def latest_step(self):
    return max(self._metrics)

  def best_step(self):
    scored = {s: m['recall@1'] for s, m in self._metrics.items() if m}
    return max(scored, key=scored.get) if scored else None


def test_select_step():
  ckpt = _FakeCheckpoints({10: {'recall@1': 0.5}, 20: {'recall@1': 0.4}, 30: None})
  assert rundir.select_step(ckpt, 'best')[0] == 10
  assert rundir.select_step(ckpt, 'latest') == (30, 'latest')
  assert rundir.select_step(ckpt, '20') == (20, 'requested')
  with pytest.raises(cli.UserError, match=r'No checkpoint at step 15 .*kept steps: \[10, 20, 30\]'):
    rundir.select_step(ckpt, 15)
  with pytest.raises(cli.UserError, match="'best', 'latest' or a step number"):
    rundir.select_step(ckpt, 'newest')
  assert rundir.select_step(_FakeCheckpoints({5: None}), 'best') == (5, 'latest (no checkpoint has evaluation metrics)')
