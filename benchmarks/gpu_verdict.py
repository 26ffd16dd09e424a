r"""The GPU verdict of the performance targets (issues 8 and 17) in one call of at most 8 minutes.

    bash benchmarks/gpu_verdict.sh              # on the GPU host: stages .whl/, writes the rows to $OUT
    bash benchmarks/gpu_verdict.sh --smoke      # CPU rehearsal: ResNet-18, 32 px, the same rows, code and files
    python benchmarks/gpu_verdict.py --compile_only   # any machine: XLA's compile time of every JAX row

Rows, most important first (`--rows` reorders or picks; each row is written to --out as soon as it exists, so a
call cut short keeps its rows):
  core (always run):  torch_bf16_cl  PyTorch bf16 autocast + channels_last step (the 1.5x target's yardstick)
                      jax_clean      the trainer's MS step, no Metrix
                      jax_feature    MS + feature-level Metrix (target: >= 1.5x torch_bf16_cl, <= 5% over clean)
                      jax_embedding  MS + embedding-level Metrix (target: <= 5% over clean)
                      eval_embed     the evaluator's forward (target: >= 3x the clean step's images/s)
  optional (run only when XLA's compile times so far predict that the row ends before the deadline):
                      e2e            MS + feature fed by the grain pipeline on every core (input keeps up?)
                      profile        a jax.profiler trace of 3 clean + 3 feature steps (profile.tar.gz; seconds)
                      max_batch      largest MS + feature batch whose XLA memory fits the device (compile only)
                      jax_input      MS + input-level Metrix (no target; 2x the backbone work by design)
                      torch_fp32     PyTorch float32 eager (the official code's step)

The JAX steps are `metrix_jax.step.make_train_step` built from a config as the trainer builds it
(`bench_train.py`); the train state is built once and shared (it does not depend on the mix level). Compilation:
jax_clean compiles alone (on a GPU it fills XLA's in-process autotuning results for the backbone's convolutions),
then each row compiles right before it is timed (--compile_workers=N > 1: feature, embedding and eval embed
compile together in N threads, faster, but a GPU then times its autotuning candidates under contention).

Outputs in --out (default $OUT): verdict.json (environment, settings, rows, skipped rows and why, targets,
timeline), verdict.md (the table and the targets, rewritten after every row), profile.tar.gz (the profile row);
gpu_verdict.sh adds verdict.log (everything printed, with JAX's compile log lines).

--smoke rehearses the GPU run on a CPU: ResNet-18, 32 px, batch 20, bf16, 2 steps, every row, the same files;
imports are limited to what the GPU host has (HOST_PACKAGES) plus the staged wheels (WHEELS), so an import that
only this machine can satisfy fails here first.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.metadata
import json
import os
import platform
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# What the GPU host (nvidia-h200, image 'cuda', Python 3.12) has, as read there on 2026-11-17 (the device notes'
# package list); versions where known. It lacks grain, tensorflow-datasets, ml-collections, tensorboardX and
# array-record: those come as wheels (WHEELS, staged from ../shared/gpu/wheels-cp312 by ../shared/gpu/stage.sh).
HOST_PYTHON = '3.12'
HOST_VERSIONS = {
  'jax': '0.11.2',
  'jaxlib': '0.11.2',
  'jax-cuda13-plugin': '0.11.2',
  'jax-cuda13-pjrt': '0.11.2',
  'flax': '0.12.10',
  'optax': '0.2.8',
  'orbax-checkpoint': '0.12.4',
  'numpy': '2.5.2',
  'torch': '2.11.0',
  'torchvision': '0.26.0',
  'triton': '3.6.0',
}
HOST_PACKAGES = frozenset(
  """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()
)
# ../shared/gpu/wheels-cp312 (tests/test_gpu_verdict.py checks this against the folder and the host list).
WHEELS = {
  'array-record': '0.8.6',
  'dm-tree': '0.1.10',
  'docstring-parser': '0.18.0',
  'googleapis-common-protos': '1.76.0',
  'grain': '0.2.18',
  'immutabledict': '4.3.1',
  'ml-collections': '1.1.0',
  'portpicker': '1.6.0',
  'promise': '2.3',
  'simple-parsing': '0.1.9',
  'tensorboardx': '2.6.5',
  'tensorflow-datasets': '4.9.10',
  'tensorflow-metadata': '1.21.0',
  'termcolor': '3.3.0',
  'toml': '0.10.2',
}
PROJECT_DISTRIBUTIONS = frozenset({'metrix-jax'})

