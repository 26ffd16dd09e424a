"""Brute-force float64 references of the Metrix mixed loss (spec sections 2.2-2.4): explicit Python loops over
anchors, pairs and mixed items, written from the formulas. Used only by tests; slow by design."""

import math

import numpy as np

from reference.losses_ref import cos, dist, log1p_sum_exp, log_sum_exp, normalize, softplus


def pair_sets_of(labels, pos_lists=None, neg_lists=None):
  """Per anchor: (positives, negatives) index lists; default all pairs from labels (MS: mined lists)."""
  b = len(labels)
  out = []
  for a in range(b):
    pos = [j for j in range(b) if j != a and labels[j] == labels[a]] if pos_lists is None else pos_lists[a]
    neg = [j for j in range(b) if labels[j] != labels[a]] if neg_lists is None else neg_lists[a]
    out.append((set(pos), set(neg)))
  return out


def in_pair_set(a, x, x2, sets, pair_sets):
  pos, neg = sets[a]
  return (
    ('pos_neg' in pair_sets and x in pos and x2 in neg)
    or ('anc_neg' in pair_sets and x == a and x2 in neg)
    or ('pos_pos' in pair_sets and x in pos and x2 in pos and x != x2)
    or ('neg_neg' in pair_sets and x in neg and x2 in neg and x != x2)
  )


def mixed_vector(e, x, x2, lam, renormalize=True):
  v = lam * e[x] + (1 - lam) * e[x2]
  return v / max(np.linalg.norm(v), 1e-12) if renormalize else v


def soft_label(lam, cx, cx2, c):
  return lam * (cx == c) + (1 - lam) * (cx2 == c)


def mixed_loss(name, emb, labels, items_per_anchor, *, proxies=None, hp=None, form='pml'):
  """The mixed term from_similarity(mixed) by loops.

  items_per_anchor: for embedding-anchor losses, a list over anchors a of lists of (x, x', lam) = V(a);
  for proxy losses, a flat list of (x, x', lam) items that every proxy sees.
  """
  hp = dict(hp or {})
  e = normalize(emb)
  b = len(labels)
  if name in ('proxy_anchor', 'proxy_nca'):
    p = normalize(proxies)
    vs = [(mixed_vector(e, x, x2, lam), labels[x], labels[x2], lam) for x, x2, lam in items_per_anchor]
    if name == 'proxy_anchor':
      alpha, margin = hp.get('alpha', 32.0), hp.get('margin', 0.1)
      pos_total, neg_total, with_pos = 0.0, 0.0, 0
      for c in range(len(p)):
        zp, zn = [], []
        for v, cx, cx2, lam in vs:
          y, s = soft_label(lam, cx, cx2, c), cos(v, p[c])
          if y > 0:
            zp.append(-alpha * (s - margin) + math.log(y))
          if 1 - y > 0:
            zn.append(alpha * (s + margin) + math.log(1 - y))
        with_pos += bool(zp)
        pos_total += log1p_sum_exp(zp)
        neg_total += log1p_sum_exp(zn)
      if form == 'paper':
        return (pos_total + neg_total) / len(p)
      return (pos_total / with_pos if with_pos else 0.0) + neg_total / len(p)
    k = hp.get('softmax_scale', 1.0)
    per_item = []
    for v, cx, cx2, lam in vs:
      zp, zn = [], []
      for c in range(len(p)):
        y, z = soft_label(lam, cx, cx2, c), -k * dist(v, p[c]) ** 2
        if y > 0:
          zp.append(z + math.log(y))
        if 1 - y > 0:
          zn.append(z + math.log(1 - y))
      per_item.append(softplus((log_sum_exp(zn) if zn else -math.inf) - log_sum_exp(zp)))
    return sum(per_item) / len(per_item) if per_item else 0.0

  per_anchor, pos_terms, neg_terms = [], [], []
  for a in range(b):
    rows = []
    for x, x2, lam in items_per_anchor[a]:
      v = mixed_vector(e, x, x2, lam)
      rows.append((cos(e[a], v), dist(e[a], v), soft_label(lam, labels[x], labels[x2], labels[a])))
    if name == 'contrastive':
      pos_margin, neg_margin = hp.get('pos_margin', 0.0), hp.get('neg_margin', 0.5)
      if form == 'paper':
        m = 1 - neg_margin**2 / 2
        per_anchor.append(sum(y * (-s) + (1 - y) * max(s - m, 0.0) for s, _, y in rows))
      else:
        pos_terms += [y * max(d - pos_margin, 0.0) for _, d, y in rows]
        neg_terms += [(1 - y) * max(neg_margin - d, 0.0) for _, d, y in rows]
    elif name == 'multi_similarity':
      al, be, base = hp.get('alpha', 2.0), hp.get('beta', 50.0), hp.get('base', 0.5)
      zp = [-al * (s - base) + math.log(y) for s, _, y in rows if y > 0]
      zn = [be * (s - base) + math.log(1 - y) for s, _, y in rows if 1 - y > 0]
      per_anchor.append(log1p_sum_exp(zp) / al + log1p_sum_exp(zn) / be)
    elif name == 'circle':
      m, gamma = hp.get('m', 0.4), hp.get('gamma', 80.0)
      zp = [-gamma * max(1 + m - s, 0.0) * (s - (1 - m)) + math.log(y) for s, _, y in rows if y > 0]
      zn = [gamma * max(s + m, 0.0) * (s - m) + math.log(1 - y) for s, _, y in rows if 1 - y > 0]
      per_anchor.append(softplus(log_sum_exp(zp) + log_sum_exp(zn)) if zp and zn else 0.0)
    elif name == 'lifted_structure':
      pm, nm = hp.get('pos_margin', 0.0), hp.get('neg_margin', 1.0)
      zp = [d - pm + math.log(y) for _, d, y in rows if y > 0]
      zn = [nm - d + math.log(1 - y) for _, d, y in rows if 1 - y > 0]
      per_anchor.append(max((log_sum_exp(zp) if zp else 0.0) + (log_sum_exp(zn) if zn else 0.0), 0.0))
    else:
      raise ValueError(name)
  if name == 'contrastive' and form != 'paper':
    pos = [t for t in pos_terms if t > 0]
    neg = [t for t in neg_terms if t > 0]
    return (sum(pos) / len(pos) if pos else 0.0) + (sum(neg) / len(neg) if neg else 0.0)
  if name == 'circle' and form != 'paper':
    nonzero = [t for t in per_anchor if t > 0]
    return sum(nonzero) / len(nonzero) if nonzero else 0.0
  return sum(per_anchor) / b


