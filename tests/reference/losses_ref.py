"""Brute-force float64 references of the named losses: explicit Python loops over anchors and pairs, written
from the formulas (spec section 1, PML 2.9.0 semantics). Used only by tests; slow by design."""

import math

import numpy as np


def normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cos(u, v):
  return float(np.dot(u, v))


def dist(u, v):
  return float(np.linalg.norm(u - v))


def log1p_sum_exp(zs):
  """log(1 + sum exp(z)) for a Python list (0 for an empty list)."""
  if not zs:
    return 0.0
  m = max(max(zs), 0.0)
  return m + math.log(math.exp(-m) + sum(math.exp(z - m) for z in zs))


def log_sum_exp(zs):
  m = max(zs)
  return m + math.log(sum(math.exp(z - m) for z in zs))


def softplus(x):
  if x == -math.inf:
    return 0.0
  return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def contrastive(emb, labels, pos_margin=0.0, neg_margin=0.5, form='pml'):
  e = normalize(emb)
  b = len(labels)
  if form == 'paper':
    m = 1.0 - neg_margin**2 / 2.0
    total = 0.0
    for a in range(b):
      for j in range(b):
        if j == a:
          continue
        s = cos(e[a], e[j])
        total += -s if labels[a] == labels[j] else max(s - m, 0.0)
    return total / b
  pos, neg = [], []
  for a in range(b):
    for j in range(b):
      if j == a:
        continue
      d = dist(e[a], e[j])
      if labels[a] == labels[j]:
        pos.append(max(d - pos_margin, 0.0))
      else:
        neg.append(max(neg_margin - d, 0.0))
  pos = [x for x in pos if x > 0]
  neg = [x for x in neg if x > 0]
  return (sum(pos) / len(pos) if pos else 0.0) + (sum(neg) / len(neg) if neg else 0.0)


def ms_mined_pairs(emb, labels, epsilon):
  """Per anchor, the lists of mined positive and negative indices (PML MultiSimilarityMiner)."""
  e = normalize(emb)
  b = len(labels)
  out = []
  for a in range(b):
    pos = [j for j in range(b) if j != a and labels[j] == labels[a]]
    neg = [j for j in range(b) if labels[j] != labels[a]]
    if epsilon is None:
      out.append((pos, neg))
      continue
    max_neg = max((cos(e[a], e[n]) for n in neg), default=-math.inf)
    min_pos = min((cos(e[a], e[p]) for p in pos), default=math.inf)
    out.append(
      ([p for p in pos if cos(e[a], e[p]) - epsilon < max_neg], [n for n in neg if cos(e[a], e[n]) + epsilon > min_pos])
    )
  return out


def ms_miner_mask(sim, targets, mask, epsilon):
  """PML MultiSimilarityMiner's rule by loops on a given similarity matrix [A][N] -> mined [A, N] bool.

  Candidate j of anchor a is a positive if mask[a][j] and targets[a][j] >= 1, a negative if mask[a][j] and
  targets[a][j] <= 0 (soft targets in between: neither, never kept). Keeps positive p if
  s_ap - epsilon < max_n s_an and negative n if s_an + epsilon > min_p s_ap (strict); an anchor without
  negatives keeps no positive and vice versa."""
  out = np.zeros(np.shape(sim), bool)
  for a in range(len(sim)):
    cols = range(len(sim[a]))
    pos = [j for j in cols if mask[a][j] and targets[a][j] >= 1]
    neg = [j for j in cols if mask[a][j] and targets[a][j] <= 0]
    max_neg = max((float(sim[a][n]) for n in neg), default=-math.inf)
    min_pos = min((float(sim[a][p]) for p in pos), default=math.inf)
    for p in pos:
      out[a, p] = float(sim[a][p]) - epsilon < max_neg
    for n in neg:
      out[a, n] = float(sim[a][n]) + epsilon > min_pos
  return out


