"""metrix_jax.mixup: the Metrix mixed loss against brute-force float64 loops (every loss x every pair set),
sampling on device (items in M(a), uniform, degenerate anchors), limits (lam = 1 / 0, w = 0), closed form ==
materialised mixing, feature / input mixing == explicit one-by-one mixing, and jit + grad for every
(loss x level x pair set)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metrix_jax import losses, mixup
from reference import losses_ref
from reference import mixup_ref as ref

NUM_PROXIES = 6


def make_batch(kind='uneven', *, dim=5, seed=0):
  rng = np.random.default_rng(seed)
  if kind == 'uneven':  # uneven classes, a singleton (anchor without positive)
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 4])
  elif kind == 'balanced':  # 3 classes x 3: every anchor has 2 positives and 6 negatives
    labels = np.repeat(np.arange(3), 3)
  elif kind == 'one_class':
    labels = np.full(6, 1)
  elif kind == 'no_positives':
    labels = np.arange(6)
  else:
    raise ValueError(kind)
  labels = rng.permutation(labels)
  emb = rng.normal(size=(len(labels), dim))
  emb[1] = emb[0] + 0.1 * rng.normal(size=dim)  # a near-duplicate: hinge terms / miner thresholds active
  return emb, labels


def proxies_for(dim, seed=1):
  return np.random.default_rng(seed).normal(size=(NUM_PROXIES, dim))


# case -> (registry name, hyperparameters). Non-default values so that every term is active at B = 10.
CASES = {
  'contrastive': ('contrastive', dict(pos_margin=0.05, neg_margin=1.2)),
  'contrastive_paper': ('contrastive', dict(neg_margin=1.2, form='paper')),
  'multi_similarity': ('multi_similarity', dict(alpha=2.0, beta=10.0, base=0.3, epsilon=0.5)),
  'multi_similarity_nomine': ('multi_similarity', dict(alpha=2.0, beta=10.0, base=0.3, epsilon=None)),
  'proxy_anchor': ('proxy_anchor', dict(alpha=8.0, margin=0.1)),
  'proxy_anchor_paper': ('proxy_anchor', dict(alpha=8.0, margin=0.1, form='paper')),
  'circle': ('circle', dict(m=0.4, gamma=8.0)),
  'proxy_nca': ('proxy_nca', dict(softmax_scale=2.0)),
  'lifted_structure': ('lifted_structure', dict(pos_margin=0.1, neg_margin=1.2)),
}
PAIR_SET_CHOICES = [(p,) for p in mixup.PAIR_SETS] + [('pos_neg', 'anc_neg'), mixup.PAIR_SETS]


def _loss(case):
  name, hp = CASES[case]
  return losses.get(name, **hp)


def _ref_sets(case, emb, labels):
  """Per anchor (P(a), N(a)) sets as the reference sees them (MS: the miner's pairs; proxies: all pairs)."""
  name, hp = CASES[case]
  if name == 'multi_similarity':
    mined = losses_ref.ms_mined_pairs(emb, labels, hp['epsilon'])
    return ref.pair_sets_of(labels, [p for p, _ in mined], [n for _, n in mined])
  return ref.pair_sets_of(labels)


SAMPLED_CONFIGS = [
  (i, pair_sets, mask_mode) for i, pair_sets in enumerate(PAIR_SET_CHOICES) for mask_mode in ('own', 'all')
]


@jax.jit
def _sampled_plans(labels, pos, neg):
  """The plans of every (pair sets, mask mode) of SAMPLED_CONFIGS (key i per pair-set choice), one compilation
  instead of one per static configuration."""
  return [
    mixup.make_plan(
      jax.random.key(i),
      labels,
      pos_mask=pos,
      neg_mask=neg,
      pair_sets=pair_sets,
      num_mixed=3,
      lambda_mode='item',
      mask_mode=mask_mode,
    )
    for i, pair_sets, mask_mode in SAMPLED_CONFIGS
  ]


@functools.lru_cache(maxsize=None)
def _mixed_fn(case):
  """jit: (emb, labels, plan, proxies) -> (closed-form mixed loss, materialised mixed loss)."""
  loss = _loss(case)

  def fn(emb, labels, plan, proxies):
    proxies = proxies if loss.uses_proxies else None
    closed = mixup.mixed_loss(loss, emb, labels, plan, proxies=proxies)
    mixed = mixup.mix_embeddings(emb, plan)
    materialised = mixup.mixed_loss(loss, emb, labels, plan, mixed_embeddings=mixed, proxies=proxies)
    return closed, materialised

  return jax.jit(fn)


def _reference(case, emb, labels, plan, proxies, mask_mode='own'):
  name, hp = CASES[case]
  hp = {k: v for k, v in hp.items() if k not in ('form', 'epsilon')}
  form = CASES[case][1].get('form', 'pml')
  first, second, lam, anchor, valid = (np.asarray(a) for a in plan[:5])
  if name in losses.PROXY_LOSS_NAMES:
    items = [(int(x), int(x2), float(l)) for x, x2, l, ok in zip(first, second, lam, valid) if ok]
  elif int(anchor[0]) < 0:  # all-pairs plan: per-anchor membership from the plan's own mask
    mask = np.asarray(plan.mask)
    items = [
      [(int(first[m]), int(second[m]), float(lam[m])) for m in range(len(first)) if mask[a, m]]
      for a in range(len(labels))
    ]
  else:
    items = ref.items_from_plan(first, second, lam, anchor, valid, len(labels), mask_mode)
  return ref.mixed_loss(name, emb, labels, items, proxies=proxies, hp=hp, form=form)


# ----------------------------------------------------------------------------------------------------------
# Values against the brute-force reference.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('case', list(CASES))
def test_sampled_mixed_loss_matches_reference(case, x64):
  """Every loss x every pair set (and combinations), sampled K items per anchor, lambda per item, both masks:
  the closed form and materialised mixing equal the float64 loop reference."""
  loss = _loss(case)
  emb, labels = make_batch('uneven')
  proxies = proxies_for(emb.shape[1])
  sets = _ref_sets(case, emb, labels)
  pos, neg = mixup.pair_masks(loss, jnp.asarray(emb), jnp.asarray(labels), jnp.asarray(proxies))
  plans = _sampled_plans(jnp.asarray(labels), pos, neg)
  for (_, pair_sets, mask_mode), plan in zip(SAMPLED_CONFIGS, plans):
    if mask_mode == 'all' and loss.uses_proxies:
      continue  # proxies see every item either way
    first, second, anchor, valid = (np.asarray(a) for a in (plan.first, plan.second, plan.anchor, plan.valid))
    for x, x2, a, ok in zip(first, second, anchor, valid):  # sampled items lie in M(a)
      has_items = any(ref.in_pair_set(a, u, v, sets, pair_sets) for u in range(len(labels)) for v in range(len(labels)))
      assert ok == has_items, (pair_sets, a)
      assert not ok or ref.in_pair_set(a, x, x2, sets, pair_sets), (pair_sets, a, x, x2)
    closed, materialised = _mixed_fn(case)(jnp.asarray(emb), jnp.asarray(labels), plan, jnp.asarray(proxies))
    expected = _reference(case, emb, labels, plan, proxies, mask_mode)
    np.testing.assert_allclose(float(closed), expected, rtol=1e-9, atol=1e-12, err_msg=str(pair_sets))
    np.testing.assert_allclose(float(materialised), expected, rtol=1e-9, atol=1e-12, err_msg=str(pair_sets))


@pytest.mark.parametrize('case', ['contrastive', 'multi_similarity', 'proxy_anchor', 'circle', 'proxy_nca'])
def test_all_pairs_mixed_loss_matches_triple_loop(case, x64):
  """all_pairs_plan: every (x, x') of M(a) by a triple loop over the batch, per pair set, one lambda."""
  loss = _loss(case)
  emb, labels = make_batch('uneven')
  proxies = proxies_for(emb.shape[1])
  sets = _ref_sets(case, emb, labels)
  pos, neg = mixup.pair_masks(loss, jnp.asarray(emb), jnp.asarray(labels), jnp.asarray(proxies))
  lam = float(np.float32(0.3))  # plans hold lambda in float32
  for pair_sets in PAIR_SET_CHOICES[:4] + PAIR_SET_CHOICES[-1:]:
    plan = mixup.all_pairs_plan(None, jnp.asarray(labels), pos_mask=pos, neg_mask=neg, pair_sets=pair_sets, lam=lam)
    items = ref.all_pairs_items(labels, sets, pair_sets, lambda x, x2: lam)
    np.testing.assert_array_equal(  # the plan's membership is the triple loop's
      np.asarray(plan.mask),
      [
        [(m // len(labels), m % len(labels), lam) in items[a] for m in range(len(labels) ** 2)]
        for a in range(len(labels))
      ],
    )
    closed, materialised = _mixed_fn(case)(jnp.asarray(emb), jnp.asarray(labels), plan, jnp.asarray(proxies))
    if loss.uses_proxies:
      flat = sorted({item for per_anchor in items for item in per_anchor})
      expected = ref.mixed_loss(case, emb, labels, flat, proxies=proxies, hp=CASES[case][1])
    else:
      hp = {k: v for k, v in CASES[case][1].items() if k != 'epsilon'}
      expected = ref.mixed_loss(case, emb, labels, items, hp=hp)
    np.testing.assert_allclose(float(closed), expected, rtol=1e-9, err_msg=str(pair_sets))
    np.testing.assert_allclose(float(materialised), expected, rtol=1e-9, err_msg=str(pair_sets))


def test_closed_form_equals_materialised_float32():
  """s(a, v) from the B x B similarities alone == cosine to the explicitly mixed, re-normalised embeddings
  (and without re-normalisation == the plain dot product), lambda per pair, proxies as references."""
  emb, labels = make_batch('uneven', dim=16)
  emb, labels = jnp.asarray(emb, jnp.float32), jnp.asarray(labels)
  plan = mixup.all_pairs_plan(jax.random.key(0), labels, pair_sets=mixup.PAIR_SETS, lambda_mode='item')
  proxies = jnp.asarray(proxies_for(16), jnp.float32)
  for refs in (emb, proxies):
    for renormalize in (True, False):
      closed = mixup.closed_form_similarity(refs, emb, plan, renormalize=renormalize)
      mixed = mixup.mix_embeddings(emb, plan, renormalize=renormalize)
      explicit = mixup.similarity_to_mixed(refs, mixed, renormalize=renormalize)
      np.testing.assert_allclose(closed, explicit, atol=1e-5)  # float32 cosines, two different formulas
  e = np.asarray(losses.l2_normalize(emb), np.float64)  # and against numpy float64 by hand for a few items
  closed = np.asarray(mixup.closed_form_similarity(emb, emb, plan))
  for m in (3, 17, 55, 99):
    x, x2, lam = int(plan.first[m]), int(plan.second[m]), float(plan.lam[m])
    v = lam * e[x] + (1 - lam) * e[x2]
    np.testing.assert_allclose(closed[:, m], e @ (v / np.linalg.norm(v)), atol=1e-5)  # float32 vs float64


# ----------------------------------------------------------------------------------------------------------
# Limits.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  'case', ['contrastive', 'contrastive_paper', 'multi_similarity_nomine', 'circle', 'lifted_structure']
)
def test_lambda_one_and_zero_reduce_to_clean_positive_and_negative_terms(case, x64):
  """pos_neg with lam = 1: every mixed item IS its positive p (y = 1), the mixed loss is the loss's positive
  term on the sampled pairs (a, p) with the clean similarities; lam = 0: the item is n, y = 0, negative term."""
  loss = _loss(case)
  emb, labels = make_batch('balanced')
  e, l = jnp.asarray(emb), jnp.asarray(labels)
  sim = losses.cosine_similarity(e)
  for lam, column in ((1.0, 'first'), (0.0, 'second')):
    plan = mixup.make_plan(jax.random.key(3), l, pair_sets=('pos_neg',), num_mixed=4, lam=lam)
    idx = getattr(plan, column)
    np.testing.assert_array_equal(labels[np.asarray(plan.anchor)] == labels[np.asarray(idx)], lam == 1.0)
    clean_sim = sim[:, idx]  # [B, M] clean similarities of every anchor to the sampled p (or n)
    own = plan.mask
    expected = loss.from_similarity(clean_sim, jnp.full(clean_sim.shape, lam), own)
    got = mixup.mixed_loss(loss, e, l, plan)
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-12, atol=1e-14)
    side = 0 if lam == 1.0 else 1
    pieces = _generic_pieces(case)
    if pieces is not None:  # per-anchor: only the matching side of the generic form is non-zero
      pos_side, neg_side = losses.generic_terms(clean_sim, jnp.full(clean_sim.shape, lam), own, **pieces)
      assert np.all(np.asarray((pos_side, neg_side)[1 - side]) == 0.0)


def test_lambda_limits_all_pairs_contrastive_equal_clean_terms(x64):
  """All pairs of pos_neg on a balanced batch (each (a, p) appears |N(a)| times, each (a, n) |P(a)| times):
  PML contrastive (AvgNonZero per side) with lam = 1 equals the clean loss's positive term exactly, lam = 0
  its negative term."""
  loss = _loss('contrastive')
  emb, labels = make_batch('balanced')
  e, l = jnp.asarray(emb), jnp.asarray(labels)
  sim, targets, mask = loss.clean_terms(e, l)
  clean_pos = loss.from_similarity(sim, targets, mask & (targets > 0))
  clean_neg = loss.from_similarity(sim, targets, mask & (targets < 1))
  np.testing.assert_allclose(float(clean_pos + clean_neg), float(loss(e, l)), rtol=1e-12)
  for lam, expected in ((1.0, clean_pos), (0.0, clean_neg)):
    plan = mixup.all_pairs_plan(None, l, pair_sets=('pos_neg',), lam=lam)
    np.testing.assert_allclose(float(mixup.mixed_loss(loss, e, l, plan)), float(expected), rtol=1e-12)


def _generic_pieces(case):
  name, hp = CASES[case]
  if name == 'multi_similarity':
    return losses.multi_similarity_pieces(alpha=hp['alpha'], beta=hp['beta'], base=hp['base'])
  if name == 'contrastive':
    return losses.contrastive_pieces(**{k: v for k, v in hp.items()})
  return None


@pytest.mark.parametrize('case', ['contrastive', 'multi_similarity', 'proxy_anchor', 'circle'])
def test_weight_zero_gives_clean_loss_exactly(case):
  loss = _loss(case)
  emb, labels = make_batch('uneven')
  e, l = jnp.asarray(emb, jnp.float32), jnp.asarray(labels)
  proxies = jnp.asarray(proxies_for(5), jnp.float32) if loss.uses_proxies else None
  pos, neg = mixup.pair_masks(loss, e, l, proxies)
  plan = mixup.make_plan(jax.random.key(0), l, pos_mask=pos, neg_mask=neg, num_mixed=2)
  total, parts = mixup.objective(loss, e, l, plan, proxies=proxies, weight=0.0)
  assert float(total) == float(loss(e, l, proxies)) == float(parts['clean'])
  assert float(parts['mixed']) > 0
  total, parts = mixup.objective(loss, e, l, plan, proxies=proxies, weight=0.4)
  # one float32 multiply-add of two positive terms: a few ulps
  np.testing.assert_allclose(float(total), float(parts['clean']) + 0.4 * float(parts['mixed']), rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Sampling.
# ----------------------------------------------------------------------------------------------------------
def test_sampling_is_uniform_over_the_union_of_pair_sets():
  """Many items for a few anchors: every pair of M(a) drawn, frequencies ~ uniform (union of sets);
  balance_sets=True: each non-empty set equally likely."""
  _, labels = make_batch('uneven')
  l = jnp.asarray(labels)
  sets = ref.pair_sets_of(labels)
  pair_sets = ('pos_neg', 'anc_neg', 'pos_pos')
  k = 6000
  sample = jax.jit(mixup.sample_pairs, static_argnames=('pair_sets', 'num_mixed', 'balance_sets'))  # not op by op
  first, second, valid = sample(jax.random.key(0), *_label_masks(l), pair_sets=pair_sets, num_mixed=k)
  for a in range(len(labels)):
    members = [
      (x, x2) for x in range(len(labels)) for x2 in range(len(labels)) if ref.in_pair_set(a, x, x2, sets, pair_sets)
    ]
    counts = {}
    for x, x2 in zip(np.asarray(first[a]), np.asarray(second[a])):
      counts[(int(x), int(x2))] = counts.get((int(x), int(x2)), 0) + 1
    assert set(counts) == set(members)
    expected = k / len(members)
    assert max(abs(c - expected) for c in counts.values()) < 5 * np.sqrt(expected) + 1, a
    assert bool(np.all(valid[a]))
  first, second, _ = sample(
    jax.random.key(1), *_label_masks(l), pair_sets=('pos_neg', 'anc_neg'), num_mixed=k, balance_sets=True
  )
  a = int(np.flatnonzero(np.sum(labels[:, None] == labels[None], 1) > 2)[0])  # has >= 2 positives
  anc_share = np.mean(np.asarray(first[a]) == a)
  assert abs(anc_share - 0.5) < 0.05


def _label_masks(labels):
  same = losses.same_label(labels)
  return same & ~jnp.eye(len(labels), dtype=bool), ~same


def test_lambda_sampling():
  lam = mixup.sample_lambda(jax.random.key(0), (40000,), alpha=2.0, lambda_mode='item')
  assert abs(float(jnp.mean(lam)) - 0.5) < 0.01 and abs(float(jnp.var(lam)) - 1 / 20) < 0.003  # Beta(2, 2)
  lam = mixup.sample_lambda(jax.random.key(0), (40000,), alpha=0.4, lambda_mode='item')  # jax.random.beta path
  assert abs(float(jnp.var(lam)) - 0.25 / 1.8) < 0.01 and float(jnp.min(lam)) >= 0 and float(jnp.max(lam)) <= 1
  lam = mixup.sample_lambda(jax.random.key(1), (7,), alpha=2.0, lambda_mode='batch')
  assert np.all(np.asarray(lam) == float(lam[0])) and 0 < float(lam[0]) < 1


def test_soft_targets_and_masks():
  """y(a, v) = lam [c(x) = c(a)] + (1 - lam) [c(x') = c(a)]; 'own' mask: only the anchor's items."""
  _, labels = make_batch('uneven')
  l = jnp.asarray(labels)
  plan = mixup.make_plan(jax.random.key(0), l, pair_sets=mixup.PAIR_SETS, num_mixed=5, lambda_mode='item')
  first, second, lam, anchor = (np.asarray(a) for a in plan[:4])
  for a in range(len(labels)):
    for m in range(len(first)):
      y = lam[m] * (labels[first[m]] == labels[a]) + (1 - lam[m]) * (labels[second[m]] == labels[a])
      assert abs(float(plan.targets[a, m]) - y) < 1e-6
      assert bool(plan.mask[a, m]) == (anchor[m] == a and bool(plan.valid[m]))
  plan_all = mixup.make_plan(jax.random.key(0), l, pair_sets=mixup.PAIR_SETS, num_mixed=5, mask_mode='all')
  assert np.all(np.asarray(plan_all.mask) == np.asarray(plan_all.valid)[None])


def test_bad_arguments_raise_clear_errors():
  l = jnp.arange(4)
  with pytest.raises(ValueError, match='pos_neg'):
    mixup.make_plan(jax.random.key(0), l, pair_sets=('pos_negative',))
  with pytest.raises(ValueError, match='num_mixed'):
    mixup.make_plan(jax.random.key(0), l, num_mixed=0)
  with pytest.raises(ValueError, match='lambda_mode'):
    mixup.make_plan(jax.random.key(0), l, lambda_mode='pair')
  with pytest.raises(ValueError, match='mask_mode'):
    mixup.make_plan(jax.random.key(0), l, mask_mode='mine')
  with pytest.raises(ValueError, match='alpha'):
    mixup.make_plan(jax.random.key(0), l, alpha=0.0)
  with pytest.raises(ValueError, match='pos_mask'):
    mixup.make_plan(jax.random.key(0), l, pos_mask=jnp.ones((3, 3), bool), neg_mask=jnp.ones((3, 3), bool))
  with pytest.raises(ValueError, match='leading batch axis'):
    mixup.mix(jnp.ones((5, 2)), mixup.all_pairs_plan(None, l, lam=0.5))
  with pytest.raises(ValueError, match='proxies'):
    mixup.metrix_loss('proxy_anchor', jnp.ones((4, 3)), l, jax.random.key(0))


# ----------------------------------------------------------------------------------------------------------
# Degenerate batches.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # one large jit + jacrev compilation
def test_degenerate_batches_finite_loss_and_grads():
  """A batch of one class and a batch without any positive (one jitted function, labels traced), every loss,
  all pair sets selected, sampled and all-pairs: finite loss and gradients (embeddings and proxies); a pair set
  that is empty for every anchor gives a mixed term of exactly 0 and the clean loss as the objective."""
  proxies = jnp.asarray(proxies_for(5), jnp.float32)

  def mixed_terms(e, proxies, l, key):
    out = []
    for name in losses.LOSS_NAMES:
      loss = losses.get(name)
      p = proxies if loss.uses_proxies else None
      for all_pairs in (False, True):
        pos, neg = mixup.pair_masks(loss, e, l, p)
        kw = dict(pos_mask=pos, neg_mask=neg, pair_sets=mixup.PAIR_SETS)
        plan = mixup.all_pairs_plan(key, l, **kw) if all_pairs else mixup.make_plan(key, l, num_mixed=2, **kw)
        out.append(mixup.objective(loss, e, l, plan, proxies=p)[1]['mixed'])
    return jnp.stack(out)

  names = ('contrastive', 'multi_similarity', 'proxy_anchor', 'circle')

  def empty_set_terms(e, proxies, l, key):
    """{(pair set, loss name): (plan.valid, mixed term, objective, clean loss)} for pos_neg and pos_pos."""
    out = {}
    for pair_set in ('pos_neg', 'pos_pos'):
      plan = mixup.make_plan(key, l, pair_sets=(pair_set,), num_mixed=2)
      for name in names:
        loss = losses.get(name)
        p = proxies if loss.uses_proxies else None
        total, parts = mixup.objective(loss, e, l, plan, proxies=p)
        out[pair_set, name] = plan.valid, parts['mixed'], total, loss(e, l, p)
    return out

  # one compilation for both batches (labels traced)
  fn = jax.jit(
    lambda e, p, l, k: (
      mixed_terms(e, p, l, k),
      jax.grad(lambda e, p: jnp.sum(mixed_terms(e, p, l, k)), argnums=(0, 1))(e, p),
      empty_set_terms(e, p, l, k),
    )
  )
  for kind in ('one_class', 'no_positives'):
    emb, labels = make_batch(kind)
    e, l = jnp.asarray(emb, jnp.float32), jnp.asarray(labels)
    mixed, (g_e, g_p), empty = fn(e, proxies, l, jax.random.key(0))
    assert np.all(np.isfinite(mixed)) and np.all(np.isfinite(g_e)) and np.all(np.isfinite(g_p)), kind
    assert np.any(np.asarray(mixed) != 0.0)  # one_class: pos_pos items; no_positives: anc_neg / neg_neg items
    empty_set = 'pos_neg' if kind == 'one_class' else 'pos_pos'  # empty for every anchor
    for name in names:
      valid, mixed_term, total, clean = empty[empty_set, name]
      assert not np.any(np.asarray(valid))
      assert float(mixed_term) == 0.0 and float(total) == float(clean), (kind, name)


# ----------------------------------------------------------------------------------------------------------
# Mixing levels.
# ----------------------------------------------------------------------------------------------------------
class TinyNet(nn.Module):
  """conv -> feature map [B, 4, 4, 8] -> GAP + GMP (summed) -> Dense -> L2: the EmbeddingNet layout, tiny."""

  dim: int = 6

  def setup(self):
    self.conv = nn.Conv(8, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    self.dense = nn.Dense(self.dim)

  def features(self, x):
    return nn.relu(self.conv(x))

  def head(self, feature_map):
    pooled = jnp.mean(feature_map, axis=(1, 2)) + jnp.max(feature_map, axis=(1, 2))
    return losses.l2_normalize(self.dense(pooled))

  def __call__(self, x):
    return self.head(self.features(x))


def _tiny():
  net = TinyNet()
  images = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8, 8, 3)), jnp.float32)
  labels = jnp.array([0, 0, 0, 1, 1, 1, 2, 3])
  # 'rbg' key: threefry's truncated-normal init takes seconds to compile on a loaded 2-core CPU
  return net, images, labels, net.init(jax.random.key(1, impl='rbg'), images)


