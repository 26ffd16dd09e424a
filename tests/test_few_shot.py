"""evaluation.sample_episodes / episode_accuracy / few_shot_accuracy against explicit float64 loops."""

import math

import numpy as np
import pytest

from metrix_jax import evaluation


def _episode_accuracy_loops(x, support, query):
  """Reference: per episode, per query, cosine to each class prototype (normalised mean of its supports)."""
  x = np.asarray(x, np.float64)
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  out = []
  for sup, qry in zip(support, query):
    protos = []
    for row in sup:
      p = x[row].mean(axis=0)
      protos.append(p / np.linalg.norm(p))
    correct = total = 0
    for n, rows in enumerate(qry):
      for i in rows:
        scores = [float(x[i] @ p) for p in protos]
        correct += all(scores[n] > s for m, s in enumerate(scores) if m != n)
        total += 1
    out.append(correct / total)
  return np.array(out)


def _data(num_classes=9, per_class=7, dim=6, noise=0.8, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_classes, dim))
  labels = np.repeat(np.arange(num_classes) * 3 + 100, per_class)  # arbitrary class ids
  x = centres[(labels - 100) // 3] + noise * rng.normal(size=(len(labels), dim))
  return x.astype(np.float32), labels


def test_episodes_are_valid_and_reproducible():
  x, labels = _data()
  labels = np.concatenate([labels, [999]])  # a class with one item is never eligible for 1 shot + 2 queries
  support, query = evaluation.sample_episodes(labels, ways=5, shots=1, queries=2, episodes=50, seed=3)
  assert support.shape == (50, 5, 1) and query.shape == (50, 5, 2)
  for sup, qry in zip(support, query):
    classes = [labels[row[0]] for row in sup]
    assert len(set(classes)) == 5 and 999 not in classes
    for c, s_rows, q_rows in zip(classes, sup, qry):
      assert all(labels[i] == c for i in (*s_rows, *q_rows))
      assert not set(s_rows) & set(q_rows) and len(set(q_rows)) == len(q_rows)
  again = evaluation.sample_episodes(labels, ways=5, shots=1, queries=2, episodes=50, seed=3)
  np.testing.assert_array_equal(again[0], support)
  np.testing.assert_array_equal(again[1], query)


@pytest.mark.parametrize('ways,shots,queries', [(5, 1, 3), (3, 5, 2), (9, 2, 4)])
def test_episode_accuracy_matches_loops(ways, shots, queries):
  x, labels = _data()
  support, query = evaluation.sample_episodes(labels, ways=ways, shots=shots, queries=queries, episodes=40, seed=1)
  got = evaluation.episode_accuracy(x, support, query)
  want = _episode_accuracy_loops(x, support, query)
  np.testing.assert_allclose(got, want, atol=1e-12)
  assert 0 < want.mean() < 1  # neither trivial nor hopeless: the test can fail


def test_few_shot_accuracy_summary_and_limits():
  x, labels = _data(noise=0.05)
  out = evaluation.few_shot_accuracy(x, labels, ways=5, shots=1, queries=2, episodes=200)
  support, query = evaluation.sample_episodes(labels, ways=5, shots=1, queries=2, episodes=200)
  acc = _episode_accuracy_loops(x, support, query)
  assert out['accuracy'] == pytest.approx(acc.mean(), abs=1e-12) and out['accuracy'] > 0.95
  assert out['ci95'] == pytest.approx(1.96 * acc.std(ddof=1) / math.sqrt(200), abs=1e-12)
  with pytest.raises(ValueError, match='need 5 classes with >= 8 items; only 0 of 9'):
    evaluation.few_shot_accuracy(x, labels, ways=5, shots=5, queries=3)
  with pytest.raises(ValueError, match='ways >= 2'):
    evaluation.few_shot_accuracy(x, labels, ways=1)


def test_report_few_shot_keeps_the_settings_the_split_can_fill():
  from metrix_jax import report  # pylint: disable=g-import-not-at-top

  x, labels = _data()  # 9 classes x 7 items: 5-way 1-shot fits (6 >= 1 + 5), 5-shot and 20-way do not
  got = report.few_shot(x, labels, episodes=30, seed=2)
  assert [(f['ways'], f['shots']) for f in got] == [(5, 1)]
  assert got[0] == evaluation.few_shot_accuracy(x, labels, ways=5, shots=1, queries=5, episodes=30, seed=2)
