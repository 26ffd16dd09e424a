r"""Train-step benchmark (issue 8): the project's REAL train step vs a PyTorch reference, in one run.

    python benchmarks/bench_train.py                       # GPU: ResNet-50, 224 px, batch 180, bf16, every variant
    python benchmarks/bench_train.py --quick               # CPU smoke test: ResNet-18, 32 px, batch 16, 2 steps
    python benchmarks/bench_train.py --losses=ms --modes=none,feature --extra_batch_sizes=100 --json_out=r.json
    python benchmarks/bench_train.py --compile_only --dtype=float32   # any machine: XLA FLOPs + memory per variant
    python benchmarks/bench_train.py --first_step --runs=5 --first_step_cache=warm   # restart: start -> first step

JAX rows: `metrix_jax.step.make_train_step` (the trainer's jitted step: uint8 batch -> normalise -> EmbeddingNet
-> loss (+ Metrix at the configured level) -> clip + Adam with coupled L2), built from a config exactly as
`train_and_evaluate` builds it, for each loss (--losses) x mix level (--modes; 'none' = clean). Settings: the
official CUB recipe after warm-up (bn_freeze=True, warm-up 0: BN statistics and gamma/beta frozen), random weights,
random uint8 images, labels of n classes x 5 images. The batch stays on the device; each step is timed over
--steps steps after --warmup steps, with `jax.block_until_ready`. Compilation is timed apart (AOT lower/compile).

PyTorch rows (`benchmarks/torch_reference.py`, same process, run first so each framework has the GPU's memory to
itself): torchvision ResNet-50 (random weights) + the same head + MS loss (spec 1.4) + clip + Adam, float32 eager
(the official code) and bf16 autocast + channels_last (a strong PyTorch user), same images and labels.

Columns: images/s; ms/step; Metrix overhead = step time vs the clean step of the same loss (-1); ratios vs the
PyTorch rows; the step's device memory from XLA's compiled memory analysis (arguments + outputs + temporaries -
donated aliases; PyTorch: `torch.cuda.max_memory_allocated`); GFLOP/step and FLOP overhead from XLA's cost model
of the compiled step (deterministic: the work Metrix adds, free of timing noise; --compile_only gives these columns
alone, without running a step); compile seconds; the loss after the last step
(finite check). Then the eval embedding throughput (`embedding.make_embed_fn`) and the process's peak device memory
(`device.memory_stats()`, where the backend reports it). --e2e_workers=N adds the MS + feature step fed by the
project's grain pipeline (N worker processes) from a synthetic set of 256-px JPEGs (`bench_input_pipeline.py`'s
photos), as the trainer's loop feeds it: end-to-end images/s vs the step alone. --max_batch_probe=256,512,...
compiles (without running) the MS + feature step at those batch sizes and compares XLA's memory with the device's
limit: the largest batch that fits. --json_out writes every row (rewritten after each row,
so a run cut short still leaves its rows).

--first_step times a restart instead (issue 17): `python -m metrix_jax.main --config=configs/demo.py` in a fresh
workdir, from the process start to the log line 'compiled and ran the first step in X s' (then the run is killed),
--runs times after --first_step_warmup untimed runs (which build the demo data set once). --first_step_cache:
'cold' (an empty compilation cache folder for every run: every program compiles), 'warm' (one folder for all runs,
filled by the warm-up run: what a restart finds), 'off' (--compilation_cache=off) or a folder (kept between calls).
Prints min / median / max of the wall time to the first step and of the logged X.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # share the GPU with the PyTorch reference

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from metrix_jax import jsonio  # pylint: disable=g-import-not-at-top,wrong-import-position

LOSS_ALIASES = {
  'ms': 'multi_similarity',
  'contrastive': 'contrastive',
  'pa': 'proxy_anchor',
  'multi_similarity': 'multi_similarity',
  'proxy_anchor': 'proxy_anchor',
}
MODES = ('none', 'input', 'feature', 'embedding')
IMAGES_PER_CLASS = 5


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--quick',
    action='store_true',
    help='tiny CPU smoke run: ResNet-18, 32 px, batch 16, 2 steps, 1 warm-up (overrides sizes)',
  )
  parser.add_argument('--depth', type=int, default=50, choices=(18, 34, 50))
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batch_size', type=int, default=180)
  parser.add_argument('--eval_batch_size', type=int, default=360)
  parser.add_argument(
    '--dtype',
    default='bfloat16',
    choices=('bfloat16', 'float32'),
    help='JAX compute dtype (parameters, loss and Metrix math stay float32)',
  )
  parser.add_argument('--losses', default='ms,contrastive,pa', help='comma-separated: ms, contrastive, pa')
  parser.add_argument('--modes', default=','.join(MODES), help='comma-separated mix levels; none = clean')
  parser.add_argument(
    '--torch', default='fp32,bf16_cl', help='PyTorch variants: fp32, bf16_cl, or "none" to skip PyTorch'
  )
  parser.add_argument(
    '--extra_batch_sizes',
    default='',
    help='e.g. 100: also time MS clean + feature and PyTorch bf16_cl at these batch sizes',
  )
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--num_classes', type=int, default=100, help='train classes (proxies for proxy anchor)')
  parser.add_argument(
    '--e2e_workers',
    type=int,
    default=None,
    help='also time MS + feature Metrix fed by the grain pipeline (the trainer loop: next batch '
    '-> global_batch -> step) from a synthetic 256-px JPEG set read at --image_size, with '
    'this many worker processes (0: in-process; -1: all cores); default: skip',
  )
  parser.add_argument('--e2e_photos', type=int, default=600, help='photos in the synthetic set (half train)')
  parser.add_argument('--data_dir', default=os.path.join(tempfile.gettempdir(), 'metrix_bench_data'))
  parser.add_argument(
    '--max_batch_probe',
    default='',
    help='e.g. 256,384,512,768: compile (not run) MS + feature at these batch sizes and report '
    "XLA's memory for each vs the device's limit (the largest batch that fits)",
  )
  parser.add_argument(
    '--memory_limit_gib',
    type=float,
    default=None,
    help="device memory for --max_batch_probe (default: memory_stats()['bytes_limit'])",
  )
  parser.add_argument(
    '--compile_only',
    action='store_true',
    help="compile every JAX variant and report XLA's memory and FLOPs without running a step "
    '(predicts the Metrix FLOP overhead at full size on any machine; no PyTorch rows)',
  )
  parser.add_argument('--json_out', default='')
  parser.add_argument('--first_step', action='store_true', help='time start -> first step of the demo (restarts)')
  parser.add_argument('--runs', type=int, default=5, help='--first_step: timed runs')
  parser.add_argument('--first_step_warmup', type=int, default=1, help='--first_step: untimed runs first')
  parser.add_argument('--first_step_cache', default='warm', help="--first_step: 'cold', 'warm', 'off' or a folder")
  parser.add_argument('--first_step_config', default='configs/demo.py')
  parser.add_argument(
    '--first_step_data_dir',
    default=os.path.join(tempfile.gettempdir(), 'metrix_first_step_data'),
    help='--first_step: where the demo data set is built once (--config.dataset.data_dir)',
  )
  args = parser.parse_args(argv)
  if args.quick:
    args.depth, args.image_size, args.batch_size, args.eval_batch_size = 18, 32, 16, 16
    args.steps, args.warmup = 2, 1
  args.losses = [_loss_name(x) for x in args.losses.split(',') if x.strip()]
  args.modes = [m.strip() for m in args.modes.split(',') if m.strip()]
  bad = [m for m in args.modes if m not in MODES]
  if bad:
    parser.error(f'unknown mix level(s) {bad}; valid choices: {", ".join(MODES)}')
  args.torch = [] if args.torch.strip() in ('', 'none') else [t.strip() for t in args.torch.split(',')]
  if args.compile_only:
    args.torch = []
  args.extra_batch_sizes = [int(b) for b in args.extra_batch_sizes.split(',') if b.strip()]
  args.max_batch_probe = [int(b) for b in args.max_batch_probe.split(',') if b.strip()]
  return args


def _loss_name(name: str) -> str:
  name = name.strip()
  if name not in LOSS_ALIASES:
    raise SystemExit(f'Unknown loss {name!r}; valid choices: {", ".join(LOSS_ALIASES)}.')
  return LOSS_ALIASES[name]


def make_batch(batch_size: int, image_size: int, num_classes: int, seed: int = 0):
  """Random uint8 images [B, S, S, 3] and labels of consecutive groups of 5 (n classes x 5 images)."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
  labels = ((np.arange(batch_size) // IMAGES_PER_CLASS) % num_classes).astype(np.int32)
  return images, labels


def make_config(loss: str, mode: str, args, batch_size: int):
  """The trainer's config for this variant (validated like a run's)."""
  from metrix_jax import config_lib  # pylint: disable=g-import-not-at-top

  c = config_lib.base_config()
  c.dataset.name = 'cub200'
  c.dataset.image_size = args.image_size
  c.dataset.eval_resize = max(c.dataset.eval_resize, args.image_size)
  c.dataset.eval_batch_size = args.eval_batch_size
  c.model.depth = args.depth
  c.model.dtype = args.dtype
  c.model.bn_freeze = True
  c.optim.warmup_epochs = 0  # the step after warm-up: everything but BN trains
  c.loss.name = loss
  c.mix.mode = mode
  c.train.batch_size = batch_size
  config_lib.validate(c, check_files=False)
  return c


def _xla_bytes(compiled) -> int | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def build_variant(loss: str, mode: str, args, batch_size: int, mesh, state=None):
  """The trainer's jitted step for (loss, mode) at `batch_size`: (config, model, step_fn, state). `state` (any
  earlier variant's: the train state does not depend on the mix level or the batch size) saves an init."""
  from metrix_jax import embedding, step  # pylint: disable=g-import-not-at-top

  config = make_config(loss, mode, args, batch_size)
  model, loss_fn = embedding.create_model(config), step.create_loss(config)

  tx_factory = step.optimizer_factory(config, steps_per_epoch=1000, total_steps=10**6)

  if state is None:
    state = step.init_state(config, model, loss_fn, tx_factory, args.num_classes, mesh)
  step_fn = step.make_train_step(config, model, loss_fn, tx_factory(state.params), mesh)
  return config, model, step_fn, state


def compile_timed(lowered, compiler_options: dict | None = None):
  """(compiled, seconds) of `lowered.compile()` (XLA's compilation alone; tracing and lowering excluded).

  `compiler_options`: XLA debug options for this compilation only, e.g. {'xla_gpu_autotune_level': 0} for a
  memory probe that needs no kernel timing (ignored where this jax's `compile` takes none)."""
  start = time.perf_counter()
  try:
    compiled = lowered.compile(compiler_options=compiler_options) if compiler_options else lowered.compile()
  except TypeError:  # a jax without per-call compiler options
    compiled = lowered.compile()
  return compiled, time.perf_counter() - start


def jax_row(loss: str, mode: str, args, batch_size: int, compiled, compile_s: float) -> dict:
  """A JAX row before timing: memory and FLOPs from XLA's analysis of the compiled step."""
  return dict(
    framework='jax',
    loss=loss,
    mix=mode,
    batch_size=batch_size,
    dtype=args.dtype,
    images_per_s=None,
    ms_per_step=None,
    memory_bytes=_xla_bytes(compiled),
    flops=_xla_flops(compiled),
    compile_s=compile_s,
    loss_value=None,
  )


def run_steps(compiled, state, batch, steps: int, warmup: int):
  """(state, seconds per step, metrics): `warmup` steps, then `steps` timed ones (device-synchronised)."""
  import jax  # pylint: disable=g-import-not-at-top

  metrics = None
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  return state, (time.perf_counter() - start) / max(steps, 1), metrics


def time_jax_step(
  loss: str, mode: str, args, batch_size: int, images, labels, mesh, keep_state: bool = False, e2e: int | None = None
):
  """Builds the trainer's step for (loss, mode), times it; returns (row, (state, model, config) or None)."""
  from metrix_jax import sharding  # pylint: disable=g-import-not-at-top

  config, model, step_fn, state = build_variant(loss, mode, args, batch_size, mesh)
  batch = sharding.global_batch({'image': images, 'label': labels}, mesh)
  compiled, compile_s = compile_timed(step_fn.lower(state, batch))
  row = jax_row(loss, mode, args, batch_size, compiled, compile_s)
  if args.compile_only:
    return row, None
  state, seconds, metrics = run_steps(compiled, state, batch, args.steps, args.warmup)
  row.update(images_per_s=batch_size / seconds, ms_per_step=1000 * seconds, loss_value=float(metrics['loss']))
  if e2e is not None:
    row['e2e'] = time_end_to_end(compiled, state, args, batch_size, mesh, e2e)
    state = row['e2e'].pop('state')
  return row, ((state, model, config) if keep_state else None)


def time_end_to_end(compiled, state, args, batch_size: int, mesh, workers: int) -> dict:
  """The trainer's loop on real decoded JPEGs: grain batch -> `sharding.global_batch` -> compiled step."""
  import jax  # pylint: disable=g-import-not-at-top
  from metrix_jax import data, sharding  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import bench_input_pipeline  # pylint: disable=g-import-not-at-top

  manual_dir = os.path.join(args.data_dir, f'fake_cub_{args.e2e_photos}')
  os.makedirs(manual_dir, exist_ok=True)
  bench_input_pipeline.fake_cub_archive(manual_dir, args.e2e_photos)
  workers = os.cpu_count() if workers < 0 else workers
  it = data.create_train_iterator(
    'cub200',
    global_batch_size=batch_size,
    image_size=args.image_size,
    seed=0,
    data_dir=os.path.join(args.data_dir, f'built_{args.e2e_photos}'),
    manual_dir=manual_dir,
    check_counts=False,
    num_workers=workers,
  )
  try:

    def step(state):
      local = next(it)
      return compiled(state, sharding.global_batch({'image': local['image'], 'label': local['label']}, mesh))

    for _ in range(max(args.warmup, 1)):
      state, metrics = step(state)
    jax.block_until_ready((state, metrics))
    start = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = step(state)
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / args.steps
  finally:
    it.close()
  return dict(
    images_per_s=batch_size / seconds,
    ms_per_step=1000 * seconds,
    workers=workers,
    state=state,
    loss_value=float(metrics['loss']),
  )


def memory_limit(args) -> int | None:
  """Device memory the largest-batch probe compares with: --memory_limit_gib, else memory_stats()['bytes_limit']."""
  import jax  # pylint: disable=g-import-not-at-top

  if args.memory_limit_gib:
    return int(args.memory_limit_gib * 2**30)
  stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], 'memory_stats') else None
  return (stats or {}).get('bytes_limit')