def test_feature_mixing_equals_mixing_maps_one_by_one():
  """One backbone forward; mix(feature_map) -> head == for each item, head(lam F[x] + (1-lam) F[x']) built by
  hand in float64; and != mixing the pooled features (GMP is not linear: mixing happens before pooling)."""
  net, images, labels, params = _tiny()
  feature_map = net.apply(params, images, method='features')
  assert feature_map.shape == (8, 4, 4, 8)
  plan = mixup.make_plan(jax.random.key(2), labels, pair_sets=('pos_neg', 'anc_neg'), num_mixed=2, lambda_mode='item')
  head = jax.jit(functools.partial(net.apply, method='head'))
  batched = head(params, mixup.mix(feature_map, plan))
  maps = np.asarray(feature_map, np.float64)
  explicit = []
  for m in range(plan.first.shape[0]):
    lam = float(plan.lam[m])
    one = lam * maps[int(plan.first[m])] + (1 - lam) * maps[int(plan.second[m])]
    explicit.append(head(params, jnp.asarray(one[None], jnp.float32))[0])
  np.testing.assert_allclose(batched, np.stack(explicit), atol=1e-5)  # float32 unit vectors, batch M vs 1 graphs
  pooled = jnp.mean(feature_map, axis=(1, 2)) + jnp.max(feature_map, axis=(1, 2))
  after_pooling = losses.l2_normalize(net.apply(params, mixup.mix(pooled, plan), method=lambda m, x: m.dense(x)))
  assert np.max(np.abs(np.asarray(after_pooling - batched))) > 1e-3


