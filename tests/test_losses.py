"""metrix_jax.losses: values against brute-force float64 loops and pytorch-metric-learning 2.9.0, soft-target
properties, numerical safety (empty sums, overflow, identical embeddings, bfloat16), registry contract."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metrix_jax import losses
from reference import losses_ref as ref

NUM_CLASSES = 9


def make_batch(kind, *, batch=20, dim=8, seed=0):
  rng = np.random.default_rng(seed)
  if kind == 'uneven':  # uneven class sizes and two singleton classes
    labels = np.array([0] * 7 + [1] * 5 + [2] * 3 + [3] * 3 + [4] + [5])[:batch]
  elif kind == 'no_positives':
    labels = np.arange(batch)
  elif kind == 'one_class':
    labels = np.full(batch, 2)
  else:
    raise ValueError(kind)
  labels = rng.permutation(labels)
  emb = rng.normal(size=(len(labels), dim))
  # a few near-duplicates so that hinge terms and mining thresholds are exercised on both sides
  emb[1] = emb[0] + 0.05 * rng.normal(size=dim)
  return emb, labels


BATCHES = ('uneven', 'no_positives', 'one_class')


def _proxies(labels, dim, seed=1):
  """One proxy per possible label of every test batch (labels < 20), so all batches share shapes."""
  del labels
  return np.random.default_rng(seed).normal(size=(20, dim))


# name -> (jax function, reference function, PML builder(hparams, num_classes, dim) -> (loss, miner))
CASES = {
  'contrastive': dict(hp=dict(pos_margin=0.05, neg_margin=0.5)),
  'contrastive_paper': dict(hp=dict(neg_margin=0.8, form='paper')),
  'multi_similarity': dict(hp=dict(alpha=2.0, beta=50.0, base=0.5, epsilon=0.1)),
  'multi_similarity_official': dict(hp=dict(alpha=17.97, beta=75.66, base=0.77, epsilon=0.39)),
  'multi_similarity_nomine': dict(hp=dict(alpha=2.0, beta=40.0, base=0.5, epsilon=None)),
  'proxy_anchor': dict(hp=dict(alpha=32.0, margin=0.1)),
  'proxy_anchor_paper': dict(hp=dict(alpha=16.0, margin=0.1, form='paper')),
  'circle': dict(hp=dict(m=0.4, gamma=80.0)),
  'circle_paper': dict(hp=dict(m=0.25, gamma=64.0, form='paper')),
  'proxy_nca': dict(hp=dict(softmax_scale=3.0)),
  'lifted_structure': dict(hp=dict(pos_margin=0.1, neg_margin=1.2)),
}


def _base(case):
  for name in sorted(losses.LOSS_NAMES, key=len, reverse=True):
    if case.startswith(name):
      return name
  raise KeyError(case)


@functools.lru_cache(maxsize=None)
def _jax_fn(case):
  name, hp = _base(case), CASES[case]['hp']
  fn = getattr(losses, f'{name}_loss')
  if name in losses.PROXY_LOSS_NAMES:
    return jax.jit(lambda e, l, p: fn(e, l, p, **hp))
  return jax.jit(lambda e, l, p: fn(e, l, **hp))


@functools.lru_cache(maxsize=None)
def _jax_values(case, seeds):
  """{(batch kind, seed): float64 loss} with one compilation per case (all batches share shapes)."""
  out = {}
  with jax.enable_x64(True):
    fn = _jax_fn(case)
    for kind in BATCHES:
      for seed in seeds:
        emb, labels = make_batch(kind, seed=seed)
        proxies = _proxies(labels, emb.shape[1], seed=seed + 1)
        out[kind, seed] = float(fn(jnp.asarray(emb), jnp.asarray(labels), jnp.asarray(proxies)))
  return out


def _ref_value(case, emb, labels, proxies):
  name, hp = _base(case), dict(CASES[case]['hp'])
  form = hp.pop('form', 'pml')
  if name == 'contrastive':
    return ref.contrastive(emb, labels, form=form, **hp)
  if name == 'multi_similarity':
    return ref.multi_similarity(emb, labels, **hp)
  if name == 'proxy_anchor':
    return ref.proxy_anchor(emb, labels, proxies, form=form, **hp)
  if name == 'circle':
    return ref.circle(emb, labels, form=form, **hp)
  if name == 'proxy_nca':
    return ref.proxy_nca(emb, labels, proxies, **hp)
  return ref.lifted_structure(emb, labels, **hp)


def _pml_value(case, emb, labels, proxies):
  torch = pytest.importorskip('torch')
  pml_losses = pytest.importorskip('pytorch_metric_learning.losses')
  pml_miners = pytest.importorskip('pytorch_metric_learning.miners')
  name, hp = _base(case), dict(CASES[case]['hp'])
  e, l = torch.tensor(emb, dtype=torch.float64), torch.tensor(labels)
  if name == 'contrastive':
    return pml_losses.ContrastiveLoss(**hp)(e, l).item()
  if name == 'multi_similarity':
    eps = hp.pop('epsilon')
    mined = None if eps is None else pml_miners.MultiSimilarityMiner(epsilon=eps)(e, l)
    return pml_losses.MultiSimilarityLoss(**hp)(e, l, mined).item()
  if name == 'circle':
    return pml_losses.CircleLoss(**hp)(e, l).item()
  if name == 'lifted_structure':
    return pml_losses.GeneralizedLiftedStructureLoss(**hp)(e, l).item()
  cls = pml_losses.ProxyAnchorLoss if name == 'proxy_anchor' else pml_losses.ProxyNCALoss
  loss = cls(num_classes=len(proxies), embedding_size=emb.shape[1], **hp).double()
  loss.proxies.data = torch.tensor(proxies, dtype=torch.float64)
  return loss(e, l).item()


REF_SEEDS, PML_SEEDS = (0,), (3,)


@pytest.mark.parametrize('case', sorted(CASES))
def test_matches_bruteforce_reference(case):
  got = _jax_values(case, REF_SEEDS)
  for kind in BATCHES:
    emb, labels = make_batch(kind, seed=REF_SEEDS[0])
    proxies = _proxies(labels, emb.shape[1], seed=REF_SEEDS[0] + 1)
    np.testing.assert_allclose(
      got[kind, REF_SEEDS[0]], _ref_value(case, emb, labels, proxies), rtol=1e-9, atol=1e-12, err_msg=kind
    )


@pytest.mark.parametrize('case', sorted(c for c in CASES if 'paper' not in c))
def test_matches_pytorch_metric_learning(case):
  pytest.importorskip('torch')
  pytest.importorskip('pytorch_metric_learning')
  got = _jax_values(case, PML_SEEDS)
  for kind in BATCHES:
    emb, labels = make_batch(kind, seed=PML_SEEDS[0])
    proxies = _proxies(labels, emb.shape[1], seed=PML_SEEDS[0] + 1)
    np.testing.assert_allclose(
      got[kind, PML_SEEDS[0]], _pml_value(case, emb, labels, proxies), rtol=1e-5, atol=1e-9, err_msg=kind
    )


def test_reference_is_not_trivially_zero(x64):
  """Guards the parity tests: the uneven batch exercises both sides of every loss."""
  emb, labels = make_batch('uneven')
  proxies = _proxies(labels, emb.shape[1])
  for case in CASES:
    assert _ref_value(case, emb, labels, proxies) != 0.0, case


# ---------------------------------------------------------------------------------------------------------
# generic_loss
# ---------------------------------------------------------------------------------------------------------
def _random_terms(seed, shape=(6, 11), soft=True):
  rng = np.random.default_rng(seed)
  sim = rng.uniform(-1, 1, size=shape)
  targets = rng.uniform(0, 1, size=shape) if soft else rng.integers(0, 2, size=shape).astype(float)
  mask = rng.uniform(size=shape) < 0.7
  mask[0] = False  # an anchor with an empty U(a)
  return sim, targets, mask


def test_generic_loss_plain_callables_match_loops(x64):
  sim, targets, mask = _random_terms(0)
  kwargs = dict(
    rho_pos=lambda s: jnp.exp(-2.0 * (s - 0.3)),
    rho_neg=lambda s: jnp.maximum(s - 0.1, 0.0),
    sigma_pos=jnp.log1p,
    sigma_neg=lambda x: jnp.sqrt(x + 1.0),
    tau=jnp.tanh,
  )
  got = losses.generic_loss(jnp.asarray(sim), jnp.asarray(targets), jnp.asarray(mask), **kwargs)
  expected = ref.generic(
    sim,
    targets,
    mask,
    lambda s: math.exp(-2.0 * (s - 0.3)),
    lambda s: max(s - 0.1, 0.0),
    math.log1p,
    lambda x: math.sqrt(x + 1.0),
    math.tanh,
  )
  np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize('pieces', ['ms', 'pa', 'circle', 'nca'])
def test_generic_log_sum_exp_path_matches_literal_evaluation(pieces, x64):
  """Pieces recognised for log-sum-exp evaluation give the literal formula (soft targets, empty anchors)."""
  sim, targets, mask = _random_terms(1)
  mask[1] = mask[1] & (np.arange(mask.shape[1]) < 2)
  kw = {
    'ms': losses.multi_similarity_pieces(alpha=3.0, beta=7.0, base=0.5),
    'pa': losses.proxy_anchor_pieces(alpha=5.0, margin=0.1),
    'circle': losses.circle_pieces(m=0.3, gamma=4.0),
    'nca': losses.proxy_nca_pieces(softmax_scale=2.0),
  }[pieces]
  kw.pop('tau', None)
  args = (jnp.asarray(sim), jnp.asarray(targets), jnp.asarray(mask))
  got = losses.generic_terms(*args, **kw)
  literal = {k: (lambda x, f=v: f(x)) for k, v in kw.items()}  # plain callables: evaluated literally
  expected = losses.generic_terms(*args, **literal)
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_generic_loss_empty_sums_and_gradients_are_finite():
  sim = jnp.zeros((3, 4))
  mask = jnp.zeros((3, 4), bool)
  targets = jnp.ones((3, 4))
  for kw in (
    losses.multi_similarity_pieces(),
    losses.proxy_anchor_pieces(),
    losses.circle_pieces(),
    losses.contrastive_pieces(),
    losses.lifted_structure_pieces(),
  ):
    value, grad = jax.jit(jax.value_and_grad(lambda s: jnp.sum(losses.generic_loss(s, targets, mask, **kw))))(sim)
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def test_generic_loss_shape_mismatch_error_says_how_to_fix():
  with pytest.raises(ValueError, match='one shape.*broadcast'):
    losses.generic_loss(
      jnp.zeros((3, 4)),
      jnp.zeros((3, 5)),
      jnp.ones((3, 4), bool),
      rho_pos=losses.NegSimilarity(),
      rho_neg=losses.SimilarityHinge(0.5),
    )


def test_generic_loss_jit_and_vmap():
  sim, targets, mask = (jnp.asarray(x) for x in _random_terms(2, shape=(3, 5, 7)))
  kw = losses.multi_similarity_pieces()
  fn = lambda s, t, m: losses.generic_loss(s, t, m, **kw)
  batched = jax.vmap(fn)(sim.astype(jnp.float32), targets.astype(jnp.float32), mask)
  jitted = jax.jit(fn)(sim.astype(jnp.float32), targets.astype(jnp.float32), mask)
  np.testing.assert_allclose(batched, jitted, rtol=1e-5)  # float32, two differently compiled graphs
  assert batched.shape == (3, 5)


# ---------------------------------------------------------------------------------------------------------
# Multi-Similarity miner: the mined pairs themselves (a dropped negative weighs ~e^-50 in the loss value, so
# the value tests above cannot see a wrong epsilon rule)
# ---------------------------------------------------------------------------------------------------------
def _pml_mined_mask(emb, labels, epsilon):
  """pytorch_metric_learning.miners.MultiSimilarityMiner in float64 -> [B, B] bool of the mined (a, j)."""
  torch = pytest.importorskip('torch')
  pml_miners = pytest.importorskip('pytorch_metric_learning.miners')
  a1, p, a2, n = pml_miners.MultiSimilarityMiner(epsilon=epsilon)(
    torch.tensor(emb, dtype=torch.float64), torch.tensor(labels)
  )
  mined = np.zeros((len(labels), len(labels)), bool)
  mined[a1.numpy(), p.numpy()] = True
  mined[a2.numpy(), n.numpy()] = True
  return mined


def _epsilon_bands(sim, targets, mask, epsilon):
  """(#positives, #negatives) whose mining flips when epsilon flips sign, and the smallest distance of any
  candidate's s -/+ epsilon to its threshold (float32 similarities must not straddle a threshold)."""
  keep, flipped = (ref.ms_miner_mask(sim, targets, mask, eps) for eps in (epsilon, -epsilon))
  pos, neg = mask & (targets >= 1), mask & (targets <= 0)
  hardest_neg = np.max(np.where(neg, sim, -np.inf), axis=1, keepdims=True)
  hardest_pos = np.min(np.where(pos, sim, np.inf), axis=1, keepdims=True)
  with np.errstate(invalid='ignore'):
    gaps = np.concatenate(
      [
        np.abs(sim - epsilon - hardest_neg)[pos & np.isfinite(hardest_neg)],
        np.abs(sim + epsilon - hardest_pos)[neg & np.isfinite(hardest_pos)],
      ]
    )
  return int(np.sum(pos & (keep != flipped))), int(np.sum(neg & (keep != flipped))), float(np.min(gaps))


@pytest.mark.parametrize('epsilon', [0.1, 0.39])
def test_ms_miner_mined_pairs_match_loops_and_pml(epsilon):
  """The float32 jitted miner (clean_terms' mask) keeps exactly the pairs of PML's MultiSimilarityMiner rule
  (float64 loops) and of PML itself, on a batch where epsilon decides pairs on both sides (its sign flipped
  on either side changes the mined set) and no similarity lies within 1e-4 of a threshold."""
  emb, labels = make_batch('uneven', seed=12)
  sim = ref.normalize(emb) @ ref.normalize(emb).T
  targets = (labels[:, None] == labels[None, :]).astype(float)
  all_pairs = ~np.eye(len(labels), dtype=bool)
  num_pos, num_neg, gap = _epsilon_bands(sim, targets, all_pairs, epsilon)
  assert num_pos > 0 and num_neg > 0 and gap > 1e-4, (num_pos, num_neg, gap)
  expected = ref.ms_miner_mask(sim, targets, all_pairs, epsilon)
  pairs = ref.ms_mined_pairs(emb, labels, epsilon)  # the loss references' per-anchor lists agree
  np.testing.assert_array_equal(expected, [[j in pos or j in neg for j in range(len(labels))] for pos, neg in pairs])
  loss = losses.get('multi_similarity', epsilon=epsilon)
  _, got_targets, mined = jax.jit(loss.clean_terms)(jnp.asarray(emb, jnp.float32), jnp.asarray(labels))
  np.testing.assert_array_equal(np.asarray(got_targets), targets)
  np.testing.assert_array_equal(np.asarray(mined), expected)
  np.testing.assert_array_equal(_pml_mined_mask(emb, labels, epsilon), expected)
  assert 0 < expected.sum() < all_pairs.sum()  # mining keeps some pairs and drops others


def test_ms_miner_on_a_similarity_matrix_matches_loops(x64):
  """multi_similarity_mining itself, float64: random similarities, soft targets (neither positive nor
  negative), a partial candidate mask, rows without positives / negatives / candidates; both epsilon bands
  populated."""
  rng = np.random.default_rng(4)
  shape = (9, 14)
  sim = rng.uniform(-1, 1, size=shape)
  targets = rng.choice([0.0, 1.0, 0.4], size=shape, p=[0.6, 0.3, 0.1])
  mask = rng.uniform(size=shape) < 0.8
  targets[1] = 0.0  # no positives: keeps nothing
  targets[2] = 1.0  # no negatives: keeps nothing
  mask[3] = False  # no candidates
  for epsilon in (0.1, 0.25):
    num_pos, num_neg, gap = _epsilon_bands(sim, targets, mask, epsilon)
    assert num_pos > 0 and num_neg > 0 and gap > 1e-6, (num_pos, num_neg, gap)
    got = losses.multi_similarity_mining(jnp.asarray(sim), jnp.asarray(targets), jnp.asarray(mask), epsilon=epsilon)
    expected = ref.ms_miner_mask(sim, targets, mask, epsilon)
    np.testing.assert_array_equal(np.asarray(got), expected, err_msg=str(epsilon))
    assert not expected[1:4].any() and expected.any()


# ---------------------------------------------------------------------------------------------------------
# Soft targets
# ---------------------------------------------------------------------------------------------------------
PAPER_LOSSES = ('contrastive', 'multi_similarity', 'proxy_anchor')


@pytest.mark.parametrize('name', losses.LOSS_NAMES)
def test_soft_targets_at_zero_one_equal_binary_loss(name, x64):
  """Binary labels fed as float soft targets through from_similarity give the named loss; targets a hair
  away from 0/1 give (nearly) the same value."""
  emb, labels = make_batch('uneven')
  proxies = jnp.asarray(_proxies(labels, emb.shape[1]))
  loss = losses.get(name)

  @jax.jit
  def values(emb, labels, proxies):
    sim, targets, mask = loss.clean_terms(emb, labels, proxies)
    soft = jnp.asarray(targets, jnp.float64)
    nudged = jnp.clip(soft, 1e-9, 1 - 1e-9)
    return (loss(emb, labels, proxies), loss.from_similarity(sim, soft, mask), loss.from_similarity(sim, nudged, mask))

  direct, soft, nudged = values(jnp.asarray(emb), jnp.asarray(labels), proxies)
  np.testing.assert_allclose(soft, direct, rtol=1e-12)
  if name in ('multi_similarity', 'proxy_nca'):  # others count anchors/pairs with y > 0: a jump at 0
    np.testing.assert_allclose(nudged, direct, rtol=1e-6)


@pytest.mark.parametrize('name', PAPER_LOSSES)
@pytest.mark.parametrize('form', losses.FORMS)
def test_gradient_monotone_in_targets(name, form, x64):
  """Paper (positivity): raising y(a, v) makes v act more as a positive: d l / d s(a, v) is non-increasing
  in y(a, v), for every anchor, in both forms."""
  emb, labels = make_batch('uneven', seed=5)
  proxies = jnp.asarray(_proxies(labels, emb.shape[1]))
  hp = {} if name != 'multi_similarity' else dict(epsilon=None)
  loss = losses.get(name, form=form, **hp)
  sim, targets, mask = loss.clean_terms(jnp.asarray(emb), jnp.asarray(labels), proxies)
  num_anchors = sim.shape[0]

  def grad_at(y, s_extra):
    """Gradient w.r.t. one extra candidate per anchor with similarity s_extra and soft target y."""
    t = jnp.concatenate([targets, jnp.full((num_anchors, 1), y)], axis=1)
    m = jnp.concatenate([mask, jnp.ones((num_anchors, 1), bool)], axis=1)
    fn = lambda col: loss.from_similarity(jnp.concatenate([sim, col], axis=1), t, m)
    return jax.grad(fn)(jnp.full((num_anchors, 1), s_extra))[:, 0]

  ys = jnp.linspace(0.0, 1.0, 11)
  for s_extra in (0.93, 0.3):
    grads = np.asarray(jax.jit(jax.vmap(grad_at, in_axes=(0, None)))(ys, s_extra))  # [11, A]
    assert np.all(np.diff(grads, axis=0) <= 1e-12), (s_extra, grads)


# ---------------------------------------------------------------------------------------------------------
# Numerical safety, dtypes, transformations
# ---------------------------------------------------------------------------------------------------------
def _call(name, emb, labels, **hp):
  loss = losses.get(name, **hp)
  proxies = losses.init_proxies(jax.random.PRNGKey(0), NUM_CLASSES, emb.shape[1]) if loss.uses_proxies else None
  return loss(emb, labels, proxies)


@pytest.mark.parametrize('name', losses.LOSS_NAMES)
def test_gradients_finite_at_identical_and_zero_embeddings(name):
  labels = jnp.array([0, 0, 1, 1, 2, 3])
  value_and_grad = jax.jit(jax.value_and_grad(lambda e: _call(name, e, labels)))
  identical = jnp.tile(jnp.arange(1.0, 5.0), (6, 1))  # every pair at distance 0, similarity 1
  zero = jnp.zeros((6, 4))  # zero vectors: normalisation must not divide by 0
  for emb in (identical, zero):
    value, grad = value_and_grad(emb)
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(np.asarray(grad)))


