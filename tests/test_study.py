"""scripts/study.py: the run plan (dry run, filters, errors), the statistics against scipy/numpy, the report from
finished runs, and one real 2-step study run on the demo data through the project's trainer."""

import ast
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from metrix_jax import jsonio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'scripts', 'study.py')
STUDY_CONFIG = os.path.join(ROOT, 'configs', 'study', 'metrix.py')

_spec = importlib.util.spec_from_file_location('study_script', SCRIPT)
study = importlib.util.module_from_spec(_spec)
sys.modules['study_script'] = study  # dataclasses look their module up
_spec.loader.exec_module(study)


def _cli(args, timeout=120):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  return subprocess.run(
    [sys.executable, SCRIPT, *args], cwd=ROOT, env=env, text=True, capture_output=True, timeout=timeout
  )


# ----------------------------------------------------------------------------------------------------------------
# The plan.
# ----------------------------------------------------------------------------------------------------------------
def test_dry_run_lists_every_run_seed_major(tmp_path):
  proc = _cli([f'--config={STUDY_CONFIG}:omniglot', f'--workdir={tmp_path}', '--dry-run'])
  assert proc.returncode == 0, proc.stderr
  lines = [l for l in proc.stdout.splitlines() if l.strip()[:3].strip().rstrip('.').isdigit()]
  assert len(lines) == 24  # 8 rows x 3 seeds
  names = [l.split()[1] for l in lines]
  assert names[:8] == [
    f'{r}/seed1'
    for r in (
      'ms-none',
      'ms-feature',
      'ms-input',
      'ms-embedding',
      'contrastive-none',
      'contrastive-feature',
      'pa-none',
      'pa-feature',
    )
  ]
  assert [n.split('/')[1] for n in names] == ['seed1'] * 8 + ['seed2'] * 8 + ['seed3'] * 8
  assert all('pending' in l for l in lines)
  first = lines[0]
  assert '-m metrix_jax.main' in first and 'configs/omniglot.py:ms,none' in first and '--config.seed=1' in first
  assert '--config.dataset.image_size=16' in first and '--config.train.num_steps=' in first
  assert 'metrix_jax.evaluate' in proc.stdout and '--checkpoint=latest' in proc.stdout
  assert not os.listdir(tmp_path)  # a dry run writes nothing


