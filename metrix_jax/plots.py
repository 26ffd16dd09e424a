"""Evaluation plots: Recall@K and positivity (PNG), and the positivity record written next to them.

matplotlib is imported lazily inside the plotting functions and drives an Agg canvas directly (no pyplot, no
global backend switch, no display needed), so importing this module stays light.

Positivity data come from `metrix_jax.analysis` (gradient sign of the mixed loss per lambda, spec section 6):
per lambda bin, the empirical fraction of mixed items that act as positives for their anchor, next to the
paper's theoretical curve P(Pos). `positivity_record` turns those arrays into the JSON layout written next to
the plot: {"lambda": [...], "empirical": [...], "theoretical": [...] or null} (NaN, e.g. an empty bin, is
None, i.e. null once written with `metrix_jax.jsonio.write_json`, the project's JSON writer).
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping
from typing import Any

import numpy as np

from metrix_jax import jsonio


# ----------------------------------------------------------------------------------------------------------
# Positivity record.
# ----------------------------------------------------------------------------------------------------------
def _as_curve(values: Any, name: str, length: int | None = None) -> np.ndarray:
  array = np.asarray(values, dtype=np.float64)
  if array.ndim != 1 or array.size == 0:
    raise ValueError(f'{name} must be a non-empty 1-D array (one value per lambda bin); got shape {array.shape}.')
  if length is not None and array.size != length:
    raise ValueError(f'{name} has {array.size} values but lambdas has {length}: pass one value per lambda bin.')
  return array


def positivity_record(lambdas: Any, empirical: Any, theoretical: Any = None) -> dict[str, Any]:
  """JSON-ready positivity curve.

  Args:
    lambdas: lambda bin centres [B], in [0, 1] (the mixing weight of the first item).
    empirical: fraction of mixed items that are positives for their anchor in each bin [B], in [0, 1]
      (NaN for an empty bin).
    theoretical: the paper's P(Pos) at the same lambdas [B], or None.

  Returns:
    {"lambda": [B floats], "empirical": [B floats or None], "theoretical": [B floats or None] or None}.
  """
  lambdas = _as_curve(lambdas, 'lambdas')
  record = {
    'lambda': lambdas,
    'empirical': _as_curve(empirical, 'empirical', lambdas.size),
    'theoretical': None if theoretical is None else _as_curve(theoretical, 'theoretical', lambdas.size),
  }
  return jsonio.to_jsonable(record)


# ----------------------------------------------------------------------------------------------------------
# Plots.
# ----------------------------------------------------------------------------------------------------------
def _new_figure(width: float = 5.0, height: float = 3.6):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  figure = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(figure)
  return figure


def _save(figure, path: str | os.PathLike, *, layout: bool = True) -> str:
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if layout:
    figure.tight_layout()
  figure.savefig(path, format='png')
  return path


def _recall_series(recalls: Mapping) -> dict[str, tuple[list[int], list[float]]]:
  """{name: (ks, recalls)} from {k: recall} or {name: {k: recall}}, ks sorted."""
  if not recalls:
    raise ValueError('recalls is empty: pass {k: recall} or {name: {k: recall}}.')
  nested = all(isinstance(value, Mapping) for value in recalls.values())
  series = recalls if nested else {'': recalls}
  out = {}
  for name, curve in series.items():
    if not curve:
      raise ValueError(f'recalls[{name!r}] is empty.')
    try:
      pairs = sorted((int(k), float(v)) for k, v in curve.items())
    except (TypeError, ValueError) as error:
      raise ValueError(f'recalls must map positive int K to a recall in [0, 1]; got {dict(curve)!r}.') from error
    if pairs[0][0] < 1:
      raise ValueError(f'Recall@K needs K >= 1; got K={pairs[0][0]}.')
    out[str(name)] = ([k for k, _ in pairs], [v for _, v in pairs])
  return out


def plot_recall_at_k(recalls: Mapping, path: str | os.PathLike, *, title: str = 'Recall@K') -> str:
  """Recall@K (in %) against K on a log axis, one line per series; writes a PNG and returns its path.

  Args:
    recalls: {k: recall in [0, 1]} (e.g. `evaluation.recall_at_k`'s result) or {name: {k: recall}} to
      compare runs or test splits.
    path: output .png path (parent folders are created).
  """
  series = _recall_series(recalls)
  figure = _new_figure()
  axes = figure.add_subplot()
  all_ks: set[int] = set()
  for name, (ks, values) in series.items():
    axes.plot(ks, [100.0 * v for v in values], marker='o', label=name or None)
    all_ks.update(ks)
  axes.set_xscale('log')
  axes.set_xticks(sorted(all_ks))
  axes.set_xticklabels([str(k) for k in sorted(all_ks)])
  axes.minorticks_off()
  axes.set_xlabel('K')
  axes.set_ylabel('Recall@K (%)')
  axes.set_ylim(0, 100)
  axes.grid(True, alpha=0.3)
  axes.set_title(title)
  if any(series):
    axes.legend()
  return _save(figure, path)


POSITIVITY_EXPLANATION = (
  "empirical: fraction of mixed items v = mix_lambda(x, x') (x of the anchor's class, x' not) that the loss pulls "
  'towards the anchor (d loss / d s(a, v) < 0), every item at the same lambda, all items of an anchor together in '
  'its loss. theoretical (multi-similarity): the same for an item alone, positive iff s(a, v) <= base + '
  'log(lambda / (1 - lambda)) / (alpha + beta); the paper expects a rise from 0 to 1, but with several items per '
  'anchor the lambdas partly cancel inside the log-sums, so a measured curve can be flat or fall.'
)


def plot_positivity(
  lambdas: Any,
  empirical: Any,
  theoretical: Any,
  path: str | os.PathLike,
  *,
  title: str = 'Positivity of mixed embeddings',
  explanation: str | None = POSITIVITY_EXPLANATION,
) -> str:
  """Fraction of mixed items that act as positives vs lambda, empirical and theoretical; writes a PNG.

  Args: as `positivity_record` (`theoretical` may be None); path: output .png path; explanation: the caption
  under the axes (what is plotted and what the theory assumes; None: no caption). Returns the path.
  """
  record = positivity_record(lambdas, empirical, theoretical)
  nan = lambda values: [math.nan if v is None else v for v in values]  # noqa: E731
  figure = _new_figure(height=3.6 if explanation is None else 4.8)
  axes = figure.add_subplot()
  axes.plot(record['lambda'], nan(record['empirical']), marker='o', linestyle='-', label='empirical')
  if record['theoretical'] is not None:
    axes.plot(record['lambda'], nan(record['theoretical']), linestyle='--', label='theoretical (isolated item)')
  axes.set_xlabel('lambda (weight of the same-class item x)')
  axes.set_ylabel('P(mixed item acts as a positive)')
  axes.set_xlim(0, 1)
  axes.set_ylim(-0.02, 1.02)
  axes.grid(True, alpha=0.3)
  axes.set_title(title)
  axes.legend()
  if explanation:
    figure.text(0.02, 0.01, textwrap.fill(explanation, 95), fontsize=6.5, va='bottom', ha='left')
    figure.tight_layout(rect=(0, 0.2, 1, 1))
    return _save(figure, path, layout=False)
  return _save(figure, path)


__all__ = ['plot_positivity', 'plot_recall_at_k', 'positivity_record']


# ----------------------------------------------------------------------------------------------------------
# Retrieval examples.
# ----------------------------------------------------------------------------------------------------------
CORRECT_COLOR, WRONG_COLOR = '#1a9641', '#d7191c'


def _display_image(image: Any) -> np.ndarray:
  """uint8 or float [H, W, 3] (or [H, W, 1]) -> what imshow shows: uint8 as is, floats rescaled to [0, 1]."""
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.dtype == np.uint8:
    return image
  low, high = float(np.min(image)), float(np.max(image))
  return (image - low) / (high - low) if high > low else np.zeros_like(image, np.float64)


def plot_retrieval_grid(
  query_images: Any,
  neighbour_images: Any,
  correct: Any,
  path: str | os.PathLike,
  *,
  title: str = 'Retrieval examples',
  row_labels: Any = None,
) -> str:
  """One row per query: the query, then its top-K retrievals framed green (same class) or red (another class).

  query_images [Q, H, W, C], neighbour_images [Q, K, H, W, C] (uint8, or floats: rescaled per image), correct
  [Q, K] bool, row_labels [Q] (optional text under each query, e.g. its class). Returns `path` (PNG).
  """
  correct = np.asarray(correct, bool)
  num_queries, k = correct.shape
  if len(query_images) != num_queries or np.shape(neighbour_images)[:2] != (num_queries, k):
    raise ValueError(
      f'{len(query_images)} query images and neighbour images of shape {np.shape(neighbour_images)[:2]} do not '
      f'match correct of shape {correct.shape}.'
    )
  figure = _new_figure(1.3 * (k + 1) + 0.2, 1.35 * num_queries + 0.5)
  for q in range(num_queries):
    for column in range(k + 1):
      axes = figure.add_subplot(num_queries, k + 1, q * (k + 1) + column + 1)
      image = query_images[q] if column == 0 else neighbour_images[q][column - 1]
      axes.imshow(_display_image(image), cmap='gray', interpolation='nearest')
      axes.set_xticks([])
      axes.set_yticks([])
      color, width = ('black', 1.0) if column == 0 else (CORRECT_COLOR if correct[q, column - 1] else WRONG_COLOR, 4.0)
      for spine in axes.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(width)
      if q == 0:
        axes.set_title('query' if column == 0 else f'#{column}', fontsize=8)
      if column == 0 and row_labels is not None:
        axes.set_xlabel(str(row_labels[q]), fontsize=7)
  figure.suptitle(title, fontsize=9)
  return _save(figure, path)
