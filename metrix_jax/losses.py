"""The paper's generic metric-learning loss and its named instances (pure jax; notebook-safe).

Everything is built as   embeddings -> (sim, targets, mask) -> generic_loss -> reduction:

* `sim` [A, N]: cosine similarities of A anchors to N candidates (anchors are the embeddings, or the proxies
  for Proxy Anchor);
* `targets` [A, N]: soft labels in [0, 1] (1 positive, 0 negative, in between: a Metrix mixed item);
* `mask` [A, N] bool: which candidates belong to U(a) (all pairs i != j, or the mined pairs).

`generic_loss` evaluates, per anchor (spec section 1.1, the paper's generic form),

    l(a) = tau( sigma_pos( sum_j mask*y*rho_pos(s_aj) ) + sigma_neg( sum_j mask*(1-y)*rho_neg(s_aj) ) ).

rho and sigma are small composable pieces. Where rho is exponential (`Exponential`, `CirclePos`, ...: any
object with a `log(s)` method) and sigma is a logarithm (`Log1p`, `Log`), the pair is evaluated in
log-sum-exp form, so Multi-Similarity at scale 75 or Circle at gamma 80 neither overflows float32 nor loses its
gradient. Plain callables are accepted as well and are evaluated literally.

Named losses take embeddings [B, D] (any float dtype; L2-normalised inside; computed in float32, or float64
when given float64) and integer labels [B], and match pytorch-metric-learning 2.9.0 (PML) with the same
hyperparameters (`form='pml'`, the default: that is what the official Metrix code ran) or the paper's
per-anchor form (`form='paper'`: per-anchor sums, mean over anchors; spec section 9).

For Metrix, `get(name, **hparams)` returns a `Loss` whose `clean_terms` and `from_similarity` expose the
pieces (see DESIGN.md): the Metrix objective is `from_similarity(clean) + w * from_similarity(mixed)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST
FORMS = ('pml', 'paper')


# ----------------------------------------------------------------------------------------------------------
# Geometry.
# ----------------------------------------------------------------------------------------------------------
def compute_dtype(*arrays) -> jnp.dtype:
  """float64 if any input is float64, else float32 (bfloat16/float16 inputs are computed in float32)."""
  dtype = jnp.float32
  for x in arrays:
    if x is not None and jnp.asarray(x).dtype == jnp.float64:
      dtype = jnp.float64
  return jnp.dtype(dtype)


def l2_normalize(x: Array, *, eps: float = 1e-12) -> Array:
  """x / max(||x||, eps) along the last axis (as torch.nn.functional.normalize). Finite gradient at x = 0."""
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  norm = jnp.sqrt(jnp.maximum(sq, eps * eps))
  return x / norm


def cosine_similarity(queries: Array, references: Optional[Array] = None) -> Array:
  """[Q, D] x [R, D] -> [Q, R] cosine similarity (PML CosineSimilarity), full-precision matmul.

  The inputs are L2-normalised here; computed in float32 (float64 for float64 inputs).
  """
  dtype = compute_dtype(queries, references)
  q = l2_normalize(jnp.asarray(queries, dtype))
  r = q if references is None else l2_normalize(jnp.asarray(references, dtype))
  return jnp.matmul(q, r.T, precision=_HIGHEST)


def distance_from_similarity(sim: Array) -> Array:
  """Euclidean distance of unit vectors, d = sqrt(max(2 - 2 s, 0)) (PML LpDistance on normalised inputs).

  Safe square root: exactly 0 with a zero (not NaN) gradient where s >= 1 (identical embeddings).
  """
  sq = jnp.maximum(2.0 - 2.0 * sim, 0.0)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


# ----------------------------------------------------------------------------------------------------------
# rho pieces: s [A, N] -> rho(s) [A, N]. Exponential ones define log(s) and trigger log-sum-exp evaluation.
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Exponential:
  """rho(s) = exp(scale * (s - offset)).

  MS (PML alpha/beta/base): rho_pos = Exponential(-alpha, base), rho_neg = Exponential(beta, base);
  Proxy Anchor: rho_pos = Exponential(-alpha, margin), rho_neg = Exponential(alpha, -margin).
  """

  scale: float
  offset: float = 0.0

  def log(self, s: Array) -> Array:
    return self.scale * (s - self.offset)

  def __call__(self, s: Array) -> Array:
    return jnp.exp(self.log(s))


@dataclasses.dataclass(frozen=True)
class CirclePos:
  """Circle loss positive: log rho(s) = -gamma [1 + m - sg(s)]_+ (s - (1 - m)) (PML CircleLoss, sg = detach)."""

  m: float
  gamma: float

  def log(self, s: Array) -> Array:
    weight = jax.nn.relu(1.0 + self.m - jax.lax.stop_gradient(s))
    return -self.gamma * weight * (s - (1.0 - self.m))

  def __call__(self, s: Array) -> Array:
    return jnp.exp(self.log(s))


@dataclasses.dataclass(frozen=True)
class CircleNeg:
  """Circle loss negative: log rho(s) = gamma [sg(s) + m]_+ (s - m) (PML CircleLoss)."""

  m: float
  gamma: float

  def log(self, s: Array) -> Array:
    weight = jax.nn.relu(jax.lax.stop_gradient(s) + self.m)
    return self.gamma * weight * (s - self.m)

  def __call__(self, s: Array) -> Array:
    return jnp.exp(self.log(s))


@dataclasses.dataclass(frozen=True)
class ExpDistance:
  """rho(s) = exp(sign * (d(s) - margin)), d the Euclidean distance of unit vectors (lifted structure)."""

  sign: float
  margin: float

  def log(self, s: Array) -> Array:
    return self.sign * (distance_from_similarity(s) - self.margin)

  def __call__(self, s: Array) -> Array:
    return jnp.exp(self.log(s))


@dataclasses.dataclass(frozen=True)
class DistanceHinge:
  """rho(s) = [d(s) - margin]_+ (contrastive positive, PML ContrastiveLoss pos_calc; decreasing in s)."""

  margin: float = 0.0

  def __call__(self, s: Array) -> Array:
    return jax.nn.relu(distance_from_similarity(s) - self.margin)


@dataclasses.dataclass(frozen=True)
class MarginMinusDistance:
  """rho(s) = [margin - d(s)]_+ (contrastive negative, PML ContrastiveLoss neg_calc; increasing in s)."""

  margin: float = 0.5

  def __call__(self, s: Array) -> Array:
    return jax.nn.relu(self.margin - distance_from_similarity(s))


@dataclasses.dataclass(frozen=True)
class NegSimilarity:
  """rho(s) = -s (the paper's contrastive positive, spec section 1.1)."""

  def __call__(self, s: Array) -> Array:
    return -s


@dataclasses.dataclass(frozen=True)
class SimilarityHinge:
  """rho(s) = [s - margin]_+ (the paper's contrastive negative, spec section 1.1)."""

  margin: float

  def __call__(self, s: Array) -> Array:
    return jax.nn.relu(s - self.margin)


# ----------------------------------------------------------------------------------------------------------
# sigma pieces: per-anchor sum [A] -> [A].
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Log1p:
  """sigma(x) = log(1 + x) / scale (MS: scale = alpha or beta; Proxy Anchor: scale = 1). Empty sum -> 0."""

  scale: float = 1.0

  def __call__(self, x: Array) -> Array:
    return jnp.log1p(x) / self.scale


@dataclasses.dataclass(frozen=True)
class Log:
  """sigma(x) = log(x) / scale. An empty sum gives log 0 = -inf (/scale), or `empty` when given.

  Circle: Log() with tau = softplus (empty side -> loss 0, as PML zeroes such rows). PML's masked
  logsumexp convention (empty -> 0, lifted structure) is Log(empty=0.0). ProxyNCA: sigma_pos = Log(-1).
  """

  scale: float = 1.0
  empty: Optional[float] = None

  def __call__(self, x: Array) -> Array:
    has = x > 0
    value = jnp.log(jnp.where(has, x, 1.0)) / self.scale
    return jnp.where(has, value, self._empty_value())

  def _empty_value(self) -> float:
    if self.empty is not None:
      return self.empty
    return -math.inf / self.scale


def _is_exponential(rho) -> bool:
  return callable(getattr(rho, 'log', None))


def _masked_lse(logits: Array, weights: Array, *, add_one: bool) -> tuple[Array, Array]:
  """log(sum_j w_j exp(z_j) [+ 1]) over the last axis, only where w > 0; returns (value, any_active).

  Stable and gradient-safe: inactive entries never reach exp, the shift is a stop-gradient max, the zero
  logit of log1p is explicit. Where nothing is active and add_one is False the value is 0 (caller decides).
  """
  active = weights > 0
  z = jnp.where(active, logits + jnp.log(jnp.where(active, weights, 1.0)), -jnp.inf)
  shift = jnp.max(z, axis=-1)
  if add_one:
    shift = jnp.maximum(shift, 0.0)
  shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(shift), shift, 0.0))
  total = jnp.sum(jnp.where(active, jnp.exp(z - shift[..., None]), 0.0), axis=-1)
  if add_one:
    total = total + jnp.exp(-shift)
  any_active = jnp.any(active, axis=-1)
  safe = any_active | add_one
  return jnp.where(safe, jnp.log(jnp.where(safe, total, 1.0)) + shift, 0.0), any_active


