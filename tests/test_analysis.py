"""metrix_jax.analysis: positivity of mixed embeddings (paper section 3.3) against a float64 loop reference of
the explicit gradient (checked by finite differences), the single-item limit (empirical == theoretical,
increasing in lambda), and the record format metrix_jax.plots expects."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metrix_jax import analysis, losses, mixup, plots
from reference import losses_ref
from reference import mixup_ref as ref

LAMBDAS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
MS = dict(alpha=2.0, beta=10.0, base=0.0)


def random_batch(b=24, dim=4, classes=5, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(b, dim)), rng.integers(0, classes, b)


def test_reference_gradient_matches_finite_differences():
  rng = np.random.default_rng(0)
  s, y = list(rng.uniform(-0.8, 0.8, 5)), [0.3, 0.3, 1.0, 0.0, 0.7]
  grads = ref.ms_mixed_gradients(s, y, **MS)
  for v in range(5):
    h = 1e-6
    up, down = list(s), list(s)
    up[v] += h
    down[v] -= h
    fd = (ref.ms_mixed_anchor_loss(up, y, **MS) - ref.ms_mixed_anchor_loss(down, y, **MS)) / (2 * h)
    assert abs(fd - grads[v]) < 1e-7


@pytest.mark.parametrize('epsilon', [None, 0.3])
def test_positivity_matches_float64_reference(epsilon, x64):
  """Sampled K = 4 pos_neg items per anchor (MS mined or not): empirical and theoretical fractions per lambda
  equal the explicit-gradient loop reference."""
  emb, labels = random_batch()
  loss = losses.get('multi_similarity', epsilon=epsilon, **MS)
  key = jax.random.key(1)
  out = analysis.positivity_curve(loss, emb, labels, key, lambdas=LAMBDAS, num_mixed=4)
  pos, neg = mixup.pair_masks(loss, jnp.asarray(emb), jnp.asarray(labels))  # the same plan as inside
  plan = mixup.make_plan(
    key, jnp.asarray(labels), pos_mask=pos, neg_mask=neg, pair_sets=('pos_neg',), num_mixed=4, lam=0.5
  )
  items = [
    [(int(x), int(x2)) for x, x2, l, an, ok in zip(*(np.asarray(a) for a in plan[:5])) if ok and an == a]
    for a in range(len(labels))
  ]
  if epsilon is not None:  # the plan's pairs are the miner's pairs
    mined = losses_ref.ms_mined_pairs(emb, labels, epsilon)
    assert all(x in mined[a][0] and x2 in mined[a][1] for a in range(len(labels)) for x, x2 in items[a])
  for i, lam in enumerate(LAMBDAS):
    lam32 = float(np.float32(lam))
    empirical, theoretical = ref.ms_positivity(emb, labels, items, lam32, **MS)
    assert out['empirical'][i] == pytest.approx(empirical, abs=1e-12), lam
    assert out['theoretical'][i] == pytest.approx(theoretical, abs=1e-12), lam
  assert out['empirical'][0] == 0.0 and out['empirical'][-1] == 1.0
  assert out['num_items'] == sum(len(i) for i in items)


def test_single_item_positivity_equals_theory_and_increases_with_lambda():
  """|V(a)| = 1: the mixed loss of an anchor is the isolated-item form, so the empirical fraction equals the
  theoretical one at every lambda, and it increases from 0 (lam = 0) to 1 (lam = 1)."""
  emb, labels = random_batch(b=60, seed=2)
  grid = np.linspace(0, 1, 21)
  out = analysis.positivity_curve(
    losses.get('multi_similarity', epsilon=None, **MS), emb, labels, jax.random.key(0), lambdas=grid, num_mixed=1
  )
  np.testing.assert_allclose(out['empirical'], out['theoretical'], atol=1.0 / out['num_items'] + 1e-9)
  assert out['empirical'][0] == 0.0 and out['empirical'][-1] == 1.0
  assert np.all(np.diff(out['empirical']) >= -2.0 / out['num_items'])  # monotone up to one flipped item
  assert out['empirical'][5] < out['empirical'][10] < out['empirical'][15]


def test_other_losses_all_pairs_and_plot_record(tmp_path):
  emb, labels = random_batch(b=12)
  out = analysis.positivity_curve(
    'contrastive', emb, labels, lambdas=LAMBDAS, num_mixed=None, pair_sets=('pos_neg', 'anc_neg')
  )
  assert out['theoretical'] is None and out['num_items'] > 0
  assert np.all((out['empirical'] >= 0) & (out['empirical'] <= 1))
  proxies = losses.init_proxies(jax.random.key(0), 5, 4)
  out_pa = analysis.positivity_curve('proxy_anchor', emb, labels, jax.random.key(1), lambdas=LAMBDAS, proxies=proxies)
  assert out_pa['empirical'][0] < out_pa['empirical'][-1]
  out_ms = analysis.positivity_curve('multi_similarity', emb, labels, jax.random.key(1), lambdas=LAMBDAS)
  record = plots.positivity_record(out_ms['lambdas'], out_ms['empirical'], out_ms['theoretical'])
  assert record['lambda'] == list(LAMBDAS) and len(record['theoretical']) == len(LAMBDAS)


def test_errors():
  emb, labels = random_batch(b=8)
  with pytest.raises(ValueError, match='PRNG key'):
    analysis.positivity_curve('multi_similarity', emb, labels)
  with pytest.raises(ValueError, match='lambdas'):
    analysis.positivity_curve('multi_similarity', emb, labels, jax.random.key(0), lambdas=(0.5, 1.5))
  with pytest.raises(ValueError, match='proxies'):
    analysis.positivity_curve('proxy_anchor', emb, labels, jax.random.key(0))


def test_threshold_limits():
  t = np.asarray(analysis.ms_positive_threshold(jnp.array([0.0, 0.5, 1.0]), alpha=2.0, beta=50.0, base=0.5))
  assert t[0] == -math.inf and t[1] == pytest.approx(0.5) and t[2] == math.inf
