"""Issue 17: the one-call GPU verdict (its CPU rehearsal, its row scheduling, the GPU host's packages) and restarts
without recompiling (JAX's persistent compilation cache in the CLIs: where it lives, and that it changes nothing).

The wheel checks read ../shared/gpu/wheels-cp312 (beside the checkout) and skip where it is absent.
"""

import glob
import json
import math
import os
import subprocess
import sys
import tarfile
import time

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
SHARED_WHEELS = os.path.join(os.path.dirname(ROOT), 'shared', 'gpu', 'wheels-cp312')
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import gpu_verdict  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

TIMED_ROWS = (
  'torch_bf16_cl',
  'jax_clean',
  'jax_feature',
  'jax_embedding',
  'eval_embed',
  'e2e',
  'jax_input',
  'torch_fp32',
)


# -- the CPU rehearsal of the GPU call ---------------------------------------------------------------------------
@pytest.mark.slow
def test_smoke_rehearsal_writes_every_row_in_order(tmp_path):
  """`gpu_verdict.sh --smoke`: the GPU call's code path on a CPU (ResNet-18, 32 px), every row, the same files."""
  out = tmp_path / 'out'
  env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, JAX_PLATFORMS='cpu')
  start = time.time()
  proc = subprocess.run(
    ['bash', os.path.join(ROOT, 'benchmarks', 'gpu_verdict.sh'), '--smoke', f'--data_dir={tmp_path / "data"}'],
    capture_output=True,
    text=True,
    env=env,
    cwd=tmp_path,  # the script finds the checkout itself
    timeout=600,
  )
  took = time.time() - start
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  assert sorted(os.listdir(out)) == ['profile.tar.gz', 'verdict.json', 'verdict.log', 'verdict.md']
  doc = json.loads((out / 'verdict.json').read_text())
  assert doc['status'] == 'done' and doc['skipped'] == [], doc['skipped']
  assert [r['row'] for r in doc['rows']] == list(gpu_verdict.ROWS)  # most important first
  assert [t['row'] for t in doc['timeline']] == list(gpu_verdict.ROWS)
  rows = {r['row']: r for r in doc['rows']}
  for name in TIMED_ROWS:
    r = rows[name]
    assert r['images_per_s'] > 0 and math.isfinite(r['loss_value']) and r['row_s'] >= 0, name
  assert rows['torch_bf16_cl']['torch_variant'] == 'bf16_cl' and rows['torch_fp32']['torch_variant'] == 'fp32'
  assert [rows[n]['mix'] for n in ('jax_clean', 'jax_feature', 'jax_embedding', 'jax_input')] == [
    'none',
    'feature',
    'embedding',
    'input',
  ]
  assert all(rows[n]['batch_size'] == 20 and rows[n]['dtype'] == 'bfloat16' for n in ('jax_clean', 'jax_feature'))
  assert rows['jax_feature']['flops'] > rows['jax_clean']['flops'] > 0 and rows['eval_embed']['batch_size'] == 40
  assert rows['e2e']['mix'].startswith('feature, end to end (') and rows['e2e']['e2e_vs_step'] > 0
  # the largest-batch search: compile-only probes around the batch predicted from the feature row's memory
  probes = doc['max_batch_probe']
  assert probes and all(p['memory_bytes'] > 0 and p['fits'] in (True, False) for p in probes)
  assert rows['max_batch']['predicted_batch'] > 20
  # the targets are computed from the rows (met or not: a CPU says nothing about the GPU)
  met = {t['target'].split(' (')[0]: t['met'] for t in doc['targets']}
  assert all(v in (True, False) for k, v in met.items() if not k.startswith('largest')), met
  # XLA's compile log: every train step compilation, with the row it belonged to
  steps = [c for c in doc['xla_compile_log'] if 'train_step' in c['fun']]
  assert len(steps) >= 5 and {c['row'] for c in steps} >= {'jax_clean', 'jax_feature', 'jax_input'}
  with tarfile.open(out / 'profile.tar.gz') as tar:
    assert any(name.endswith('.xplane.pb') for name in tar.getnames())
  md = (out / 'verdict.md').read_text()
  assert '| row | framework | mix |' in md and '| target | value | threshold | met |' in md
  assert '# GPU verdict (done' in (out / 'verdict.log').read_text()  # the log holds what was printed
  print(f'smoke rehearsal: {took:.0f} s wall, {doc["elapsed_s"]:.0f} s inside the script')