def _weighted_rho(sim: Array, weights: Array, rho: Callable) -> Array:
  """Element-wise w * rho(s), exactly 0 (with a zero gradient) where w = 0, even if rho(s) is inf there."""
  active = weights > 0
  safe_sim = jnp.where(active, sim, 0.0)
  return jnp.where(active, weights * rho(safe_sim), 0.0)


def _side(sim: Array, weights: Array, rho: Callable, sigma: Optional[Callable]) -> Array:
  """sigma(sum_j w_j rho(s_j)) per anchor, in log-sum-exp form when rho is exponential and sigma a log."""
  if isinstance(sigma, (Log1p, Log)) and _is_exponential(rho):
    active = weights > 0
    logits = rho.log(jnp.where(active, sim, 0.0))
    lse, any_active = _masked_lse(logits, weights, add_one=isinstance(sigma, Log1p))
    if isinstance(sigma, Log1p):
      return lse / sigma.scale
    return jnp.where(any_active, lse / sigma.scale, sigma._empty_value())  # pylint: disable=protected-access
  total = jnp.sum(_weighted_rho(sim, weights, rho), axis=-1)
  return total if sigma is None else sigma(total)


def _check_same_shape(sim, targets, mask) -> None:
  shapes = {'sim': jnp.shape(sim), 'targets': jnp.shape(targets), 'mask': jnp.shape(mask)}
  if len(set(shapes.values())) != 1 or len(shapes['sim']) < 1:
    raise ValueError(
      f'generic_loss needs sim, targets and mask of one shape [..., A, N]; got {shapes}. '
      'Broadcast targets/mask to sim.shape before the call (e.g. jnp.broadcast_to).'
    )


