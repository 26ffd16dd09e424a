"""metrix_jax.evaluation against float64 loop references, pytorch-metric-learning, and its own invariances."""

from __future__ import annotations

import json
import math
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metrix_jax import evaluation
from reference import evaluation_ref

KS = (1, 2, 4, 8, 1000)


def _data(seed, n, dim, num_classes):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, dim)).astype(np.float32), rng.integers(0, num_classes, n)


def _tied_data(seed, n, num_distinct, num_classes):
  """Rows drawn from `num_distinct` unit vectors with entries +-1/4 in 16-d: every dot product is exact."""
  rng = np.random.default_rng(seed)
  atoms = rng.choice([-0.25, 0.25], size=(num_distinct, 16)).astype(np.float32)
  return atoms[rng.integers(0, num_distinct, n)], rng.integers(0, num_classes, n)


def _single_device_mesh():
  return jax.make_mesh((1,), ('queries',), devices=jax.devices()[:1])


def _assert_retrieval_equal(got, want):
  """Recall from integer counts: exact. AP@R / R-Precision per query are float32 sums over R ranks (mean over
  queries in float64): a few float32 ulps, far below one query's rank moving (>= 1 / (n R) ~ 1e-4 here)."""
  assert got['recall'] == pytest.approx(want['recall'], abs=1e-12)
  for name in ('map_at_r', 'r_precision', 'precision_at_1'):
    assert got[name] == pytest.approx(want[name], abs=1e-5, nan_ok=True), name


# ---------------------------------------------------------------------------------------------------------
# Values against the float64 loop reference.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  'seed,n,dim,num_classes,chunk',
  [
    (0, 37, 8, 9, 5),  # chunk does not divide n; classes of one (lone queries) likely
    (1, 150, 16, 30, 64),
    (2, 203, 4, 50, 1000),  # chunk > n: one padded step
  ],
)
def test_leave_one_out_matches_reference(seed, n, dim, num_classes, chunk):
  x, y = _data(seed, n, dim, num_classes)
  got = evaluation.retrieval_metrics(x, y, KS, query_chunk_size=chunk)
  _assert_retrieval_equal(got, evaluation_ref.retrieval_metrics(x, y, KS))
  assert evaluation.recall_at_k(x, y, KS, query_chunk_size=chunk) == got['recall']


@pytest.mark.parametrize('seed,num_queries,num_gallery,chunk', [(3, 60, 90, 7), (4, 131, 40, 32)])
def test_query_gallery_matches_reference(seed, num_queries, num_gallery, chunk):
  q, qy = _data(seed, num_queries, 12, 25)
  g, gy = _data(seed + 100, num_gallery, 12, 20)  # query classes 20..24 are absent from the gallery
  kwargs = dict(gallery_embeddings=g, gallery_labels=gy)
  got = evaluation.retrieval_metrics(q, qy, KS, query_chunk_size=chunk, **kwargs)
  _assert_retrieval_equal(got, evaluation_ref.retrieval_metrics(q, qy, KS, g, gy))
  assert got['num_lone_queries'] == int(np.sum(~np.isin(qy, gy))) >= int(np.sum(qy >= 20))
  assert evaluation.recall_at_k(q, qy, KS, query_chunk_size=chunk, **kwargs) == got['recall']
  # float32 per-query values from differently chunked graphs (default chunk vs `chunk`)
  assert evaluation.mean_average_precision_at_r(q, qy, **kwargs) == pytest.approx(got['map_at_r'], rel=1e-5)
  assert evaluation.r_precision(q, qy, **kwargs) == pytest.approx(got['r_precision'], rel=1e-5)


