"""Brute-force float64 numpy references for `metrix_jax.evaluation`, written from the definitions with loops.

Used only by tests. Every query's reference list is built item by item and ranked by sorting with the
documented tie rule (higher similarity first; at equal similarity same-class items first), then Recall@K,
AP@R and R-Precision are read off that list exactly as their definitions say. This is deliberately a
different computation from the library's (which counts negatives above positives and never sorts).
"""

from __future__ import annotations

import math

import numpy as np


def normalize(x):
  """Rows of x [n, d] over max(||row||, 1e-12), float64."""
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  for i in range(len(x)):
    out[i] = x[i] / max(math.sqrt(float(np.dot(x[i], x[i]))), 1e-12)
  return out


def ranked_relevance(embeddings, labels, gallery_embeddings=None, gallery_labels=None):
  """For each query: list of booleans (same class?) over its reference items, nearest first (ties: same first)."""
  queries = normalize(embeddings)
  leave_one_out = gallery_embeddings is None
  gallery = queries if leave_one_out else normalize(gallery_embeddings)
  gallery_labels = labels if leave_one_out else gallery_labels
  lists = []
  for i in range(len(queries)):
    items = []
    for j in range(len(gallery)):
      if leave_one_out and j == i:
        continue
      same = bool(labels[i] == gallery_labels[j])
      items.append((-float(np.dot(queries[i], gallery[j])), 0 if same else 1, same))
    items.sort(key=lambda item: (item[0], item[1]))
    lists.append([item[2] for item in items])
  return lists


def retrieval_metrics(embeddings, labels, ks, gallery_embeddings=None, gallery_labels=None):
  """{'recall': {k: ...}, 'map_at_r', 'r_precision', 'precision_at_1'} from the ranked lists."""
  lists = ranked_relevance(embeddings, labels, gallery_embeddings, gallery_labels)
  recall = {k: sum(any(rel[:k]) for rel in lists) / len(lists) for k in ks}
  aps, rps, p1s = [], [], []
  for rel in lists:
    r = sum(rel)
    if r == 0:  # lone query: a miss for Recall@K, left out of the rest (PML)
      continue
    hits, precision_sum = 0, 0.0
    for i in range(r):
      if rel[i]:
        hits += 1
        precision_sum += hits / (i + 1)
    aps.append(precision_sum / r)
    rps.append(hits / r)
    p1s.append(float(rel[0]))
  mean = lambda v: sum(v) / len(v) if v else math.nan  # noqa: E731
  return {'recall': recall, 'map_at_r': mean(aps), 'r_precision': mean(rps), 'precision_at_1': mean(p1s)}


def utilization(test_embeddings, train_embeddings):
  """(1/|Q|) sum_q min_x ||q - x||^2 over normalised rows."""
  q, x = normalize(test_embeddings), normalize(train_embeddings)
  total = 0.0
  for i in range(len(q)):
    total += min(float(np.sum((q[i] - x[j]) ** 2)) for j in range(len(x)))
  return total / len(q)


def alignment(embeddings, labels):
  """Mean of ||f(x) - f(x+)||^2 over unordered same-class pairs."""
  z = normalize(embeddings)
  values = [
    float(np.sum((z[i] - z[j]) ** 2)) for i in range(len(z)) for j in range(i + 1, len(z)) if labels[i] == labels[j]
  ]
  return sum(values) / len(values)


def uniformity(embeddings, t=2.0):
  """log of the mean of exp(-t ||f(x) - f(y)||^2) over unordered distinct pairs."""
  z = normalize(embeddings)
  values = [math.exp(-t * float(np.sum((z[i] - z[j]) ** 2))) for i in range(len(z)) for j in range(i + 1, len(z))]
  return math.log(sum(values) / len(values))