def generic_terms(
  sim: Array,
  targets: Array,
  mask: Array,
  *,
  rho_pos: Callable,
  rho_neg: Callable,
  sigma_pos: Optional[Callable] = None,
  sigma_neg: Optional[Callable] = None,
) -> tuple[Array, Array]:
  """The two sides of the generic loss: (sigma_pos(sum mask*y*rho_pos), sigma_neg(sum mask*(1-y)*rho_neg)).

  Args/shapes as `generic_loss`; returns two [..., A] arrays (float32, or float64 for float64 inputs).
  """
  _check_same_shape(sim, targets, mask)
  dtype = compute_dtype(sim, targets)
  sim = jnp.asarray(sim, dtype)
  targets = jnp.asarray(targets, dtype)
  mask = jnp.asarray(mask, bool)
  w_pos = jnp.where(mask, targets, 0.0)
  w_neg = jnp.where(mask, 1.0 - targets, 0.0)
  return _side(sim, w_pos, rho_pos, sigma_pos), _side(sim, w_neg, rho_neg, sigma_neg)


def generic_loss(
  sim: Array,
  targets: Array,
  mask: Array,
  *,
  rho_pos: Callable,
  rho_neg: Callable,
  sigma_pos: Optional[Callable] = None,
  sigma_neg: Optional[Callable] = None,
  tau: Optional[Callable] = None,
) -> Array:
  """Per-anchor generic loss (paper, spec section 1.1) with soft labels.

      l(a) = tau( sigma_pos( sum_j mask*y*rho_pos(s_aj) ) + sigma_neg( sum_j mask*(1-y)*rho_neg(s_aj) ) )

  Args:
    sim: [..., A, N] float similarities of A anchors to N candidates (any float dtype; computed in float32,
      float64 kept).
    targets: [..., A, N] soft labels y in [0, 1].
    mask: [..., A, N] bool, the candidates U(a) of each anchor.
    rho_pos, rho_neg: s -> rho(s) element-wise (decreasing / increasing). Pieces with a `log` method
      (`Exponential`, `CirclePos`, ...) are evaluated in log space when paired with `Log1p`/`Log`.
    sigma_pos, sigma_neg: per-anchor transforms of the sums (None = identity).
    tau: transform of their sum (None = identity), e.g. `jax.nn.softplus` (Circle).
  Returns:
    [..., A] per-anchor loss. An empty masked sum contributes rho-sum 0 (so Log1p gives 0, Log gives -inf
    or its `empty` value). jit/grad/vmap safe; no NaN from masked entries.
  """
  pos, neg = generic_terms(
    sim, targets, mask, rho_pos=rho_pos, rho_neg=rho_neg, sigma_pos=sigma_pos, sigma_neg=sigma_neg
  )
  total = pos + neg
  return total if tau is None else tau(total)


# ----------------------------------------------------------------------------------------------------------
# Reductions.
# ----------------------------------------------------------------------------------------------------------
def nan_if_nonfinite(value: Array, *arrays: Optional[Array]) -> Array:
  """`value`, or NaN when any of `arrays` (embeddings, proxies) holds a NaN or an infinity.

  Masks and mining drop a row whose similarities are NaN (a comparison with NaN is False), so a bad embedding
  would otherwise give a finite loss with NaN gradients. Exact for finite inputs: value + sum(0 * x) adds 0.
  """
  value = jnp.asarray(value)
  for x in arrays:
    if x is not None:
      value = value + jnp.sum(jnp.asarray(x).astype(value.dtype) * 0)
  return value


def _propagates_nonfinite(loss_fn: Callable) -> Callable:
  """A named loss `fn(embeddings, labels[, proxies], **hparams)` whose value is NaN for non-finite inputs."""

  @functools.wraps(loss_fn)
  def wrapped(embeddings, labels, *args, **kwargs):
    proxies = args[0] if args else kwargs.get('proxies')
    return nan_if_nonfinite(loss_fn(embeddings, labels, *args, **kwargs), embeddings, proxies)

  return wrapped


def avg_non_zero(values: Array) -> Array:
  """Mean of the entries > 0 (0 if none): PML AvgNonZeroReducer."""
  nonzero = values > 0
  count = jnp.sum(nonzero)
  return jnp.sum(jnp.where(nonzero, values, 0.0)) / jnp.maximum(count, 1)


def _masked_mean(values: Array, keep: Array) -> Array:
  return jnp.sum(jnp.where(keep, values, 0.0)) / jnp.maximum(jnp.sum(keep), 1)