@pytest.mark.parametrize('seed,n_test,n_train,chunk', [(5, 33, 70, 8), (6, 120, 45, 1024)])
def test_utilization_matches_reference(seed, n_test, n_train, chunk):
  test, _ = _data(seed, n_test, 10, 1)
  train, _ = _data(seed + 1, n_train, 10, 1)
  got = evaluation.utilization(test, train, query_chunk_size=chunk)
  # float32 squared distances |q|^2 + |g|^2 - 2 q.g of unit vectors (<= 4): a few ulps of 4 each
  assert got == pytest.approx(evaluation_ref.utilization(test, train), abs=1e-5)
  assert evaluation.utilization(train[:5], train) == pytest.approx(0.0, abs=1e-5)  # train vs itself


@pytest.mark.parametrize('seed,n,dim,num_classes,chunk', [(7, 41, 6, 5, 9), (8, 160, 32, 12, 64)])
def test_alignment_and_uniformity_match_reference(seed, n, dim, num_classes, chunk):
  x, y = _data(seed, n, dim, num_classes)
  assert evaluation.alignment(x, y, query_chunk_size=chunk) == pytest.approx(evaluation_ref.alignment(x, y), rel=1e-5)
  for t in (2.0, 0.5, 60.0):  # large t: the sum is dominated by few pairs (log-sum-exp keeps it exact)
    assert evaluation.uniformity(x, t=t, query_chunk_size=chunk) == pytest.approx(
      evaluation_ref.uniformity(x, t=t), rel=1e-5, abs=1e-5
    )
  both = evaluation.alignment_and_uniformity(x, y, t=0.5, query_chunk_size=chunk)  # one pass
  assert both == pytest.approx((evaluation_ref.alignment(x, y), evaluation_ref.uniformity(x, t=0.5)), rel=1e-5)
  assert evaluation.alignment_and_uniformity(x, np.arange(n))[0] is None  # no positive pair


# ---------------------------------------------------------------------------------------------------------
# Ties: positives first, independent of order, chunking and protocol.
# ---------------------------------------------------------------------------------------------------------
def test_tie_rule_small_example():
  # The query's only positive is an exact duplicate of two negatives: at K=1 the positive wins the tie.
  x = np.array([[1, 0], [0, 1], [0, 1], [0, 1], [1, 1]], np.float32)
  y = np.array([0, 1, 1, 0, 2])
  got = evaluation.retrieval_metrics(x[:1], y[:1], (1,), gallery_embeddings=x[1:], gallery_labels=y[1:])
  assert got['recall'] == {1: 0.0}  # the nearest item [1,1] is a negative; then a 3-way tie
  got = evaluation.retrieval_metrics(x[1:2], y[1:2], (1, 2), gallery_embeddings=x[2:], gallery_labels=y[2:])
  # query [0,1] class 1: positive [0,1] (class 1) ties with negative [0,1] (class 0) at similarity 1.
  assert got['recall'] == {1: 1.0, 2: 1.0}
  assert got['map_at_r'] == 1.0 and got['r_precision'] == 1.0


@pytest.mark.parametrize('leave_one_out', [True, False])
def test_ties_match_reference_and_ignore_order(leave_one_out):
  x, y = _tied_data(9, 90, 12, 6)
  perm = np.random.default_rng(0).permutation(len(x))
  if leave_one_out:
    got = evaluation.retrieval_metrics(x, y, KS, query_chunk_size=16)
    want = evaluation_ref.retrieval_metrics(x, y, KS)
    permuted = evaluation.retrieval_metrics(x[perm], y[perm], KS, query_chunk_size=16)
  else:
    kwargs = dict(gallery_embeddings=x[30:], gallery_labels=y[30:])
    got = evaluation.retrieval_metrics(x[:30], y[:30], KS, query_chunk_size=16, **kwargs)
    want = evaluation_ref.retrieval_metrics(x[:30], y[:30], KS, x[30:], y[30:])
    g_perm = np.random.default_rng(1).permutation(60)
    permuted = evaluation.retrieval_metrics(
      x[:30], y[:30], KS, query_chunk_size=16, gallery_embeddings=x[30:][g_perm], gallery_labels=y[30:][g_perm]
    )
  _assert_retrieval_equal(got, want)
  _assert_retrieval_equal(permuted, got)


