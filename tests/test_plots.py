"""metrix_jax.plots: valid PNG files, the positivity record (strict JSON through jsonio), clear errors, lazy
matplotlib."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from metrix_jax import jsonio, plots

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _assert_png(path):
  with open(path, 'rb') as f:
    assert f.read(8) == PNG_SIGNATURE
  import matplotlib.image

  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
  assert np.ptp(image[..., :3]) > 0  # something was drawn


def test_plot_recall_at_k_single_and_named_series(tmp_path):
  single = {1: 0.61, 2: 0.72, 4: 0.81, 8: 0.88}
  _assert_png(plots.plot_recall_at_k(single, tmp_path / 'recall.png'))
  named = {'SOP': {1: 0.8, 10: 0.9, 100: 0.95, 1000: 0.98}, 'baseline': {'1': 0.7, '10': 0.85}}
  _assert_png(plots.plot_recall_at_k(named, tmp_path / 'sub' / 'recall_named.png'))


def test_plot_positivity(tmp_path):
  lambdas = np.linspace(0.05, 0.95, 10)
  theoretical = 1 / (1 + np.exp(-12 * (lambdas - 0.5)))
  empirical = theoretical + 0.03
  empirical[0] = np.nan  # an empty bin
  _assert_png(plots.plot_positivity(lambdas, empirical, theoretical, tmp_path / 'positivity.png'))
  _assert_png(plots.plot_positivity(lambdas, empirical, None, tmp_path / 'positivity_empirical.png'))


def test_positivity_record_written_as_strict_json(tmp_path):
  lambdas = np.array([0.1, 0.5, 0.9], np.float32)
  record = plots.positivity_record(lambdas, [np.nan, 0.5, 1.0], np.array([0.0, 0.5, 1.0]))
  assert record['empirical'] == [None, 0.5, 1.0]  # NaN (an empty bin) -> None
  assert all(type(v) is float for v in record['lambda'] + record['theoretical'])
  loaded = jsonio.read_json(jsonio.write_json(tmp_path / 'a' / 'positivity.json', record))
  assert loaded['lambda'] == pytest.approx([0.1, 0.5, 0.9])
  assert loaded['empirical'] == [None, 0.5, 1.0]
  assert loaded['theoretical'] == [0.0, 0.5, 1.0]
  assert plots.positivity_record([0.5], [1.0])['theoretical'] is None


def test_no_json_writer_here():
  """One JSON writer per project: metrix_jax.jsonio (plots only plots)."""
  assert not hasattr(plots, 'write_json') and not hasattr(plots, 'to_jsonable')


@pytest.mark.parametrize(
  'call,message',
  [
    (lambda p: plots.plot_recall_at_k({}, p), 'empty'),
    (lambda p: plots.plot_recall_at_k({0: 0.5}, p), 'K >= 1'),
    (lambda p: plots.plot_recall_at_k({'x': 0.5}, p), 'positive int K'),
    (lambda p: plots.plot_positivity([0.1, 0.2], [0.5], None, p), 'one value per lambda bin'),
    (lambda p: plots.plot_positivity([[0.1]], [0.5], None, p), '1-D'),
    (lambda p: plots.positivity_record([0.1, 0.2], [0.1, 0.2], [0.3]), 'theoretical'),
  ],
)
def test_bad_inputs_raise(tmp_path, call, message):
  with pytest.raises(ValueError, match=message):
    call(tmp_path / 'bad.png')
  assert not (tmp_path / 'bad.png').exists()


def test_import_does_not_load_matplotlib():
  code = "import sys, metrix_jax.plots; print('matplotlib' in sys.modules)"
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, check=True)
  assert out.stdout.strip() == 'False'


def test_positivity_plot_carries_its_explanation(tmp_path):
  """The caption (what is plotted, what the isolated-item theory assumes) makes the figure taller: 500 x 480 px
  with it, 500 x 360 without (PNG header)."""
  import struct  # pylint: disable=g-import-not-at-top

  lam = np.linspace(0.05, 0.95, 5)
  sizes = {}
  for name, explanation in (('with', plots.POSITIVITY_EXPLANATION), ('without', None)):
    path = plots.plot_positivity(lam, lam, None, tmp_path / f'{name}.png', explanation=explanation)
    with open(path, 'rb') as f:
      header = f.read(24)
    sizes[name] = struct.unpack('>II', header[16:24])
  assert sizes == {'with': (500, 480), 'without': (500, 360)}
  assert 'd loss / d s(a, v) < 0' in plots.POSITIVITY_EXPLANATION and 'log(lambda / (1 - lambda))' in (
    plots.POSITIVITY_EXPLANATION
  )


def test_plot_retrieval_grid_uint8_and_float_images(tmp_path):
  rng = np.random.default_rng(0)
  queries = rng.integers(0, 255, size=(3, 8, 8, 3), dtype=np.uint8)
  neighbours = rng.integers(0, 255, size=(3, 4, 8, 8, 3), dtype=np.uint8)
  correct = rng.random((3, 4)) < 0.5
  _assert_png(plots.plot_retrieval_grid(queries, neighbours, correct, tmp_path / 'grid.png', row_labels=[1, 2, 3]))
  gray = rng.normal(size=(2, 8, 8, 1))
  _assert_png(plots.plot_retrieval_grid(gray, rng.normal(size=(2, 1, 8, 8, 1)), [[True], [False]], tmp_path / 'g.png'))
  np.testing.assert_allclose(plots._display_image(np.array([[[2.0], [4.0]]])), [[0.0, 1.0]])
  with pytest.raises(ValueError, match='do not match'):
    plots.plot_retrieval_grid(queries, neighbours[:, :2], correct, tmp_path / 'bad.png')


def test_write_outputs_draws_the_grid_on_request_and_removes_a_stale_one(tmp_path):
  from metrix_jax import report as report_lib  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(1)
  report = {'recall': {1: 0.5, 2: 0.7}, 'dataset': 'demo', 'step': 3}
  examples = {'correct': [[True, False]], 'query_labels': [7]}
  images = (rng.integers(0, 255, (1, 8, 8, 3), np.uint8), rng.integers(0, 255, (1, 2, 8, 8, 3), np.uint8))
  paths = report_lib.write_outputs({**report, 'retrieval_examples': examples}, str(tmp_path), retrieval_images=images)
  _assert_png(paths['retrieval_grid'])
  assert jsonio.read_json(tmp_path / 'eval.json')['files']['retrieval_grid'] == 'eval_retrieval.png'
  paths = report_lib.write_outputs(dict(report), str(tmp_path))  # a later evaluation without the grid
  assert 'retrieval_grid' not in paths and not (tmp_path / 'eval_retrieval.png').exists()