# ----------------------------------------------------------------------------------------------------------
# Input checks and clean terms.
# ----------------------------------------------------------------------------------------------------------
def _check_embeddings(embeddings, labels, proxies=None) -> None:
  e_shape, l_shape = jnp.shape(embeddings), jnp.shape(labels)
  if len(e_shape) != 2:
    raise ValueError(
      f'embeddings must be [B, D]; got shape {e_shape}. Flatten extra axes first (embeddings.reshape(-1, D)).'
    )
  if len(l_shape) != 1 or l_shape[0] != e_shape[0]:
    raise ValueError(
      f'labels must be [B] with B = embeddings.shape[0] = {e_shape[0]}; got shape {l_shape}. '
      'Pass one integer class label per embedding row.'
    )
  if not jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
    raise ValueError(f'labels must be integers; got dtype {jnp.asarray(labels).dtype}. Use labels.astype(jnp.int32).')
  if proxies is not None:
    p_shape = jnp.shape(proxies)
    if len(p_shape) != 2 or p_shape[1] != e_shape[1]:
      raise ValueError(
        f'proxies must be [C, D] with D = embeddings.shape[1] = {e_shape[1]}; got shape '
        f'{p_shape}. Create them with losses.init_proxies(key, num_classes, embedding_dim).'
      )


def same_label(labels: Array, other_labels: Optional[Array] = None) -> Array:
  """[B] x [N] int -> [B, N] bool, labels[i] == other_labels[j]."""
  other = labels if other_labels is None else other_labels
  return jnp.asarray(labels)[:, None] == jnp.asarray(other)[None, :]


def all_pairs_terms(embeddings: Array, labels: Array) -> tuple[Array, Array, Array]:
  """Embeddings [B, D], labels [B] -> (sim [B, B], targets [B, B] 0/1, mask [B, B] = all pairs i != j).

  PML's get_all_pairs_indices: every ordered pair counts (spec section 1.2).
  """
  _check_embeddings(embeddings, labels)
  sim = cosine_similarity(embeddings)
  targets = same_label(labels).astype(sim.dtype)
  mask = ~jnp.eye(sim.shape[0], dtype=bool)
  return sim, targets, mask


def multi_similarity_mining(sim: Array, targets: Array, mask: Array, *, epsilon: float) -> Array:
  """PML MultiSimilarityMiner on cosine similarity: [A, N] -> mined mask [A, N] bool (no gradient).

  Keeps positive p of anchor i if s_ip - epsilon < max_n s_in, negative n if s_in + epsilon > min_p s_ip
  (strict; spec section 1.4). An anchor without positives keeps no negatives and vice versa.
  """
  s = jax.lax.stop_gradient(sim)
  pos = mask & (targets >= 1)
  neg = mask & (targets <= 0)
  hardest_neg = jnp.max(jnp.where(neg, s, -jnp.inf), axis=-1, keepdims=True)
  hardest_pos = jnp.min(jnp.where(pos, s, jnp.inf), axis=-1, keepdims=True)
  keep_pos = pos & (s - epsilon < hardest_neg)
  keep_neg = neg & (s + epsilon > hardest_pos)
  return keep_pos | keep_neg


def proxy_terms(embeddings: Array, labels: Array, proxies: Array) -> tuple[Array, Array, Array]:
  """[B, D], [B], [C, D] -> (sim [C, B] proxies x embeddings, targets [C, B] one-hot, mask [C, B] all)."""
  _check_embeddings(embeddings, labels, proxies)
  sim = cosine_similarity(proxies, embeddings)
  targets = same_label(jnp.arange(jnp.shape(proxies)[0]), labels).astype(sim.dtype)
  return sim, targets, jnp.ones(sim.shape, bool)


def init_proxies(key: Array, num_classes: int, embedding_dim: int, *, dtype=jnp.float32) -> Array:
  """Proxies [C, D] ~ N(0, 2/C): torch kaiming_normal_(mode='fan_out') on a (C, D) tensor (PML, spec 1.5)."""
  return jax.random.normal(key, (num_classes, embedding_dim), dtype) * math.sqrt(2.0 / num_classes)


# ----------------------------------------------------------------------------------------------------------
# Named losses: clean terms + from_similarity (the loss's own reduction; soft targets allowed).
# ----------------------------------------------------------------------------------------------------------
def _check_form(form: str) -> None:
  if form not in FORMS:
    raise ValueError(
      f'form={form!r} is not one of {FORMS}: "pml" matches pytorch-metric-learning (official '
      'code), "paper" is per-anchor sums with a mean over anchors (spec section 9).'
    )


def _dtype_sim(sim, targets, mask):
  dtype = compute_dtype(sim, targets)
  return jnp.asarray(sim, dtype), jnp.asarray(targets, dtype), jnp.asarray(mask, bool)


# Contrastive ---------------------------------------------------------------------------------------------
def contrastive_pieces(*, pos_margin: float = 0.0, neg_margin: float = 0.5, form: str = 'pml') -> dict:
  """rho pieces of the contrastive loss. pml: d - pos_margin, [neg_margin - d]_+ on Euclidean distance;
  paper: -s, [s - m]_+ on cosine with m = 1 - neg_margin^2 / 2 (the same boundary, 0.5 -> 0.875)."""
  _check_form(form)
  if form == 'pml':
    return dict(rho_pos=DistanceHinge(pos_margin), rho_neg=MarginMinusDistance(neg_margin))
  if pos_margin != 0.0:
    raise ValueError(
      f'form="paper" contrastive uses rho_pos(s) = -s (no positive margin); got pos_margin='
      f'{pos_margin}. Use pos_margin=0.0, or form="pml".'
    )
  return dict(rho_pos=NegSimilarity(), rho_neg=SimilarityHinge(1.0 - neg_margin**2 / 2.0))


