r"""The Metrix study: baseline vs +Metrix for several losses, several seeds, one table (issue 9).

    nice -n 10 python scripts/study.py --config=configs/study/metrix.py:omniglot --workdir=workdirs/study_omniglot \
      --config.manual_dir=/data/omniglot
    python scripts/study.py --config=configs/study/metrix.py:cub200 --workdir=workdirs/study_cub200 \
      --config.manual_dir=/data/cub --config.pretrained=resnet50.npz

Every run is the project's own trainer in a subprocess, `python -m metrix_jax.main --config=<trainer config>:<row>
--workdir=WORKDIR/<row>/seed<k> --config.seed=<k> <study overrides>`, then (config `evaluate.enabled`)
`python -m metrix_jax.evaluate --workdir=<run> --checkpoint=latest` for utilization, alignment, uniformity and
positivity. A run with a results.json (eval.json) is skipped, and an interrupted run resumes from its checkpoint,
so rerunning the command continues the study. Runs go seed-major (seed 1 of every row first), so a study cut short
still has complete rows. Outputs in --report_dir (default WORKDIR): study.json (every number), study.md (tables:
R@K mean +- std per row, Metrix vs baseline with the seed spread and a paired t-test, per-run metrics, recipe,
hardware, wall time), recall_at_k.png and positivity.png. Every JSON file is written and read with
`metrix_jax.jsonio` (strict JSON: NaN -> null); study.json names runs by their folder relative to WORKDIR
(e.g. 'ms-feature/seed1'), never by an absolute path.

Flags: --dry-run (list the runs and their commands, run nothing), --seeds=1,2 and --rows=ms-none,ms-feature
(filters; row ids are the recipe with '-' for ','), --report-only (aggregate what has finished), --no-evaluate,
--python (interpreter for the runs), and study-config overrides --config.KEY=VALUE (ml_collections syntax).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import subprocess
import sys
import time
from typing import Any, Sequence

import numpy as np

from metrix_jax import jsonio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_LABELS = {'ms': 'MS', 'multi_similarity': 'MS', 'contrastive': 'Contrastive', 'pa': 'PA', 'proxy_anchor': 'PA'}
MIX_LABELS = {
  'none': '',
  'feature': ' + Metrix',
  'metrix': ' + Metrix',
  'input': ' + Metrix/input',
  'embedding': ' + Metrix/embed',
}
RESULTS, EVAL = 'results.json', 'eval.json'
TRAIN_LOG, EVAL_LOG, RUN_RECORD, EVAL_RECORD = 'train.log', 'evaluate.log', 'study_run.json', 'study_eval.json'


# The paper's reported Recall@K (%), spec section 7 (copied as published; ResNet-50, D = 512), per data set:
# recipe -> R@K at PAPER_KS[dataset]. study.md prints them beside a benchmark study's own numbers.
PAPER_KS = {'cub200': (1, 2, 4), 'cars196': (1, 2, 4), 'sop': (1, 10, 100), 'inshop': (1, 10, 20)}
PAPER_RESULTS = {
  'cub200': {
    'contrastive,none': (64.7, 75.9, 84.6),
    'contrastive,feature': (67.4, 77.9, 85.7),
    'contrastive,input': (66.3, 77.1, 85.2),
    'contrastive,embedding': (66.4, 77.6, 85.4),
    'ms,none': (67.8, 77.8, 85.6),
    'ms,feature': (71.4, 80.6, 86.8),
    'ms,input': (69.0, 79.1, 86.0),
    'ms,embedding': (70.2, 80.4, 86.7),
    'pa,none': (69.5, 79.3, 87.0),
    'pa,feature': (71.0, 81.8, 88.2),
    'pa,input': (70.5, 81.2, 87.8),
    'pa,embedding': (70.4, 81.1, 87.9),
  },
  'cars196': {
    'contrastive,none': (81.6, 88.2, 92.7),
    'contrastive,feature': (85.1, 91.1, 94.6),
    'contrastive,input': (82.9, 89.3, 93.7),
    'contrastive,embedding': (83.9, 90.3, 94.1),
    'ms,none': (87.8, 92.7, 95.3),
    'ms,feature': (89.6, 94.2, 96.0),
    'ms,input': (89.0, 93.4, 96.0),
    'ms,embedding': (88.8, 92.9, 95.6),
    'pa,none': (87.6, 92.3, 95.5),
    'pa,feature': (89.1, 93.6, 96.7),
    'pa,input': (88.2, 93.2, 96.2),
    'pa,embedding': (88.9, 93.3, 96.4),
  },
  'sop': {
    'contrastive,none': (74.9, 87.0, 93.9),
    'contrastive,feature': (77.5, 89.1, 95.5),
    'contrastive,input': (75.8, 87.8, 94.6),
    'contrastive,embedding': (76.7, 88.6, 95.2),
    'ms,none': (76.9, 89.8, 95.9),
    'ms,feature': (81.0, 92.0, 97.2),
    'ms,input': (77.9, 90.6, 95.9),
    'ms,embedding': (78.5, 91.3, 96.7),
    'pa,none': (79.1, 90.8, 96.2),
    'pa,feature': (81.3, 91.7, 96.9),
    'pa,input': (79.8, 91.4, 96.5),
    'pa,embedding': (80.6, 91.7, 96.6),
  },
  'inshop': {
    'contrastive,none': (86.4, 94.7, 96.2),
    'contrastive,feature': (89.1, 95.7, 97.1),
    'contrastive,input': (87.7, 95.9, 96.5),
    'contrastive,embedding': (88.4, 95.4, 95.8),
    'ms,none': (90.1, 97.6, 98.4),
    'ms,feature': (92.2, 98.5, 98.6),
    'ms,input': (91.8, 98.0, 98.9),
    'ms,embedding': (91.9, 98.3, 98.7),
    'pa,none': (90.0, 97.4, 98.2),
    'pa,feature': (91.9, 98.2, 98.8),
    'pa,input': (90.9, 98.1, 98.4),
    'pa,embedding': (91.6, 98.3, 98.3),
  },
}


class StudyError(Exception):
  """A problem the user can fix; the message says how."""


# ----------------------------------------------------------------------------------------------------------------
# Study config, rows and runs.
# ----------------------------------------------------------------------------------------------------------------
def load_study_config(spec: str, overrides: Sequence[str] = ()):
  """The study config from `path[:arg]` with `--config.KEY=VALUE` overrides (ml_collections config_flags)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  path = spec.split(':', 1)[0]
  if not os.path.isfile(path) and os.path.isfile(os.path.join(ROOT, path)):
    spec = os.path.join(ROOT, spec)
  elif not os.path.isfile(path):
    raise StudyError(f'Study config {path!r} does not exist; e.g. --config=configs/study/metrix.py:omniglot.')
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'study config', flag_values=values, lock_config=True)
  try:
    values(['study', f'--config={spec}', *overrides])
    study = values.config
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
    raise StudyError(f'Bad study config or override ({" ".join(overrides) or "none"}): {error}') from None
  missing = [k for k in ('trainer_config', 'rows', 'seeds', 'overrides', 'report_ks', 'evaluate') if k not in study]
  if missing:
    raise StudyError(f'{spec} is not a study config: it lacks {", ".join(missing)} (see configs/study/metrix.py).')
  return study