def test_input_mixing_equals_embedding_explicitly_mixed_images():
  net, images, labels, params = _tiny()
  plan = mixup.make_plan(jax.random.key(4), labels, pair_sets=mixup.PAIR_SETS, num_mixed=1, lambda_mode='item')
  batched = net.apply(params, jnp.concatenate([images, mixup.mix(images, plan)]))[8:]
  x = np.asarray(images, np.float64)
  explicit = np.stack(
    [float(plan.lam[m]) * x[int(plan.first[m])] + (1 - float(plan.lam[m])) * x[int(plan.second[m])] for m in range(8)]
  )
  # float32 unit vectors from two differently compiled forwards (batch 16 vs 8)
  np.testing.assert_allclose(batched, net.apply(params, jnp.asarray(explicit, jnp.float32)), atol=1e-5)
  uint8 = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 3, 3, 3)), jnp.uint8)  # raw images
  mixed = mixup.mix(uint8, plan)
  lam = np.asarray(plan.lam)[:, None, None, None]
  assert mixed.dtype == jnp.float32
  np.testing.assert_allclose(
    mixed, lam * np.asarray(uint8)[plan.first] + (1 - lam) * np.asarray(uint8)[plan.second], rtol=1e-6
  )  # two non-negative float32 terms: ulps