CORE_ROWS = ('torch_bf16_cl', 'jax_clean', 'jax_feature', 'jax_embedding', 'eval_embed')
OPTIONAL_ROWS = ('e2e', 'profile', 'max_batch', 'jax_input', 'torch_fp32')
ROWS = CORE_ROWS + OPTIONAL_ROWS
FULL = dict(depth=50, image_size=224, batch_size=180, eval_batch_size=360, steps=20, warmup=3, e2e_photos=600)
SMOKE = dict(depth=18, image_size=32, batch_size=20, eval_batch_size=40, steps=2, warmup=1, e2e_photos=40)
MARGIN_S = 10.0  # kept free before the deadline: the last writes
# Memory probes need no kernel timing: no autotuning (on a GPU it would run candidate kernels at the probed batch,
# allocating device memory in 3 compilations at once, and take as long as the timed rows' compilations).
PROBE_OPTIONS = {'xla_gpu_autotune_level': 0}
MAX_BATCH_FACTOR = 32  # probes stay below 32x the timed batch (an absurd shape can abort XLA, and the process)
COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'  # jax.monitoring: one XLA compilation


def normalize(name: str) -> str:
  """A distribution name as pip compares them (PEP 503)."""
  return name.lower().replace('_', '-').replace('.', '-')


def allowed_distributions() -> frozenset:
  return frozenset(HOST_PACKAGES | set(WHEELS) | PROJECT_DISTRIBUTIONS)


class HostImportGuard(importlib.abc.MetaPathFinder):
  """Refuses top-level imports of installed distributions the GPU host would not have (neither HOST_PACKAGES nor
  WHEELS): on a CPU rehearsal an import that only this machine satisfies fails as it would on the GPU host."""

  def __init__(self, allowed=None):
    self.allowed = allowed or allowed_distributions()
    self.owners = {m: {normalize(d) for d in ds} for m, ds in importlib.metadata.packages_distributions().items()}
    self.refused: list[str] = []

  def find_spec(self, fullname, path=None, target=None):
    del path, target
    if '.' in fullname:
      return None
    owners = self.owners.get(fullname)
    if owners and not owners & self.allowed:
      self.refused.append(fullname)
      raise ModuleNotFoundError(
        f'No module named {fullname!r} on the GPU host (distribution {", ".join(sorted(owners))} is neither in '
        'its package list nor in the staged wheels: add a wheel to ../shared/gpu or avoid the import)',
        name=fullname,
      )
    return None


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--smoke', action='store_true', help='CPU rehearsal: ResNet-18, 32 px, batch 20, 2 steps')
  parser.add_argument('--out', default=os.environ.get('OUT') or os.path.join(ROOT, '.verdict_out'))
  parser.add_argument(
    '--budget_s', type=float, default=None, help='wall-time budget from --started_at (default 480; --smoke: 900)'
  )
  parser.add_argument('--started_at', type=float, default=None, help='epoch seconds the call began (default: now)')
  parser.add_argument('--rows', default=','.join(ROWS), help=f'comma-separated, in order; from {", ".join(ROWS)}')
  parser.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'))
  parser.add_argument(
    '--compile_workers',
    type=int,
    default=1,
    help='1: each JAX row compiles right before it runs (exact GPU autotuning, rows appear one by one); N > 1: '
    'feature, embedding and eval embed compile together in N threads (faster, autotuning timed under contention)',
  )
  parser.add_argument('--compile_only', action='store_true', help="no run: XLA's compile time and memory per row")
  parser.add_argument('--e2e_workers', type=int, default=-1, help='grain worker processes (-1: every core)')
  parser.add_argument('--memory_limit_gib', type=float, default=None, help="largest batch vs this, not the device's")
  parser.add_argument('--host_imports', default=None, choices=('on', 'off'), help='the import guard (smoke: on)')
  parser.add_argument('--data_dir', default=os.path.join(tempfile.gettempdir(), 'metrix_verdict_data'))
  for key in FULL:
    parser.add_argument(f'--{key}', type=int, default=None, help=f'default {FULL[key]} (--smoke: {SMOKE[key]})')
  args = parser.parse_args(argv)
  sizes = SMOKE if args.smoke else FULL
  for key, value in sizes.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  args.rows = [r.strip() for r in args.rows.split(',') if r.strip()]
  bad = [r for r in args.rows if r not in ROWS]
  if bad:
    parser.error(f'unknown row(s) {bad}; valid choices: {", ".join(ROWS)}')
  if args.compile_only:
    args.rows = [r for r in args.rows if r.startswith('jax_') or r in ('eval_embed', 'max_batch')]
  args.host_imports = args.host_imports or ('on' if args.smoke else 'off')
  if args.budget_s is None:
    args.budget_s = 900.0 if args.smoke else 480.0  # the rehearsal runs every row, however slow the CI machine
  args.started_at = args.started_at or time.time()
  args.deadline = args.started_at + args.budget_s
  return args