@dataclasses.dataclass(frozen=True)
class Row:
  recipe: str  # the trainer config argument, e.g. 'ms,feature'

  @property
  def loss(self) -> str:
    return self.recipe.split(',')[0].strip()

  @property
  def mix(self) -> str:
    parts = [p.strip() for p in self.recipe.split(',')]
    return parts[1] if len(parts) > 1 else 'none'

  @property
  def id(self) -> str:
    return self.recipe.replace(',', '-').replace(' ', '')

  @property
  def label(self) -> str:
    return LOSS_LABELS.get(self.loss, self.loss) + MIX_LABELS.get(self.mix, f' + {self.mix}')


@dataclasses.dataclass(frozen=True)
class Run:
  row: Row
  seed: int
  dir: str

  @property
  def name(self) -> str:
    return f'{self.row.id}/seed{self.seed}'


def _csv(text: str | None) -> list[str] | None:
  return None if text is None else [t.strip() for t in text.split(',') if t.strip()]


def plan_runs(
  study, workdir: str, *, rows: Sequence[str] | None = None, seeds: Sequence[int] | None = None
) -> list[Run]:
  """The runs of the study (after the filters), seed-major: every row of seed 1, then seed 2, ..."""
  all_rows = [Row(r) for r in study.rows]
  if rows is not None:
    known = {r.id: r for r in all_rows} | {r.recipe: r for r in all_rows}
    unknown = [r for r in rows if r not in known]
    if unknown:
      raise StudyError(
        f'--rows: unknown row(s) {", ".join(unknown)}; rows of this study: {", ".join(r.id for r in all_rows)}.'
      )
    chosen = {known[r].id for r in rows}
    all_rows = [r for r in all_rows if r.id in chosen]
  all_seeds = [int(s) for s in study.seeds]
  if seeds is not None:
    unknown = [s for s in seeds if s not in all_seeds]
    if unknown:
      raise StudyError(
        f'--seeds: seed(s) {unknown} are not in this study (seeds {all_seeds}); change them with '
        f"--config.seeds='({', '.join(map(str, seeds))},)'."
      )
    all_seeds = [s for s in all_seeds if s in seeds]
  return [Run(row, seed, os.path.join(workdir, row.id, f'seed{seed}')) for seed in all_seeds for row in all_rows]


def trainer_overrides(study) -> list[str]:
  """--config.KEY=VALUE flags every run gets: the study's overrides + data/weights locations when set."""
  flags = [f'--config.{o}' for o in study.overrides]
  for key, target in (
    ('manual_dir', 'dataset.manual_dir'),
    ('data_dir', 'dataset.data_dir'),
    ('pretrained', 'model.pretrained'),
  ):
    if study.get(key):
      flags.append(f'--config.{target}={study[key]}')
  return flags


def _trainer_config_path(study) -> str:
  path = study.trainer_config
  return path if os.path.isabs(path) else os.path.join(ROOT, path)


def train_command(study, run: Run, python: str) -> list[str]:
  return [
    python,
    '-m',
    'metrix_jax.main',
    f'--config={_trainer_config_path(study)}:{run.row.recipe}',
    f'--workdir={run.dir}',
    f'--config.seed={run.seed}',
    *trainer_overrides(study),
  ]


def evaluate_command(study, run: Run, python: str) -> list[str]:
  e = study.evaluate
  cmd = [
    python,
    '-m',
    'metrix_jax.evaluate',
    f'--workdir={run.dir}',
    f'--checkpoint={e.checkpoint}',
    f'--utilization={bool(e.utilization)}',
    f'--positivity={bool(e.positivity)}',
  ]
  if study.get('data_dir'):
    cmd.append(f'--config.dataset.data_dir={study.data_dir}')
  if study.get('manual_dir'):
    cmd.append(f'--config.dataset.manual_dir={study.manual_dir}')
  return cmd


def run_status(run: Run, *, evaluate: bool) -> str:
  if os.path.isfile(os.path.join(run.dir, RESULTS)):
    if evaluate and not os.path.isfile(os.path.join(run.dir, EVAL)):
      return 'trained'
    return 'done'
  if os.path.isfile(os.path.join(run.dir, RUN_RECORD)):
    record = _read_json(os.path.join(run.dir, RUN_RECORD))
    if record and record.get('returncode') not in (None, 0):
      return f'failed (rc {record["returncode"]}; rerun resumes)'
  if os.path.isdir(os.path.join(run.dir, 'checkpoints')):
    return 'partial (resumes)'
  return 'pending'


# ----------------------------------------------------------------------------------------------------------------
# Running.
# ----------------------------------------------------------------------------------------------------------------
def _read_json(path: str) -> Any:
  """The parsed file (strict JSON), or None when it does not exist; a damaged file is a StudyError naming it."""
  if not os.path.isfile(path):
    return None
  try:
    return jsonio.read_json(path)
  except ValueError as error:
    raise StudyError(f'{error} Fix it, then rerun the command.') from None


