"""Positivity of mixed embeddings (Metrix paper, section 3.3): does a mixed item act as a positive?

For an anchor a and a mixed item v = mix_lam(x, x') with soft target y(a, v), the mixed loss l~(a) pulls v
towards a when d l~(a) / d s(a, v) < 0 (raising the similarity lowers the loss: v "acts as a positive") and
pushes it away when it is > 0 (items with an exactly zero gradient are not counted). With positive-negative
mixing y = lam, and the paper expects the fraction of mixed items that act as positives to grow with lam: from 0
at lam = 0 (v is the negative, y = 0) to 1 at lam = 1 (v is the positive, y = 1). Measured curves need not
(RESULTS.md): with MS's exponential weights, an item far below the base similarity is pulled even at small lam,
and when many items share one lam inside a log-sum the lam factors largely cancel.

`positivity_curve` measures that fraction ("empirical") on a batch of embeddings for a grid of lambdas, from
the exact gradient of the loss's own mixed term (`jax.grad` of `Loss.from_similarity` with respect to the
anchor-to-mixed similarities, so all items of V(a) interact through the sums inside sigma), with embedding-level
mixing (exact closed form, `mixup.closed_form_similarity`).

"theoretical" (Multi-Similarity only; derived from the generic form, the paper's text not checked): for a
single mixed item (|V(a)| = 1) with target y, PML scales alpha (positive), beta (negative) and base m,

    l~(a) = (1/alpha) log(1 + y e^{-alpha (s - m)}) + (1/beta) log(1 + (1 - y) e^{beta (s - m)})
    d l~ / d s = -sigmoid(log y - alpha (s - m)) + sigmoid(log(1 - y) + beta (s - m)) <= 0
            <=>  s <= m + log(y / (1 - y)) / (alpha + beta)

(paper names: alpha -> beta, beta -> gamma), so the theoretical positivity is the fraction of the same items
whose similarity lies below that threshold. The two curves differ only by the interaction of the items
inside the log-sums. The output matches `metrix_jax.plots.positivity_record(lambdas, empirical, theoretical)`.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metrix_jax import losses as losses_lib
from metrix_jax import mixup

Array = jax.Array
DEFAULT_LAMBDAS = tuple(np.round(np.linspace(0.0, 1.0, 11), 6))
MAX_ALL_PAIRS_BATCH = 256


def ms_positive_threshold(targets: Array, *, alpha: float, beta: float, base: float) -> Array:
  """s* = base + log(y / (1 - y)) / (alpha + beta): an isolated mixed item with target y acts as a positive
  for Multi-Similarity (PML alpha, beta, base) iff s(a, v) <= s*. y = 1 -> +inf, y = 0 -> -inf."""
  y = jnp.asarray(targets)
  return base + (jnp.log(y) - jnp.log1p(-y)) / (alpha + beta)


def _with_lambda(plan: mixup.MixPlan, labels: Array, lam: Array) -> mixup.MixPlan:
  """The same items with every lambda set to `lam` (scalar), targets recomputed; masks unchanged."""
  lam = jnp.broadcast_to(jnp.asarray(lam, jnp.float32), plan.lam.shape)
  targets = mixup.soft_targets(labels, labels, plan.first, plan.second, lam)
  return plan._replace(lam=lam, targets=targets)


@functools.lru_cache(maxsize=32)
def _curve_fn(loss: losses_lib.Loss, renormalize: bool):
  """jit: (embeddings, labels, plan, proxies, lambdas [L]) -> (empirical [L], theoretical [L], count)."""

  def one(embeddings, labels, plan, proxies, lam):
    plan = _with_lambda(plan, labels, lam)
    refs = proxies if loss.uses_proxies else embeddings
    sim_to_mixed = mixup.closed_form_similarity(refs, embeddings, plan, renormalize=renormalize)
    sim, targets, mask = mixup.mixed_terms(loss, labels, plan, sim_to_mixed)  # in the loss's orientation
    grad = jax.grad(lambda s: loss.from_similarity(s, targets, mask))(sim)
    # The (anchor, item) pairs the loss sees whose lambda-side x shares the anchor's class (the anchor's
    # positive for pos_neg, the anchor itself for anc_neg; for proxies: proxy c = c(x)), i.e. y = 1 at lam = 1.
    _, targets_at_one, _ = mixup.mixed_terms(loss, labels, _with_lambda(plan, labels, 1.0), sim_to_mixed)
    relevant = mask & (targets_at_one >= 1)
    # Exactly zero gradients (an inactive hinge, a mined-out pair, exp underflow) neither pull nor push: the
    # fraction is over the items with a gradient, positive = pulled (grad < 0).
    relevant = relevant & (grad != 0)
    count = jnp.sum(relevant)
    empirical = jnp.sum(relevant & (grad < 0)) / jnp.maximum(count, 1)
    if loss.name == 'multi_similarity':
      hp = loss.hyperparameters
      threshold = ms_positive_threshold(targets, alpha=hp['alpha'], beta=hp['beta'], base=hp['base'])
      theoretical = jnp.sum(relevant & (sim <= threshold)) / jnp.maximum(count, 1)
    else:
      theoretical = jnp.full((), jnp.nan, empirical.dtype)
    return jnp.where(count > 0, empirical, jnp.nan), jnp.where(count > 0, theoretical, jnp.nan), count

  return jax.jit(jax.vmap(one, in_axes=(None, None, None, None, 0)))


def positivity_curve(
  loss: losses_lib.Loss | str,
  embeddings: Array,
  labels: Array,
  key: Optional[Array] = None,
  *,
  lambdas: Sequence[float] = DEFAULT_LAMBDAS,
  num_mixed: Optional[int] = 16,
  pair_sets: Sequence[str] = ('pos_neg',),
  proxies: Optional[Array] = None,
  mask_mode: str = 'own',
  renormalize: bool = True,
) -> dict:
  """Fraction of mixed items acting as positives (d l~(a) / d s(a, v) < 0) for each lambda.

  Args:
    loss: a `losses.Loss` or a registry name (e.g. 'multi_similarity'; default hyperparameters).
    embeddings: [B, D] float, one batch (e.g. a training batch of the trained model; normalised here).
    labels: [B] int class labels.
    key: PRNG key for sampling the mixed pairs (needed when num_mixed is not None).
    lambdas: the lambda grid [L] in [0, 1] (every item uses the same lambda; the items are fixed across the
      grid, so the curve shows the effect of lambda alone).
    num_mixed: K pairs per anchor sampled from M(a) (`mixup.make_plan`); None: every pair of M(a)
      (`mixup.all_pairs_plan`, B <= 256).
    pair_sets: the pair sets M(a) (`mixup.PAIR_SETS`); the paper's analysis uses ('pos_neg',).
    proxies: [C, D] for proxy losses (the proxies are the anchors).
    mask_mode: 'own' (paper) or 'all', as in `mixup.make_plan`.
    renormalize: re-normalise mixed embeddings (as in training).
  Returns:
    {'lambdas': [L] float64, 'empirical': [L] float64 in [0, 1], 'theoretical': [L] float64 (Multi-Similarity)
     or None, 'num_items': int, the (anchor, item) pairs counted per lambda}. NaN where no item exists.
    Counted: the (anchor, item) pairs the loss sees whose lambda-weighted item x is of the anchor's class
    (proxies: proxy c = c(x)) and whose gradient is non-zero (an exactly zero gradient neither pulls nor
    pushes). Plot with
    `plots.plot_positivity(out['lambdas'], out['empirical'], out['theoretical'], path)`.
  """
  if isinstance(loss, str):
    loss = losses_lib.get(loss)
  embeddings, labels = jnp.asarray(embeddings), jnp.asarray(labels)
  losses_lib._check_embeddings(embeddings, labels, proxies)  # pylint: disable=protected-access
  if loss.uses_proxies and proxies is None:
    raise ValueError(f'{loss.name} needs proxies [C, D] (the trained proxies) for the positivity analysis.')
  grid = np.asarray(lambdas, np.float64).reshape(-1)
  if grid.size == 0 or np.any(grid < 0) or np.any(grid > 1):
    raise ValueError(f'lambdas must be a non-empty sequence of values in [0, 1]; got {lambdas!r}.')
  if num_mixed is None and labels.shape[0] > MAX_ALL_PAIRS_BATCH:
    raise ValueError(
      f'num_mixed=None (all pairs) needs B <= {MAX_ALL_PAIRS_BATCH} (B^3 masks); got '
      f'B = {labels.shape[0]}. Pass num_mixed=K to sample K pairs per anchor, or a smaller batch.'
    )
  if num_mixed is not None and key is None:
    raise ValueError(
      'positivity_curve needs a PRNG key to sample num_mixed pairs per anchor '
      '(e.g. jax.random.key(0)), or num_mixed=None for all pairs.'
    )
  settings = mixup.MixSettings(
    level='embedding',
    pair_sets=tuple(pair_sets),
    num_mixed=num_mixed or 1,
    all_pairs=num_mixed is None,
    mask_mode=mask_mode,
    renormalize=renormalize,
  )
  plan = mixup.plan_for(key, loss, labels, settings, embeddings=embeddings, proxies=proxies, lam=0.5)
  dtype = losses_lib.compute_dtype(embeddings)
  empirical, theoretical, count = _curve_fn(loss, renormalize)(
    embeddings, labels, plan, None if proxies is None else jnp.asarray(proxies), jnp.asarray(grid, dtype)
  )
  return {
    'lambdas': grid,
    'empirical': np.asarray(empirical, np.float64),
    'theoretical': (np.asarray(theoretical, np.float64) if loss.name == 'multi_similarity' else None),
    'num_items': int(np.asarray(count)[0]),
  }


__all__ = ['positivity_curve', 'ms_positive_threshold', 'DEFAULT_LAMBDAS']