def items_from_plan(first, second, lam, anchor, valid, b, mask_mode='own'):
  """Per-anchor item lists from a sampled plan's arrays ('own': the anchor's items; 'all': every item)."""
  items = [(int(x), int(x2), float(l)) for x, x2, l, ok in zip(first, second, lam, valid) if ok]
  if mask_mode == 'all':
    return [items] * b
  return [
    [(int(x), int(x2), float(l)) for x, x2, l, an, ok in zip(first, second, lam, anchor, valid) if ok and an == a]
    for a in range(b)
  ]


def all_pairs_items(labels, sets, pair_sets, lam_of):
  """Per anchor, every (x, x', lam) with (x, x') in M(a), by a triple loop; lam_of(x, x') gives lambda."""
  b = len(labels)
  return [
    [(x, x2, lam_of(x, x2)) for x in range(b) for x2 in range(b) if in_pair_set(a, x, x2, sets, pair_sets)]
    for a in range(b)
  ]


def ms_mixed_gradients(s, y, alpha, beta, base):
  """d l~(a) / d s(a, v) for every item of one anchor, Multi-Similarity (PML names), explicit formula:
  -y_v e^{-alpha(s_v - base)} / (1 + sum_u y_u e^{-alpha(s_u - base)})
  + (1 - y_v) e^{beta(s_v - base)} / (1 + sum_u (1 - y_u) e^{beta(s_u - base)})."""
  pos = [yv * math.exp(-alpha * (sv - base)) for sv, yv in zip(s, y)]
  neg = [(1 - yv) * math.exp(beta * (sv - base)) for sv, yv in zip(s, y)]
  return [-p / (1 + sum(pos)) + n / (1 + sum(neg)) for p, n in zip(pos, neg)]


def ms_mixed_anchor_loss(s, y, alpha, beta, base):
  """l~(a) for one anchor's items (for finite differences)."""
  return (
    math.log1p(sum(yv * math.exp(-alpha * (sv - base)) for sv, yv in zip(s, y))) / alpha
    + math.log1p(sum((1 - yv) * math.exp(beta * (sv - base)) for sv, yv in zip(s, y))) / beta
  )


def ms_positivity(emb, labels, items_per_anchor, lam, alpha, beta, base):
  """(empirical, theoretical) fraction of (anchor, item) pairs acting as positives at one lambda, by loops:
  empirical: gradient < 0 among items with a non-zero gradient whose first item x has the anchor's class;
  theoretical: s(a, v) <= base + log(y / (1 - y)) / (alpha + beta) among the same items."""
  e = normalize(emb)
  n_pos = n_theory = count = 0
  for a, items in enumerate(items_per_anchor):
    rows = []
    for x, x2 in items:
      v = mixed_vector(e, x, x2, lam)
      rows.append((cos(e[a], v), soft_label(lam, labels[x], labels[x2], labels[a]), labels[x] == labels[a]))
    grads = ms_mixed_gradients([r[0] for r in rows], [r[1] for r in rows], alpha, beta, base)
    for (s, y, involved), g in zip(rows, grads):
      if not involved or g == 0:
        continue
      count += 1
      n_pos += g < 0
      if y >= 1:
        n_theory += 1
      elif y > 0:
        n_theory += s <= base + math.log(y / (1 - y)) / (alpha + beta)
  if count == 0:
    return math.nan, math.nan
  return n_pos / count, n_theory / count