def _write_json(path: str, data: Any) -> None:
  jsonio.write_json(path, data)  # strict JSON (NaN -> null), atomic


def subprocess_env(workdir: str) -> dict[str, str]:
  """The runs' environment: the repository importable, a shared persistent XLA compilation cache (seeds 2, 3 of
  a row reuse the executables of seed 1) unless the caller set one."""
  env = dict(os.environ)
  env['PYTHONPATH'] = ROOT + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
  env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(workdir, 'jax_cache'))
  env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  return env


def portable_command(cmd: list[str]) -> list[str]:
  """`cmd` without absolute machine paths, as recorded in study_run.json / study_eval.json: the interpreter as
  'python', every absolute path (alone or as a `--flag=` value) relative to the repository root, where the runs
  start (`cd ROOT && <command>` reruns it)."""

  def rel(path: str) -> str:
    return _relative(path, ROOT) if os.path.isabs(path) else path

  out = []
  for i, arg in enumerate(cmd):
    if i == 0 and os.path.isabs(arg):
      out.append('python')
    elif arg.startswith('--') and '=' in arg:
      flag, value = arg.split('=', 1)
      out.append(f'{flag}={rel(value)}')
    else:
      out.append(rel(arg))
  return out


def execute(cmd: list[str], log_path: str, record_path: str, env: dict[str, str]) -> int:
  """Runs `cmd` with stdout+stderr to `log_path` (appended: a resumed run keeps its history); records the
  command, return code, wall time and load averages in `record_path`."""
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  start, load_start = time.time(), os.getloadavg()
  with open(log_path, 'a') as log:
    log.write(f'\n# {time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(start))} UTC: {" ".join(cmd)}\n')
    log.flush()
    rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
  end = time.time()
  previous = _read_json(record_path) or {}
  _write_json(
    record_path,
    {
      'command': portable_command(cmd),
      'returncode': rc,
      'start_utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(start)),
      'end_utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(end)),
      'wall_s': end - start,
      'wall_s_all_attempts': previous.get('wall_s_all_attempts', 0.0) + (end - start),
      'attempts': previous.get('attempts', 0) + 1,
      'loadavg_start': load_start,
      'loadavg_end': os.getloadavg(),
    },
  )
  return rc