def lower_probe(batch_size: int, args, mesh, state):
  """The MS + feature step at `batch_size`, lowered on an abstract batch (nothing allocated) for compile-only."""
  import jax  # pylint: disable=g-import-not-at-top
  from metrix_jax import sharding  # pylint: disable=g-import-not-at-top

  _, _, step_fn, state = build_variant('multi_similarity', 'feature', args, batch_size, mesh, state=state)
  shard = sharding.batch_sharding(mesh)
  batch = {
    'image': jax.ShapeDtypeStruct((batch_size, args.image_size, args.image_size, 3), np.uint8, sharding=shard),
    'label': jax.ShapeDtypeStruct((batch_size,), np.int32, sharding=shard),
  }
  return step_fn.lower(state, batch), state


def probe_row(batch_size: int, compiled, compile_s: float, limit: int | None) -> dict:
  memory = _xla_bytes(compiled)
  fits = None if (memory is None or limit is None) else memory <= limit
  return dict(batch_size=batch_size, memory_bytes=memory, limit_bytes=limit, fits=fits, compile_s=compile_s)


def probe_batch_memory(args, mesh) -> list[dict]:
  """Compile-only: XLA memory of the MS + feature step per batch size (abstract batch, nothing allocated)."""
  limit, out, state = memory_limit(args), [], None
  for batch_size in args.max_batch_probe:
    lowered, state = lower_probe(batch_size, args, mesh, state)  # the state does not depend on the batch size
    compiled, compile_s = compile_timed(lowered)
    out.append(probe_row(batch_size, compiled, compile_s, limit))
    print(
      f'  probe batch {batch_size}: {_mib(out[-1]["memory_bytes"])} of {_mib(limit)} -> fits: {out[-1]["fits"]}',
      file=sys.stderr,
      flush=True,
    )
  return out