def bench_args(args):
  """bench_train's argument namespace for these sizes (its row builders read it)."""
  import bench_train  # pylint: disable=g-import-not-at-top

  b = bench_train.parse_args(
    [
      f'--depth={args.depth}',
      f'--image_size={args.image_size}',
      f'--batch_size={args.batch_size}',
      f'--eval_batch_size={args.eval_batch_size}',
      f'--dtype={args.dtype}',
      f'--steps={args.steps}',
      f'--warmup={args.warmup}',
      f'--e2e_photos={args.e2e_photos}',
      f'--data_dir={args.data_dir}',
      '--losses=ms',
      '--torch=none',
    ]
    + (['--compile_only'] if args.compile_only else [])
    + ([f'--memory_limit_gib={args.memory_limit_gib}'] if args.memory_limit_gib else [])
  )
  return b


class Verdict:
  """The rows so far and their files; every change is written at once (a call cut short keeps what exists)."""

  def __init__(self, args, env):
    self.args, self.env = args, env
    self.rows: list[dict] = []
    self.skipped: list[dict] = []
    self.timeline: list[dict] = []
    self.probes: list[dict] = []
    self.compile_log: list[dict] = []
    self.current = None
    self.status = 'running'
    self.lock = threading.Lock()
    os.makedirs(args.out, exist_ok=True)

  def on_event(self, event: str, seconds: float, **kwargs) -> None:
    """jax.monitoring listener: every XLA compilation (program, seconds, during which row) into the log."""
    if event != COMPILE_EVENT:
      return
    entry = dict(
      fun=str(kwargs.get('fun_name', '?')), s=round(seconds, 3), row=self.current, at_s=round(self.elapsed(), 1)
    )
    with self.lock:
      self.compile_log.append(entry)
    if seconds >= 1.0:
      print(f'  XLA compiled {entry["fun"]} in {seconds:.1f} s ({entry["row"]})', file=sys.stderr, flush=True)

  def elapsed(self) -> float:
    return time.time() - self.args.started_at

  def left(self) -> float:
    return self.args.deadline - time.time()

  def add(self, name: str, row: dict) -> None:
    row = dict(row, row=name)
    self.rows.append(row)
    _print_row(row)
    self.write()

  def skip(self, name: str, why: str) -> None:
    self.skipped.append({'row': name, 'why': why})
    print(f'  skipped {name}: {why}', file=sys.stderr, flush=True)
    self.write()

  def write(self) -> None:
    import bench_train  # pylint: disable=g-import-not-at-top

    with self.lock:
      rows = [dict(r) for r in self.rows]
      bench_train.add_ratios(rows)
      self.env['peak_device_bytes'] = _peak_device_bytes()
      doc = {
        'status': self.status,
        'environment': self.env,
        'settings': {k: getattr(self.args, k) for k in ('smoke', 'budget_s', 'rows', 'compile_workers', *FULL)},
        'elapsed_s': round(self.elapsed(), 1),
        'rows': rows,
        'max_batch_probe': self.probes,
        'skipped': self.skipped,
        'targets': targets(rows, self.probes),
        'timeline': self.timeline,
        'xla_compile_log': self.compile_log,
      }
      _write_atomic(os.path.join(self.args.out, 'verdict.json'), json.dumps(_strict(doc), indent=1) + '\n')
      _write_atomic(os.path.join(self.args.out, 'verdict.md'), markdown(doc))