def code_version() -> dict[str, Any]:
  """git commit of the repository and its uncommitted changes under metrix_jax/ and configs/ (what the runs ran)."""

  def git(*args):
    try:
      return subprocess.run(['git', *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.rstrip('\n')
    except (OSError, subprocess.SubprocessError):
      return None

  return {
    'commit': git('rev-parse', 'HEAD'),
    'uncommitted': [
      line[3:]
      for line in (git('status', '--porcelain', '--', 'metrix_jax', 'configs') or '').splitlines()
      if len(line) > 3
    ],
    'utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
  }


def _say(message: str) -> None:
  print(f'[{time.strftime("%H:%M:%S", time.gmtime())} UTC] {message}', flush=True)


def run_study(study, runs: list[Run], *, python: str, workdir: str, evaluate: bool) -> list[str]:
  """Trains (and evaluates) every unfinished run; returns the names of the runs that failed this time."""
  env = subprocess_env(workdir)
  failed = []
  evaluate_each = evaluate and study.evaluate.when == 'each'

  def evaluate_run(run):
    if os.path.isfile(os.path.join(run.dir, EVAL)) or not os.path.isfile(os.path.join(run.dir, RESULTS)):
      return
    _say(f'evaluate {run.name}')
    rc = execute(
      evaluate_command(study, run, python), os.path.join(run.dir, EVAL_LOG), os.path.join(run.dir, EVAL_RECORD), env
    )
    if rc:
      failed.append(f'{run.name} (evaluate)')
      _say(f'  evaluate {run.name} failed (rc {rc}); see {os.path.join(run.dir, EVAL_LOG)}')

  for i, run in enumerate(runs):
    if os.path.isfile(os.path.join(run.dir, RESULTS)):
      _say(f'[{i + 1}/{len(runs)}] {run.name}: done, skipped')
    else:
      _say(f'[{i + 1}/{len(runs)}] train {run.name}')
      rc = execute(
        train_command(study, run, python), os.path.join(run.dir, TRAIN_LOG), os.path.join(run.dir, RUN_RECORD), env
      )
      if rc:
        failed.append(run.name)
        _say(f'  {run.name} failed (rc {rc}); see {os.path.join(run.dir, TRAIN_LOG)}; continuing')
        continue
      result = _read_json(os.path.join(run.dir, RESULTS)) or {}
      _say(
        f'  {run.name}: R@1 {100 * result.get("recall", {}).get("1", math.nan):.2f}, '
        f'{result.get("wall_s", math.nan):.0f} s'
      )
    if evaluate_each:
      evaluate_run(run)
  if evaluate and not evaluate_each:
    for run in runs:
      evaluate_run(run)
  return failed


# ----------------------------------------------------------------------------------------------------------------
# Aggregation.
# ----------------------------------------------------------------------------------------------------------------
def collect(runs: list[Run], workdir: str) -> list[dict[str, Any]]:
  """One record per finished run (results.json present): recall, wall time, throughput, evaluation metrics.

  A record's 'dir' is the run folder relative to the study's `workdir` ('ms-feature/seed1'), so that study.json
  holds no path of the machine that wrote it.
  """
  records = []
  for run in runs:
    result = _read_json(os.path.join(run.dir, RESULTS))
    if not result or not result.get('recall'):
      continue
    ev = _read_json(os.path.join(run.dir, EVAL)) or {}
    run_record = _read_json(os.path.join(run.dir, RUN_RECORD)) or {}
    eval_record = _read_json(os.path.join(run.dir, EVAL_RECORD)) or {}
    records.append(
      {
        'row': run.row.id,
        'label': run.row.label,
        'recipe': run.row.recipe,
        'seed': run.seed,
        'dir': _relative(run.dir, workdir),
        'recall': {int(k): float(v) for k, v in result['recall'].items()},
        'steps': result.get('steps'),
        'train_loss': result.get('train_loss'),
        'images_per_second': result.get('images_per_second'),
        'train_wall_s': result.get('wall_s'),
        'devices': (result.get('variant') or {}).get('devices'),
        'process_wall_s': run_record.get('wall_s_all_attempts'),
        'loadavg': _mean_load(run_record),
        'eval': None
        if not ev
        else {
          'step': ev.get('step'),
          'checkpoint_selection': ev.get('checkpoint_selection'),
          'recall': {int(k): float(v) for k, v in (ev.get('recall') or {}).items()},
          'utilization': ev.get('utilization'),
          'alignment': ev.get('alignment'),
          'uniformity': ev.get('uniformity'),
          'map_at_r': ev.get('map_at_r'),
          'positivity': ev.get('positivity'),
          'few_shot': few_shot_settings(ev.get('few_shot')),
          'wall_s': eval_record.get('wall_s_all_attempts'),
        },
      }
    )
  return records


def few_shot_settings(entries) -> dict[str, float]:
  """eval.json's few-shot list -> {'5-way 1-shot': accuracy, ...} (settings whose accuracy is known)."""
  out = {}
  for f in entries or ():
    if f.get('accuracy') is not None:
      out[f'{int(f["ways"])}-way {int(f["shots"])}-shot'] = float(f['accuracy'])
  return out


def _relative(path: str, workdir: str) -> str:
  """`path` relative to `workdir` (a folder), with '/' separators: 'ms-feature/seed1'."""
  return os.path.relpath(path, workdir).replace(os.sep, '/')


def _mean_load(record: dict[str, Any]) -> float | None:
  loads = [record[k][0] for k in ('loadavg_start', 'loadavg_end') if record.get(k)]
  return float(np.mean(loads)) if loads else None


def mean_std(values: Sequence[float]) -> dict[str, Any]:
  """{'mean', 'std' (sample std, ddof=1; None for one value), 'n', 'min', 'max'}."""
  v = np.asarray(values, np.float64)
  return {
    'mean': float(v.mean()),
    'std': float(v.std(ddof=1)) if v.size > 1 else None,
    'n': int(v.size),
    'min': float(v.min()),
    'max': float(v.max()),
  }


def paired_comparison(baseline: dict[int, float], treated: dict[int, float]) -> dict[str, Any] | None:
  """Metrix minus baseline over the seeds both finished (same seed = same init and data order).

  Returns {'seeds', 'diffs', 'mean_diff', 'std_diff', 't', 'p_two_sided' (paired t-test, None for < 2 seeds),
  'ci95' ([low, high]: mean diff +- t(0.975, n - 1) x std_diff / sqrt(n), None for < 2 seeds), 'baseline_std',
  'treated_std', 'exceeds_seed_spread' (|mean diff| > the larger of the two rows' seed stds), 'verdict'}; None if
  no seed is shared.
  """
  seeds = sorted(set(baseline) & set(treated))
  if not seeds:
    return None
  diffs = np.asarray([treated[s] - baseline[s] for s in seeds], np.float64)
  out = {
    'seeds': seeds,
    'diffs': diffs.tolist(),
    'mean_diff': float(diffs.mean()),
    'std_diff': None,
    't': None,
    'p_two_sided': None,
    'ci95': None,
  }
  b = np.asarray([baseline[s] for s in seeds])
  m = np.asarray([treated[s] for s in seeds])
  out['baseline_std'] = float(b.std(ddof=1)) if len(seeds) > 1 else None
  out['treated_std'] = float(m.std(ddof=1)) if len(seeds) > 1 else None
  if len(seeds) > 1:
    from scipy import stats  # pylint: disable=g-import-not-at-top

    sd = float(diffs.std(ddof=1))
    out['std_diff'] = sd
    half = float(stats.t.ppf(0.975, df=len(seeds) - 1)) * sd / math.sqrt(len(seeds))
    out['ci95'] = [float(diffs.mean()) - half, float(diffs.mean()) + half]
    if sd > 0:
      t = float(diffs.mean() / (sd / math.sqrt(len(seeds))))
      out['t'], out['p_two_sided'] = t, float(2 * stats.t.sf(abs(t), df=len(seeds) - 1))
    elif diffs.mean() != 0:
      out['t'], out['p_two_sided'] = math.copysign(math.inf, diffs.mean()), 0.0
  spread = max([s for s in (out['baseline_std'], out['treated_std']) if s is not None], default=None)
  out['exceeds_seed_spread'] = None if spread is None else bool(abs(out['mean_diff']) > spread)
  p = out['p_two_sided']
  if p is None:
    out['verdict'] = 'undetermined (one seed: no spread to compare with)'
  elif p < 0.05 and out['mean_diff'] > 0:
    out['verdict'] = 'helped (paired t-test p < 0.05)'
  elif p < 0.05:
    out['verdict'] = 'hurt (paired t-test p < 0.05)'
  else:
    out['verdict'] = 'no significant difference (paired t-test p >= 0.05)'
  return out


def holm(p_values: Sequence[float]) -> list[float]:
  """Holm-Bonferroni adjusted p-values (same order as the input): family-wise error control over all tests."""
  p = np.asarray(p_values, np.float64)
  order = np.argsort(p, kind='stable')
  adjusted = np.empty_like(p)
  running = 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (len(p) - rank) * p[i]))
    adjusted[i] = running
  return adjusted.tolist()


def holm_adjust(comparisons: list[dict[str, Any]]) -> None:
  """Adds 'p_holm' (over every comparison of the study: rows x K) to each comparison and bases the verdict on
  it: with, say, 15 tests at 0.05, about one raw p < 0.05 is expected by chance alone."""
  tested = [c for c in comparisons if c.get('p_two_sided') is not None]
  for c, adjusted in zip(tested, holm([c['p_two_sided'] for c in tested])):
    c['p_holm'] = adjusted
    direction = 'helped' if c['mean_diff'] > 0 else 'hurt'
    c['verdict'] = (
      f'{direction} (Holm-adjusted p < 0.05)'
      if adjusted < 0.05
      else 'no significant difference (Holm-adjusted p >= 0.05'
      + (f'; raw p {c["p_two_sided"]:.3f} < 0.05' if c['p_two_sided'] < 0.05 else '')
      + ')'
    )