class _FakeRunner(gpu_verdict.Runner):
  """The row scheduler without JAX: each row sleeps, fails or records itself; compile times are given."""

  def __init__(self, args, verdict, compile_s, step_s):  # pylint: disable=super-init-not-called
    self.args, self.v = args, verdict
    self.compiled = {'jax_clean': (None, compile_s, None, 1)}
    self.seconds = {'jax_clean': step_s}
    self.row_seconds = {}
    self.ran = []

  def __getattribute__(self, name):
    if not (name.startswith('row_') and name[len('row_') :] in gpu_verdict.ROWS):
      return object.__getattribute__(self, name)
    row = name[len('row_') :]

    def run():
      self.ran.append(row)
      if row == 'jax_embedding':
        raise ValueError('boom')
      fake = dict(framework='jax', loss='ms', mix=row, batch_size=4, images_per_s=1.0, ms_per_step=4e3, loss_value=0.5)
      self.emit(row, fake, time.time())

    return run


def test_rows_that_do_not_fit_are_skipped_and_a_failing_row_costs_no_other(tmp_path):
  args = gpu_verdict.parse_args([f'--out={tmp_path}', '--budget_s=100', '--rows=jax_clean,jax_embedding,e2e,jax_input'])
  verdict = gpu_verdict.Verdict(args, {'device': 'test'})
  # compile 50 s, steps 0.5 s, 23 runs: jax_input needs 1.5 x 50 + 2 x 23 x 0.5 = 98 s > the ~90 s left; e2e
  # (600 photos) 30 + 0.05 x 600 + 2 x 23 x 0.5 = 83 s fits
  runner = _FakeRunner(args, verdict, compile_s=50.0, step_s=0.5)
  runner.run()
  assert runner.ran == ['jax_clean', 'jax_embedding', 'e2e']
  doc = json.loads((tmp_path / 'verdict.json').read_text())
  assert [r['row'] for r in doc['rows']] == ['jax_clean', 'e2e']
  skipped = {s['row']: s['why'] for s in doc['skipped']}
  assert skipped['jax_embedding'] == 'failed: ValueError: boom'
  assert skipped['jax_input'].startswith('predicted 98 s from the compile/step times so far;')
  assert [t['row'] for t in doc['timeline']] == ['jax_clean', 'jax_embedding', 'e2e']
  assert 'skipped jax_input: predicted 98 s' in (tmp_path / 'verdict.md').read_text()


def test_core_rows_run_even_past_the_deadline_and_unknown_rows_are_refused(tmp_path):
  args = gpu_verdict.parse_args([f'--out={tmp_path}', '--budget_s=0', '--rows=jax_feature,jax_input'])
  runner = _FakeRunner(args, gpu_verdict.Verdict(args, {}), compile_s=10.0, step_s=0.1)
  runner.run()
  assert runner.ran == ['jax_feature']  # a core row always runs; an optional one only when it is predicted to fit
  with pytest.raises(SystemExit):
    gpu_verdict.parse_args(['--rows=jax_clean,pytorch'])
  smoke = gpu_verdict.parse_args(['--smoke'])
  assert (smoke.depth, smoke.image_size, smoke.batch_size, smoke.host_imports) == (18, 32, 20, 'on')
  full = gpu_verdict.parse_args([])
  assert (full.depth, full.image_size, full.batch_size, full.dtype, full.host_imports) == (
    50,
    224,
    180,
    'bfloat16',
    'off',
  )


