"""Brute-force float64 references of the losses added for issue 16 (NormalizedSoftmax, CosFace, ArcFace, sub-center
ArcFace, SoftTriple, margin, pair NCA, SupCon, NT-Xent), clean and Metrix-mixed with soft labels: explicit Python
loops over anchors / rows, candidates and class centers, written from the formulas in the docstrings of
metrix_jax/losses.py (PML 2.9.0 semantics for binary labels). Used only by tests; slow by design."""

import math

import numpy as np

from reference.losses_ref import cos, log_sum_exp, normalize, softplus
from reference.mixup_ref import mixed_vector, soft_label

CLASS_WEIGHT = ('normalized_softmax', 'cosface', 'arcface', 'subcenter_arcface', 'soft_triple')
PAIRS = ('margin', 'pair_nca', 'supcon', 'ntxent')
DEFAULTS = {
  'normalized_softmax': dict(temperature=0.05),
  'cosface': dict(margin=0.35, scale=64.0),
  'arcface': dict(margin=28.6, scale=64.0),
  'subcenter_arcface': dict(margin=28.6, scale=64.0, sub_centers=3),
  'soft_triple': dict(centers_per_class=10, la=20.0, gamma=0.1, margin=0.01),
  'margin': dict(margin=0.2, beta=1.2),
  'pair_nca': dict(softmax_scale=1.0),
  'supcon': dict(temperature=0.1),
  'ntxent': dict(temperature=0.07),
}


def per_class(name, hp):
  return (
    hp.get('centers_per_class', 1) if name == 'soft_triple' else hp.get('sub_centers', 1) if 'subcenter' in name else 1
  )


