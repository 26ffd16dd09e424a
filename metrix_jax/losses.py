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
# Class-weight (softmax) losses: NormalizedSoftmax, CosFace, ArcFace, sub-center ArcFace, SoftTriple.
# ----------------------------------------------------------------------------------------------------------
# Parameters: the class weights are the loss's 'proxies' [N, D] (the trainer's proxy group, checkpointed as
# params['proxies']); PML's W [D, C] (fc [D, C*K]) transposed. With K centers per class (SoftTriple's
# centers_per_class, sub-center ArcFace's sub_centers) row r belongs to class r // K (PML's view(-1, C, K)
# layout: class c owns rows c*K .. c*K + K - 1), so N = C*K: `Loss.init_proxies(key, C, D)` makes them.
#
# Generic form (embeddings are the anchors, class rows the candidates; spec 1.1): per row, with logits
# z+(s) on the positive side (the margin applied) and z(s) on the negative side,
#
#     l(x) = softplus( log sum_c (1 - y_c) e^{z(s_c)} - log sum_c y_c e^{z+(s_c)} )
#          = -log( sum_c y_c e^{z+_c} / (sum_c y_c e^{z+_c} + sum_c (1 - y_c) e^{z_c}) ),
#
# i.e. rho_pos = e^{z+}, sigma_pos = -log, rho_neg = e^{z}, sigma_neg = log, tau = softplus (ProxyNCA's shape).
# With one-hot y this is exactly the cross entropy PML computes. What y means for a class weight: y_c(v) is how
# much of class c the item carries; for a Metrix item v = mix_lam(x, x') (mixup.mixed_terms)
# y_c(v) = lam [c(x) = c] + (1 - lam) [c(x') = c], so class c(x) puts lam e^{z+} in the numerator and
# (1 - lam) e^{z} among the negatives, and c(x') the other way round. lam -> 1 (or 0): y is one-hot on c(x)
# (c(x')) and l~ is the plain margin cross entropy of v labelled c(x) (c(x')); a pos_pos item (c(x) = c(x'))
# has y one-hot for every lam. Multi-center losses first reduce the K center similarities of a class to one
# class similarity s_c (SoftTriple: softmax-weighted mean; sub-center ArcFace: max), then apply the above; a
# mixed item's s_c comes from its own K center similarities (exact in the embedding-level closed form).
@dataclasses.dataclass(frozen=True)
class ArcMargin:
  """ArcFace positive: log rho(s) = scale * cos(theta + m) for theta = acos(s) <= pi - m, else
  scale * (s - m sin m) (PML ArcFaceLoss: monotone continuation). cos(theta + m) = s cos m - sqrt(1-s^2) sin m,
  with a finite gradient at s = +-1 (PML's acos has none)."""

  scale: float
  margin: float  # radians

  def log(self, s: Array) -> Array:
    s = jnp.clip(s, -1.0, 1.0)
    sq = 1.0 - s * s
    safe = sq > 0
    sine = jnp.where(safe, jnp.sqrt(jnp.where(safe, sq, 1.0)), 0.0)
    plus = s * math.cos(self.margin) - sine * math.sin(self.margin)
    return self.scale * jnp.where(s >= -math.cos(self.margin), plus, s - self.margin * math.sin(self.margin))

  def __call__(self, s: Array) -> Array:
    return jnp.exp(self.log(s))


def class_weight_terms(embeddings, labels, proxies, *, per_class: int = 1) -> tuple[Array, Array, Array]:
  """[B, D], [B], [N, D] -> (sim [B, N] embeddings x class rows, targets [B, N] = [label = row // K], mask all)."""
  if proxies is None:
    raise ValueError('class-weight losses need their weights [C*K, D]; create them with loss.init_proxies(key, C, D).')
  _check_embeddings(embeddings, labels, proxies)
  sim = cosine_similarity(embeddings, proxies)
  row_class = jnp.arange(jnp.shape(proxies)[0]) // per_class
  targets = same_label(labels, row_class).astype(sim.dtype)
  return sim, targets, jnp.ones(sim.shape, bool)