def _few_shot_order(name: str) -> tuple[int, int]:
  """'20-way 1-shot' -> (20, 1): settings sorted by ways, then shots."""
  ways, shots = name.split('-way ')
  return int(ways), int(shots.split('-shot')[0])


def aggregate(study, records: list[dict[str, Any]], planned: list[Run]) -> dict[str, Any]:
  """Per-row mean +- std of every Recall@K, Metrix-vs-baseline comparisons, positivity mean curves."""
  rows = []
  for row in [Row(r) for r in study.rows]:
    mine = [r for r in records if r['row'] == row.id]
    if not mine:
      continue
    ks = sorted(set.intersection(*[set(r['recall']) for r in mine]))
    entry = {
      'row': row.id,
      'label': row.label,
      'recipe': row.recipe,
      'seeds': [r['seed'] for r in mine],
      'recall': {k: mean_std([r['recall'][k] for r in mine]) for k in ks},
      'train_wall_s': mean_std([r['train_wall_s'] for r in mine if r['train_wall_s'] is not None]),
      'images_per_second': mean_std([r['images_per_second'] for r in mine if r['images_per_second'] is not None]),
    }
    for metric in ('utilization', 'alignment', 'uniformity'):
      values = [r['eval'][metric] for r in mine if r['eval'] and r['eval'].get(metric) is not None]
      entry[metric] = mean_std(values) if values else None
    settings = sorted(
      {name for r in mine if r['eval'] for name in r['eval'].get('few_shot') or {}}, key=_few_shot_order
    )
    if settings:
      entry['few_shot'] = {
        name: mean_std([r['eval']['few_shot'][name] for r in mine if name in ((r['eval'] or {}).get('few_shot') or {})])
        for name in settings
      }
    curves = [r['eval']['positivity'] for r in mine if r['eval'] and r['eval'].get('positivity')]
    if curves:
      emp = np.asarray([[math.nan if v is None else v for v in c['empirical']] for c in curves], np.float64)
      with np.errstate(invalid='ignore'):
        mean_curve = np.nanmean(emp, axis=0) if np.isfinite(emp).any() else emp[0]
      entry['positivity'] = {
        'lambda': curves[0]['lambda'],
        'empirical_mean': mean_curve.tolist(),
        'theoretical': curves[0].get('theoretical'),
        'num_seeds': len(curves),
      }
    rows.append(entry)

  by_row = {r['row']: {rec['seed']: rec for rec in records if rec['row'] == r['row']} for r in rows}
  comparisons = []
  for row in [Row(r) for r in study.rows]:
    base_mix = study.baselines.get(row.mix) if row.mix in study.baselines else None
    if base_mix is None:
      continue
    base = Row(f'{row.loss},{base_mix}')
    if row.id not in by_row or base.id not in by_row:
      continue
    entry = {'row': row.id, 'label': row.label, 'baseline': base.id, 'baseline_label': base.label, 'by_k': {}}
    for k in study.report_ks:
      b = {s: rec['recall'][k] for s, rec in by_row[base.id].items() if k in rec['recall']}
      m = {s: rec['recall'][k] for s, rec in by_row[row.id].items() if k in rec['recall']}
      entry['by_k'][int(k)] = paired_comparison(b, m)
    comparisons.append(entry)

  holm_adjust([cmp for c in comparisons for cmp in c['by_k'].values() if cmp is not None])
  finished = {(r['row'], r['seed']) for r in records}
  missing = [run.name for run in planned if (run.row.id, run.seed) not in finished]
  walls = [r['process_wall_s'] for r in records if r['process_wall_s']]
  eval_walls = [r['eval']['wall_s'] for r in records if r['eval'] and r['eval'].get('wall_s')]
  loads = [r['loadavg'] for r in records if r['loadavg'] is not None]
  summary = {
    'study': study.name,
    'rows': rows,
    'comparisons': comparisons,
    'runs': records,
    'planned_runs': len(planned),
    'finished_runs': len(records),
    'missing_runs': missing,
    'wall_s': {
      'training_processes': float(np.sum(walls)) if walls else None,
      'evaluate_processes': float(np.sum(eval_walls)) if eval_walls else None,
    },
    'hardware': hardware(records, loads),
  }
  summary['primary_endpoint'] = primary_endpoint(study, summary)
  return summary


def hardware(records, loads) -> dict[str, Any]:
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  devices = sorted({r['devices'] for r in records if r.get('devices')})
  return {
    'cpu': cpu,
    'cpu_count': os.cpu_count(),
    'platform': platform.platform(),
    'jax_devices': devices,
    'mean_load_average_during_runs': float(np.mean(loads)) if loads else None,
  }


# ----------------------------------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------------------------------
def _pct(stat: dict[str, Any] | None) -> str:
  if not stat:
    return '-'
  std = '' if stat['std'] is None else f' ± {100 * stat["std"]:.2f}'
  return f'{100 * stat["mean"]:.2f}{std}'


def _num(value, digits=3) -> str:
  return '-' if value is None or (isinstance(value, float) and not math.isfinite(value)) else f'{value:.{digits}f}'