def class_similarities(name, hp, v, p):
  """Cosine of unit v to every class: one row per class (K rows per class; row r is class r // K)."""
  k = per_class(name, hp)
  out = []
  for c in range((len(p) + k - 1) // k):
    sims = [cos(v, p[r]) for r in range(c * k, min((c + 1) * k, len(p)))]
    if name == 'subcenter_arcface':
      out.append(max(sims))
    elif name == 'soft_triple':
      g = 1.0 / hp['gamma']
      m = max(sims)
      w = [math.exp(g * (s - m)) for s in sims]
      out.append(sum(wi * s for wi, s in zip(w, sims)) / sum(w))
    else:
      out.append(sims[0])
  return out


def _logits(name, hp, s):
  """(z+, z) of a class similarity s."""
  if name == 'normalized_softmax':
    return s / hp['temperature'], s / hp['temperature']
  if name == 'cosface':
    return hp['scale'] * (s - hp['margin']), hp['scale'] * s
  if name == 'soft_triple':
    return hp['la'] * (s - hp['margin']), hp['la'] * s
  m = math.radians(hp['margin'])
  c = min(max(s, -1.0), 1.0)
  theta = math.acos(c)
  zp = math.cos(theta + m) if theta <= math.pi - m else c - m * math.sin(m)
  return hp['scale'] * zp, hp['scale'] * s


def _softmax_ce_row(name, hp, sims, ys):
  """-log(sum y e^{z+} / (sum y e^{z+} + sum (1-y) e^{z})); None when no class has y > 0."""
  zp = [_logits(name, hp, s)[0] + math.log(y) for s, y in zip(sims, ys) if y > 0]
  zn = [_logits(name, hp, s)[1] + math.log(1 - y) for s, y in zip(sims, ys) if 1 - y > 0]
  if not zp:
    return None
  return softplus((log_sum_exp(zn) if zn else -math.inf) - log_sum_exp(zp))


def class_weight_loss(name, emb, labels, proxies, items=None, hp=None):
  """Mean over rows (clean embeddings, or mixed items (x, x', lam): every class sees every item) of the soft
  cross entropy; rows without a positive class are left out."""
  hp = {**DEFAULTS[name], **(hp or {})}
  e, p = normalize(emb), normalize(proxies)
  rows = []
  if items is None:
    for i in range(len(labels)):
      sims = class_similarities(name, hp, e[i], p)
      rows.append((sims, [float(labels[i] == c) for c in range(len(sims))]))
  else:
    for x, x2, lam in items:
      sims = class_similarities(name, hp, mixed_vector(e, x, x2, lam), p)
      rows.append((sims, [soft_label(lam, labels[x], labels[x2], c) for c in range(len(sims))]))
  values = [v for v in (_softmax_ce_row(name, hp, s, y) for s, y in rows) if v is not None]
  return sum(values) / len(values) if values else 0.0


def _pair_rows(emb, labels, items_per_anchor):
  """Per anchor: [(s, d^2, y)] over its candidates: the other batch items (clean) or its mixed items."""
  e = normalize(emb)
  b = len(labels)
  rows = []
  for a in range(b):
    row = []
    if items_per_anchor is None:
      for j in range(b):
        if j != a:
          row.append((cos(e[a], e[j]), float(np.sum((e[a] - e[j]) ** 2)), float(labels[a] == labels[j])))
    else:
      for x, x2, lam in items_per_anchor[a]:
        v = mixed_vector(e, x, x2, lam)
        row.append((cos(e[a], v), float(np.sum((e[a] - v) ** 2)), soft_label(lam, labels[x], labels[x2], labels[a])))
    rows.append(row)
  return rows


def pair_loss(name, emb, labels, items_per_anchor=None, hp=None, form='pml'):
  """margin / pair_nca / supcon / ntxent by loops, clean (items_per_anchor None) or mixed (per anchor (x, x', lam))."""
  hp = {**DEFAULTS[name], **(hp or {})}
  rows = _pair_rows(emb, labels, items_per_anchor)
  if name == 'margin':
    m, beta = hp['margin'], hp['beta']
    total = count = 0.0
    per_anchor = []
    for row in rows:
      num_pos = sum(y for _, _, y in row)
      num_neg = sum(1 - y for _, _, y in row)
      ps = pc = ns = nc = 0.0
      for _, d2, y in row:
        d = math.sqrt(max(d2, 0.0))
        hp_, hn = max(d - beta + m, 0.0), max(beta - d + m, 0.0)
        ps += y * hp_
        pc += y * (hp_ > 0)
        ns += (1 - y) * hn
        nc += (1 - y) * (hn > 0)
      total += num_neg * ps + num_pos * ns
      count += num_neg * pc + num_pos * nc
      per_anchor.append(ps + ns)
    if form == 'paper':
      return sum(per_anchor) / len(rows)
    return total / count if count > 0 else 0.0
  if name == 'pair_nca':
    k = hp['softmax_scale']
    values = []
    for row in rows:
      zp = [-k * d2 + math.log(y) for _, d2, y in row if y > 0]
      zn = [-k * d2 + math.log(1 - y) for _, d2, y in row if 1 - y > 0]
      if zp:
        values.append(softplus((log_sum_exp(zn) if zn else -math.inf) - log_sum_exp(zp)))
    return sum(values) / len(values) if values else 0.0
  t = hp['temperature']
  any_pos = any(y > 0 for row in rows for _, _, y in row)
  any_neg = any(y < 1 for row in rows for _, _, y in row)
  if name == 'supcon':
    per_anchor = []
    for row in rows:
      mass = sum(y for _, _, y in row)
      if mass > 0:
        z = log_sum_exp([s / t for s, _, _ in row])
        per_anchor.append(z - sum(y * s / t for s, _, y in row) / mass)
      else:
        per_anchor.append(0.0)
    if form == 'paper':
      kept = [v for v, row in zip(per_anchor, rows) if sum(y for _, _, y in row) > 0]
      return sum(kept) / len(kept) if kept else 0.0
    if not (any_pos and any_neg):
      return 0.0
    nonzero = [v for v in per_anchor if v > 0]
    return sum(nonzero) / len(nonzero) if nonzero else 0.0
  # ntxent
  total = mass = 0.0
  anchor_means = []
  for row in rows:
    zn = [s / t + math.log(1 - y) for s, _, y in row if 1 - y > 0]
    neg = log_sum_exp(zn) if zn else -math.inf
    a_total = sum(y * softplus(neg - s / t) for s, _, y in row if y > 0)
    a_mass = sum(y for _, _, y in row if y > 0)
    total += a_total
    mass += a_mass
    if a_mass > 0:
      anchor_means.append(a_total / a_mass)
  if form == 'paper':
    return sum(anchor_means) / len(anchor_means) if anchor_means else 0.0
  return total / mass if (mass > 0 and any_neg) else 0.0


def loss(name, emb, labels, *, proxies=None, items=None, hp=None, form='pml'):
  """One entry point: clean (items None) or mixed (class-weight losses: a flat item list; pair losses: per anchor)."""
  if name in CLASS_WEIGHT:
    return class_weight_loss(name, emb, labels, proxies, items, hp)
  return pair_loss(name, emb, labels, items, hp, form)
