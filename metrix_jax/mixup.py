"""Metrix (ICLR 2022): mixing with interpolated labels for every loss of `metrix_jax.losses`, on device.

A *plan* says which pairs are mixed and how (spec section 2): for every anchor a, mixed items v = mix_lam(x, x')
with (x, x') drawn from its pair sets M(a), and the soft target of v for every anchor,

    y(a, v) = lam [c(x) = c(a)] + (1 - lam) [c(x') = c(a)]          (proxies: y_c(v), c a class)

Plans have static shapes (jit-safe): `make_plan` samples K items per anchor with `jax.random` (vmapped over
anchors; padding items are marked invalid where M(a) is empty), `all_pairs_plan` lists all B^2 ordered pairs
and masks them per anchor. One mixing function serves every level: `mix(x, plan)` mixes any array with a
leading batch axis (images [B, H, W, C] = 'input', feature maps before pooling [B, h, w, C] = 'feature',
embeddings [B, D] = 'embedding'). The similarity of anchors to mixed items then comes either from the mixed
embeddings (`similarity_to_mixed`) or, for embedding mixing, exactly from the B x B similarity matrix
(`closed_form_similarity`, no B^3 embeddings):

    s(a, normalize(lam e_x + (1-lam) e_x')) = (lam s_ax + (1-lam) s_ax') / sqrt(lam^2 + (1-lam)^2 + 2 lam (1-lam) s_xx')

`mixed_terms` turns those similarities into the loss's (sim, targets, mask) and `objective` gives the Metrix
objective from_similarity(clean) + w * from_similarity(mixed) = mean_a[l(a) + w l~(a)] (spec 2.4, paper form;
none of the official code's defects, spec section 8).

Trainer recipe (feature level; one backbone forward):

    settings = mixup.MixSettings(level='feature', num_mixed=K, ...)
    plan = mixup.plan_for(key, loss, labels, settings, embeddings=clean_emb)  # MS: its mined pairs
    mixed_emb = head(mixup.mix(feature_maps, plan))
    total, parts = mixup.objective(loss, clean_emb, labels, plan, mixed_embeddings=mixed_emb, weight=w)

Notebook: `mixup.metrix_loss(loss, embeddings, labels, key, ...)` (embedding level).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from metrix_jax import losses as losses_lib

Array = jax.Array
PAIR_SETS = ('pos_neg', 'anc_neg', 'pos_pos', 'neg_neg')
LAMBDA_MODES = ('batch', 'item')
MASK_MODES = ('own', 'all')
LEVELS = ('input', 'feature', 'embedding')
_HIGHEST = jax.lax.Precision.HIGHEST


class MixPlan(NamedTuple):
  """Which items are mixed and how; a pytree of arrays with static shapes (M items, B batch anchors).

  first [M] int32: index of x in the batch (weight lam); second [M] int32: index of x' (weight 1 - lam);
  lam [M] float32; anchor [M] int32: the anchor the item was drawn for (-1 for all-pairs plans, whose items
  are shared); valid [M] bool: False for padding (empty M(a)); targets [B, M] float32: y(a, v) for every
  batch anchor a; mask [B, M] bool: which items each batch anchor sees ('own': its M(a), 'all': every valid
  item with its own soft label).
  """

  first: Array
  second: Array
  lam: Array
  anchor: Array
  valid: Array
  targets: Array
  mask: Array


# ----------------------------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------------------------
def _check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f'{name}={value!r} is not one of {choices}.')


def _check_lambda(alpha: float, lambda_mode: str) -> None:
  _check_choice('lambda_mode', lambda_mode, LAMBDA_MODES)
  if alpha <= 0:
    raise ValueError(f'alpha must be > 0 for Beta(alpha, alpha); got {alpha}.')


def _check_num_mixed(num_mixed) -> None:
  if not isinstance(num_mixed, int) or num_mixed < 1:
    raise ValueError(f'num_mixed must be a positive int (static shape); got {num_mixed!r}.')


def _check_pair_sets(pair_sets: Sequence[str]) -> tuple:
  if isinstance(pair_sets, str):
    pair_sets = (pair_sets,)
  pair_sets = tuple(pair_sets)
  if not pair_sets or any(p not in PAIR_SETS for p in pair_sets):
    raise ValueError(
      f"pair_sets={pair_sets!r} must be a non-empty selection of {PAIR_SETS}, e.g. ('pos_neg', 'anc_neg')."
    )
  return tuple(p for p in PAIR_SETS if p in pair_sets)  # canonical order, no duplicates


def _check_masks(labels, pos_mask, neg_mask):
  labels = jnp.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'labels must be [B]; got shape {labels.shape}.')
  b = labels.shape[0]
  if pos_mask is None and neg_mask is None:
    same = losses_lib.same_label(labels)
    pos_mask, neg_mask = same & ~jnp.eye(b, dtype=bool), ~same
  elif pos_mask is None or neg_mask is None:
    raise ValueError('Pass both pos_mask and neg_mask (e.g. from mixup.pair_masks), or neither (all pairs).')
  for name, m in (('pos_mask', pos_mask), ('neg_mask', neg_mask)):
    if jnp.shape(m) != (b, b):
      raise ValueError(
        f'{name} must be [B, B] = {(b, b)} for labels of shape {labels.shape}; got '
        f'{jnp.shape(m)}. Build it with mixup.pair_masks(loss, embeddings, labels).'
      )
  return labels, jnp.asarray(pos_mask, bool), jnp.asarray(neg_mask, bool)


# ----------------------------------------------------------------------------------------------------------
# Pair sets.
# ----------------------------------------------------------------------------------------------------------
def pair_masks(
  loss: losses_lib.Loss, embeddings: Optional[Array], labels: Array, proxies: Optional[Array] = None
) -> tuple[Array, Array]:
  """P(a), N(a) as [B, B] bool masks for the pair sets: the loss's mined clean pairs when the loss mines
  (`loss.mines`: Multi-Similarity mixes its mined pairs, no re-mining; needs `embeddings` [B, D]), the pairs of
  the labels otherwise (every other loss's clean pairs are exactly these). No gradient flows."""
  del proxies
  labels = jnp.asarray(labels)
  if not loss.mines:
    same = losses_lib.same_label(labels)
    return same & ~jnp.eye(labels.shape[0], dtype=bool), ~same
  if embeddings is None:
    raise ValueError(f'{loss.name} mines its pairs from the embeddings: pass the clean embeddings [B, D].')
  _, targets, mask = loss.clean_terms(jax.lax.stop_gradient(embeddings), labels)
  return mask & (targets >= 1), mask & (targets <= 0)


class MixSettings(NamedTuple):
  """How one Metrix level mixes (hashable: a static argument of the jitted step).

  level: 'input' | 'feature' | 'embedding'; pair_sets: selection of PAIR_SETS; num_mixed: K items per anchor
  (sampled plans); all_pairs: every pair of M(a) instead (embedding level only: exact closed form);
  alpha: Beta(alpha, alpha) for lambda; lambda_mode: 'batch' | 'item'; mask_mode: 'own' | 'all';
  weight: w of clean + w * mixed; renormalize: re-normalise mixed embeddings.
  """

  level: str = 'embedding'
  pair_sets: tuple = ('pos_neg', 'anc_neg')
  num_mixed: int = 8
  all_pairs: bool = False
  alpha: float = 2.0
  lambda_mode: str = 'batch'
  mask_mode: str = 'own'
  weight: float = 0.4
  renormalize: bool = True


def plan_for(
  key: Optional[Array],
  loss: losses_lib.Loss,
  labels: Array,
  settings: MixSettings,
  *,
  embeddings: Optional[Array] = None,
  proxies: Optional[Array] = None,
  lam: Optional[Array] = None,
) -> MixPlan:
  """THE Metrix plan of a batch, for every level and caller (train step, `metrix_loss`, positivity analysis).

  Pair sets from `pair_masks` (mined pairs when `loss.mines`: pass the clean `embeddings` [B, D]; the labels
  otherwise), then `all_pairs_plan` (settings.all_pairs; embedding level) or `make_plan` with
  settings.num_mixed items per anchor. key: PRNG key (may be None with a fixed `lam`). labels: [B] int.
  """
  _check_choice('level', settings.level, LEVELS)
  if settings.all_pairs and settings.level != 'embedding':
    raise ValueError(
      f'all_pairs mixes embeddings through the closed form; level {settings.level!r} mixes '
      f'{settings.level}s: sample num_mixed items per anchor instead.'
    )
  pos, neg = pair_masks(loss, embeddings, labels, proxies)
  kwargs = dict(
    pos_mask=pos,
    neg_mask=neg,
    pair_sets=settings.pair_sets,
    alpha=settings.alpha,
    lambda_mode=settings.lambda_mode,
    mask_mode=settings.mask_mode,
    lam=lam,
  )
  if settings.all_pairs:
    return all_pairs_plan(key, labels, **kwargs)
  return make_plan(key, labels, num_mixed=settings.num_mixed, **kwargs)


def _anchor_sets(a, pos_row, neg_row, pair_sets):
  """For one anchor: first-candidate masks [S, B], second-candidate masks [S, B], distinct flags [S]."""
  own = jnp.arange(pos_row.shape[0]) == a
  table = {
    'pos_neg': (pos_row, neg_row, False),
    'anc_neg': (own, neg_row, False),
    'pos_pos': (pos_row, pos_row, True),
    'neg_neg': (neg_row, neg_row, True),
  }
  firsts = jnp.stack([table[p][0] for p in pair_sets])
  seconds = jnp.stack([table[p][1] for p in pair_sets])
  distinct = jnp.array([table[p][2] for p in pair_sets])
  return firsts, seconds, distinct


def pair_set_tensor(pos_mask: Array, neg_mask: Array, *, pair_sets: Sequence[str]) -> Array:
  """M(a) as a dense [B, B, B] bool tensor: [a, x, x'] is True iff (x, x') is in a selected pair set of a."""
  pair_sets = _check_pair_sets(pair_sets)
  b = pos_mask.shape[0]

  def one(a, pos_row, neg_row):
    firsts, seconds, distinct = _anchor_sets(a, pos_row, neg_row, pair_sets)
    pairs = firsts[:, :, None] & seconds[:, None, :]
    pairs = pairs & ~(distinct[:, None, None] & jnp.eye(b, dtype=bool)[None])
    return jnp.any(pairs, axis=0)

  return jax.vmap(one)(jnp.arange(b), pos_mask, neg_mask)


def sample_pairs(
  key: Array,
  pos_mask: Array,
  neg_mask: Array,
  *,
  pair_sets: Sequence[str] = ('pos_neg',),
  num_mixed: int = 8,
  balance_sets: bool = False,
) -> tuple[Array, Array, Array]:
  """K = num_mixed pairs (x, x') per anchor from M(a), on device, with replacement.

  Args:
    key: PRNG key. pos_mask, neg_mask: [B, B] bool, P(a) and N(a) per row (see `pair_masks`).
    pair_sets: any of PAIR_SETS: 'pos_neg' (p, n), 'anc_neg' (a, n), 'pos_pos' (p, p' != p),
      'neg_neg' (n, n' != n). The union is sampled uniformly (balance_sets=True: each non-empty set equally
      likely, then uniform within it).
  Returns:
    first [B, K] int32, second [B, K] int32, valid [B, K] bool (False where M(a) is empty).
  """
  pair_sets = _check_pair_sets(pair_sets)
  _check_num_mixed(num_mixed)
  b, num_sets = pos_mask.shape[0], len(pair_sets)
  firsts, seconds, distinct = jax.vmap(lambda a, p, n: _anchor_sets(a, p, n, pair_sets))(
    jnp.arange(b), pos_mask, neg_mask
  )  # [B, S, B], [B, S, B], [B, S]
  n_first = jnp.sum(firsts, axis=-1).astype(jnp.float32)
  n_second = jnp.sum(seconds, axis=-1).astype(jnp.float32)
  sizes = n_first * n_second - jnp.where(distinct, n_first, 0.0)  # distinct sets: ordered pairs x != x'
  nonempty = sizes > 0
  set_logits = jnp.where(nonempty, 0.0 if balance_sets else jnp.log(jnp.where(nonempty, sizes, 1.0)), -jnp.inf)
  # Gumbel-max sampling from one noise draw (one PRNG call compiles fast; categorical per anchor does not).
  noise = jax.random.gumbel(key, (b, num_mixed, num_sets + 2 * b), jnp.float32)
  set_idx = jnp.argmax(set_logits[:, None, :] + noise[..., :num_sets], axis=-1)  # [B, K]
  rows = jnp.arange(b)[:, None]
  first_ok = firsts[rows, set_idx]  # [B, K, B]
  first = jnp.argmax(jnp.where(first_ok, 0.0, -jnp.inf) + noise[..., num_sets : num_sets + b], axis=-1)
  own_first = jnp.arange(b)[None, None, :] == first[..., None]
  second_ok = seconds[rows, set_idx] & ~(distinct[rows, set_idx][..., None] & own_first)
  second = jnp.argmax(jnp.where(second_ok, 0.0, -jnp.inf) + noise[..., num_sets + b :], axis=-1)
  valid = jnp.broadcast_to(jnp.any(nonempty, axis=-1)[:, None], (b, num_mixed))
  return first.astype(jnp.int32), second.astype(jnp.int32), valid


def sample_lambda(key: Array, shape: tuple, *, alpha: float = 2.0, lambda_mode: str = 'batch') -> Array:
  """lam ~ Beta(alpha, alpha) float32: one per batch broadcast to `shape` ('batch', the official code's
  choice) or one per mixed item ('item')."""
  _check_lambda(alpha, lambda_mode)
  draw_shape = () if lambda_mode == 'batch' else tuple(shape)
  return jnp.broadcast_to(_beta_symmetric(key, alpha, draw_shape), shape)


def _beta_symmetric(key: Array, alpha: float, shape: tuple) -> Array:
  """Beta(alpha, alpha) float32. Integer alpha <= 16: the alpha-th smallest of 2 alpha - 1 uniforms (exact
  order statistic; compiles in a fraction of jax.random.beta's rejection sampler). Otherwise jax.random.beta."""
  if float(alpha).is_integer() and 1 <= alpha <= 16:
    k = int(alpha)
    uniforms = jax.random.uniform(key, tuple(shape) + (2 * k - 1,), jnp.float32)
    return jnp.sort(uniforms, axis=-1)[..., k - 1]
  return jax.random.beta(key, alpha, alpha, shape, jnp.float32)


def soft_targets(anchor_labels: Array, labels: Array, first: Array, second: Array, lam: Array) -> Array:
  """y [A, M] = lam [c(x) = c(a)] + (1 - lam) [c(x') = c(a)] for anchor classes [A] (labels or proxy ids)."""
  lam = jnp.asarray(lam, jnp.float32)
  same_first = losses_lib.same_label(anchor_labels, labels[first]).astype(jnp.float32)
  same_second = losses_lib.same_label(anchor_labels, labels[second]).astype(jnp.float32)
  return lam[None, :] * same_first + (1.0 - lam[None, :]) * same_second


# ----------------------------------------------------------------------------------------------------------
# Plans.
# ----------------------------------------------------------------------------------------------------------
def make_plan(
  key: Array,
  labels: Array,
  *,
  pos_mask: Optional[Array] = None,
  neg_mask: Optional[Array] = None,
  pair_sets: Sequence[str] = ('pos_neg', 'anc_neg'),
  num_mixed: int = 8,
  alpha: float = 2.0,
  lambda_mode: str = 'batch',
  mask_mode: str = 'own',
  balance_sets: bool = False,
  lam: Optional[Array] = None,
) -> MixPlan:
  """Sampled plan: K = num_mixed items per anchor (M = B * K, anchor-major: item a * K + k).

  Args:
    key: PRNG key (e.g. fold_in(base_key, step)). labels: [B] int.
    pos_mask, neg_mask: [B, B] bool P(a), N(a) (None: all pairs from labels; MS: `pair_masks` = mined).
    pair_sets, num_mixed, balance_sets: see `sample_pairs`. alpha, lambda_mode: see `sample_lambda`.
    mask_mode: 'own' (paper: each anchor sees only its own items) or 'all' (every valid item, own soft label).
    lam: optional fixed lambda (scalar or [M]) instead of sampling (tests, limits).
  """
  _check_choice('mask_mode', mask_mode, MASK_MODES)
  _check_lambda(alpha, lambda_mode)
  _check_num_mixed(num_mixed)
  labels, pos_mask, neg_mask = _check_masks(labels, pos_mask, neg_mask)
  return _make_plan(
    key,
    labels,
    pos_mask,
    neg_mask,
    lam,
    pair_sets=_check_pair_sets(pair_sets),
    num_mixed=num_mixed,
    alpha=float(alpha),
    lambda_mode=lambda_mode,
    mask_mode=mask_mode,
    balance_sets=bool(balance_sets),
  )


@functools.partial(
  jax.jit, static_argnames=('pair_sets', 'num_mixed', 'alpha', 'lambda_mode', 'mask_mode', 'balance_sets')
)
def _make_plan(
  key, labels, pos_mask, neg_mask, lam, *, pair_sets, num_mixed, alpha, lambda_mode, mask_mode, balance_sets
) -> MixPlan:
  """make_plan after validation; jitted (one compilation per configuration when called eagerly, inlined
  inside an outer jit)."""
  b = labels.shape[0]
  k_pairs, k_lam = jax.random.split(key)
  first, second, valid = sample_pairs(
    k_pairs, pos_mask, neg_mask, pair_sets=pair_sets, num_mixed=num_mixed, balance_sets=balance_sets
  )
  first, second, valid = first.reshape(-1), second.reshape(-1), valid.reshape(-1)
  m = first.shape[0]
  lam = (
    sample_lambda(k_lam, (m,), alpha=alpha, lambda_mode=lambda_mode)
    if lam is None
    else jnp.broadcast_to(jnp.asarray(lam, jnp.float32), (m,))
  )
  anchor = jnp.repeat(jnp.arange(b, dtype=jnp.int32), num_mixed)
  targets = soft_targets(labels, labels, first, second, lam)
  if mask_mode == 'own':
    mask = (jnp.arange(b)[:, None] == anchor[None, :]) & valid[None, :]
  else:
    mask = jnp.broadcast_to(valid[None, :], (b, m))
  return MixPlan(first, second, lam, anchor, valid, targets, mask)


def all_pairs_plan(
  key: Optional[Array],
  labels: Array,
  *,
  pos_mask: Optional[Array] = None,
  neg_mask: Optional[Array] = None,
  pair_sets: Sequence[str] = ('pos_neg', 'anc_neg'),
  alpha: float = 2.0,
  lambda_mode: str = 'batch',
  mask_mode: str = 'own',
  lam: Optional[Array] = None,
) -> MixPlan:
  """All B^2 ordered pairs (x, x') as items (item x * B + x'), each anchor masked to its M(a) ('own') or to
  the union of all M(a) ('all'). lam: one per batch, or one per pair (x, x') ('item'; shared by the anchors,
  since the mixed embedding is). Use with `closed_form_similarity` (embedding level): B^3 masks, no B^3
  embeddings. key may be None when lam is given."""
  _check_choice('mask_mode', mask_mode, MASK_MODES)
  _check_lambda(alpha, lambda_mode)
  labels, pos_mask, neg_mask = _check_masks(labels, pos_mask, neg_mask)
  if lam is None and key is None:
    raise ValueError('all_pairs_plan needs a key to sample lambda, or a fixed lam.')
  return _all_pairs_plan(
    key,
    labels,
    pos_mask,
    neg_mask,
    lam,
    pair_sets=_check_pair_sets(pair_sets),
    alpha=float(alpha),
    lambda_mode=lambda_mode,
    mask_mode=mask_mode,
  )


@functools.partial(jax.jit, static_argnames=('pair_sets', 'alpha', 'lambda_mode', 'mask_mode'))
def _all_pairs_plan(key, labels, pos_mask, neg_mask, lam, *, pair_sets, alpha, lambda_mode, mask_mode) -> MixPlan:
  """all_pairs_plan after validation; jitted."""
  b = labels.shape[0]
  m = b * b
  members = pair_set_tensor(pos_mask, neg_mask, pair_sets=pair_sets).reshape(b, m)
  valid = jnp.any(members, axis=0)
  first = jnp.repeat(jnp.arange(b, dtype=jnp.int32), b)
  second = jnp.tile(jnp.arange(b, dtype=jnp.int32), b)
  if lam is None:
    lam = sample_lambda(key, (m,), alpha=alpha, lambda_mode=lambda_mode)
  lam = jnp.broadcast_to(jnp.asarray(lam, jnp.float32), (m,))
  targets = soft_targets(labels, labels, first, second, lam)
  mask = members if mask_mode == 'own' else jnp.broadcast_to(valid[None, :], (b, m))
  return MixPlan(first, second, lam, jnp.full((m,), -1, jnp.int32), valid, targets, mask)


# ----------------------------------------------------------------------------------------------------------
# Mixing and similarities.
# ----------------------------------------------------------------------------------------------------------
def mix(x: Array, plan: MixPlan) -> Array:
  """[B, ...] -> [M, ...]: lam * x[first] + (1 - lam) * x[second], in x's dtype (float32 arithmetic).

  One function for every level: images (input), feature maps before pooling (feature), embeddings.
  """
  x = jnp.asarray(x)
  if x.ndim < 1 or x.shape[0] != plan.targets.shape[0]:
    raise ValueError(
      f"mix needs an array with leading batch axis B = {plan.targets.shape[0]} (the plan's batch); got shape {x.shape}."
    )
  dtype = losses_lib.compute_dtype(x)
  lam = plan.lam.astype(dtype).reshape((-1,) + (1,) * (x.ndim - 1))
  mixed = lam * x[plan.first].astype(dtype) + (1.0 - lam) * x[plan.second].astype(dtype)
  return mixed.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else mixed


def mix_embeddings(embeddings: Array, plan: MixPlan, *, renormalize: bool = True) -> Array:
  """Embedding-level mixing: unit embeddings [B, D] -> mixed [M, D], re-normalised unless renormalize=False."""
  unit = losses_lib.l2_normalize(jnp.asarray(embeddings, losses_lib.compute_dtype(embeddings)))
  mixed = mix(unit, plan)
  return losses_lib.l2_normalize(mixed) if renormalize else mixed


def _references(loss, embeddings, proxies):
  if loss is not None and loss.uses_proxies:
    if proxies is None:
      raise ValueError(
        f'{loss.name} needs proxies [C, D] for its mixed term (the same proxies as the clean '
        'term); create them with losses.init_proxies(key, C, D).'
      )
    return proxies
  return embeddings


def similarity_to_mixed(references: Array, mixed_embeddings: Array, *, renormalize: bool = True) -> Array:
  """[A, D] references (clean embeddings or proxies; normalised here) x [M, D] mixed -> s(r, v) [A, M].
  renormalize=False uses the mixed vectors as they are (dot product with the unit references)."""
  dtype = losses_lib.compute_dtype(references, mixed_embeddings)
  refs = losses_lib.l2_normalize(jnp.asarray(references, dtype))
  mixed = jnp.asarray(mixed_embeddings, dtype)
  if renormalize:
    mixed = losses_lib.l2_normalize(mixed)
  return jnp.matmul(refs, mixed.T, precision=_HIGHEST)


def closed_form_similarity(references: Array, embeddings: Array, plan: MixPlan, *, renormalize: bool = True) -> Array:
  """Exact s(r, v) [A, M] for embedding mixing without materialising the mixed embeddings:
  (lam s_rx + (1-lam) s_rx') / sqrt(lam^2 + (1-lam)^2 + 2 lam (1-lam) s_xx') (denominator 1 without
  re-normalisation). references [A, D]: the clean embeddings themselves or proxies; embeddings [B, D]."""
  s_ref = losses_lib.cosine_similarity(references, embeddings)  # [A, B]
  s_batch = losses_lib.cosine_similarity(embeddings)  # [B, B]
  lam = plan.lam.astype(s_ref.dtype)
  numerator = lam[None, :] * s_ref[:, plan.first] + (1.0 - lam[None, :]) * s_ref[:, plan.second]
  if not renormalize:
    return numerator
  sq_norm = lam**2 + (1.0 - lam) ** 2 + 2.0 * lam * (1.0 - lam) * s_batch[plan.first, plan.second]
  return numerator / jnp.sqrt(jnp.maximum(sq_norm, 1e-24))  # = max(||v||, 1e-12) as l2_normalize


def mixed_terms(
  loss: losses_lib.Loss, labels: Array, plan: MixPlan, sim_to_mixed: Array, num_classes: Optional[int] = None
) -> tuple[Array, Array, Array]:
  """(sim, targets, mask) of the mixed term in the loss's orientation.

  Embedding-anchor losses: sim_to_mixed [B, M] (clean anchors x mixed items) with the plan's targets/mask.
  Proxy losses: sim_to_mixed [C, M] (proxies x mixed items), y_c(v) = lam [c(x) = c] + (1-lam) [c(x') = c],
  every proxy sees every valid item; transposed to [M, C] where the embeddings are the anchors (ProxyNCA, the
  class-weight losses). With K proxy rows per class (sim_to_mixed [C*K, M]) row r carries class r // K's target;
  the loss reduces the K rows of a class itself (SoftTriple, sub-center ArcFace).
  """
  labels = jnp.asarray(labels)
  if not loss.uses_proxies:
    if sim_to_mixed.shape != plan.targets.shape:
      raise ValueError(
        f'sim_to_mixed must be [B, M] = {plan.targets.shape} (clean anchors x mixed items); got {sim_to_mixed.shape}.'
      )
    return sim_to_mixed, plan.targets.astype(sim_to_mixed.dtype), plan.mask
  c = sim_to_mixed.shape[0] if num_classes is None else num_classes
  if sim_to_mixed.shape != (c, plan.first.shape[0]):
    raise ValueError(
      f'sim_to_mixed must be [C, M] = {(c, plan.first.shape[0])} (proxies x mixed items); got {sim_to_mixed.shape}.'
    )
  # proxy row r belongs to class r // K (K = loss.proxies_per_class: SoftTriple centers, sub-center ArcFace)
  row_class = loss.proxy_classes(c)
  targets = soft_targets(row_class, labels, plan.first, plan.second, plan.lam).astype(sim_to_mixed.dtype)
  mask = jnp.broadcast_to(plan.valid[None, :], targets.shape)
  if loss.proxies_are_anchors:
    return sim_to_mixed, targets, mask
  return sim_to_mixed.T, targets.T, mask.T


# ----------------------------------------------------------------------------------------------------------
# The objective.
# ----------------------------------------------------------------------------------------------------------
def mixed_loss(
  loss: losses_lib.Loss,
  embeddings: Array,
  labels: Array,
  plan: MixPlan,
  *,
  mixed_embeddings: Optional[Array] = None,
  proxies: Optional[Array] = None,
  renormalize: bool = True,
) -> Array:
  """The mixed term from_similarity(mixed) (= mean_a l~(a) for per-anchor-mean reductions), scalar.

  mixed_embeddings [M, D] (input/feature level: the head's output on mixed images/maps); None: embedding
  level, exact closed form from `embeddings` [B, D] (clean, any scale; normalised).
  """
  refs = _references(loss, embeddings, proxies)
  if mixed_embeddings is None:
    sim = closed_form_similarity(refs, embeddings, plan, renormalize=renormalize)
  else:
    sim = similarity_to_mixed(refs, mixed_embeddings, renormalize=renormalize)
  return loss.from_similarity(*mixed_terms(loss, labels, plan, sim))


def objective(
  loss: losses_lib.Loss,
  embeddings: Array,
  labels: Array,
  plan: MixPlan,
  *,
  mixed_embeddings: Optional[Array] = None,
  proxies: Optional[Array] = None,
  weight: float = 0.4,
  renormalize: bool = True,
) -> tuple[Array, dict]:
  """Metrix objective (paper): from_similarity(clean) + weight * from_similarity(mixed), same proxies for both.

  Returns (total scalar, {'clean': scalar, 'mixed': scalar}). weight = 0 gives the clean loss exactly.
  """
  clean = loss(embeddings, labels, proxies)
  mixed = mixed_loss(
    loss, embeddings, labels, plan, mixed_embeddings=mixed_embeddings, proxies=proxies, renormalize=renormalize
  )
  return clean + weight * mixed, {'clean': clean, 'mixed': mixed}


def metrix_loss(
  loss: losses_lib.Loss | str,
  embeddings: Array,
  labels: Array,
  key: Array,
  *,
  proxies: Optional[Array] = None,
  pair_sets: Sequence[str] = ('pos_neg', 'anc_neg'),
  num_mixed: int = 8,
  all_pairs: bool = False,
  alpha: float = 2.0,
  lambda_mode: str = 'batch',
  mask_mode: str = 'own',
  weight: float = 0.4,
  renormalize: bool = True,
) -> Array:
  """Notebook API: Metrix at embedding level for any loss, scalar (jit-safe with static keyword arguments).

  loss: a `losses.Loss` or a registry name (default hyperparameters). embeddings [B, D], labels [B] int,
  key: PRNG key. all_pairs=True uses every pair of M(a) through the closed form (num_mixed ignored).
  """
  if isinstance(loss, str):
    loss = losses_lib.get(loss)
  settings = MixSettings(
    level='embedding',
    pair_sets=tuple(pair_sets),
    num_mixed=num_mixed,
    all_pairs=bool(all_pairs),
    alpha=alpha,
    lambda_mode=lambda_mode,
    mask_mode=mask_mode,
    weight=weight,
    renormalize=renormalize,
  )
  plan = plan_for(key, loss, labels, settings, embeddings=embeddings, proxies=proxies)
  total, _ = objective(loss, embeddings, labels, plan, proxies=proxies, weight=weight, renormalize=renormalize)
  return total


__all__ = [
  'MixPlan',
  'MixSettings',
  'PAIR_SETS',
  'LAMBDA_MODES',
  'MASK_MODES',
  'LEVELS',
  'pair_masks',
  'plan_for',
  'pair_set_tensor',
  'sample_pairs',
  'sample_lambda',
  'soft_targets',
  'make_plan',
  'all_pairs_plan',
  'mix',
  'mix_embeddings',
  'similarity_to_mixed',
  'closed_form_similarity',
  'mixed_terms',
  'mixed_loss',
  'objective',
  'metrix_loss',
]