def lower_embed(state, model, config, args, mesh):
  """The evaluator's jitted forward (`embedding.make_embed_fn`) at --eval_batch_size: (lowered, variables, batch)."""
  from metrix_jax import embedding, sharding  # pylint: disable=g-import-not-at-top

  images, _ = make_batch(args.eval_batch_size, args.image_size, args.num_classes, seed=1)
  embed_fn = embedding.make_embed_fn(model, config, mesh)
  variables = state.variables()
  batch = sharding.global_batch({'image': images}, mesh)['image']
  return embed_fn.lower(variables, batch), variables, batch


def embed_row(compiled, compile_s: float, variables, batch, args) -> dict:
  """Times the compiled eval embedding: images/s over --steps calls after --warmup."""
  import jax  # pylint: disable=g-import-not-at-top

  out = None
  for _ in range(args.warmup):
    out = compiled(variables, batch)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(args.steps):
    out = compiled(variables, batch)
  jax.block_until_ready(out)
  seconds = (time.perf_counter() - start) / max(args.steps, 1)
  return dict(
    framework='jax',
    loss='-',
    mix='eval embed',
    batch_size=args.eval_batch_size,
    dtype=args.dtype,
    images_per_s=args.eval_batch_size / seconds,
    ms_per_step=1000 * seconds,
    memory_bytes=_xla_bytes(compiled),
    flops=_xla_flops(compiled),
    compile_s=compile_s,
    loss_value=float(np.abs(np.asarray(out, np.float32)).sum()),
  )