def _recipe_lines(study, records, workdir: str) -> list[str]:
  if not records:
    return []
  config = _read_json(os.path.join(workdir, records[0]['dir'], 'config.json')) or {}
  d, m, o, t, mx = (config.get(k, {}) for k in ('dataset', 'model', 'optim', 'train', 'mix'))
  lines = [
    f'- Trainer config: `{study.trainer_config}:<row>` with overrides '
    + (', '.join(f'`{x}`' for x in study.overrides) or 'none')
    + '.',
    f'- Data: {d.get("name")} (train/test classes disjoint), {d.get("image_size")} px '
    f'(eval resize {d.get("eval_resize")}), sampler {d.get("sampler")} '
    f'({d.get("classes_per_batch")} classes x {d.get("images_per_class")} images).',
    f'- Model: ResNet-{m.get("depth")}, embedding {m.get("embedding_dim")}, {m.get("dtype")}, pretrained '
    f'{m.get("pretrained") or "no (random init)"}, BN {"frozen" if m.get("bn_freeze") else "trained"}.',
    f'- Optimiser: {o.get("name")}, lr {o.get("lr")}, schedule {o.get("schedule")}, weight decay '
    f'{o.get("weight_decay")}, warm-up epochs {o.get("warmup_epochs")}, proxy lr x{o.get("proxy_lr_mult")}.',
    f'- Training: batch {t.get("batch_size")}, '
    + (f'{t["num_steps"]} steps' if t.get('num_steps') else f'{t.get("num_epochs")} epochs')
    + '; model reported = last step (no selection on the test set).',
    f'- Metrix: pairs {mx.get("pairs")}, alpha {mx.get("alpha")}, weight {mx.get("weight")}, lambda '
    f'{mx.get("lambda_mode")}, feature items/anchor {mx.get("items_per_anchor")}, input items/anchor '
    f'{mx.get("input_items_per_anchor")}, embedding all pairs {mx.get("all_pairs")}.',
    f'- Seeds: {", ".join(map(str, study.seeds))} (a seed fixes the init and the data order, so seeds pair up '
    'across rows).',
  ]
  losses = {}
  for rec in records:
    cfg = _read_json(os.path.join(workdir, rec['dir'], 'config.json')) or {}
    name = (cfg.get('loss') or {}).get('name')
    if name and name not in losses:
      losses[name] = cfg['loss'].get(name)
  lines += [f'- Loss `{name}`: {hp}' for name, hp in losses.items()]
  return lines


def primary_endpoint(study, summary: dict[str, Any]) -> dict[str, Any] | None:
  """The pre-registered comparison (`study.primary` row vs its baseline at K = `study.primary_k`), or None."""
  if not study.get('primary'):
    return None
  row, k = Row(study.primary), int(study.primary_k)
  for c in summary['comparisons']:
    if c['row'] == row.id:
      found = c['by_k'].get(k) or {'mean_diff': None}
      return {'row': row.id, 'label': c['label'], 'baseline_label': c['baseline_label'], 'k': k, **found}
  return {'row': row.id, 'label': row.label, 'k': k, 'mean_diff': None}


def primary_endpoint_lines(study, summary: dict[str, Any]) -> list[str]:
  """study.md's first section: the pre-registered endpoint with its 95% interval (before every other table)."""
  p = summary.get('primary_endpoint')
  if p is None:
    return []
  head = f'### Primary endpoint (pre-registered in the docstring of study config `{study.name}`)'
  if p.get('mean_diff') is None:
    return [head, '', f'{p["label"]} vs its baseline, R@{p["k"]}: not available yet (no seed finished both rows).', '']
  ci = p.get('ci95')
  interval = '' if ci is None else f', 95% CI [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]'
  pval = '' if p.get('p_two_sided') is None else f', paired t-test p = {p["p_two_sided"]:.3g}'
  return [
    head,
    '',
    f'{p["label"]} minus {p["baseline_label"]}, test R@{p["k"]}, paired by seed over {len(p["seeds"])} seeds: '
    f'**{100 * p["mean_diff"]:+.2f} points**{interval}{pval} (t interval with {len(p["seeds"]) - 1} degrees of '
    'freedom; seeds pair up: same init and data order).',
    '',
  ]


def paper_lines(study, summary: dict[str, Any]) -> list[str]:
  """A benchmark study's R@K beside the paper's (`PAPER_RESULTS`) for the rows the paper reports; [] otherwise."""
  dataset = os.path.splitext(os.path.basename(str(study.trainer_config)))[0]
  paper = PAPER_RESULTS.get(dataset)
  if not paper:
    return []
  ks = PAPER_KS[dataset]
  out = [
    '',
    "### Beside the paper (R@K %: this study's mean over seeds / the paper's reported number, and the difference)",
    '',
    '| row | ' + ' | '.join(f'R@{k} here / paper (Δ)' for k in ks) + ' |',
    '|---|' + '---|' * len(ks),
  ]
  for r in summary['rows']:
    reported = paper.get(Row(r['recipe']).recipe.replace(' ', ''))
    if reported is None:
      continue
    cells = []
    for k, theirs in zip(ks, reported):
      ours = (r['recall'].get(k) or {}).get('mean')
      cells.append(
        f'- / {theirs:.1f}' if ours is None else f'{100 * ours:.2f} / {theirs:.1f} ({100 * ours - theirs:+.2f})'
      )
    out.append(f'| {r["label"]} | ' + ' | '.join(cells) + ' |')
  out.append('')
  out.append(
    'The paper: ResNet-50 from ImageNet weights at 224 px, 512-d, the official recipe (spec section 7; MS + Metrix '
    'at feature/input level and every PA + Metrix row have no public code).'
  )
  return out