def contrastive_from_similarity(
  sim: Array, targets: Array, mask: Array, *, pos_margin: float = 0.0, neg_margin: float = 0.5, form: str = 'pml'
) -> Array:
  """Contrastive reduction. pml: AvgNonZero over positive pair terms + AvgNonZero over negative pair terms
  (PML ContrastiveLoss + AvgNonZeroReducer; pair terms y*rho_pos, (1-y)*rho_neg). paper: per-anchor sums
  (generic_loss, sigma = tau = id), mean over anchors."""
  sim, targets, mask = _dtype_sim(sim, targets, mask)
  pieces = contrastive_pieces(pos_margin=pos_margin, neg_margin=neg_margin, form=form)
  if form == 'paper':
    return jnp.mean(generic_loss(sim, targets, mask, **pieces))
  pos = _weighted_rho(sim, jnp.where(mask, targets, 0.0), pieces['rho_pos'])
  neg = _weighted_rho(sim, jnp.where(mask, 1.0 - targets, 0.0), pieces['rho_neg'])
  return avg_non_zero(pos) + avg_non_zero(neg)


def contrastive_clean_terms(embeddings, labels, proxies=None, **_) -> tuple[Array, Array, Array]:
  del proxies
  return all_pairs_terms(embeddings, labels)


@_propagates_nonfinite
def contrastive_loss(
  embeddings: Array, labels: Array, *, pos_margin: float = 0.0, neg_margin: float = 0.5, form: str = 'pml'
) -> Array:
  """Contrastive loss, scalar. embeddings [B, D] float, labels [B] int.

  form='pml': PML ContrastiveLoss(pos_margin, neg_margin) with LpDistance (Euclidean, normalised) and its
  AvgNonZeroReducer: mean{[d - pos_margin]_+ > 0} + mean{[neg_margin - d]_+ > 0} over all ordered pairs
  (spec 1.3; the official code uses neg_margin 0.5). form='paper': per-anchor sum of -s over positives and
  [s - (1 - neg_margin^2/2)]_+ over negatives, mean over anchors (spec 1.1, section 9).
  """
  return contrastive_from_similarity(
    *all_pairs_terms(embeddings, labels), pos_margin=pos_margin, neg_margin=neg_margin, form=form
  )


# Multi-Similarity ----------------------------------------------------------------------------------------
def multi_similarity_pieces(*, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5) -> dict:
  """MS in generic form: rho_pos = e^{-alpha(s-base)}, rho_neg = e^{beta(s-base)}, sigma = log(1+x)/scale."""
  return dict(
    rho_pos=Exponential(-alpha, base), rho_neg=Exponential(beta, base), sigma_pos=Log1p(alpha), sigma_neg=Log1p(beta)
  )


def multi_similarity_from_similarity(
  sim,
  targets,
  mask,
  *,
  alpha: float = 2.0,
  beta: float = 50.0,
  base: float = 0.5,
  epsilon: Optional[float] = 0.1,
  form: str = 'pml',
) -> Array:
  """MS reduction: mean over all A rows of the per-anchor generic loss (PML MultiSimilarityLoss with its
  MeanReducer; identical to the paper form). `mask` should already be mined (see clean_terms)."""
  del epsilon
  _check_form(form)
  sim, targets, mask = _dtype_sim(sim, targets, mask)
  return jnp.mean(generic_loss(sim, targets, mask, **multi_similarity_pieces(alpha=alpha, beta=beta, base=base)))


def multi_similarity_clean_terms(
  embeddings, labels, proxies=None, *, epsilon: Optional[float] = 0.1, **_
) -> tuple[Array, Array, Array]:
  """All pairs, then the MS miner (epsilon=None: no mining)."""
  del proxies
  sim, targets, mask = all_pairs_terms(embeddings, labels)
  if epsilon is not None:
    mask = multi_similarity_mining(sim, targets, mask, epsilon=epsilon)
  return sim, targets, mask


@_propagates_nonfinite
def multi_similarity_loss(
  embeddings: Array,
  labels: Array,
  *,
  alpha: float = 2.0,
  beta: float = 50.0,
  base: float = 0.5,
  epsilon: Optional[float] = 0.1,
  form: str = 'pml',
) -> Array:
  """Multi-Similarity loss, scalar: PML MultiSimilarityLoss(alpha, beta, base) fed by
  MultiSimilarityMiner(epsilon) (epsilon=None: all pairs). Per anchor
  (1/alpha) log(1 + sum_p e^{-alpha(s-base)}) + (1/beta) log(1 + sum_n e^{beta(s-base)}), mean over all rows
  (spec 1.4; paper names: beta = alpha, gamma = beta, m = base). Both forms coincide.
  """
  terms = multi_similarity_clean_terms(embeddings, labels, epsilon=epsilon)
  return multi_similarity_from_similarity(*terms, alpha=alpha, beta=beta, base=base, form=form)