def time_embed(state, model, config, args, mesh) -> dict:
  """Eval embedding throughput (`embedding.make_embed_fn`, the evaluator's jitted forward) at --eval_batch_size."""
  lowered, variables, batch = lower_embed(state, model, config, args, mesh)
  compiled, compile_s = compile_timed(lowered)
  return embed_row(compiled, compile_s, variables, batch, args)


def time_torch(variant: str, args, images, labels) -> dict:
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import torch_reference  # pylint: disable=g-import-not-at-top

  r = torch_reference.time_variant(
    variant, depth=args.depth, images_uint8=images, labels=labels, steps=args.steps, warmup=args.warmup
  )
  return dict(
    framework='torch',
    loss='multi_similarity',
    mix=f'none ({variant})',
    batch_size=len(labels),
    dtype='float32' if variant == 'fp32' else 'bf16 autocast, channels_last',
    images_per_s=r['images_per_s'],
    ms_per_step=r['ms_per_step'],
    memory_bytes=r['peak_bytes'],
    flops=None,
    compile_s=None,
    loss_value=r['loss'],
    torch_variant=variant,
    resnet_source=r['source'],
  )


def environment(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top

  env = {
    'date_utc': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M'),
    'python': platform.python_version(),
    'jax': jax.__version__,
    'flax': flax.__version__,
    'backend': jax.default_backend(),
    'device': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
    'cpu_cores': os.cpu_count(),
    'command': ' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
  }
  if args.torch:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch_reference  # pylint: disable=g-import-not-at-top

    env['torch'] = torch_reference.describe_device()
  return env


def _xla_flops(compiled) -> float | None:
  """XLA's count of floating-point operations of one call (its cost model; a deterministic work measure that
  predicts the Metrix overhead independently of timing noise)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get('flops')
  return float(flops) if flops is not None and flops > 0 else None


def _mib(n):
  return '-' if n is None else f'{n / 2**20:,.0f} MiB'


def _fmt(x, spec, suffix=''):
  return '-' if x is None or (isinstance(x, float) and not math.isfinite(x)) else f'{x:{spec}}{suffix}'


def add_ratios(rows: list[dict]) -> None:
  """Metrix overhead vs the clean step of the same loss and batch; speed ratios vs the PyTorch rows of the batch."""
  for r in rows:
    if r['framework'] != 'jax' or r['mix'] == 'eval embed':
      continue
    clean = [
      c
      for c in rows
      if c['framework'] == 'jax'
      and c['loss'] == r['loss']
      and c['mix'] == 'none'
      and c['batch_size'] == r['batch_size']
    ]
    if clean and r['mix'] != 'none':
      if r['ms_per_step'] and clean[0]['ms_per_step']:
        r['overhead_pct'] = 100 * (r['ms_per_step'] / clean[0]['ms_per_step'] - 1)
      if r.get('flops') and clean[0].get('flops'):
        r['flop_overhead_pct'] = 100 * (r['flops'] / clean[0]['flops'] - 1)
    for variant in ('bf16_cl', 'fp32'):
      ref = [t for t in rows if t.get('torch_variant') == variant and t['batch_size'] == r['batch_size']]
      if ref and r['images_per_s']:
        r[f'vs_torch_{variant}'] = r['images_per_s'] / ref[0]['images_per_s']


def print_table(rows: list[dict], env: dict, args) -> None:
  print(f'\n{env["device"]} ({env["backend"]}); jax {env["jax"]}, flax {env["flax"]}; {env.get("torch", "")}')
  print(
    f'ResNet-{args.depth}, {args.image_size} px, JAX compute {args.dtype}, {args.steps} timed steps after '
    f'{args.warmup} warm-up; {env["date_utc"]} UTC; command: {env["command"]}\n'
  )
  print(
    '| framework | loss | mix | batch | images/s | ms/step | Metrix overhead | vs PyTorch bf16+CL | '
    'vs PyTorch fp32 | memory | GFLOP/step (XLA) | FLOP overhead | compile s | loss |'
  )
  print('|---|---|---|---|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(
      f'| {r["framework"]} | {r["loss"]} | {r["mix"]} | {r["batch_size"]} | {_fmt(r["images_per_s"], ",.1f")} | '
      f'{_fmt(r["ms_per_step"], ",.1f")} | {_fmt(r.get("overhead_pct"), "+.1f", "%")} | '
      f'{_fmt(r.get("vs_torch_bf16_cl"), ".2f", "x")} | {_fmt(r.get("vs_torch_fp32"), ".2f", "x")} | '
      f'{_mib(r["memory_bytes"])} | {_fmt(r.get("flops") and r["flops"] / 1e9, ",.1f")} | '
      f'{_fmt(r.get("flop_overhead_pct"), "+.1f", "%")} | {_fmt(r["compile_s"], ".1f")} | '
      f'{_fmt(r["loss_value"], ".4g")} |',
      flush=True,
    )
  train_rows = [r for r in rows if r['framework'] == 'jax' and r['mix'] == 'none']
  embed = [r for r in rows if r['mix'] == 'eval embed']
  for r in rows:
    if 'e2e_vs_step' in r:
      print(f'end to end (grain pipeline, {r["mix"]}) / step alone: {r["e2e_vs_step"]:.2f}x')
  if train_rows and embed and embed[0]['images_per_s'] and train_rows[0]['images_per_s']:
    print(
      f'\neval embedding throughput / clean train step: {embed[0]["images_per_s"] / train_rows[0]["images_per_s"]:.2f}x'
    )
  for p in env.get('max_batch_probe') or []:
    print(
      f'MS + feature at batch {p["batch_size"]}: XLA memory {_mib(p["memory_bytes"])} of '
      f'{_mib(p["limit_bytes"])} -> fits: {p["fits"]} (compile {p["compile_s"]:.0f} s)'
    )
  if env.get('peak_device_bytes') is not None:
    print(f'process peak device memory (all variants, device.memory_stats): {_mib(env["peak_device_bytes"])}')


FIRST_STEP_LINE = re.compile(r'compiled and ran the first step in ([0-9.]+)s')


def first_step_command(args, workdir: str, cache: str) -> list[str]:
  """The demo's training command in `workdir` with compilation cache `cache` (a folder or 'off')."""
  return [
    sys.executable,
    '-m',
    'metrix_jax.main',
    f'--config={args.first_step_config}',
    f'--workdir={workdir}',
    f'--compilation_cache={cache}',
    f'--config.dataset.data_dir={args.first_step_data_dir}',
  ]


def run_to_first_step(command: list[str], timeout_s: float = 900.0) -> dict:
  """Runs `command` (from the checkout) from its start to the trainer's log line 'compiled and ran the first step
  in X s', then kills its process group: {'wall_s': start -> that line, 'logged_s': X}."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get('PYTHONPATH', ''))
  start = time.perf_counter()
  proc = subprocess.Popen(
    command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
  )
  tail: list[str] = []
  try:
    for line in proc.stderr:
      tail = (tail + [line])[-20:]
      match = FIRST_STEP_LINE.search(line)
      if match:
        return dict(wall_s=time.perf_counter() - start, logged_s=float(match.group(1)))
      if time.perf_counter() - start > timeout_s:
        break
  finally:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    proc.wait()
  raise RuntimeError('the run ended before its first step:\n' + ''.join(tail))


def first_step(args) -> dict:
  """--first_step: min / median / max over --runs of start -> first step, with the chosen cache."""
  mode = args.first_step_cache
  scratch = tempfile.mkdtemp(prefix='metrix_first_step_')
  shared = os.path.join(scratch, 'cache') if mode == 'warm' else None if mode in ('cold', 'off') else mode
  runs = []
  try:
    for i in range(args.first_step_warmup + args.runs):
      cache = 'off' if mode == 'off' else shared or os.path.join(scratch, f'cache{i}')
      r = run_to_first_step(first_step_command(args, os.path.join(scratch, f'run{i}'), cache))
      timed = i >= args.first_step_warmup
      print(
        f'  run {i}{"" if timed else " (warm-up)"}: first step after {r["wall_s"]:.1f} s '
        f'(logged {r["logged_s"]:.1f} s)',
        file=sys.stderr,
        flush=True,
      )
      if timed:
        runs.append(r)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)

  def stats(key):
    values = sorted(r[key] for r in runs)
    return dict(min=values[0], median=float(np.median(values)), max=values[-1])

  out = dict(cache=mode, runs=len(runs), wall_s=stats('wall_s'), logged_s=stats('logged_s'), per_run=runs)
  print(
    f'| {mode} | {len(runs)} | '
    + ' / '.join(f'{out["wall_s"][k]:.1f}' for k in ('min', 'median', 'max'))
    + ' | '
    + ' / '.join(f'{out["logged_s"][k]:.1f}' for k in ('min', 'median', 'max'))
    + ' |',
    flush=True,
  )
  if args.json_out:
    jsonio.write_json(args.json_out, out)
  return out


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  if args.first_step:
    return [first_step(args)]
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  absl_logging.set_verbosity(absl_logging.ERROR)  # the "random init" warning, once per variant
  import jax  # pylint: disable=g-import-not-at-top
  from metrix_jax import sharding  # pylint: disable=g-import-not-at-top

  env = environment(args)
  mesh = sharding.make_mesh()
  rows: list[dict] = []

  def emit(row):
    rows.append(row)
    print(
      f'  {row["framework"]} {row["loss"]} {row["mix"]} batch {row["batch_size"]}: '
      f'{_fmt(row["images_per_s"], ",.1f")} images/s, {_fmt(row["ms_per_step"], ",.1f")} ms/step, '
      f'{_fmt(row.get("flops") and row["flops"] / 1e9, ",.1f")} GFLOP',
      file=sys.stderr,
      flush=True,
    )
    if args.json_out:  # after every row: a run cut short keeps its rows
      jsonio.write_json(args.json_out, {'environment': env, 'rows': rows})

  for batch_size in [args.batch_size] + args.extra_batch_sizes:
    main_batch = batch_size == args.batch_size
    images, labels = make_batch(batch_size, args.image_size, args.num_classes)
    for variant in args.torch if main_batch else [v for v in args.torch if v == 'bf16_cl']:
      emit(time_torch(variant, args, images, labels))
    losses = args.losses if main_batch else ['multi_similarity']
    modes = args.modes if main_batch else [m for m in args.modes if m in ('none', 'feature')]
    for loss in losses:
      for mode in modes:
        want_state = main_batch and loss == losses[0] and mode == modes[0]
        e2e = args.e2e_workers if (main_batch and mode == 'feature' and loss == 'multi_similarity') else None
        row, kept = time_jax_step(loss, mode, args, batch_size, images, labels, mesh, keep_state=want_state, e2e=e2e)
        e2e_row = row.pop('e2e', None)
        emit(row)
        if e2e_row is not None:
          emit(
            dict(
              row,
              mix=f'feature, end to end ({e2e_row["workers"]} workers)',
              memory_bytes=None,
              flops=None,
              compile_s=None,
              images_per_s=e2e_row['images_per_s'],
              ms_per_step=e2e_row['ms_per_step'],
              loss_value=e2e_row['loss_value'],
              e2e_vs_step=e2e_row['images_per_s'] / row['images_per_s'],
            )
          )
        if kept is not None:
          emit(time_embed(*kept, args, mesh))
          del kept
  probes = probe_batch_memory(args, mesh) if args.max_batch_probe else []
  env['max_batch_probe'] = probes
  stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], 'memory_stats') else None
  env['peak_device_bytes'] = (stats or {}).get('peak_bytes_in_use')
  add_ratios(rows)
  print_table(rows, env, args)
  if args.json_out:
    jsonio.write_json(args.json_out, {'environment': env, 'rows': rows})
  return rows


if __name__ == '__main__':
  main()