def multi_similarity(emb, labels, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1):
  e = normalize(emb)
  total = 0.0
  for a, (pos, neg) in enumerate(ms_mined_pairs(emb, labels, epsilon)):
    total += log1p_sum_exp([-alpha * (cos(e[a], e[p]) - base) for p in pos]) / alpha
    total += log1p_sum_exp([beta * (cos(e[a], e[n]) - base) for n in neg]) / beta
  return total / len(labels)


def proxy_anchor(emb, labels, proxies, alpha=32.0, margin=0.1, form='pml'):
  e, p = normalize(emb), normalize(proxies)
  num_classes = len(p)
  pos_total, neg_total, with_pos = 0.0, 0.0, 0
  for c in range(num_classes):
    members = [i for i in range(len(labels)) if labels[i] == c]
    others = [i for i in range(len(labels)) if labels[i] != c]
    if members:
      with_pos += 1
    pos_total += log1p_sum_exp([-alpha * (cos(e[i], p[c]) - margin) for i in members])
    neg_total += log1p_sum_exp([alpha * (cos(e[i], p[c]) + margin) for i in others])
  if form == 'paper':
    return (pos_total + neg_total) / num_classes
  return (pos_total / with_pos if with_pos else 0.0) + neg_total / num_classes


def circle(emb, labels, m=0.4, gamma=80.0, form='pml'):
  e = normalize(emb)
  b = len(labels)
  losses = []
  for a in range(b):
    zp, zn = [], []
    for j in range(b):
      if j == a:
        continue
      s = cos(e[a], e[j])
      if labels[j] == labels[a]:
        zp.append(-gamma * max(1 + m - s, 0.0) * (s - (1 - m)))
      else:
        zn.append(gamma * max(s + m, 0.0) * (s - m))
    losses.append(softplus(log_sum_exp(zp) + log_sum_exp(zn)) if zp and zn else 0.0)
  if form == 'paper':
    return sum(losses) / b
  nonzero = [x for x in losses if x > 0]
  return sum(nonzero) / len(nonzero) if nonzero else 0.0


def proxy_nca(emb, labels, proxies, softmax_scale=1.0):
  e, p = normalize(emb), normalize(proxies)
  losses = []
  for i in range(len(labels)):
    logits = [-softmax_scale * dist(e[i], p[c]) ** 2 for c in range(len(p))]
    m = max(logits)
    denom = sum(math.exp(z - m) for z in logits)
    prob = math.exp(logits[labels[i]] - m) / denom
    losses.append(-math.log(prob))
  return sum(losses) / len(losses)


def lifted_structure(emb, labels, pos_margin=0.0, neg_margin=1.0):
  e = normalize(emb)
  b = len(labels)
  total = 0.0
  for a in range(b):
    zp = [dist(e[a], e[j]) - pos_margin for j in range(b) if j != a and labels[j] == labels[a]]
    zn = [neg_margin - dist(e[a], e[j]) for j in range(b) if labels[j] != labels[a]]
    total += max((log_sum_exp(zp) if zp else 0.0) + (log_sum_exp(zn) if zn else 0.0), 0.0)
  return total / b


def generic(sim, targets, mask, rho_pos, rho_neg, sigma_pos=None, sigma_neg=None, tau=None):
  """Per-anchor generic loss (spec 1.1) by loops; rho/sigma/tau are plain float -> float functions."""
  ident = lambda x: x
  sigma_pos, sigma_neg, tau = sigma_pos or ident, sigma_neg or ident, tau or ident
  out = []
  for a in range(len(sim)):
    sp = sum(targets[a][j] * rho_pos(sim[a][j]) for j in range(len(sim[a])) if mask[a][j])
    sn = sum((1 - targets[a][j]) * rho_neg(sim[a][j]) for j in range(len(sim[a])) if mask[a][j])
    out.append(tau(sigma_pos(sp) + sigma_neg(sn)))
  return np.array(out)