def markdown(study, summary: dict[str, Any], *, plots: dict[str, str], workdir: str) -> str:
  """study.md; `workdir` is the study's (the runs' 'dir' are relative to it: the recipe is read from there)."""
  ks = [int(k) for k in study.report_ks]
  out = [f'## Study `{study.name}`: {summary["finished_runs"]}/{summary["planned_runs"]} runs finished', '']
  out += primary_endpoint_lines(study, summary)
  if summary['missing_runs']:
    out += [f'Not finished (left out of every number below): {", ".join(summary["missing_runs"])}.', '']
  out += [
    '### Recall@K on the test classes (%, mean ± sample std over seeds)',
    '',
    '| row | seeds | ' + ' | '.join(f'R@{k}' for k in ks) + ' | train s/run | img/s |',
    '|---|---|' + '---|' * len(ks) + '---|---|',
  ]
  for r in summary['rows']:
    out.append(
      f'| {r["label"]} | {len(r["seeds"])} | '
      + ' | '.join(_pct(r['recall'].get(k)) for k in ks)
      + f' | {_num(r["train_wall_s"]["mean"] if r["train_wall_s"]["n"] else None, 0)}'
      + f' | {_num(r["images_per_second"]["mean"] if r["images_per_second"]["n"] else None, 1)} |'
    )
  out += paper_lines(study, summary)
  if any(r.get('utilization') for r in summary['rows']):

    def _ms(stat, digits=3):
      if not stat:
        return '-'
      return f'{stat["mean"]:.{digits}f}' + ('' if stat['std'] is None else f' ± {stat["std"]:.{digits}f}')

    out += [
      '',
      '### Embedding space of the test set (mean ± std over seeds; `python -m metrix_jax.evaluate`)',
      '',
      '| row | evaluated seeds | utilization | alignment | uniformity |',
      '|---|---|---|---|---|',
    ]
    for r in summary['rows']:
      n = (r.get('uniformity') or {}).get('n', 0)
      out.append(
        f'| {r["label"]} | {n} | {_ms(r.get("utilization"))} | {_ms(r.get("alignment"))} | {_ms(r.get("uniformity"))} |'
      )
  settings = sorted({name for r in summary['rows'] for name in r.get('few_shot') or {}}, key=_few_shot_order)
  if settings:
    out += [
      '',
      '### Few-shot episodes on the test classes (accuracy %, mean ± std over seeds; nearest prototype, cosine)',
      '',
      '| row | ' + ' | '.join(settings) + ' |',
      '|---|' + '---|' * len(settings),
    ]
    for r in summary['rows']:
      out.append(
        f'| {r["label"]} | ' + ' | '.join(_pct((r.get('few_shot') or {}).get(name)) for name in settings) + ' |'
      )
  out += [
    '',
    '### Metrix vs baseline (paired by seed; differences in points of %)',
    '',
    '| comparison | K | Δ mean | per-seed Δ | seed std over those seeds (base / Metrix) | abs(Δ) > both stds? '
    '| paired t p | p, Holm over all rows x K | verdict |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for c in summary['comparisons']:
    for k, cmp in c['by_k'].items():
      if cmp is None:
        continue
      stds = ' / '.join('-' if s is None else f'{100 * s:.2f}' for s in (cmp['baseline_std'], cmp['treated_std']))
      exceeds = {None: '-', True: 'yes', False: 'no'}[cmp['exceeds_seed_spread']]
      out.append(
        f'| {c["label"]} vs {c["baseline_label"]} | {k} | {100 * cmp["mean_diff"]:+.2f} | '
        + ', '.join(f'{100 * d:+.2f}' for d in cmp['diffs'])
        + f' | {stds} | {exceeds} | {_num(cmp["p_two_sided"], 3)} | {_num(cmp.get("p_holm"), 3)}'
        + f' | {cmp["verdict"]} |'
      )
  out += ['', 'In words (Recall@1):', '']
  for c in summary['comparisons']:
    cmp = c['by_k'].get(1) or c['by_k'].get(ks[0])
    if cmp is None:
      continue
    spread = {
      None: 'no seed spread to compare with (one seed)',
      True: 'larger than the seed-to-seed std of both rows',
      False: 'within the seed-to-seed std of at least one row',
    }[cmp['exceeds_seed_spread']]
    out.append(
      f'- {c["label"]} vs {c["baseline_label"]}: {100 * cmp["mean_diff"]:+.2f} points over '
      f'{len(cmp["seeds"])} paired seed(s) ({", ".join(f"{100 * d:+.2f}" for d in cmp["diffs"])}); the '
      f'difference is {spread}; {cmp["verdict"]}.'
    )
  out += [
    '',
    '### Per run',
    '',
    '| row | seed | '
    + ' | '.join(f'R@{k}' for k in ks)
    + ' | utilization | alignment | uniformity | P(pos) λ=0.2/0.5/0.8 | final loss | train s | eval s |',
    '|---|---|' + '---|' * len(ks) + '---|---|---|---|---|---|---|',
  ]
  for r in summary['runs']:
    ev = r['eval'] or {}
    pos = ev.get('positivity')
    pos_text = '-'
    if pos:
      lam = np.asarray(pos['lambda'], np.float64)
      emp = [math.nan if v is None else v for v in pos['empirical']]
      pos_text = '/'.join(_num(emp[int(np.argmin(np.abs(lam - x)))], 2) for x in (0.2, 0.5, 0.8))
    out.append(
      f'| {r["label"]} | {r["seed"]} | '
      + ' | '.join('-' if k not in r['recall'] else f'{100 * r["recall"][k]:.2f}' for k in ks)
      + f' | {_num(ev.get("utilization"))} | {_num(ev.get("alignment"))} | {_num(ev.get("uniformity"))}'
      + f' | {pos_text} | {_num(r["train_loss"], 4)} | {_num(r["train_wall_s"], 0)}'
      + f' | {_num(ev.get("wall_s"), 0)} |'
    )
  out += [
    '',
    'utilization: mean over test images of the squared distance to the nearest training image (lower: '
    'test closer to train); alignment: mean squared distance of same-class test pairs (lower: tighter); '
    'uniformity: log E exp(-2 d²) over test pairs (lower: more uniform); P(pos): fraction of mixed test '
    'items acting as positives for their anchor at λ (from the gradient sign of the mixed loss).',
    '',
    '### Recipe',
    '',
    *_recipe_lines(study, summary['runs'], workdir),
    '',
  ]
  hw = summary['hardware']
  walls = summary['wall_s']
  out += [
    '### Hardware and wall time',
    '',
    f'- CPU: {hw["cpu"]}, {hw["cpu_count"]} logical cores; JAX devices: {", ".join(hw["jax_devices"]) or "-"};'
    f' {hw["platform"]}.',
    f'- Mean 1-minute load average during the training runs: {_num(hw["mean_load_average_during_runs"], 1)} '
    f'(> core count: the machine was shared).',
    f'- Wall time, all training processes: {_num((walls["training_processes"] or 0) / 60, 1)} min; all '
    f'evaluate processes: {_num((walls["evaluate_processes"] or 0) / 60, 1)} min.',
  ]
  for v in summary.get('code_versions', []):
    out.append(
      f'- Code: started {v["utc"]} at commit {(v["commit"] or "?")[:10]}'
      + (f' with uncommitted changes in {", ".join(v["uncommitted"])}' if v['uncommitted'] else '')
      + '.'
    )
  out.append('')
  if plots:
    out += ['### Plots', ''] + [f'![{name}]({os.path.basename(path)})' for name, path in plots.items()] + ['']
  return '\n'.join(out)


def write_report(study, summary: dict[str, Any], report_dir: str, *, workdir: str) -> dict[str, str]:
  """study.json, study.md, recall_at_k.png and positivity.png (when there are curves) into `report_dir`."""
  os.makedirs(report_dir, exist_ok=True)
  paths = {}
  if summary['rows']:
    from metrix_jax import plots  # pylint: disable=g-import-not-at-top

    series = {
      f'{r["label"]} (n={len(r["seeds"])})': {k: s['mean'] for k, s in r['recall'].items()} for r in summary['rows']
    }
    paths['Recall@K'] = plots.plot_recall_at_k(
      series, os.path.join(report_dir, 'recall_at_k.png'), title=f'Recall@K, {study.name} (mean over seeds)'
    )
    chosen = Row(study.positivity_row).id if study.get('positivity_row') else None
    pos_rows = [r for r in summary['rows'] if r.get('positivity') and r['row'] == chosen]
    if pos_rows:
      p = pos_rows[0]['positivity']
      paths['positivity'] = plots.plot_positivity(
        p['lambda'],
        [math.nan if v is None else v for v in p['empirical_mean']],
        None if p['theoretical'] is None else [math.nan if v is None else v for v in p['theoretical']],
        os.path.join(report_dir, 'positivity.png'),
        title=f'Positivity, {pos_rows[0]["label"]} (test, mean of {p["num_seeds"]} seeds)',
      )
  _write_json(os.path.join(report_dir, 'study.json'), summary)
  with open(os.path.join(report_dir, 'study.md'), 'w') as f:
    f.write(markdown(study, summary, plots=paths, workdir=workdir) + '\n')
  return paths


# ----------------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]):
  parser = argparse.ArgumentParser(
    description=__doc__.splitlines()[0],
    epilog='Study-config overrides: --config.KEY=VALUE, e.g. '
    '--config.manual_dir=/data/cub --config.pretrained=resnet50.npz',
  )
  parser.add_argument('--config', default='configs/study/metrix.py:omniglot', help='study config path[:arg]')
  parser.add_argument('--workdir', required=True, help='runs go to WORKDIR/<row>/seed<k>')
  parser.add_argument('--report_dir', '--report-dir', default=None, help='study.md/json + plots (default WORKDIR)')
  parser.add_argument('--rows', default=None, help='comma-separated row ids (e.g. ms-none,ms-feature)')
  parser.add_argument('--seeds', default=None, help='comma-separated seeds (e.g. 1,2)')
  parser.add_argument('--dry-run', '--dry_run', dest='dry_run', action='store_true', help='list runs, run nothing')
  parser.add_argument(
    '--report-only',
    '--report_only',
    dest='report_only',
    action='store_true',
    help='aggregate the finished runs, train nothing',
  )
  parser.add_argument(
    '--no-evaluate',
    '--no_evaluate',
    dest='no_evaluate',
    action='store_true',
    help='skip the per-run evaluate step (utilization, alignment, uniformity, positivity)',
  )
  parser.add_argument('--python', default=sys.executable, help='interpreter for the runs')
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith('--config.')]
  if bad:
    parser.error(f'unrecognised arguments: {" ".join(bad)} (study-config overrides look like --config.KEY=VALUE)')
  return args, rest