# ---------------------------------------------------------------------------------------------------------
# Against pytorch-metric-learning's AccuracyCalculator.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('leave_one_out', [True, False])
def test_matches_pytorch_metric_learning(leave_one_out):
  pytest.importorskip('torch')
  pytest.importorskip('pytorch_metric_learning')
  from pytorch_metric_learning.distances import CosineSimilarity
  from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
  from pytorch_metric_learning.utils.inference import CustomKNN

  calculator = AccuracyCalculator(
    include=('precision_at_1', 'mean_average_precision_at_r', 'r_precision'),
    k='max_bin_count',
    knn_func=CustomKNN(CosineSimilarity()),
    device=__import__('torch').device('cpu'),
  )
  x, y = _data(10, 240, 16, 40)
  y[:3] = [100, 101, 102]  # lone classes: PML leaves them out of these metrics, so do we
  if leave_one_out:
    want = calculator.get_accuracy(x, y)
    got = evaluation.retrieval_metrics(x, y, (1,), query_chunk_size=50)
  else:
    want = calculator.get_accuracy(x[:80], y[:80], x[80:], y[80:], ref_includes_query=False)
    got = evaluation.retrieval_metrics(
      x[:80], y[:80], (1,), query_chunk_size=50, gallery_embeddings=x[80:], gallery_labels=y[80:]
    )
  # two float32 implementations of per-query AP@R / R-Precision (counts for precision_at_1)
  assert got['precision_at_1'] == pytest.approx(want['precision_at_1'], abs=1e-6)
  assert got['map_at_r'] == pytest.approx(want['mean_average_precision_at_r'], abs=1e-5)
  assert got['r_precision'] == pytest.approx(want['r_precision'], abs=1e-5)
  # R@1 counts lone queries as misses; precision_at_1 leaves them out.
  lone = got['num_lone_queries']
  assert lone >= 3
  num_queries = got['num_queries']
  assert got['recall'][1] == pytest.approx(want['precision_at_1'] * (num_queries - lone) / num_queries, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Invariances: chunk size, device count.
# ---------------------------------------------------------------------------------------------------------
def test_invariant_to_chunk_size():
  x, y = _data(11, 101, 8, 20)
  results = [evaluation.retrieval_metrics(x, y, KS, query_chunk_size=c) for c in (1, 7, 50, 4096)]
  for other in results[1:]:
    _assert_retrieval_equal(other, results[0])
  # Float metrics agree to float32 rounding (the matmul's blocking may depend on the chunk's shape).
  assert evaluation.utilization(x[:40], x[40:], query_chunk_size=3) == pytest.approx(
    evaluation.utilization(x[:40], x[40:], query_chunk_size=40), abs=1e-5
  )


_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    from metrix_jax import evaluation
    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(12)
    x = rng.normal(size=(157, 8)).astype(np.float32); y = rng.integers(0, 30, 157)
    out = evaluation.retrieval_metrics(x, y, (1, 2, 4, 8), query_chunk_size=16)
    out["gallery"] = evaluation.retrieval_metrics(x[:50], y[:50], (1, 2, 4, 8), query_chunk_size=16,
                                                  gallery_embeddings=x[50:], gallery_labels=y[50:])
    out["utilization"] = evaluation.utilization(x[:50], x[50:], query_chunk_size=16)
    out["alignment"] = evaluation.alignment(x, y, query_chunk_size=16)
    out["uniformity"] = evaluation.uniformity(x, query_chunk_size=16)
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow  # a second interpreter with 4 fake devices
def test_invariant_to_device_count(fake_devices_runner):
  proc = fake_devices_runner(_DEVICE_SCRIPT, num_devices=4, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  four = json.loads(proc.stdout.split('RESULT', 1)[1])
  rng = np.random.default_rng(12)
  x = rng.normal(size=(157, 8)).astype(np.float32)
  y = rng.integers(0, 30, 157)
  mesh = _single_device_mesh()
  one = evaluation.retrieval_metrics(x, y, (1, 2, 4, 8), query_chunk_size=16, mesh=mesh)
  one_gallery = evaluation.retrieval_metrics(
    x[:50], y[:50], (1, 2, 4, 8), query_chunk_size=16, mesh=mesh, gallery_embeddings=x[50:], gallery_labels=y[50:]
  )
  # Recall: integer counts, exact. The rest: float32 per-row values from a sharded and a 1-device graph
  # (summation order may differ: a few ulps, relative), averaged in float64 on the host.
  for got, want in ((four, one), (four['gallery'], one_gallery)):
    assert {int(k): v for k, v in got['recall'].items()} == want['recall']
    for name in ('map_at_r', 'r_precision', 'precision_at_1'):
      assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-7)
  assert four['utilization'] == pytest.approx(
    evaluation.utilization(x[:50], x[50:], query_chunk_size=16, mesh=mesh), rel=1e-5, abs=1e-7
  )
  assert four['alignment'] == pytest.approx(
    evaluation.alignment(x, y, query_chunk_size=16, mesh=mesh), rel=1e-5, abs=1e-7
  )
  assert four['uniformity'] == pytest.approx(
    evaluation.uniformity(x, query_chunk_size=16, mesh=mesh), rel=1e-5, abs=1e-7
  )


# ---------------------------------------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------------------------------------
def test_label_values_and_input_types_do_not_matter():
  x, y = _data(13, 64, 8, 10)
  want = evaluation.retrieval_metrics(x, y, (1, 4))
  names = np.array([f'class-{v}' for v in y])
  _assert_retrieval_equal(evaluation.retrieval_metrics(x, names, (1, 4)), want)
  _assert_retrieval_equal(evaluation.retrieval_metrics(jnp.asarray(x), jnp.asarray(y) * 10**6, (1, 4)), want)
  scaled = evaluation.retrieval_metrics(x * 3.5, y, (1, 4))  # cosine: scale-free
  _assert_retrieval_equal(scaled, want)
  exact = np.round(x * 4).astype(np.float32) / 4  # exactly representable in bfloat16
  assert evaluation.recall_at_k(jnp.asarray(exact, jnp.bfloat16), y, (1, 4)) == evaluation.recall_at_k(exact, y, (1, 4))


def test_lone_queries_are_recall_misses():
  x = np.eye(4, dtype=np.float32)
  y = np.array([0, 1, 2, 3])  # every class has one member
  got = evaluation.retrieval_metrics(x, y, (1, 3))
  assert got['recall'] == {1: 0.0, 3: 0.0}
  assert np.isnan(got['map_at_r']) and got['num_lone_queries'] == 4


@pytest.mark.parametrize(
  'call,message',
  [
    (lambda x, y: evaluation.recall_at_k(x, y[:-1], (1,)), 'one label per row'),
    (lambda x, y: evaluation.recall_at_k(x[0], y, (1,)), '2-D'),
    (lambda x, y: evaluation.recall_at_k(x, y, (0,)), 'positive ints'),
    (lambda x, y: evaluation.recall_at_k(x, y, (1,), gallery_embeddings=x), 'both'),
    (lambda x, y: evaluation.recall_at_k(x, y, (1,), gallery_embeddings=x[:, :3], gallery_labels=y), 'dim'),
    (lambda x, y: evaluation.recall_at_k(np.where(x > 1, np.nan, x), y, (1,)), 'NaN'),
    (lambda x, y: evaluation.recall_at_k(x, y, (1,), query_chunk_size=0), 'query_chunk_size'),
    (lambda x, y: evaluation.utilization(x, x[:, :2]), 'dim'),
    (lambda x, y: evaluation.alignment(x, np.arange(len(x))), 'positive pair'),
    (lambda x, y: evaluation.uniformity(x, t=0.0), 't > 0'),
  ],
)
def test_bad_inputs_raise(call, message):
  x, y = _data(14, 20, 4, 3)
  with pytest.raises(ValueError, match=message):
    call(x, y)


# ----------------------------------------------------------------------------------------------------------
# Retrieval examples.
# ----------------------------------------------------------------------------------------------------------
def _brute_force_neighbours(queries, gallery, k, exclude):
  out = []
  for qi, q in enumerate(queries):
    scores = []
    for gi, g in enumerate(gallery):
      if exclude is not None and exclude[qi] == gi:
        continue
      cos = sum(a * b for a, b in zip(q, g)) / (math.sqrt(sum(a * a for a in q)) * math.sqrt(sum(b * b for b in g)))
      scores.append((-cos, gi))  # ties: the lower index first
    out.append([gi for _, gi in sorted(scores)[:k]])
  return out


def test_nearest_neighbours_equal_a_brute_force_loop_with_ties_and_exclusion():
  rng = np.random.default_rng(0)
  gallery = rng.normal(size=(12, 4))
  gallery[7] = 2.0 * gallery[3]  # the same direction: a tie, the lower index wins
  queries = np.concatenate([gallery[[3, 0]], rng.normal(size=(2, 4))])
  for exclude in (None, np.array([3, 0, -1, -1])):
    got = evaluation.nearest_neighbours(queries, gallery, 5, exclude=exclude)
    assert got.tolist() == _brute_force_neighbours(queries.tolist(), gallery.tolist(), 5, exclude)
  assert evaluation.nearest_neighbours(queries, gallery, 2)[0].tolist() == [3, 7]
  assert evaluation.nearest_neighbours(queries, gallery, 2, exclude=[3, 0, -1, -1])[0].tolist()[0] == 7
  with pytest.raises(ValueError, match='k must be in'):
    evaluation.nearest_neighbours(queries, gallery, 12, exclude=[3, 0, -1, -1])
  with pytest.raises(ValueError, match='dimension'):
    evaluation.nearest_neighbours(queries[:, :3], gallery, 2)


def test_retrieval_examples_leave_one_out_and_query_gallery():
  rng = np.random.default_rng(1)
  emb, labels = rng.normal(size=(20, 6)), np.repeat(np.arange(5), 4)
  ex = evaluation.retrieval_examples({'test': (emb, labels), 'train': (emb, labels)}, num_queries=6, k=3, seed=4)
  assert ex['query_split'] == ex['gallery_split'] == 'test'
  assert ex['queries'] == sorted(ex['queries']) and len(set(ex['queries'])) == 6
  assert ex == evaluation.retrieval_examples({'test': (emb, labels)}, num_queries=6, k=3, seed=4)  # fixed sample
  want = _brute_force_neighbours(emb[ex['queries']].tolist(), emb.tolist(), 3, ex['queries'])
  assert ex['neighbours'] == want and all(q not in row for q, row in zip(ex['queries'], ex['neighbours']))
  assert ex['correct'] == [[bool(labels[i] == labels[q]) for i in row] for q, row in zip(ex['queries'], want)]
  assert ex['neighbour_labels'] == [[int(labels[i]) for i in row] for row in want]
  gallery, gallery_labels = rng.normal(size=(9, 6)), np.arange(9) % 3
  ex = evaluation.retrieval_examples(
    {'query': (emb[:5], labels[:5]), 'gallery': (gallery, gallery_labels)}, num_queries=10, k=9
  )
  assert ex['queries'] == [0, 1, 2, 3, 4] and ex['gallery_split'] == 'gallery'  # at most the split's size
  assert ex['neighbours'] == _brute_force_neighbours(emb[:5].tolist(), gallery.tolist(), 9, None)
  with pytest.raises(ValueError, match="'test' split or 'query' \\+ 'gallery'"):
    evaluation.retrieval_examples({'train': (emb, labels)})