# Proxy Anchor --------------------------------------------------------------------------------------------
def proxy_anchor_pieces(*, alpha: float = 32.0, margin: float = 0.1) -> dict:
  return dict(
    rho_pos=Exponential(-alpha, margin), rho_neg=Exponential(alpha, -margin), sigma_pos=Log1p(), sigma_neg=Log1p()
  )


def proxy_anchor_from_similarity(
  sim, targets, mask, *, alpha: float = 32.0, margin: float = 0.1, form: str = 'pml'
) -> Array:
  """Proxy Anchor reduction on sim [C, N] (proxies are the anchors). pml (PML ProxyAnchorLoss +
  DivisorReducer): sum_c pos(c) / |P+| + sum_c neg(c) / C, P+ = proxies with a positive (mask*y > 0);
  paper: mean over the C proxies of pos(c) + neg(c)."""
  _check_form(form)
  sim, targets, mask = _dtype_sim(sim, targets, mask)
  pos, neg = generic_terms(sim, targets, mask, **proxy_anchor_pieces(alpha=alpha, margin=margin))
  num_proxies = sim.shape[-2]
  if form == 'paper':
    return jnp.sum(pos + neg, axis=-1) / num_proxies
  with_pos = jnp.sum(jnp.any(mask & (targets > 0), axis=-1), axis=-1)
  return jnp.sum(pos, axis=-1) / jnp.maximum(with_pos, 1) + jnp.sum(neg, axis=-1) / num_proxies


def proxy_anchor_clean_terms(embeddings, labels, proxies=None, **_) -> tuple[Array, Array, Array]:
  if proxies is None:
    raise ValueError('proxy_anchor needs proxies [C, D]; create them with losses.init_proxies(key, C, D).')
  return proxy_terms(embeddings, labels, proxies)


@_propagates_nonfinite
def proxy_anchor_loss(
  embeddings: Array, labels: Array, proxies: Array, *, alpha: float = 32.0, margin: float = 0.1, form: str = 'pml'
) -> Array:
  """Proxy Anchor loss, scalar: PML ProxyAnchorLoss(margin, alpha). embeddings [B, D], labels [B] int in
  [0, C), proxies [C, D] (normalised inside). Spec 1.5:
  (1/|P+|) sum_{c in P+} log(1 + sum_{x in c} e^{-alpha(s-margin)}) + (1/C) sum_c log(1 + sum_{x not in c}
  e^{alpha(s+margin)})."""
  terms = proxy_anchor_clean_terms(embeddings, labels, proxies)
  return proxy_anchor_from_similarity(*terms, alpha=alpha, margin=margin, form=form)


# Circle --------------------------------------------------------------------------------------------------
def circle_pieces(*, m: float = 0.4, gamma: float = 80.0) -> dict:
  """Circle in generic form: rho = CirclePos/CircleNeg, sigma = log, tau = softplus."""
  return dict(
    rho_pos=CirclePos(m, gamma), rho_neg=CircleNeg(m, gamma), sigma_pos=Log(), sigma_neg=Log(), tau=jax.nn.softplus
  )


def circle_from_similarity(sim, targets, mask, *, m: float = 0.4, gamma: float = 80.0, form: str = 'pml') -> Array:
  """Circle reduction: pml: AvgNonZero over anchors (PML CircleLoss + AvgNonZeroReducer; anchors missing a
  positive or a negative give 0); paper: mean over anchors."""
  _check_form(form)
  sim, targets, mask = _dtype_sim(sim, targets, mask)
  per_anchor = generic_loss(sim, targets, mask, **circle_pieces(m=m, gamma=gamma))
  return avg_non_zero(per_anchor) if form == 'pml' else jnp.mean(per_anchor)


def circle_clean_terms(embeddings, labels, proxies=None, **_) -> tuple[Array, Array, Array]:
  del proxies
  return all_pairs_terms(embeddings, labels)


@_propagates_nonfinite
def circle_loss(embeddings: Array, labels: Array, *, m: float = 0.4, gamma: float = 80.0, form: str = 'pml') -> Array:
  """Circle loss (Sun et al. 2020), scalar: PML CircleLoss(m, gamma). Per anchor
  softplus(logsumexp_p(-gamma [1+m-s]_+ (s-1+m)) + logsumexp_n(gamma [s+m]_+ (s-m))) (weights detached)."""
  return circle_from_similarity(*all_pairs_terms(embeddings, labels), m=m, gamma=gamma, form=form)


# ProxyNCA (extra) ----------------------------------------------------------------------------------------
def proxy_nca_pieces(*, softmax_scale: float = 1.0) -> dict:
  """ProxyNCA in generic form: rho = e^{2k(s-1)} = e^{-k d^2} both sides, sigma_pos = -log, sigma_neg = log,
  tau = softplus:  -log(sum_pos e^z / sum_all e^z) = softplus(log sum_neg e^z - log sum_pos e^z)."""
  rho = Exponential(2.0 * softmax_scale, 1.0)
  return dict(rho_pos=rho, rho_neg=rho, sigma_pos=Log(-1.0), sigma_neg=Log(), tau=jax.nn.softplus)