def main(argv: Sequence[str] | None = None) -> int:
  """The command line: 0 done, 1 some run failed, 2 a user error (one line on stderr)."""
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    return _main(args, overrides)
  except StudyError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2


def _main(args, overrides: Sequence[str]) -> int:
  study = load_study_config(args.config, overrides)
  workdir = os.path.abspath(os.path.expanduser(args.workdir))
  seeds = _csv(args.seeds)
  try:
    seeds = None if seeds is None else [int(s) for s in seeds]
  except ValueError:
    raise StudyError(f'--seeds must be comma-separated integers, got {args.seeds!r}.') from None
  runs = plan_runs(study, workdir, rows=_csv(args.rows), seeds=seeds)
  if study.get('requires_pretrained') and not study.get('pretrained') and not args.report_only:
    raise StudyError(
      f'study {study.name} fine-tunes a pretrained backbone: pass --config.pretrained=WORKDIR of the source run '
      f'({study.requires_pretrained}).'
    )
  evaluate = bool(study.evaluate.enabled) and not args.no_evaluate
  if args.dry_run:
    print(f'study {study.name}: {len(runs)} runs in {workdir} (trainer config {study.trainer_config})')
    for i, run in enumerate(runs):
      print(
        f'{i + 1:3d}. {run.name:<28} {run_status(run, evaluate=evaluate):<12} '
        f'{" ".join(train_command(study, run, "python"))}'
      )
    if evaluate:
      print(f'then for each run: {" ".join(evaluate_command(study, runs[0], "python"))}' if runs else '')
    return 0
  failed = []
  if not args.report_only:
    _say(f'study {study.name}: {len(runs)} runs in {workdir}')
    os.makedirs(workdir, exist_ok=True)
    versions = _read_json(os.path.join(workdir, 'code_versions.json')) or []
    _write_json(os.path.join(workdir, 'code_versions.json'), versions + [code_version()])
    failed = run_study(study, runs, python=args.python, workdir=workdir, evaluate=evaluate)
  summary = aggregate(study, collect(runs, workdir), runs)
  summary['code_versions'] = _read_json(os.path.join(workdir, 'code_versions.json')) or []
  report_dir = os.path.abspath(args.report_dir or workdir)
  paths = write_report(study, summary, report_dir, workdir=workdir)
  _say(
    f'{summary["finished_runs"]}/{summary["planned_runs"]} runs finished; wrote {report_dir}/study.md, '
    f'study.json' + ''.join(f', {os.path.basename(p)}' for p in paths.values())
  )
  if failed:
    _say(f'failed: {", ".join(failed)} (logs in their run folders; rerun the command to retry/resume)')
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