def _class_similarity(sim, targets, mask, *, per_class: int, aggregate: str, gamma: float = 10.0):
  """Center columns [..., A, N] -> class columns [..., A, ceil(N/K)] (row r of the weights is class r // K; a
  last class with fewer than K rows uses the rows it has). aggregate 'softmax': sum_k softmax_k(gamma s_k) s_k
  (SoftTriple); 'max': max_k s_k (sub-center ArcFace). Targets: the class's (all its rows share it); mask: any."""
  if per_class == 1:
    return sim, targets, mask
  n = sim.shape[-1]
  c = -(-n // per_class)
  pad = [(0, 0)] * (sim.ndim - 1) + [(0, c * per_class - n)]
  shape = sim.shape[:-1] + (c, per_class)
  valid = (jnp.arange(c * per_class) < n).reshape(c, per_class)
  s = jnp.pad(sim, pad).reshape(shape)
  if aggregate == 'max':
    s_class = jnp.max(jnp.where(valid, s, -jnp.inf), axis=-1)
  else:
    weights = jax.nn.softmax(jnp.where(valid, gamma * s, -jnp.inf), axis=-1)
    s_class = jnp.sum(jnp.where(valid, weights * s, 0.0), axis=-1)
  t_class = jnp.max(jnp.pad(targets, pad).reshape(shape), axis=-1)
  m_class = jnp.any(jnp.pad(mask, pad).reshape(shape) & valid, axis=-1)
  return s_class, t_class, m_class


def _softmax_ce(sim, targets, mask, *, rho_pos, rho_neg) -> Array:
  """Mean over the rows with a positive (mask * y > 0) of softplus(log sum (1-y) e^{z} - log sum y e^{z+})."""
  pos, neg = generic_terms(sim, targets, mask, rho_pos=rho_pos, rho_neg=rho_neg, sigma_pos=Log(-1.0), sigma_neg=Log())
  has_pos = jnp.any(mask & (targets > 0), axis=-1)
  return _masked_mean(jax.nn.softplus(jnp.where(has_pos, pos, 0.0) + neg), has_pos)


def class_weight_clean_terms(embeddings, labels, proxies=None, *, per_class: int = 1, **_):
  return class_weight_terms(embeddings, labels, proxies, per_class=per_class)


def normalized_softmax_from_similarity(sim, targets, mask, *, temperature: float = 0.05, form: str = 'pml') -> Array:
  """NormalizedSoftmax on sim [B, C]: mean over rows of -log softmax(s / T)[y] (PML NormalizedSoftmaxLoss with
  its MeanReducer; both forms). Soft targets: see the section comment (rho = e^{s/T} on both sides)."""
  _check_form(form)
  sim, targets, mask = _dtype_sim(sim, targets, mask)
  rho = Exponential(1.0 / temperature)
  return _softmax_ce(sim, targets, mask, rho_pos=rho, rho_neg=rho)


@_propagates_nonfinite
def normalized_softmax_loss(embeddings, labels, proxies, *, temperature: float = 0.05, form: str = 'pml') -> Array:
  """NormalizedSoftmax (Zhai & Wu 2018), scalar: PML NormalizedSoftmaxLoss(num_classes, embedding_size,
  temperature) with W = proxies.T [D, C]: mean_x -log softmax_c(cos(x, w_c) / T)[y_x]."""
  terms = class_weight_terms(embeddings, labels, proxies)
  return normalized_softmax_from_similarity(*terms, temperature=temperature, form=form)


def cosface_from_similarity(sim, targets, mask, *, margin: float = 0.35, scale: float = 64.0, form: str = 'pml'):
  """CosFace on sim [B, C]: mean over rows of -log softmax with logits scale*(s - margin) for the label's class,
  scale*s for the others (PML CosFaceLoss, MeanReducer; both forms). Soft targets: z+ = scale (s - m), z = scale s."""
  _check_form(form)
  sim, targets, mask = _dtype_sim(sim, targets, mask)
  return _softmax_ce(sim, targets, mask, rho_pos=Exponential(scale, margin), rho_neg=Exponential(scale))


@_propagates_nonfinite
def cosface_loss(embeddings, labels, proxies, *, margin: float = 0.35, scale: float = 64.0, form: str = 'pml'):
  """CosFace / large margin cosine loss (Wang et al. 2018), scalar: PML CosFaceLoss(num_classes,
  embedding_size, margin, scale) with W = proxies.T."""
  terms = class_weight_terms(embeddings, labels, proxies)
  return cosface_from_similarity(*terms, margin=margin, scale=scale, form=form)


def arcface_from_similarity(sim, targets, mask, *, margin: float = 28.6, scale: float = 64.0, form: str = 'pml'):
  """ArcFace on sim [B, C] (margin in degrees, as PML): mean over rows of -log softmax with logits
  scale*cos(theta + m) (`ArcMargin`) for the label's class, scale*s for the others (PML ArcFaceLoss; both forms)."""
  _check_form(form)
  sim, targets, mask = _dtype_sim(sim, targets, mask)
  pos = ArcMargin(scale, math.radians(margin))
  return _softmax_ce(sim, targets, mask, rho_pos=pos, rho_neg=Exponential(scale))


@_propagates_nonfinite
def arcface_loss(embeddings, labels, proxies, *, margin: float = 28.6, scale: float = 64.0, form: str = 'pml'):
  """ArcFace / additive angular margin (Deng et al. 2019), scalar: PML ArcFaceLoss(num_classes, embedding_size,
  margin (degrees), scale) with W = proxies.T."""
  terms = class_weight_terms(embeddings, labels, proxies)
  return arcface_from_similarity(*terms, margin=margin, scale=scale, form=form)


def subcenter_arcface_from_similarity(
  sim, targets, mask, *, margin: float = 28.6, scale: float = 64.0, sub_centers: int = 3, form: str = 'pml'
):
  """Sub-center ArcFace on sim [B, C*K] (center columns; row r of the weights is class r // K): the class
  similarity is the max over its K sub-centers, then ArcFace (PML SubCenterArcFaceLoss; both forms)."""
  _check_form(form)
  sim, targets, mask = _dtype_sim(sim, targets, mask)
  sim, targets, mask = _class_similarity(sim, targets, mask, per_class=sub_centers, aggregate='max')
  pos = ArcMargin(scale, math.radians(margin))
  return _softmax_ce(sim, targets, mask, rho_pos=pos, rho_neg=Exponential(scale))


@_propagates_nonfinite
def subcenter_arcface_loss(
  embeddings, labels, proxies, *, margin: float = 28.6, scale: float = 64.0, sub_centers: int = 3, form: str = 'pml'
):
  """Sub-center ArcFace (Deng et al. 2020), scalar: PML SubCenterArcFaceLoss(num_classes, embedding_size, margin,
  scale, sub_centers) with W = proxies.T, proxies [C*K, D] (row c*K + k: sub-center k of class c)."""
  terms = class_weight_terms(embeddings, labels, proxies, per_class=sub_centers)
  return subcenter_arcface_from_similarity(*terms, margin=margin, scale=scale, sub_centers=sub_centers, form=form)


def soft_triple_from_similarity(
  sim,
  targets,
  mask,
  *,
  centers_per_class: int = 10,
  la: float = 20.0,
  gamma: float = 0.1,
  margin: float = 0.01,
  form: str = 'pml',
):
  """SoftTriple on sim [B, C*K] (center columns): s_c = sum_k softmax_k(s_ck / gamma) s_ck, then the cross entropy
  of la*(s_c - margin) (label's class) against la*s_c (PML SoftTripleLoss, MeanReducer, no center regulariser
  as PML's default weight_regularizer=None; both forms). Soft targets: z+ = la (s_c - margin), z = la s_c."""
  _check_form(form)
  sim, targets, mask = _dtype_sim(sim, targets, mask)
  sim, targets, mask = _class_similarity(
    sim, targets, mask, per_class=centers_per_class, aggregate='softmax', gamma=1.0 / gamma
  )
  return _softmax_ce(sim, targets, mask, rho_pos=Exponential(la, margin), rho_neg=Exponential(la))


@_propagates_nonfinite
def soft_triple_loss(
  embeddings,
  labels,
  proxies,
  *,
  centers_per_class: int = 10,
  la: float = 20.0,
  gamma: float = 0.1,
  margin: float = 0.01,
  form: str = 'pml',
):
  """SoftTriple (Qian et al. 2019), scalar: PML SoftTripleLoss(num_classes, embedding_size, centers_per_class,
  la, gamma, margin) with fc = proxies.T, proxies [C*K, D] (row c*K + k: center k of class c)."""
  terms = class_weight_terms(embeddings, labels, proxies, per_class=centers_per_class)
  return soft_triple_from_similarity(
    *terms, centers_per_class=centers_per_class, la=la, gamma=gamma, margin=margin, form=form
  )


def _normal_init(key, num_rows, embedding_dim, dtype=jnp.float32):
  """torch.nn.init.normal_ (PML WeightMixin default): N(0, 1)."""
  return jax.random.normal(key, (num_rows, embedding_dim), dtype)


def _kaiming_uniform_init(key, num_rows, embedding_dim, dtype=jnp.float32):
  """torch kaiming_uniform_(a=sqrt(5)) on PML's fc [D, N] (fan_in = N): U(-1/sqrt(N), 1/sqrt(N)) (SoftTriple)."""
  bound = 1.0 / math.sqrt(num_rows)
  return jax.random.uniform(key, (num_rows, embedding_dim), dtype, -bound, bound)


# Margin loss (Wu et al. 2017) ----------------------------------------------------------------------------
def margin_from_similarity(sim, targets, mask, *, margin: float = 0.2, beta: float = 1.2, form: str = 'pml'):
  """Margin loss on pairs, with the triplet enumeration folded into per-anchor weights (a stated
  generalisation of the generic form: each side's sigma is scaled by the other side's total weight).

  PML MarginLoss(margin, nu=0, beta, triplets_per_anchor='all') sums pos(a,p) + neg(a,n) over all triplets
  (a, p, n) and divides by the number of active hinges (DivisorReducer). Over triplets,
      sum = sum_a [ N_a sum_p rho_pos(s_ap) + P_a sum_n rho_neg(s_an) ],
      divisor = sum_a [ N_a #{p: rho_pos > 0} + P_a #{n: rho_neg > 0} ],
  rho_pos = [d - beta + margin]_+, rho_neg = [beta - d + margin]_+ (Euclidean d of unit vectors), P_a / N_a the
  anchor's positive / negative counts. Soft labels (Metrix): P_a = sum_j mask y, N_a = sum_j mask (1 - y), the
  sums and counts weighted by y / (1 - y): a mixed item of weight lam is lam of a positive and (1 - lam) of a
  negative (lam -> 1: a positive, lam -> 0: a negative). 0 when no triplet exists (one class, no positive).
  form='paper': per-anchor sums sum y rho_pos + sum (1-y) rho_neg, mean over anchors.
  """
  _check_form(form)
  sim, targets, mask = _dtype_sim(sim, targets, mask)
  d = distance_from_similarity(sim)
  w_pos = jnp.where(mask, targets, 0.0)
  w_neg = jnp.where(mask, 1.0 - targets, 0.0)
  pos_h = jax.nn.relu(d - beta + margin)
  neg_h = jax.nn.relu(beta - d + margin)
  pos_sum = jnp.sum(w_pos * pos_h, axis=-1)
  neg_sum = jnp.sum(w_neg * neg_h, axis=-1)
  if form == 'paper':
    return jnp.mean(pos_sum + neg_sum, axis=-1)
  num_pos, num_neg = jnp.sum(w_pos, axis=-1), jnp.sum(w_neg, axis=-1)
  total = jnp.sum(num_neg * pos_sum + num_pos * neg_sum, axis=-1)
  count = jnp.sum(
    num_neg * jnp.sum(w_pos * (pos_h > 0), axis=-1) + num_pos * jnp.sum(w_neg * (neg_h > 0), axis=-1), axis=-1
  )
  active = count > 0
  return jnp.where(active, total / jnp.where(active, count, 1.0), 0.0)


def pairs_clean_terms(embeddings, labels, proxies=None, **_) -> tuple[Array, Array, Array]:
  del proxies
  return all_pairs_terms(embeddings, labels)


@_propagates_nonfinite
def margin_loss(embeddings, labels, *, margin: float = 0.2, beta: float = 1.2, form: str = 'pml') -> Array:
  """Margin loss (Wu et al. 2017, 'Sampling matters'), scalar: PML MarginLoss(margin, nu=0, beta) with fixed beta
  (learn_beta=False), all triplets, LpDistance on normalised embeddings and its DivisorReducer."""
  return margin_from_similarity(*all_pairs_terms(embeddings, labels), margin=margin, beta=beta, form=form)


# NCA (pairs) ---------------------------------------------------------------------------------------------
def pair_nca_from_similarity(sim, targets, mask, *, softmax_scale: float = 1.0, form: str = 'pml') -> Array:
  """NCA on pairs: ProxyNCA's generic form (rho = e^{-k d^2} both sides, -log sum_pos / sum_all) with the other
  embeddings as candidates; mean over the rows with a positive (PML NCALoss; both forms). Soft labels: an item
  of weight y adds y e^{-k d^2} to the numerator and (1 - y) e^{-k d^2} to the rest of the denominator.

  Metrix caveat: rho_pos = rho_neg, so a row whose items all carry the same y (sampled 'own' plans with one lambda
  per batch: every pos_neg / anc_neg item has y = lam) gives the constant -log(lam), without gradient. Mix with
  mask_mode='all' (items of other anchors: y in {lam, 1 - lam, 0}), lambda_mode='item' or all_pairs."""
  return proxy_nca_from_similarity(sim, targets, mask, softmax_scale=softmax_scale, form=form)


@_propagates_nonfinite
def pair_nca_loss(embeddings, labels, *, softmax_scale: float = 1.0, form: str = 'pml') -> Array:
  """NCA (Goldberger et al. 2004), scalar: PML NCALoss(softmax_scale), LpDistance(power=2) on normalised
  embeddings: mean over rows with a positive of -log(sum_p e^{-k d^2} / sum_{j != i} e^{-k d^2})."""
  return pair_nca_from_similarity(*all_pairs_terms(embeddings, labels), softmax_scale=softmax_scale, form=form)


# SupCon --------------------------------------------------------------------------------------------------
def supcon_from_similarity(sim, targets, mask, *, temperature: float = 0.1, form: str = 'pml') -> Array:
  """Supervised contrastive loss per anchor (a stated generalisation of the generic form: the positive side is
  a y-weighted mean of log rho_pos, the normaliser a log-sum over both sides):

      l(a) = log sum_j mask e^{s_aj/T} - sum_j mask y_aj s_aj/T / sum_j mask y_aj
           = -(1/sum y) sum_j y_aj log softmax_j(s_a./T)

  (each item of U(a) enters the normaliser once: weight y + (1 - y) = 1). pml: AvgNonZero over anchors, 0 when
  the batch has no positive or no negative pair (PML SupConLoss); paper: mean over anchors with a positive.
  Soft labels: a mixed item of weight lam counts lam in the positives' mean; lam -> 0 makes it a pure
  negative (in the normaliser only), lam -> 1 a positive.
  """
  _check_form(form)
  sim, targets, mask = _dtype_sim(sim, targets, mask)
  z = sim / temperature
  w_pos = jnp.where(mask, targets, 0.0)
  lse, _ = _masked_lse(z, mask.astype(z.dtype), add_one=False)
  pos_mass = jnp.sum(w_pos, axis=-1)
  has_pos = pos_mass > 0
  mean_pos = jnp.sum(w_pos * jnp.where(mask, z, 0.0), axis=-1) / jnp.where(has_pos, pos_mass, 1.0)
  per_anchor = jnp.where(has_pos, lse - mean_pos, 0.0)
  if form == 'paper':
    return _masked_mean(per_anchor, has_pos)
  any_pos = jnp.any(mask & (targets > 0))
  any_neg = jnp.any(mask & (targets < 1))
  return jnp.where(any_pos & any_neg, avg_non_zero(per_anchor), 0.0)


@_propagates_nonfinite
def supcon_loss(embeddings, labels, *, temperature: float = 0.1, form: str = 'pml') -> Array:
  """Supervised contrastive loss (Khosla et al. 2020), scalar: PML SupConLoss(temperature), cosine similarity,
  AvgNonZeroReducer."""
  return supcon_from_similarity(*all_pairs_terms(embeddings, labels), temperature=temperature, form=form)


# NT-Xent -------------------------------------------------------------------------------------------------
def ntxent_from_similarity(sim, targets, mask, *, temperature: float = 0.07, form: str = 'pml') -> Array:
  """NT-Xent per (anchor, positive) pair (a stated generalisation: the generic form per positive, summed):

      l(a, p) = softplus( log sum_n mask (1 - y_an) e^{s_an/T} - s_ap/T ) = -log e^{s_ap/T} / (e^{s_ap/T} + sum_n)

  pml: mean over positive pairs, sum_a,p y_ap l(a, p) / sum y (PML NTXentLoss, MeanReducer over pos pairs; 0 when
  the batch has no positive or no negative pair); paper: per-anchor y-weighted mean, mean over anchors with a
  positive. Soft labels: an item of weight lam is lam of a positive pair and (1 - lam) of a negative in the
  anchor's denominator (lam -> 1: a positive pair, lam -> 0: a negative only).
  """
  _check_form(form)
  sim, targets, mask = _dtype_sim(sim, targets, mask)
  z = sim / temperature
  w_pos = jnp.where(mask, targets, 0.0)
  w_neg = jnp.where(mask, 1.0 - targets, 0.0)
  neg_lse, has_neg = _masked_lse(z, w_neg, add_one=False)
  neg_lse = jnp.where(has_neg, neg_lse, -jnp.inf)
  active = w_pos > 0
  per_pair = jax.nn.softplus(neg_lse[..., None] - jnp.where(active, z, 0.0))
  weighted = jnp.where(active, w_pos * per_pair, 0.0)
  if form == 'paper':
    mass = jnp.sum(w_pos, axis=-1)
    has_pos = mass > 0
    return _masked_mean(jnp.sum(weighted, axis=-1) / jnp.where(has_pos, mass, 1.0), has_pos)
  mass = jnp.sum(w_pos)
  ok = (mass > 0) & jnp.any(w_neg > 0)
  return jnp.where(ok, jnp.sum(weighted) / jnp.where(ok, mass, 1.0), 0.0)


@_propagates_nonfinite
def ntxent_loss(embeddings, labels, *, temperature: float = 0.07, form: str = 'pml') -> Array:
  """NT-Xent (Chen et al. 2020, SimCLR; InfoNCE), scalar: PML NTXentLoss(temperature) with labels (every
  same-label pair a positive), cosine similarity, mean over positive pairs."""
  return ntxent_from_similarity(*all_pairs_terms(embeddings, labels), temperature=temperature, form=form)


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
    proxies_per_class: K, the proxy rows per class (SoftTriple's centers, sub-center ArcFace's sub-centers; 1
      otherwise): proxies are [C*K, D], row r belongs to class r // K (`proxy_classes`).
  Methods:
    clean_terms(embeddings [B, D], labels [B], proxies=None) -> (sim [A, N], targets [A, N], mask [A, N])
      with mining applied (mask = mined pairs).
    from_similarity(sim, targets, mask) -> scalar, the loss's own reduction (soft targets allowed).
    __call__(embeddings, labels, proxies=None) -> scalar = from_similarity(*clean_terms(...)).
    init_proxies(key, num_classes, embedding_dim) -> [C*K, D]: the loss's own initial proxies / class weights
      (the trainer's params['proxies']: optimiser group 'proxies', checkpointed with the parameters).
    proxy_classes(num_rows) -> [N] int: the class of each proxy row (r // K).
  """

  name: str
  hparams: tuple
  uses_proxies: bool
  proxies_are_anchors: bool
  mines: bool
  _clean_terms: Callable = dataclasses.field(repr=False)
  _from_similarity: Callable = dataclasses.field(repr=False)
  proxies_per_class: int = 1
  _init_proxies: Optional[Callable] = dataclasses.field(default=None, repr=False)

  def num_proxies(self, num_classes: int) -> int:
    """Rows of the proxies for `num_classes` classes: C * proxies_per_class."""
    return int(num_classes) * self.proxies_per_class

  def proxy_classes(self, num_rows: int) -> Array:
    """[N] int32: the class of each proxy row, r // proxies_per_class."""
    return (jnp.arange(num_rows) // self.proxies_per_class).astype(jnp.int32)

  def init_proxies(self, key: Array, num_classes: int, embedding_dim: int, *, dtype=jnp.float32) -> Array:
    """The loss's initial proxies [C*K, D]: PML's init for its class weights (N(0, 1) for the softmax family,
    kaiming-uniform for SoftTriple), `losses.init_proxies` (N(0, 2/C)) for Proxy Anchor / ProxyNCA."""
    if not self.uses_proxies:
      raise ValueError(f'{self.name} has no proxies.')
    init = self._init_proxies or init_proxies
    return init(key, self.num_proxies(num_classes), embedding_dim, dtype=dtype)

  @property
  def hyperparameters(self) -> dict:
    return dict(self.hparams)

  def clean_terms(self, embeddings: Array, labels: Array, proxies: Optional[Array] = None):
    if self.uses_proxies and proxies is None:
      raise ValueError(
        f'{self.name} needs proxies [C*K, D] (K = {self.proxies_per_class}); create them with '
        'loss.init_proxies(key, C, D) (losses.init_proxies(key, C, D) for K = 1).'
      )
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
  per_class_key: Optional[str] = None  # the hyperparameter giving K proxy rows per class (None: 1)
  init: Optional[Callable] = None  # (key, rows, dim, dtype=) -> proxies; None: init_proxies


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
  'normalized_softmax': _Entry(
    class_weight_clean_terms,
    normalized_softmax_from_similarity,
    dict(temperature=0.05, form='pml'),
    (),
    True,
    init=_normal_init,
  ),
  'cosface': _Entry(
    class_weight_clean_terms,
    cosface_from_similarity,
    dict(margin=0.35, scale=64.0, form='pml'),
    (),
    True,
    init=_normal_init,
  ),
  'arcface': _Entry(
    class_weight_clean_terms,
    arcface_from_similarity,
    dict(margin=28.6, scale=64.0, form='pml'),
    (),
    True,
    init=_normal_init,
  ),
  'soft_triple': _Entry(
    class_weight_clean_terms,
    soft_triple_from_similarity,
    dict(centers_per_class=10, la=20.0, gamma=0.1, margin=0.01, form='pml'),
    (),
    True,
    per_class_key='centers_per_class',
    init=_kaiming_uniform_init,
  ),
  'margin': _Entry(pairs_clean_terms, margin_from_similarity, dict(margin=0.2, beta=1.2, form='pml'), ()),
  'pair_nca': _Entry(pairs_clean_terms, pair_nca_from_similarity, dict(softmax_scale=1.0, form='pml'), ()),
  'supcon': _Entry(pairs_clean_terms, supcon_from_similarity, dict(temperature=0.1, form='pml'), ()),
  'ntxent': _Entry(pairs_clean_terms, ntxent_from_similarity, dict(temperature=0.07, form='pml'), ()),
  'subcenter_arcface': _Entry(
    class_weight_clean_terms,
    subcenter_arcface_from_similarity,
    dict(margin=28.6, scale=64.0, sub_centers=3, form='pml'),
    (),
    True,
    per_class_key='sub_centers',
    init=_normal_init,
  ),
}
# Class-weight losses (their proxies are PML's W / fc transposed); a subset of PROXY_LOSS_NAMES.
CLASS_WEIGHT_LOSS_NAMES = ('normalized_softmax', 'cosface', 'arcface', 'soft_triple', 'subcenter_arcface')
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
  for key in ('temperature', 'scale', 'la', 'softmax_scale'):
    if key in full and not full[key] > 0:
      raise ValueError(f'Loss {name!r} needs {key} > 0; got {full[key]!r}.')
  per_class = 1
  if entry.per_class_key is not None:
    per_class = full[entry.per_class_key]
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
      raise ValueError(f'Loss {name!r} needs {entry.per_class_key} a positive int (static shape); got {per_class!r}.')
  clean_kwargs = {k: full[k] for k in entry.clean_keys}
  if per_class != 1:
    clean_kwargs['per_class'] = per_class
  sim_kwargs = {k: v for k, v in full.items() if k not in entry.clean_keys}
  return Loss(
    name=name,
    hparams=tuple(sorted(full.items())),
    uses_proxies=entry.uses_proxies,
    proxies_are_anchors=entry.proxies_are_anchors,
    mines=entry.miner_key is not None and full[entry.miner_key] is not None,
    _clean_terms=functools.partial(entry.clean_terms, **clean_kwargs),
    _from_similarity=functools.partial(entry.from_similarity, **sim_kwargs),
    proxies_per_class=per_class,
    _init_proxies=entry.init,
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
  'ArcMargin',
  'class_weight_terms',
  'normalized_softmax_loss',
  'cosface_loss',
  'arcface_loss',
  'subcenter_arcface_loss',
  'soft_triple_loss',
  'margin_loss',
  'pair_nca_loss',
  'supcon_loss',
  'ntxent_loss',
  'CLASS_WEIGHT_LOSS_NAMES',
  'Loss',
  'get',
  'default_hparams',
  'LOSS_NAMES',
  'PROXY_LOSS_NAMES',
  'FORMS',
]