def proxy_nca_from_similarity(sim, targets, mask, *, softmax_scale: float = 1.0, form: str = 'pml') -> Array:
  """ProxyNCA reduction on sim [B, C] (embeddings are the anchors, proxies the candidates): mean over the
  rows that have a positive (PML NCALoss drops rows whose positive probability is 0; both forms)."""
  _check_form(form)
  sim, targets, mask = _dtype_sim(sim, targets, mask)
  pos, neg = generic_terms(
    sim, targets, mask, **{k: v for k, v in proxy_nca_pieces(softmax_scale=softmax_scale).items() if k != 'tau'}
  )
  has_pos = jnp.any(mask & (targets > 0), axis=-1)
  per_row = jax.nn.softplus(jnp.where(has_pos, pos, 0.0) + neg)
  return _masked_mean(per_row, has_pos)


def proxy_nca_clean_terms(embeddings, labels, proxies=None, **_) -> tuple[Array, Array, Array]:
  if proxies is None:
    raise ValueError('proxy_nca needs proxies [C, D]; create them with losses.init_proxies(key, C, D).')
  sim, targets, mask = proxy_terms(embeddings, labels, proxies)
  return sim.T, targets.T, mask.T


@_propagates_nonfinite
def proxy_nca_loss(
  embeddings: Array, labels: Array, proxies: Array, *, softmax_scale: float = 1.0, form: str = 'pml'
) -> Array:
  """ProxyNCA (Movshovitz-Attias et al. 2017), scalar: PML ProxyNCALoss(softmax_scale) with its default
  LpDistance(power=2) on normalised embeddings and proxies: mean_x -log softmax_c(-k ||x - p_c||^2)[y_x]."""
  terms = proxy_nca_clean_terms(embeddings, labels, proxies)
  return proxy_nca_from_similarity(*terms, softmax_scale=softmax_scale, form=form)


# Generalized lifted structure (extra) --------------------------------------------------------------------
def lifted_structure_pieces(*, pos_margin: float = 0.0, neg_margin: float = 1.0) -> dict:
  """Generalized lifted structure in generic form: rho_pos = e^{d - pos_margin}, rho_neg = e^{neg_margin - d},
  sigma = log with PML's empty -> 0, tau = relu."""
  return dict(
    rho_pos=ExpDistance(1.0, pos_margin),
    rho_neg=ExpDistance(-1.0, neg_margin),
    sigma_pos=Log(empty=0.0),
    sigma_neg=Log(empty=0.0),
    tau=jax.nn.relu,
  )


def lifted_structure_from_similarity(
  sim, targets, mask, *, pos_margin: float = 0.0, neg_margin: float = 1.0, form: str = 'pml'
) -> Array:
  """Mean over all rows of relu(log sum_p e^{d-pos_margin} + log sum_n e^{neg_margin-d}) (both forms)."""
  _check_form(form)
  sim, targets, mask = _dtype_sim(sim, targets, mask)
  return jnp.mean(
    generic_loss(sim, targets, mask, **lifted_structure_pieces(pos_margin=pos_margin, neg_margin=neg_margin))
  )


def lifted_structure_clean_terms(embeddings, labels, proxies=None, **_) -> tuple[Array, Array, Array]:
  del proxies
  return all_pairs_terms(embeddings, labels)


@_propagates_nonfinite
def lifted_structure_loss(
  embeddings: Array, labels: Array, *, pos_margin: float = 0.0, neg_margin: float = 1.0, form: str = 'pml'
) -> Array:
  """Generalized lifted structure loss (Hermans et al. 2017, eq. 4), scalar: PML
  GeneralizedLiftedStructureLoss(neg_margin, pos_margin) with Euclidean distance and MeanReducer."""
  return lifted_structure_from_similarity(
    *all_pairs_terms(embeddings, labels), pos_margin=pos_margin, neg_margin=neg_margin, form=form
  )


# ----------------------------------------------------------------------------------------------------------
# Registry and the Loss object Metrix composes with.
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Loss:
  """A named loss split into the pieces Metrix needs (DESIGN.md contract).

  Attributes:
    name: registry name.
    hparams: the hyperparameters in use (defaults filled in).
    uses_proxies: True for proxy-based losses (pass proxies [C, D]).
    proxies_are_anchors: True if the rows of `sim` are the proxies (Proxy Anchor), False if the rows are the
      embeddings and the proxies the candidates (ProxyNCA). Only meaningful when uses_proxies.
    mines: True if `clean_terms` mines pairs from the embeddings (Multi-Similarity with epsilon): Metrix's pair
      sets then depend on the embeddings, not on the labels alone (`mixup.pair_masks`).
  Methods:
    clean_terms(embeddings [B, D], labels [B], proxies=None) -> (sim [A, N], targets [A, N], mask [A, N])
      with mining applied (mask = mined pairs).
    from_similarity(sim, targets, mask) -> scalar, the loss's own reduction (soft targets allowed).
    __call__(embeddings, labels, proxies=None) -> scalar = from_similarity(*clean_terms(...)).
  """

  name: str
  hparams: tuple
  uses_proxies: bool
  proxies_are_anchors: bool
  mines: bool
  _clean_terms: Callable = dataclasses.field(repr=False)
  _from_similarity: Callable = dataclasses.field(repr=False)

  @property
  def hyperparameters(self) -> dict:
    return dict(self.hparams)

  def clean_terms(self, embeddings: Array, labels: Array, proxies: Optional[Array] = None):
    if self.uses_proxies and proxies is None:
      raise ValueError(f'{self.name} needs proxies [C, D]; create them with losses.init_proxies(key, C, D).')
    return self._clean_terms(embeddings, labels, proxies)

  def from_similarity(self, sim: Array, targets: Array, mask: Array) -> Array:
    _check_same_shape(sim, targets, mask)
    return self._from_similarity(sim, targets, mask)

  def __call__(self, embeddings: Array, labels: Array, proxies: Optional[Array] = None) -> Array:
    """The clean loss, scalar; NaN when an embedding or proxy is not finite (`nan_if_nonfinite`)."""
    return nan_if_nonfinite(self.from_similarity(*self.clean_terms(embeddings, labels, proxies)), embeddings, proxies)