def test_targets_from_rows():
  rows = [
    dict(row='torch_bf16_cl', images_per_s=1000.0),
    dict(row='jax_clean', images_per_s=1600.0),
    dict(row='jax_feature', images_per_s=1550.0),
    dict(row='eval_embed', images_per_s=4000.0),
  ]
  t = {x['target'].split(' (')[0]: x for x in gpu_verdict.targets(rows, [dict(batch_size=600, fits=True)])}
  assert t['MS + feature Metrix step vs PyTorch bf16 autocast + channels_last']['met'] is True
  assert t['MS + feature Metrix step vs PyTorch bf16 autocast + channels_last']['value'] == pytest.approx(1.55)
  assert t['feature-level Metrix over the clean step']['value'] == pytest.approx(100 * (1600 / 1550 - 1))
  assert t['embedding-level Metrix over the clean step']['met'] is None  # no row yet
  assert t['eval embedding vs the clean train step']['met'] is False  # 2.5x < 3x
  assert t['largest MS + feature batch that fits']['value'] == 600
  assert t['largest MS + feature batch that fits']['note'] == 'every probe fits: a lower bound'


# -- the GPU host's packages ---------------------------------------------------------------------------------------
GUARD_SCRIPT = """
import sys
sys.path.insert(0, {benchmarks!r})
import gpu_verdict
sys.meta_path.insert(0, gpu_verdict.HostImportGuard())
import numpy, absl, grain.python, ml_collections, tensorboardX  # the host's, and the staged wheels'
try:
  import pytorch_metric_learning  # in the test extras here, not on the GPU host
except ModuleNotFoundError as error:
  print('REFUSED', error)
"""