@pytest.mark.slow  # one large jit + jacrev compilation
def test_jit_and_grad_every_loss_level_and_pair_set():
  """A jitted value-and-gradient for every (loss x level x pair set) at tiny size with the plans passed in (all
  plans built by one jitted function; one jit over the levels, each vmapped over the four pair sets), and once
  with the plans built inside the jitted function, all pair sets together (the trainer's tests cover that path
  at every level). Finite values and gradients; every non-zero mixed term has a non-zero gradient."""
  net, images, labels, params = _tiny()
  # 4 classes; rows beyond the first 4 serve the losses with K proxy rows per class (SoftTriple K = 10, sub-center
  # ArcFace K = 3: row r is class r // K); every loss takes its own first loss.num_proxies(4) rows
  proxies = jnp.concatenate(
    [losses.init_proxies(jax.random.key(2), 4, 6), losses.init_proxies(jax.random.key(4), 36, 6)]
  )
  names = losses.LOSS_NAMES

  def own(loss, proxies):
    return proxies[: loss.num_proxies(4)] if loss.uses_proxies else None

  def plans(params, proxies, key, level, pair_sets):
    fmap = net.apply(params, images, method='features')
    emb = net.apply(params, fmap, method='head')
    out = []
    for name in names:
      loss = losses.get(name)
      pos, neg = mixup.pair_masks(loss, emb, labels, own(loss, proxies))
      kw = dict(pos_mask=pos, neg_mask=neg, pair_sets=pair_sets)
      out.append(
        mixup.all_pairs_plan(key, labels, **kw)
        if level == 'embedding'
        else mixup.make_plan(key, labels, num_mixed=2, **kw)
      )
    return out

  def mixed_terms(params, proxies, plan_list, level):
    fmap = net.apply(params, images, method='features')
    emb = net.apply(params, fmap, method='head')
    out = []
    for name, plan in zip(names, plan_list):
      loss = losses.get(name)
      mixed = None
      if level == 'feature':
        mixed = net.apply(params, mixup.mix(fmap, plan), method='head')
      elif level == 'input':
        mixed = net.apply(params, mixup.mix(images, plan))
      out.append(
        mixup.objective(loss, emb, labels, plan, mixed_embeddings=mixed, proxies=own(loss, proxies))[1]['mixed']
      )
    return jnp.stack(out)

  def check(values, jac, zero_ok=()):
    values = np.asarray(values)
    grads = jax.tree_util.tree_leaves(jac)
    assert np.all(np.isfinite(values)) and all(np.all(np.isfinite(g)) for g in grads)
    per_objective = sum(np.abs(np.asarray(g)).reshape(len(values), -1).sum(1) for g in grads)
    for i, name in enumerate(names):
      if name not in zero_ok:
        assert values[i] > 0 and per_objective[i] > 0, (name, values[i])
      elif values[i] == 0:
        assert per_objective[i] == 0

  key = jax.random.key(3)

  @jax.jit
  def all_sets(params, proxies, key):  # plans inside jit (MS mining on traced embeddings), embedding level
    fn = lambda pr, px: mixed_terms(pr, px, plans(pr, px, key, 'embedding', mixup.PAIR_SETS), 'embedding')
    return fn(params, proxies), jax.jacrev(fn, argnums=(0, 1))(params, proxies)

  check(*all_sets(params, proxies, key))

  @jax.jit
  def all_plans(params, proxies, key):
    """level -> pair set -> the per-loss plans (one compilation for every plan of the test)."""
    return {
      level: {pair_set: plans(params, proxies, key, level, (pair_set,)) for pair_set in mixup.PAIR_SETS}
      for level in mixup.LEVELS
    }

  plans_by_level = all_plans(params, proxies, key)
  for level in mixup.LEVELS:

    @jax.jit
    def given_plans(params, proxies, plan_list, level=level):
      fn = lambda pr, px: mixed_terms(pr, px, plan_list, level)
      return fn(params, proxies), jax.jacrev(fn, argnums=(0, 1))(params, proxies)

    for pair_set in mixup.PAIR_SETS:
      # circle needs both sides: with only y = 1 (pos_pos) or y = 0 (neg_neg) items its mixed term is 0; so do the
      # triplet / softmax-over-items losses (margin, pair_nca, supcon, ntxent: no triplet, or no negative)
      one_sided = ('circle', 'margin', 'pair_nca', 'supcon', 'ntxent')
      # pair_nca on sampled 'own' plans with one lambda: every item of an anchor has y = lam, so its mixed term
      # -log(sum y e^z / sum e^z) = -log(lam) is constant in s (no gradient; see losses.pair_nca_from_similarity)
      check(
        *given_plans(params, proxies, plans_by_level[level][pair_set]),
        zero_ok=one_sided if pair_set in ('pos_pos', 'neg_neg') else ('pair_nca',) if level != 'embedding' else (),
      )