@dataclasses.dataclass(frozen=True)
class _Entry:
  clean_terms: Callable
  from_similarity: Callable
  defaults: Mapping[str, Any]
  clean_keys: tuple  # hyperparameters clean_terms needs
  uses_proxies: bool = False
  proxies_are_anchors: bool = False
  miner_key: Optional[str] = None  # the hyperparameter that switches the loss's miner on (None: off)


_REGISTRY = {
  'contrastive': _Entry(
    contrastive_clean_terms, contrastive_from_similarity, dict(pos_margin=0.0, neg_margin=0.5, form='pml'), ()
  ),
  'multi_similarity': _Entry(
    multi_similarity_clean_terms,
    multi_similarity_from_similarity,
    dict(alpha=2.0, beta=50.0, base=0.5, epsilon=0.1, form='pml'),
    ('epsilon',),
    miner_key='epsilon',
  ),
  'proxy_anchor': _Entry(
    proxy_anchor_clean_terms, proxy_anchor_from_similarity, dict(alpha=32.0, margin=0.1, form='pml'), (), True, True
  ),
  'circle': _Entry(circle_clean_terms, circle_from_similarity, dict(m=0.4, gamma=80.0, form='pml'), ()),
  'proxy_nca': _Entry(
    proxy_nca_clean_terms, proxy_nca_from_similarity, dict(softmax_scale=1.0, form='pml'), (), True, False
  ),
  'lifted_structure': _Entry(
    lifted_structure_clean_terms, lifted_structure_from_similarity, dict(pos_margin=0.0, neg_margin=1.0, form='pml'), ()
  ),
}
LOSS_NAMES = tuple(_REGISTRY)
PROXY_LOSS_NAMES = tuple(n for n, e in _REGISTRY.items() if e.uses_proxies)


def _entry(name: str) -> _Entry:
  if name not in _REGISTRY:
    raise ValueError(f'Unknown loss {name!r}; valid names: {", ".join(LOSS_NAMES)}.')
  return _REGISTRY[name]


def default_hparams(name: str) -> dict:
  """The hyperparameter names and defaults `get(name, ...)` accepts (PML defaults; `form` 'pml'|'paper')."""
  return dict(_entry(name).defaults)


def get(name: str, **hparams) -> Loss:
  """Named loss as a `Loss` (DESIGN.md contract). Unknown names or hyperparameters raise ValueError.

  >>> loss = get('multi_similarity', alpha=17.97, beta=75.66, base=0.77, epsilon=0.39)
  >>> value = loss(embeddings, labels)
  """
  entry = _entry(name)
  unknown = sorted(set(hparams) - set(entry.defaults))
  if unknown:
    raise ValueError(
      f'Loss {name!r} got unknown hyperparameters {unknown}; valid: '
      f'{", ".join(f"{k}={v!r}" for k, v in entry.defaults.items())}.'
    )
  full = {**entry.defaults, **hparams}
  _check_form(full['form'])
  if name == 'contrastive':
    contrastive_pieces(pos_margin=full['pos_margin'], neg_margin=full['neg_margin'], form=full['form'])
  clean_kwargs = {k: full[k] for k in entry.clean_keys}
  sim_kwargs = {k: v for k, v in full.items() if k not in entry.clean_keys}
  return Loss(
    name=name,
    hparams=tuple(sorted(full.items())),
    uses_proxies=entry.uses_proxies,
    proxies_are_anchors=entry.proxies_are_anchors,
    mines=entry.miner_key is not None and full[entry.miner_key] is not None,
    _clean_terms=functools.partial(entry.clean_terms, **clean_kwargs),
    _from_similarity=functools.partial(entry.from_similarity, **sim_kwargs),
  )


__all__ = [
  'generic_loss',
  'generic_terms',
  'Exponential',
  'CirclePos',
  'CircleNeg',
  'ExpDistance',
  'DistanceHinge',
  'MarginMinusDistance',
  'NegSimilarity',
  'SimilarityHinge',
  'Log1p',
  'Log',
  'avg_non_zero',
  'cosine_similarity',
  'distance_from_similarity',
  'l2_normalize',
  'nan_if_nonfinite',
  'same_label',
  'all_pairs_terms',
  'proxy_terms',
  'multi_similarity_mining',
  'init_proxies',
  'contrastive_loss',
  'multi_similarity_loss',
  'proxy_anchor_loss',
  'circle_loss',
  'proxy_nca_loss',
  'lifted_structure_loss',
  'Loss',
  'get',
  'default_hparams',
  'LOSS_NAMES',
  'PROXY_LOSS_NAMES',
  'FORMS',
]