def test_longer_budget_addendum_config():
  """omniglot_300 = the omniglot recipe with 300 steps (no duplicate overrides), 6 rows x 3 seeds."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location('study_config', os.path.join(ROOT, STUDY_CONFIG))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  base, long = module.get_config('omniglot'), module.get_config('omniglot_300')
  assert long.rows == ('ms,none', 'ms,feature', 'ms,input', 'ms,embedding', 'contrastive,none', 'contrastive,feature')
  assert [o for o in long.overrides if o.startswith('train.num_steps=')] == ['train.num_steps=300']
  assert set(long.overrides) - set(base.overrides) == {'train.num_steps=300', 'train.log_every_steps=50'}
  assert tuple(long.seeds) == (1, 2, 3) and long.trainer_config == base.trainer_config


def test_transfer_studies_need_the_source_and_follow_the_registered_recipe(tmp_path):
  proc = _cli([f'--config={STUDY_CONFIG}:omniglot_transfer', f'--workdir={tmp_path}', '--dry-run'])
  assert proc.returncode == 2 and proc.stderr.splitlines()[0].startswith('error: study omniglot_transfer fine-tunes')
  assert '--config.pretrained=WORKDIR' in proc.stderr and 'configs/pretrain_glyphs.py' in proc.stderr
  source = tmp_path / 'pretrain_glyphs'
  proc = _cli(
    [
      f'--config={STUDY_CONFIG}:omniglot_transfer',
      f'--workdir={tmp_path}',
      '--dry-run',
      f'--config.pretrained={source}',
    ]
  )
  assert proc.returncode == 0, proc.stderr
  lines = [l for l in proc.stdout.splitlines() if l.strip()[:3].strip().rstrip('.').isdigit()]
  assert len(lines) == 25  # 5 rows x 5 seeds
  assert all(f'--config.model.pretrained={source}' in l and '--config.model.bn_freeze=True' in l for l in lines)
  assert all('--config.optim.warmup_epochs=2' in l and '--config.dataset.image_size=32' in l for l in lines)
  proc = _cli([f'--config={STUDY_CONFIG}:omniglot_transfer_scratch', f'--workdir={tmp_path}', '--dry-run'])
  assert proc.returncode == 0, proc.stderr
  lines = [l for l in proc.stdout.splitlines() if l.strip()[:3].strip().rstrip('.').isdigit()]
  assert len(lines) == 10 and all('--config.model.bn_freeze=False' in l for l in lines)
  # every run's trainer config validates with the study's overrides (the last value of a key wins, as flags do)
  module_spec = importlib.util.spec_from_file_location('study_config', STUDY_CONFIG)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  from metrix_jax import config_lib  # pylint: disable=g-import-not-at-top

  trainer_spec = importlib.util.spec_from_file_location('omniglot_config', os.path.join(ROOT, 'configs', 'omniglot.py'))
  trainer = importlib.util.module_from_spec(trainer_spec)
  trainer_spec.loader.exec_module(trainer)
  for name in ('omniglot_transfer', 'omniglot_transfer_scratch'):
    s = module.get_config(name)
    assert tuple(s.seeds) == (1, 2, 3, 4, 5) and s.primary == 'ms,feature' and s.primary_k == 1
    for row in s.rows:
      config = trainer.get_config(row)
      for override in s.overrides:
        key, value = override.split('=', 1)
        node = config
        *parents, leaf = key.split('.')
        for part in parents:
          node = node[part]
        try:
          node[leaf] = ast.literal_eval(value)  # as ml_collections parses a --config.KEY=VALUE flag
        except (ValueError, SyntaxError):
          node[leaf] = value  # a plain string (e.g. 'cosine')
      config_lib.validate(config, check_files=False)
      assert config.train.num_steps == 650 and config.dataset.image_size == 32
      assert config.model.bn_freeze is (name == 'omniglot_transfer') and config.optim.schedule == 'cosine'


def test_filters_locations_and_benchmark_config(tmp_path):
  proc = _cli(
    [
      f'--config={STUDY_CONFIG}:cub200',
      f'--workdir={tmp_path}',
      '--dry-run',
      '--rows=ms-none,pa-feature',
      '--seeds=2',
      '--config.manual_dir=/data/cub',
      '--config.pretrained=/w/resnet50.npz',
    ]
  )
  assert proc.returncode == 0, proc.stderr
  lines = [l for l in proc.stdout.splitlines() if '/seed' in l and not l.startswith('then')]
  assert [l.split()[1] for l in lines] == ['ms-none/seed2', 'pa-feature/seed2']
  assert all(
    'configs/cub200.py:' in l
    and '--config.dataset.manual_dir=/data/cub' in l
    and '--config.model.pretrained=/w/resnet50.npz' in l
    and '--config.seed=2' in l
    for l in lines
  )
  assert '--config.dataset.image_size' not in proc.stdout  # the benchmark recipe is used unchanged


@pytest.mark.parametrize(
  'args,message',
  [
    (['--rows=ms-nope'], 'unknown row(s) ms-nope'),
    (['--seeds=7'], 'not in this study'),
    (['--seeds=one'], 'comma-separated integers'),
    (['--config.not_a_key=1'], 'not_a_key'),
    (['--bogus'], 'unrecognised arguments'),
  ],
)
def test_bad_arguments_are_named(tmp_path, args, message):
  proc = _cli([f'--config={STUDY_CONFIG}:omniglot', f'--workdir={tmp_path}', '--dry-run', *args])
  assert proc.returncode == 2
  assert message in proc.stderr, proc.stderr


def test_unknown_dataset_and_missing_config(tmp_path):
  proc = _cli([f'--config={STUDY_CONFIG}:mnist', f'--workdir={tmp_path}', '--dry-run'])
  assert proc.returncode == 2 and 'mnist' in proc.stderr and 'omniglot' in proc.stderr
  proc = _cli(['--config=configs/study/nope.py', f'--workdir={tmp_path}', '--dry-run'])
  assert proc.returncode == 2 and 'does not exist' in proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# Statistics.
# ----------------------------------------------------------------------------------------------------------------
def test_paired_comparison_matches_scipy():
  base = {1: 0.40, 2: 0.43, 3: 0.38}
  metrix = {1: 0.45, 2: 0.44, 3: 0.42, 4: 0.99}  # seed 4 has no baseline: left out
  out = study.paired_comparison(base, metrix)
  b, m = np.array([0.40, 0.43, 0.38]), np.array([0.45, 0.44, 0.42])
  ref = stats.ttest_rel(m, b)
  assert out['seeds'] == [1, 2, 3]
  np.testing.assert_allclose(out['diffs'], m - b, atol=1e-12)
  np.testing.assert_allclose(out['mean_diff'], np.mean(m - b), atol=1e-12)
  np.testing.assert_allclose(out['t'], ref.statistic, rtol=1e-10)
  np.testing.assert_allclose(out['p_two_sided'], ref.pvalue, rtol=1e-10)
  np.testing.assert_allclose(out['baseline_std'], np.std(b, ddof=1), rtol=1e-12)
  np.testing.assert_allclose(out['treated_std'], np.std(m, ddof=1), rtol=1e-12)
  assert out['exceeds_seed_spread'] == (abs(np.mean(m - b)) > max(np.std(b, ddof=1), np.std(m, ddof=1)))
  assert out['verdict'].startswith('helped' if ref.pvalue < 0.05 else 'no significant')
  interval = ref.confidence_interval(0.95)  # scipy's own paired-t interval of the mean difference
  np.testing.assert_allclose(out['ci95'], [interval.low, interval.high], rtol=1e-10)
  one = study.paired_comparison({1: 0.5}, {1: 0.6})
  assert one['ci95'] is None
  assert one['p_two_sided'] is None and one['exceeds_seed_spread'] is None and 'undetermined' in one['verdict']
  assert study.paired_comparison({1: 0.5}, {2: 0.6}) is None


def test_holm_adjustment_by_hand():
  # p sorted: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06), 0.2 (x1 = 0.2); monotone running max.
  np.testing.assert_allclose(study.holm([0.03, 0.01, 0.2, 0.02]), [0.06, 0.04, 0.2, 0.06], rtol=1e-12)
  np.testing.assert_allclose(study.holm([0.5, 0.4]), [0.8, 0.8], rtol=1e-12)  # capped by the running max
  cmps = [
    {'p_two_sided': 0.01, 'mean_diff': -0.1},
    {'p_two_sided': 0.04, 'mean_diff': 0.1},
    {'p_two_sided': None, 'mean_diff': 0.1},
  ]
  study.holm_adjust(cmps)
  np.testing.assert_allclose([cmps[0]['p_holm'], cmps[1]['p_holm']], [0.02, 0.04], rtol=1e-12)
  assert cmps[0]['verdict'].startswith('hurt') and cmps[1]['verdict'].startswith('helped')
  assert 'p_holm' not in cmps[2]


def test_mean_std_is_sample_std():
  s = study.mean_std([0.1, 0.2, 0.6])
  assert s['n'] == 3 and s['min'] == 0.1 and s['max'] == 0.6
  np.testing.assert_allclose([s['mean'], s['std']], [0.3, np.std([0.1, 0.2, 0.6], ddof=1)], rtol=1e-12)
  assert study.mean_std([0.5])['std'] is None


# ----------------------------------------------------------------------------------------------------------------
# The report from finished runs (fake results.json / eval.json in the trainer's and evaluate's layouts).
# ----------------------------------------------------------------------------------------------------------------
def _fake_run(workdir, row, seed, recall, *, util=None, positivity=None, few_shot=None):
  run_dir = os.path.join(workdir, row, f'seed{seed}')
  os.makedirs(run_dir)
  with open(os.path.join(run_dir, 'results.json'), 'w') as f:
    json.dump(
      {
        'dataset': 'omniglot',
        'steps': 5,
        'train_loss': 0.1,
        'wall_s': 10.0 + seed,
        'images_per_second': 50.0,
        'recall': {str(k): v for k, v in recall.items()},
        'variant': {'devices': '1 x cpu'},
      },
      f,
    )
  with open(os.path.join(run_dir, 'config.json'), 'w') as f:
    json.dump(
      {
        'dataset': {'name': 'omniglot', 'image_size': 32},
        'model': {'depth': 18},
        'loss': {'name': 'multi_similarity', 'multi_similarity': {'alpha': 2.0}},
        'train': {},
        'optim': {},
        'mix': {},
      },
      f,
    )
  if util is not None:
    with open(os.path.join(run_dir, 'eval.json'), 'w') as f:
      json.dump(
        {
          'step': 5,
          'recall': {str(k): v for k, v in recall.items()},
          'utilization': util,
          'alignment': 0.5,
          'uniformity': -2.0,
          'positivity': positivity,
          'few_shot': few_shot,
        },
        f,
      )


def test_report_only_aggregates_finished_runs(tmp_path):
  rng = np.random.default_rng(0)
  values = {}
  lam = [0.2, 0.5, 0.8]
  for row in ('ms-none', 'ms-feature'):
    for seed in (1, 2, 3):
      if (row, seed) == ('ms-feature', 3):
        continue  # not finished: reported as missing, left out of the numbers
      recall = {k: float(rng.uniform(0.2, 0.9)) for k in (1, 2, 4, 8)}
      values[row, seed] = recall
      pos = {'lambda': lam, 'empirical': [0.1 * seed, 0.5, None], 'theoretical': [0.0, 0.5, 1.0]}
      few = [
        dict(ways=20, shots=1, queries=5, episodes=1000, accuracy=0.3 + 0.01 * seed, ci95=0.01),
        dict(ways=5, shots=1, queries=5, episodes=1000, accuracy=0.6 + 0.02 * seed, ci95=0.01),
        dict(ways=5, shots=5, queries=5, episodes=1000, accuracy=None, ci95=None),  # not computed: left out
      ]
      _fake_run(tmp_path, row, seed, recall, util=0.1 * seed, positivity=pos, few_shot=few)
  report = tmp_path / 'report'
  proc = _cli(
    [
      f'--config={STUDY_CONFIG}:omniglot',
      f'--workdir={tmp_path}',
      f'--report_dir={report}',
      '--report-only',
      '--rows=ms-none,ms-feature',
      '--config.primary=ms,feature',
    ]
  )
  assert proc.returncode == 0, proc.stderr + proc.stdout
  summary = jsonio.read_json(report / 'study.json')  # strict: a NaN token would fail here
  assert str(tmp_path) not in (report / 'study.json').read_text()  # no path of this machine
  assert [r['dir'] for r in summary['runs']] == [
    'ms-none/seed1',
    'ms-feature/seed1',
    'ms-none/seed2',
    'ms-feature/seed2',
    'ms-none/seed3',
  ]
  assert summary['planned_runs'] == 6 and summary['finished_runs'] == 5
  assert summary['missing_runs'] == ['ms-feature/seed3']
  rows = {r['row']: r for r in summary['rows']}
  for row, seeds in (('ms-none', (1, 2, 3)), ('ms-feature', (1, 2))):
    for k in (1, 2, 4, 8):
      v = [values[row, s][k] for s in seeds]
      np.testing.assert_allclose(rows[row]['recall'][str(k)]['mean'], np.mean(v), rtol=1e-12)
      np.testing.assert_allclose(rows[row]['recall'][str(k)]['std'], np.std(v, ddof=1), rtol=1e-12)
  np.testing.assert_allclose(rows['ms-none']['utilization']['mean'], 0.2, rtol=1e-12)
  np.testing.assert_allclose(rows['ms-feature']['positivity']['empirical_mean'][0], 0.15, rtol=1e-12)
  assert rows['ms-feature']['positivity']['empirical_mean'][2] is None  # an empty bin in every seed: NaN -> null
  assert list(rows['ms-none']['few_shot']) == ['5-way 1-shot', '20-way 1-shot']  # by ways, then shots
  np.testing.assert_allclose(rows['ms-none']['few_shot']['5-way 1-shot']['mean'], 0.64, rtol=1e-12)
  np.testing.assert_allclose(rows['ms-none']['few_shot']['20-way 1-shot']['std'], np.std([0.31, 0.32, 0.33], ddof=1))
  np.testing.assert_allclose(rows['ms-feature']['few_shot']['20-way 1-shot']['mean'], 0.315, rtol=1e-12)
  (cmp,) = summary['comparisons']
  assert cmp['row'] == 'ms-feature' and cmp['baseline'] == 'ms-none'
  d = [values['ms-feature', s][1] - values['ms-none', s][1] for s in (1, 2)]
  np.testing.assert_allclose(cmp['by_k']['1']['diffs'], d, rtol=1e-12)
  np.testing.assert_allclose(
    cmp['by_k']['1']['p_two_sided'],
    stats.ttest_rel([values['ms-feature', s][1] for s in (1, 2)], [values['ms-none', s][1] for s in (1, 2)]).pvalue,
    rtol=1e-10,
  )
  md = (report / 'study.md').read_text()
  primary = summary['primary_endpoint']
  assert primary['row'] == 'ms-feature' and primary['k'] == 1 and primary['seeds'] == [1, 2]
  np.testing.assert_allclose(primary['mean_diff'], np.mean(d), rtol=1e-12)
  first_section = md.split('###')[1]  # the primary endpoint comes before every other table
  assert first_section.startswith(' Primary endpoint (pre-registered') and f'**{100 * np.mean(d):+.2f} points**' in md
  assert '95% CI [' in first_section
  assert '| MS + Metrix | 2 |' in md and '| MS | 3 |' in md and 'ms-feature/seed3' in md
  assert 'Loss `multi_similarity`: ' in md and 'ResNet-18' in md  # the recipe, read from the runs' config.json
  assert '| row | 5-way 1-shot | 20-way 1-shot |' in md and '| MS | 64.00 ± 2.00 | 32.00 ± 1.00 |' in md
  assert f'{100 * np.mean([values["ms-none", s][1] for s in (1, 2, 3)]):.2f}' in md
  for png in ('recall_at_k.png', 'positivity.png'):
    with open(report / png, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_damaged_run_json_is_a_user_error_naming_the_file(tmp_path):
  _fake_run(tmp_path, 'ms-none', 1, {1: 0.5, 2: 0.6})
  legacy = tmp_path / 'ms-none' / 'seed1' / 'results.json'
  legacy.write_text(legacy.read_text().replace('"train_loss": 0.1', '"train_loss": NaN'))
  proc = _cli([f'--config={STUDY_CONFIG}:omniglot', f'--workdir={tmp_path}', '--report-only', '--rows=ms-none'])
  assert proc.returncode == 2 and proc.stderr.count('\n') == 1, proc.stderr
  assert str(legacy) in proc.stderr and 'NaN' in proc.stderr and 'null' in proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# One real run: the demo data, 2 steps, through `python -m metrix_jax.main` (evaluate step off: it embeds the
# whole demo test split; tests/test_cli.py covers it).
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_step_demo_study_then_resume_skips(tmp_path):
  config = tmp_path / 'study_demo.py'
  config.write_text(
    'import importlib.util\n'
    f'spec = importlib.util.spec_from_file_location("s", {STUDY_CONFIG!r})\n'
    'base = importlib.util.module_from_spec(spec); spec.loader.exec_module(base)\n'
    'def get_config(arg=None):\n'
    '  s = base.get_config("demo")\n'
    '  s.rows = ("ms,feature",)\n'
    '  s.seeds = (1,)\n'
    '  s.overrides = ("train.num_steps=2", "train.batch_size=16", "dataset.classes_per_batch=4",\n'
    '                 "dataset.eval_max_images=200", "dataset.eval_batch_size=100", "train.log_every_steps=1",\n'
    '                 "model.embedding_dim=32")\n'
    '  return s\n'
  )
  workdir = tmp_path / 'work'
  proc = _cli([f'--config={config}', f'--workdir={workdir}', '--no-evaluate'], timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  run_dir = workdir / 'ms-feature' / 'seed1'
  with open(run_dir / 'results.json') as f:
    results = json.load(f)
  assert (results['dataset'], results['loss'], results['mix'], results['steps']) == (
    'demo',
    'multi_similarity',
    'feature',
    2,
  )
  with open(run_dir / 'config.json') as f:
    assert json.load(f)['model']['embedding_dim'] == 32
  summary = jsonio.read_json(workdir / 'study.json')
  assert summary['runs'][0]['dir'] == 'ms-feature/seed1'
  assert summary['finished_runs'] == 1 and summary['rows'][0]['label'] == 'MS + Metrix'
  np.testing.assert_allclose(summary['rows'][0]['recall']['1']['mean'], results['recall']['1'], rtol=1e-12)
  assert (workdir / 'recall_at_k.png').exists() and (run_dir / 'study_run.json').exists()
  command = jsonio.read_json(run_dir / 'study_run.json')['command']  # no absolute machine paths, rerunnable from ROOT
  assert command[:3] == ['python', '-m', 'metrix_jax.main'] and not any(
    a.startswith('/') or '=/' in a for a in command
  ), command
  assert f'--workdir={os.path.relpath(run_dir, ROOT)}' in command
  again = _cli([f'--config={config}', f'--workdir={workdir}', '--no-evaluate'], timeout=300)
  assert again.returncode == 0 and 'done, skipped' in again.stdout


def test_a_benchmark_study_prints_the_papers_numbers_beside_its_own(tmp_path):
  recall = {1: 0.70, 2: 0.80, 4: 0.87}
  for seed in (1, 2):
    _fake_run(tmp_path, 'ms-none', seed, {k: v + 0.01 * seed for k, v in recall.items()})
    _fake_run(tmp_path, 'ms-feature', seed, {k: v + 0.02 * seed for k, v in recall.items()})
  proc = _cli(
    [f'--config={STUDY_CONFIG}:cub200', f'--workdir={tmp_path}', '--report-only', '--rows=ms-none,ms-feature']
  )
  assert proc.returncode == 0, proc.stderr + proc.stdout
  md = (tmp_path / 'study.md').read_text()
  assert '### Beside the paper' in md
  # MS on CUB: paper 67.8 / 77.8 / 85.6 (spec section 7); here mean over seeds 1, 2 of 0.70 + 0.01 * seed
  assert '| MS | 71.50 / 67.8 (+3.70) | 81.50 / 77.8 (+3.70) | 88.50 / 85.6 (+2.90) |' in md
  assert '| MS + Metrix | 73.00 / 71.4 (+1.60) |' in md
  assert study.PAPER_RESULTS['sop']['pa,feature'] == (81.3, 91.7, 96.9) and study.PAPER_KS['inshop'] == (1, 10, 20)
  assert all(len(rows) == 12 for rows in study.PAPER_RESULTS.values())
  omniglot = _cli([f'--config={STUDY_CONFIG}:omniglot', f'--workdir={tmp_path}', '--report-only', '--rows=ms-none'])
  assert omniglot.returncode == 0 and 'Beside the paper' not in (tmp_path / 'study.md').read_text()