def test_large_scales_do_not_overflow_float32():
  """MS far beyond the official scales: exp(200 * 1.77) overflows float32 unless in log-sum-exp form."""
  emb, labels = make_batch('uneven', seed=7)
  emb = jnp.asarray(emb, jnp.float32)
  value, grad = jax.jit(
    jax.value_and_grad(
      lambda e: losses.multi_similarity_loss(e, jnp.asarray(labels), alpha=200.0, beta=200.0, base=-0.77, epsilon=None)
    )
  )(emb)
  assert np.isfinite(float(value)) and float(value) > 1.0
  assert np.all(np.isfinite(np.asarray(grad)))
  expected = ref.multi_similarity(
    np.asarray(emb, np.float64), labels, alpha=200.0, beta=200.0, base=-0.77, epsilon=None
  )
  np.testing.assert_allclose(float(value), expected, rtol=1e-4)


@pytest.mark.parametrize('name', losses.LOSS_NAMES)
def test_bfloat16_and_float32_under_jit_match_float64(name):
  emb, labels = make_batch('uneven', seed=8)
  emb16 = jnp.asarray(emb, jnp.bfloat16)
  v16 = jax.jit(lambda e, l: _call(name, e, l))(emb16, jnp.asarray(labels))
  assert v16.dtype == jnp.float32
  with jax.enable_x64(True):
    v64 = jax.jit(lambda e, l: _call(name, e, l))(
      jnp.asarray(np.asarray(emb16.astype(jnp.float32)), jnp.float64), jnp.asarray(labels)
    )
  np.testing.assert_allclose(float(v16), float(v64), rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Registry / contract
# ---------------------------------------------------------------------------------------------------------
def test_registry_names_and_defaults():
  assert {'contrastive', 'multi_similarity', 'proxy_anchor', 'circle', 'proxy_nca', 'lifted_structure'} <= set(
    losses.LOSS_NAMES
  )
  assert set(losses.PROXY_LOSS_NAMES) == {'proxy_anchor', 'proxy_nca'} | set(losses.CLASS_WEIGHT_LOSS_NAMES)
  assert set(losses.CLASS_WEIGHT_LOSS_NAMES) == {
    'normalized_softmax',
    'cosface',
    'arcface',
    'soft_triple',
    'subcenter_arcface',
  }
  assert losses.default_hparams('multi_similarity') == dict(alpha=2.0, beta=50.0, base=0.5, epsilon=0.1, form='pml')
  assert losses.default_hparams('contrastive') == dict(pos_margin=0.0, neg_margin=0.5, form='pml')
  for name in losses.LOSS_NAMES:
    loss = losses.get(name, **losses.default_hparams(name))
    assert loss.hyperparameters == losses.default_hparams(name)
    assert loss.uses_proxies == (name in losses.PROXY_LOSS_NAMES)
  assert losses.get('proxy_anchor').proxies_are_anchors
  assert not losses.get('proxy_nca').proxies_are_anchors


def test_registry_errors_list_valid_choices():
  with pytest.raises(ValueError, match='valid names: contrastive'):
    losses.get('triplet')
  with pytest.raises(ValueError, match='unknown hyperparameters.*valid: alpha='):
    losses.get('multi_similarity', scale=3.0)
  with pytest.raises(ValueError, match='form'):
    losses.get('circle', form='official')
  with pytest.raises(ValueError, match='pos_margin'):
    losses.get('contrastive', form='paper', pos_margin=0.1)


def test_get_matches_named_function():
  emb, labels = make_batch('uneven', seed=10)
  emb, labels = jnp.asarray(emb, jnp.float32), jnp.asarray(labels)
  hp = dict(alpha=17.97, beta=75.66, base=0.77, epsilon=0.39)
  loss = losses.get('multi_similarity', **hp)
  np.testing.assert_allclose(
    jax.jit(loss)(emb, labels), jax.jit(lambda e, l: losses.multi_similarity_loss(e, l, **hp))(emb, labels), rtol=1e-5
  )  # float32, two separately compiled graphs
  sim, targets, mask = jax.jit(loss.clean_terms)(emb, labels)
  assert sim.shape == targets.shape == mask.shape == (20, 20) and mask.dtype == jnp.bool_
  proxies = losses.init_proxies(jax.random.PRNGKey(1), NUM_CLASSES, 8)
  sim, targets, mask = losses.get('proxy_anchor').clean_terms(emb, labels, proxies)
  assert sim.shape == (NUM_CLASSES, 20)


def test_shape_errors_say_what_is_wrong():
  emb = jnp.zeros((5, 3))
  with pytest.raises(ValueError, match=r'labels must be \[B\] with B = .* = 5'):
    losses.contrastive_loss(emb, jnp.zeros(4, jnp.int32))
  with pytest.raises(ValueError, match='embeddings must be'):
    losses.contrastive_loss(jnp.zeros((5, 3, 1)), jnp.zeros(5, jnp.int32))
  with pytest.raises(ValueError, match='integers'):
    losses.contrastive_loss(emb, jnp.zeros(5))
  with pytest.raises(ValueError, match=r'proxies must be \[C, D\]'):
    losses.proxy_anchor_loss(emb, jnp.zeros(5, jnp.int32), jnp.zeros((4, 2)))
  with pytest.raises(ValueError, match='init_proxies'):
    losses.get('proxy_anchor')(emb, jnp.zeros(5, jnp.int32))


def test_init_proxies_kaiming_fan_out():
  proxies = losses.init_proxies(jax.random.PRNGKey(0), 50, 512)
  assert proxies.shape == (50, 512) and proxies.dtype == jnp.float32
  np.testing.assert_allclose(float(jnp.std(proxies)), math.sqrt(2 / 50), rtol=0.02)


def test_numpy_inputs_work_like_a_notebook():
  """Eager calls on numpy arrays (no jit) give the jitted value."""
  emb, labels = make_batch('uneven', seed=11)
  value = losses.contrastive_loss(emb.astype(np.float32), labels)
  jitted = jax.jit(losses.contrastive_loss)(emb.astype(np.float32), labels)
  assert float(value) > 0
  # float32: eager (op by op) and jitted (fused, reordered sums) differ by a few ulps; 1.3e-6 seen on an EPYC.
  np.testing.assert_allclose(float(value), float(jitted), rtol=1e-5)