def test_import_guard_refuses_what_the_gpu_host_lacks():
  pytest.importorskip('pytorch_metric_learning')
  proc = subprocess.run(
    [sys.executable, '-c', GUARD_SCRIPT.format(benchmarks=os.path.join(ROOT, 'benchmarks'))],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "REFUSED No module named 'pytorch_metric_learning' on the GPU host" in proc.stdout


def _wheels():
  if not os.path.isdir(SHARED_WHEELS):
    pytest.skip(f'{SHARED_WHEELS} is not here (the GPU staging folder lies beside the checkout)')
  from packaging.utils import parse_wheel_filename  # pylint: disable=g-import-not-at-top

  out = {}
  for path in sorted(glob.glob(os.path.join(SHARED_WHEELS, '*.whl'))):
    name, version, _, tags = parse_wheel_filename(os.path.basename(path))
    assert name not in out, f'two versions of {name} in {SHARED_WHEELS}: pip --no-deps would stop on them'
    out[str(name)] = (str(version), tags, path)
  return out


def _requirements(path):
  import zipfile  # pylint: disable=g-import-not-at-top

  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top

  with zipfile.ZipFile(path) as z:
    meta = z.read(next(n for n in z.namelist() if n.endswith('.dist-info/METADATA'))).decode()
  return [Requirement(l.split(':', 1)[1].strip()) for l in meta.splitlines() if l.startswith('Requires-Dist:')]


def test_staged_wheels_are_the_listed_ones_and_fit_the_gpu_host():
  from packaging.utils import canonicalize_name  # pylint: disable=g-import-not-at-top

  wheels = _wheels()
  assert {n: v for n, (v, _, _) in wheels.items()} == gpu_verdict.WHEELS
  for name, (_, tags, _) in wheels.items():
    ok = [
      t
      for t in tags
      if t.interpreter in ('cp312', 'py3', 'py2')
      and t.abi in ('cp312', 'abi3', 'none')
      and (t.platform == 'any' or (t.platform.endswith('_x86_64') and 'linux' in t.platform))
    ]
    assert ok, f'{name}: no tag for CPython 3.12 on x86-64 Linux in {sorted(map(str, tags))}'
  lacking = {'grain', 'tensorflow-datasets', 'ml-collections', 'tensorboardx', 'array-record'}
  assert lacking <= set(wheels) and not lacking & gpu_verdict.HOST_PACKAGES
  assert not set(wheels) & gpu_verdict.HOST_PACKAGES  # a wheel beside the host's copy would shadow it
  # every wheel's requirements (markers for Python 3.12 on Linux) are on the host or among the wheels
  environment = {
    'python_version': '3.12',
    'python_full_version': '3.12.3',
    'sys_platform': 'linux',
    'platform_system': 'Linux',
    'platform_machine': 'x86_64',
    'implementation_name': 'cpython',
    'os_name': 'posix',
    'extra': '',
  }
  known = {**gpu_verdict.HOST_VERSIONS, **gpu_verdict.WHEELS}
  missing, too_old = [], []
  for name, (_, _, path) in wheels.items():
    for req in _requirements(path):
      if req.marker is not None and not req.marker.evaluate(environment):
        continue
      dist = canonicalize_name(req.name)
      if dist not in gpu_verdict.HOST_PACKAGES and dist not in wheels:
        missing.append(f'{name} needs {req}')
      elif dist in known and not req.specifier.contains(known[dist], prereleases=True):
        too_old.append(f'{name} needs {req}; the host has {known[dist]}')
  assert not missing and not too_old, missing + too_old


def test_project_dependencies_are_on_the_gpu_host_or_staged():
  tomllib = pytest.importorskip('tomllib')  # Python >= 3.11

  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  from packaging.utils import canonicalize_name  # pylint: disable=g-import-not-at-top

  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    deps = [Requirement(d) for d in tomllib.load(f)['project']['dependencies']]
  available = gpu_verdict.HOST_PACKAGES | set(gpu_verdict.WHEELS)
  known = {**gpu_verdict.HOST_VERSIONS, **gpu_verdict.WHEELS}
  for req in deps:
    dist = canonicalize_name(req.name)
    assert dist in available, f'{req} is neither on the GPU host nor among the staged wheels'
    if dist in known:
      assert req.specifier.contains(known[dist]), f'pyproject.toml {req} excludes the GPU host version {known[dist]}'


def test_a_staged_whl_folder_in_the_checkout_is_the_shared_one():
  wheels = _wheels()
  staged = os.path.join(ROOT, '.whl')
  if not os.path.isdir(staged):
    pytest.skip('no .whl/ in the checkout (bash ../shared/gpu/stage.sh makes it before the GPU call)')
  assert sorted(os.listdir(staged)) == sorted(os.path.basename(p) for _, _, p in wheels.values())


def test_the_verdict_script_parses():
  proc = subprocess.run(['bash', '-n', os.path.join(ROOT, 'benchmarks', 'gpu_verdict.sh')], capture_output=True)
  assert proc.returncode == 0, proc.stderr


# -- restarts without recompiling: JAX's persistent compilation cache ---------------------------------------------
def test_compilation_cache_folder_precedence(monkeypatch, tmp_path):
  from metrix_jax import cli  # pylint: disable=g-import-not-at-top

  for name in (cli.COMPILATION_CACHE_ENV, 'JAX_COMPILATION_CACHE_DIR', 'XDG_CACHE_HOME', 'PYTEST_CURRENT_TEST'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert cli.compilation_cache_dir() == str(tmp_path / 'home' / '.cache' / 'metrix_jax' / 'jax_compilation_cache')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert cli.compilation_cache_dir() == str(tmp_path / 'xdg' / 'metrix_jax' / 'jax_compilation_cache')
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'jax'))
  assert cli.compilation_cache_dir() == str(tmp_path / 'jax')
  monkeypatch.setenv(cli.COMPILATION_CACHE_ENV, str(tmp_path / 'env'))
  assert cli.compilation_cache_dir() == str(tmp_path / 'env')
  assert cli.compilation_cache_dir(str(tmp_path / 'flag')) == str(tmp_path / 'flag')
  for off in ('off', 'OFF', 'none', 'false', '0', ''):
    assert cli.compilation_cache_dir(off) is None
  monkeypatch.setenv(cli.COMPILATION_CACHE_ENV, 'off')
  assert cli.compilation_cache_dir() is None and cli.compilation_cache_dir('~/c') == os.path.expanduser('~/c')
  monkeypatch.delenv(cli.COMPILATION_CACHE_ENV)
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR')
  monkeypatch.setenv('PYTEST_CURRENT_TEST', 'x')  # test runs: off unless asked for
  assert cli.compilation_cache_dir() is None and cli.compilation_cache_dir(str(tmp_path)) == str(tmp_path)