def _strict(x):
  """NaN/inf -> None (strict JSON), recursively."""
  if isinstance(x, float):
    return x if x == x and abs(x) != float('inf') else None
  if isinstance(x, dict):
    return {str(k): _strict(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_strict(v) for v in x]
  return x


def _write_atomic(path: str, text: str) -> None:
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def _peak_device_bytes():
  try:
    import jax  # pylint: disable=g-import-not-at-top

    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except  (CPU backends report none)
    return None
  return (stats or {}).get('peak_bytes_in_use')


def _print_row(r: dict) -> None:
  import bench_train  # pylint: disable=g-import-not-at-top

  fmt = bench_train._fmt  # pylint: disable=protected-access
  print(
    f'  [{r["row"]}] {r["framework"]} {r["loss"]} {r["mix"]} batch {r["batch_size"]}: '
    f'{fmt(r.get("images_per_s"), ",.1f")} images/s, {fmt(r.get("ms_per_step"), ",.1f")} ms/step, '
    f'compile {fmt(r.get("compile_s"), ".1f")} s, row took {r["row_s"]:.1f} s',
    file=sys.stderr,
    flush=True,
  )


def targets(rows: list[dict], probes: list[dict]) -> list[dict]:
  """The issue's targets from the rows so far: (target, value, met) with met None while a row is missing."""

  def find(name):
    return next((r for r in rows if r.get('row') == name and r.get('images_per_s')), None)

  torch_cl, clean, feature, emb, ev, e2e = map(
    find, ('torch_bf16_cl', 'jax_clean', 'jax_feature', 'jax_embedding', 'eval_embed', 'e2e')
  )
  out = []

  def add(target, value, threshold, higher_is_better, unit):
    met = None if value is None else (value >= threshold if higher_is_better else value <= threshold)
    out.append(dict(target=target, value=value, threshold=threshold, unit=unit, met=met))

  add(
    'MS + feature Metrix step vs PyTorch bf16 autocast + channels_last (images/s ratio)',
    feature and torch_cl and feature['images_per_s'] / torch_cl['images_per_s'],
    1.5,
    True,
    'x',
  )
  add(
    'feature-level Metrix over the clean step (wall time)',
    feature and clean and 100 * (clean['images_per_s'] / feature['images_per_s'] - 1),
    5.0,
    False,
    '%',
  )
  add(
    'embedding-level Metrix over the clean step (wall time)',
    emb and clean and 100 * (clean['images_per_s'] / emb['images_per_s'] - 1),
    5.0,
    False,
    '%',
  )
  add(
    'eval embedding vs the clean train step (images/s ratio)',
    ev and clean and ev['images_per_s'] / clean['images_per_s'],
    3.0,
    True,
    'x',
  )
  add(
    'end to end (grain pipeline, every core) vs the MS + feature step alone (images/s ratio)',
    e2e and feature and e2e['images_per_s'] / feature['images_per_s'],
    0.95,
    True,
    'x',
  )
  fitting = [p['batch_size'] for p in probes if p.get('fits')]
  failing = [p['batch_size'] for p in probes if p.get('fits') is False]
  note = (
    None
    if not probes
    else 'none of the probes fits: an upper bound'
    if not fitting
    else 'every probe fits: a lower bound'
    if not failing
    else f'{min(failing)} does not fit'
  )
  out.append(
    dict(
      target='largest MS + feature batch that fits (XLA memory <= device limit)',
      value=max(fitting) if fitting else (min(failing) if failing else None),
      threshold=None,
      unit=' images',
      met=None,
      note=note,
    )
  )
  return out


def markdown(doc: dict) -> str:
  import bench_train  # pylint: disable=g-import-not-at-top

  fmt, mib = bench_train._fmt, bench_train._mib  # pylint: disable=protected-access
  env, s = doc['environment'], doc['settings']
  lines = [
    f'# GPU verdict ({doc["status"]}, {doc["elapsed_s"]:.0f} s of {s["budget_s"]:.0f} s)',
    '',
    f'{env.get("device")} ({env.get("backend")}); jax {env.get("jax")}, flax {env.get("flax")}; '
    f'{env.get("torch", "")}; Python {env.get("python")}; {env.get("cpu_cores")} cores; {env.get("date_utc")} UTC',
    f'ResNet-{s["depth"]}, {s["image_size"]} px, batch {s["batch_size"]} (eval {s["eval_batch_size"]}), '
    f'{s["steps"]} timed steps after {s["warmup"]}; command: {env.get("command")}',
    '',
    '| row | framework | mix | batch | images/s | ms/step | Metrix overhead | vs PyTorch bf16+CL | memory | '
    'GFLOP/step | compile s | row s | loss |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in doc['rows']:
    lines.append(
      f'| {r["row"]} | {r["framework"]} | {r["mix"]} | {r["batch_size"]} | {fmt(r.get("images_per_s"), ",.1f")} | '
      f'{fmt(r.get("ms_per_step"), ",.1f")} | {fmt(r.get("overhead_pct"), "+.1f", "%")} | '
      f'{fmt(r.get("vs_torch_bf16_cl"), ".2f", "x")} | {mib(r.get("memory_bytes"))} | '
      f'{fmt(r.get("flops") and r["flops"] / 1e9, ",.1f")} | {fmt(r.get("compile_s"), ".1f")} | '
      f'{fmt(r.get("row_s"), ".1f")} | {fmt(r.get("loss_value"), ".4g")} |'
    )
  lines += ['', '| target | value | threshold | met |', '|---|---|---|---|']
  for t in doc['targets']:
    value = fmt(t['value'], '.2f' if t['unit'] == 'x' else '.1f' if t['unit'] == '%' else ',.0f', t['unit'])
    met = {None: '-', True: 'yes', False: '**no**'}[t['met']]
    threshold = '-' if t['threshold'] is None else f'{t["threshold"]:g}{t["unit"]}'
    lines.append(f'| {t["target"]} | {value}{" (" + t["note"] + ")" if t.get("note") else ""} | {threshold} | {met} |')
  for p in doc['max_batch_probe']:
    lines.append(
      f'\nprobe batch {p["batch_size"]}: XLA memory {mib(p["memory_bytes"])} of {mib(p["limit_bytes"])} -> fits: '
      f'{p["fits"]} (compile {p["compile_s"]:.1f} s)'
    )
  if env.get('peak_device_bytes') is not None:
    lines.append(f'\nprocess peak device memory (device.memory_stats): {mib(env["peak_device_bytes"])}')
  for k in doc['skipped']:
    lines.append(f'\nskipped {k["row"]}: {k["why"]}')
  lines.append(
    '\ntimeline (s from the call start): '
    + ', '.join(f'{t["row"]} {t["start_s"]:.0f}-{t["end_s"]:.0f}' for t in doc['timeline'])
  )
  return '\n'.join(lines) + '\n'


def environment(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  env = {
    'date_utc': time.strftime('%Y-%m-%d %H:%M', time.gmtime()),
    'python': platform.python_version(),
    'jax': jax.__version__,
    'backend': jax.default_backend(),
    'device': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
    'cpu_cores': os.cpu_count(),
    'command': ' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
    'versions': {},
  }
  for name in ('jaxlib', 'flax', 'optax', 'numpy', 'torch', 'torchvision', 'grain', 'tensorflow-datasets'):
    try:
      env['versions'][name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      env['versions'][name] = None
  env['flax'] = env['versions']['flax']
  return env


class Runner:
  """Runs the rows in order within the deadline; a failing row is recorded and the next one runs."""

  def __init__(self, args, verdict: Verdict):
    import bench_train  # pylint: disable=g-import-not-at-top
    from metrix_jax import sharding  # pylint: disable=g-import-not-at-top

    self.args, self.v, self.b = args, verdict, bench_args(args)
    self.bt = bench_train
    self.mesh = sharding.make_mesh()
    self.images, self.labels = bench_train.make_batch(args.batch_size, args.image_size, self.b.num_classes)
    self.state = self.batch = self.model = self.config = None
    self.compiled: dict[str, tuple] = {}  # row -> (compiled, compile_s, extra, threads)
    self.failed: dict[str, str] = {}  # row -> why it did not lower or compile
    self.seconds: dict[str, float] = {}  # row -> step seconds
    self.row_seconds: dict[str, float] = {}

  # -- predictions: which optional rows fit, from the compile and step times measured so far ----------------------
  def predict(self, name: str) -> float | None:
    compile_s = [c[1] for c in self.compiled.values() if c[1]]
    c = max(compile_s) if compile_s else None
    step = self.seconds.get('jax_feature') or self.seconds.get('jax_clean')
    runs = self.args.warmup + self.args.steps
    if name == 'e2e':
      return None if step is None else 30 + 0.05 * self.args.e2e_photos + 2 * runs * step
    if name == 'max_batch':
      return None if c is None else 2.0 * c
    if name == 'profile':
      return None if step is None else 15 + 6 * 2 * step
    if name == 'jax_input':
      return None if c is None else 1.5 * c + 2 * runs * (step or 0)
    if name == 'torch_fp32':
      t = self.row_seconds.get('torch_bf16_cl')
      return None if t is None else 3 * t
    return None

  def run(self) -> None:
    for name in self.args.rows:
      if any(r['row'] == name for r in self.v.rows):
        continue
      if name in OPTIONAL_ROWS:
        needed, left = self.predict(name), self.v.left() - MARGIN_S
        if needed is not None and needed > left:
          self.v.skip(name, f'predicted {needed:.0f} s from the compile/step times so far; {max(left, 0):.0f} s left')
          continue
      start, self.v.current = self.v.elapsed(), name
      print(f'-- {name} ({start:.0f} s into the call, {self.v.left():.0f} s left)', file=sys.stderr, flush=True)
      try:
        getattr(self, f'row_{name}')()
      except Exception as error:  # pylint: disable=broad-except  (one failing row must not cost the others)
        traceback.print_exc()
        self.v.skip(name, f'failed: {type(error).__name__}: {str(error)[:300]}')
      self.row_seconds[name] = self.v.elapsed() - start
      self.v.timeline.append({'row': name, 'start_s': round(start, 1), 'end_s': round(self.v.elapsed(), 1)})
      self.v.write()

  def emit(self, name: str, row: dict, start: float) -> None:
    row['row_s'] = time.time() - start
    self.v.add(name, row)

  # -- JAX -----------------------------------------------------------------------------------------------------
  def ensure_state(self):
    if self.state is None:
      from metrix_jax import sharding  # pylint: disable=g-import-not-at-top

      self.config, self.model, _, self.state = self.bt.build_variant(
        'multi_similarity', 'none', self.b, self.args.batch_size, self.mesh
      )
      self.batch = sharding.global_batch({'image': self.images, 'label': self.labels}, self.mesh)

  def lower(self, name: str):
    """Lowered program of a JAX row (tracing holds the GIL: done in the main thread)."""
    self.ensure_state()
    if name == 'eval_embed':
      lowered, variables, batch = self.bt.lower_embed(self.state, self.model, self.config, self.b, self.mesh)
      return lowered, (variables, batch)
    mode = name.split('_', 1)[1].replace('clean', 'none')
    config, model, step_fn, _ = self.bt.build_variant(
      'multi_similarity', mode, self.b, self.args.batch_size, self.mesh, state=self.state
    )
    return step_fn.lower(self.state, self.batch), None

  def compile_rows(self, names) -> None:
    """Compiles the JAX rows `names` not compiled (or failed) yet: lowered one by one, compiled in a pool."""
    lowered = {}
    for n in names:
      if n in self.compiled or n in self.failed:
        continue
      try:
        lowered[n] = self.lower(n)
      except Exception as error:  # pylint: disable=broad-except  (its row reports it; the others go on)
        traceback.print_exc()
        self.failed[n] = f'lowering: {type(error).__name__}: {error}'
    workers = max(1, min(self.args.compile_workers, len(lowered)))
    with ThreadPoolExecutor(workers) as pool:
      futures = {n: pool.submit(self.bt.compile_timed, lowered[n][0]) for n in lowered}
      for n in lowered:
        try:
          compiled, seconds = futures[n].result()
        except Exception as error:  # pylint: disable=broad-except  (its row reports it)
          traceback.print_exc()
          self.failed[n] = f'compilation: {type(error).__name__}: {error}'
          continue
        self.compiled[n] = (compiled, seconds, lowered[n][1], workers)

  def compiled_row(self, name: str):
    """(compiled, seconds, extra, threads) of a JAX row, compiling it (or its group) first."""
    if name not in self.compiled:
      together = self.args.compile_workers > 1 and name in ('jax_feature', 'jax_embedding', 'eval_embed')
      self.compile_rows(self.group(name) if together else [name])
    if name not in self.compiled:
      raise RuntimeError(f'{name} did not compile: {self.failed.get(name, "see the traceback above")}'[:500])
    return self.compiled[name]

  def group(self, name: str) -> list[str]:
    """The rows compiled together with `name`: feature, embedding and eval embed, as far as they are asked for."""
    return [n for n in ('jax_feature', 'jax_embedding', 'eval_embed') if n == name or n in self.args.rows]

  def jax_step_row(self, name: str) -> None:
    start = time.time()
    compiled, compile_s, _, workers = self.compiled_row(name)
    mode = name.split('_', 1)[1].replace('clean', 'none')
    row = self.bt.jax_row('multi_similarity', mode, self.b, self.args.batch_size, compiled, compile_s)
    row['compiled_with'] = f'{workers} thread(s)'
    if not self.args.compile_only:
      self.state, seconds, metrics = self.bt.run_steps(
        compiled, self.state, self.batch, self.args.steps, self.args.warmup
      )
      self.seconds[name] = seconds
      row.update(
        images_per_s=self.args.batch_size / seconds, ms_per_step=1000 * seconds, loss_value=float(metrics['loss'])
      )
    self.emit(name, row, start)

  def row_jax_clean(self):
    self.jax_step_row('jax_clean')

  def row_jax_feature(self):
    self.jax_step_row('jax_feature')

  def row_jax_embedding(self):
    self.jax_step_row('jax_embedding')

  def row_jax_input(self):
    self.jax_step_row('jax_input')

  def row_eval_embed(self):
    start = time.time()
    compiled, compile_s, (variables, batch), workers = self.compiled_row('eval_embed')
    if self.args.compile_only:
      row = self.bt.jax_row('-', 'eval embed', self.b, self.args.eval_batch_size, compiled, compile_s)
    else:
      variables = self.state.variables()  # the trained state's (same shapes as when lowered)
      row = self.bt.embed_row(compiled, compile_s, variables, batch, self.b)
    row['compiled_with'] = f'{workers} thread(s)'
    self.emit('eval_embed', row, start)

  def row_e2e(self):
    start = time.time()
    compiled = self.compiled_row('jax_feature')[0]
    step_row = next((r for r in self.v.rows if r['row'] == 'jax_feature'), None)
    e2e = self.bt.time_end_to_end(compiled, self.state, self.b, self.args.batch_size, self.mesh, self.args.e2e_workers)
    self.state = e2e.pop('state')
    row = dict(
      framework='jax',
      loss='multi_similarity',
      mix=f'feature, end to end ({e2e["workers"]} workers)',
      batch_size=self.args.batch_size,
      dtype=self.args.dtype,
      images_per_s=e2e['images_per_s'],
      ms_per_step=e2e['ms_per_step'],
      memory_bytes=None,
      flops=None,
      compile_s=None,
      loss_value=e2e['loss_value'],
    )
    if step_row and step_row.get('images_per_s'):
      row['e2e_vs_step'] = e2e['images_per_s'] / step_row['images_per_s']
    self.emit('e2e', row, start)

  def row_max_batch(self):
    """Compile-only probes around the batch that XLA's memory of the feature row predicts fills the device."""
    start = time.time()
    used = self.bt._xla_bytes(self.compiled_row('jax_feature')[0])  # pylint: disable=protected-access
    limit = self.bt.memory_limit(self.b)
    if limit is None and used is not None and self.args.smoke:
      limit = int(1.5 * used)  # a CPU reports no device memory: rehearse the search against 1.5x the feature row's
    if limit is None or used is None:
      raise RuntimeError('no device memory limit (pass --memory_limit_gib) or no XLA memory analysis')
    # XLA's memory = the state (parameters, Adam moments: fixed) + what grows with the batch (activations, the
    # batch; the gradients are counted there too, which errs small). Unusable figures fall back to all-variable.
    fixed = _nbytes(self.state)
    fixed = fixed if 0 < fixed < used else 0
    per_image = (used - fixed) / self.args.batch_size
    predicted = min(int((limit - fixed) / per_image), MAX_BATCH_FACTOR * self.args.batch_size)
    step = 20
    candidates = sorted({max(step, int(predicted * f) // step * step) for f in (0.85, 1.0, 1.15)})
    print(
      f'  max batch: predicted {predicted} from {used / 2**20:.0f} MiB at {self.args.batch_size}; probing {candidates}',
      file=sys.stderr,
      flush=True,
    )
    lowered = {}
    for bs in candidates:
      lowered[bs], _ = self.bt.lower_probe(bs, self.b, self.mesh, self.state)
    with ThreadPoolExecutor(min(len(candidates), os.cpu_count() or 1)) as pool:  # no autotuning: no contention
      futures = {bs: pool.submit(self.bt.compile_timed, lowered[bs], PROBE_OPTIONS) for bs in candidates}
      for bs in candidates:
        compiled, seconds = futures[bs].result()
        self.v.probes.append(dict(self.bt.probe_row(bs, compiled, seconds, limit), predicted=predicted))
        del compiled
    fitting = [p['batch_size'] for p in self.v.probes if p['fits']]
    self.emit(
      'max_batch',
      dict(
        framework='jax',
        loss='multi_similarity',
        mix='feature, largest batch (compile only)',
        batch_size=max(fitting) if fitting else None,
        dtype=self.args.dtype,
        images_per_s=None,
        ms_per_step=None,
        memory_bytes=next(
          (p['memory_bytes'] for p in self.v.probes if fitting and p['batch_size'] == max(fitting)), None
        ),
        flops=None,
        compile_s=max(p['compile_s'] for p in self.v.probes),
        loss_value=None,
        predicted_batch=predicted,
        limit_bytes=limit,
      ),
      start,
    )

  def row_profile(self):
    """3 clean + 3 feature steps under jax.profiler.trace -> profile.tar.gz (TensorBoard / XProf / Perfetto)."""
    import jax  # pylint: disable=g-import-not-at-top

    start = time.time()
    logdir = tempfile.mkdtemp(prefix='metrix_verdict_profile_')
    with jax.profiler.trace(logdir):
      for name in ('jax_clean', 'jax_feature'):
        if name in self.compiled:
          with jax.profiler.TraceAnnotation(name):
            self.state, _, _ = self.bt.run_steps(self.compiled[name][0], self.state, self.batch, 3, 0)
    path = os.path.join(self.args.out, 'profile.tar.gz')
    with tarfile.open(path + '.tmp', 'w:gz') as tar:
      tar.add(logdir, arcname='profile')
    os.replace(path + '.tmp', path)
    self.emit(
      'profile',
      dict(
        framework='jax',
        loss='multi_similarity',
        mix='profile: 3 clean + 3 feature steps',
        batch_size=self.args.batch_size,
        dtype=self.args.dtype,
        images_per_s=None,
        ms_per_step=None,
        memory_bytes=None,
        flops=None,
        compile_s=None,
        loss_value=None,
        file=os.path.basename(path),
        file_bytes=os.path.getsize(path),
      ),
      start,
    )

  # -- PyTorch -------------------------------------------------------------------------------------------------
  def torch_row(self, variant: str) -> None:
    start = time.time()
    row = self.bt.time_torch(variant, self.b, self.images, self.labels)
    self.emit(f'torch_{variant}', row, start)
    try:
      import torch  # pylint: disable=g-import-not-at-top

      if 'torch' not in self.v.env:
        sys.path.insert(0, HERE)
        import torch_reference  # pylint: disable=g-import-not-at-top

        self.v.env['torch'] = torch_reference.describe_device()
      if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the JAX rows get the memory
    except ImportError:
      pass

  def row_torch_bf16_cl(self):
    self.torch_row('bf16_cl')

  def row_torch_fp32(self):
    self.torch_row('fp32')


def _nbytes(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top

  return int(sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, 'nbytes')))


def start_watchdog(verdict: Verdict, grace_s: float) -> None:
  """At the deadline + grace: mark the files 'cut at the deadline' and exit (the rows so far are on disk)."""

  def watch():
    while verdict.left() + grace_s > 0:
      time.sleep(1.0)
    verdict.status = f'cut at the deadline ({verdict.args.budget_s:.0f} s) during the row after the last one listed'
    verdict.write()
    print(f'gpu_verdict: deadline reached; rows so far are in {verdict.args.out}', file=sys.stderr, flush=True)
    os._exit(3)

  threading.Thread(target=watch, daemon=True).start()


def main(argv=None) -> int:
  args = parse_args(argv)
  sys.path.insert(0, HERE)
  sys.path.insert(0, ROOT)
  guard = None
  if args.host_imports == 'on':
    guard = HostImportGuard()
    sys.meta_path.insert(0, guard)
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # PyTorch shares the device
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  absl_logging.set_verbosity(absl_logging.ERROR)  # the "random init" warning, once per variant
  import jax  # pylint: disable=g-import-not-at-top

  env = environment(args)  # initialises the JAX backend before PyTorch touches the device
  verdict = Verdict(args, env)
  jax.monitoring.register_event_duration_secs_listener(verdict.on_event)  # XLA's compile log
  verdict.write()
  print(
    f'gpu_verdict: {env["device"]}, {args.budget_s:.0f} s budget, {verdict.left():.0f} s left; rows: '
    f'{", ".join(args.rows)}; writing to {args.out}',
    file=sys.stderr,
    flush=True,
  )
  start_watchdog(verdict, grace_s=MARGIN_S)
  runner = Runner(args, verdict)
  runner.run()
  failed = [s for s in verdict.skipped if s['why'].startswith('failed')]
  verdict.status = 'done' + (f', {len(failed)} row(s) failed' if failed else '')
  if guard is not None and guard.refused:
    env['imports_refused_as_on_the_gpu_host'] = sorted(set(guard.refused))
  verdict.write()
  print(open(os.path.join(args.out, 'verdict.md')).read(), flush=True)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