def test_an_unusable_cache_folder_is_a_warning_not_an_error(tmp_path, caplog):
  import jax  # pylint: disable=g-import-not-at-top

  from metrix_jax import cli  # pylint: disable=g-import-not-at-top

  (tmp_path / 'file').write_text('')
  before = jax.config.jax_enable_compilation_cache
  try:
    assert cli.enable_compilation_cache(str(tmp_path / 'file' / 'cache')) is None
  finally:
    jax.config.update('jax_enable_compilation_cache', before)
  assert 'compilation cache off: cannot create' in caplog.text


CLI_SCRIPT = """
import sys; sys.path.insert(0, {tests!r})
import trainer_fakes, test_cli
from metrix_jax import embedding, input_pipeline
embedding.create_model = trainer_fakes.tiny_model_factory
input_pipeline.build_train_data = trainer_fakes.fake_data_factory()
input_pipeline.build_eval_data = test_cli.fake_eval_data
from metrix_jax import {module}
sys.argv = [{module!r}] + sys.argv[1:]
{call}
"""


def _cli(module, *args):
  call = 'main.run()' if module == 'main' else f'sys.exit({module}.main())'
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  proc = subprocess.run(
    [sys.executable, '-c', CLI_SCRIPT.format(tests=TESTS, module=module, call=call), *args],
    capture_output=True,
    text=True,
    env=env,
    cwd=ROOT,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _losses(workdir):
  return [(l['step'], l['loss']) for l in map(json.loads, open(workdir / 'metrics.jsonl')) if 'loss' in l]


@pytest.mark.slow
def test_a_warm_cache_skips_compilation_and_changes_no_result(tmp_path):
  """Train cold (empty cache), then warm (a new workdir, same cache), then with the cache off: identical losses
  and recalls; the warm run compiles nothing new (every program is a cache hit: no new file). evaluate likewise."""
  cache = tmp_path / 'cache'
  config = '--config=tests/tiny_run_config.py'
  cold = _cli('main', config, f'--workdir={tmp_path / "cold"}', f'--compilation_cache={cache}')
  assert f'JAX compilation cache: {cache}' in cold.stderr
  entries = set(os.listdir(cache))
  assert len(entries) >= 3  # init, the train step, the eval embedding (and the small programs)
  _cli('main', config, f'--workdir={tmp_path / "warm"}', f'--compilation_cache={cache}')
  assert set(os.listdir(cache)) == entries  # all hits
  off = _cli('main', config, f'--workdir={tmp_path / "off"}', '--compilation_cache=off')
  assert 'JAX compilation cache' not in off.stderr
  results = {k: json.loads((tmp_path / k / 'results.json').read_text()) for k in ('cold', 'warm', 'off')}
  assert _losses(tmp_path / 'cold') == _losses(tmp_path / 'warm') == _losses(tmp_path / 'off')
  for key in ('train_loss', 'recall', 'map_at_r', 'r_precision'):
    assert results['cold'][key] == results['warm'][key] == results['off'][key], key
  # evaluate and embed read the same flag (their programs are new entries, then hits)
  _cli('evaluate', f'--workdir={tmp_path / "cold"}', f'--compilation_cache={cache}', '--positivity=False')
  after_eval = set(os.listdir(cache))
  assert after_eval > entries
  _cli('evaluate', f'--workdir={tmp_path / "cold"}', f'--compilation_cache={cache}', '--positivity=False')
  assert set(os.listdir(cache)) == after_eval
  evals = [json.loads((tmp_path / 'cold' / 'eval.json').read_text())]
  _cli('evaluate', f'--workdir={tmp_path / "cold"}', '--compilation_cache=off', '--positivity=False')
  evals.append(json.loads((tmp_path / 'cold' / 'eval.json').read_text()))
  assert set(os.listdir(cache)) == after_eval
  assert evals[0]['recall'] == evals[1]['recall'] and evals[0]['map_at_r'] == evals[1]['map_at_r']
