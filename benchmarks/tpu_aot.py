r"""TPU pod slices without TPUs (issue 18): the trainer's own train step compiled ahead of time for a TPU topology.

libtpu's compiler runs on this CPU and compiles `metrix_jax.step.make_train_step` (the jitted step the trainer
runs, built from a config exactly as `train._setup` builds it: loss, mix level, optimiser with its parameter groups
and warm-up freeze, frozen or trainable BN, compute dtype) for a mesh over the devices of a slice that is not
present (`jax.experimental.topologies`), with abstract inputs (ShapeDtypeStructs: nothing is allocated, nothing
runs). Per (slice, config, global batch) it reports what XLA says about the compiled program:

* compile time (wall seconds on this machine, and the CPU seconds of this process: the load-independent figure);
* per-chip memory: arguments + outputs + temporaries - donated aliases (`compiled.memory_analysis()`), against
  the chip's HBM (`CHIPS`);
* FLOPs and HBM bytes per chip per step (`compiled.cost_analysis()`, the partitioned per-chip program);
* the collectives of the compiled program (`compiled.as_text()`): kind, count, bytes (the full buffer each one
  carries: all-reduce/all-to-all/collective-permute operand, all-gather result, reduce-scatter operand), split by
  dtype and by what they carry (forward BN statistics, gradients, the rest);
* a roofline estimate: step time = max(FLOPs / bf16 peak, HBM bytes / HBM bandwidth), images/s per chip (the
  published per-chip peaks in `CHIPS`; collectives are not in it: their bytes are listed instead).

    python benchmarks/tpu_aot.py --json_out=/tmp/tpu_aot.json                  # the BENCHMARKS.md table (long)
    python benchmarks/tpu_aot.py --slices=v5e-16 --modes=feature --batches=160  # one row
    python benchmarks/tpu_aot.py --preflight --accelerator=v4-128 --config=configs/sop.py:ms,feature \
        --config.train.batch_size=640                                          # launch/tpu_pod.sh's check
    python benchmarks/tpu_aot.py --platform=cpu --slices=cpu-4 --depth=18 --image_size=32 --batches=16  # CI path

Needs libtpu for --platform=tpu (the default): in a separate venv, `pip install -e . 'jax[tpu]==<jax version>'`
(about 700 MB; this CPU-only machine never runs it). `--platform=cpu` compiles the same step for this process's
CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`; slices 'cpu-N'): the same code path, for
tests. --batches: 'paper' = the paper's global batch (the config's, 100) rounded up to a multiple of chips x
images per class (balanced batches), 'max' = the largest that fits the chip's HBM (a few compiles: a linear
model of memory vs per-chip batch, refined by each compile), or numbers. --json_out is rewritten after every row.

--preflight (what `launch/tpu_pod.sh` runs before it creates a slice): checks the accelerator type and that the
global batch splits over its chips, then the memory of this config on that slice: compiled here when libtpu is
importable, else the recorded row of `RECORDED` (the BENCHMARKS.md table) for the same slice, loss, level, BN mode
and batch. Exit 0: fits (or not recorded: a warning), 3: does not fit (stop before it costs money), 2: a mistake
(unknown accelerator, batch not divisible).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import importlib.util
import json
import logging
import math
import os
import platform
import re
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# Compile-only use of libtpu: several compiles may run at once (libtpu otherwise takes a process lockfile).
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
GIB = 1024**3
MODES = ('none', 'input', 'feature', 'embedding')


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation's published per-chip numbers (the Cloud TPU system-architecture page, `source`)."""

  name: str
  hbm_gib: float
  bf16_tflops: float
  hbm_gb_s: float  # GB/s (1e9 bytes)
  source: str


# HBM capacity as issue 18 gives it (GiB); the pages say 16 GB (v5e), 95 GB (v5p), 32 GB (v6e): the compiler's
# own limit is what stops a program that does not fit (a compile error, recorded as such).
CHIPS = {
  'v4': Chip('TPU v4', 32.0, 275.0, 1200.0, 'https://cloud.google.com/tpu/docs/v4'),
  'v5e': Chip('TPU v5e', 16.0, 197.0, 819.0, 'https://cloud.google.com/tpu/docs/v5e'),
  'v5p': Chip('TPU v5p', 95.0, 459.0, 2765.0, 'https://cloud.google.com/tpu/docs/v5p'),
  'v6e': Chip('TPU v6e', 32.0, 918.0, 1640.0, 'https://cloud.google.com/tpu/docs/v6e'),
  'cpu': Chip('fake CPU device', 16.0, 1.0, 10.0, 'placeholder numbers for the CPU test path'),
}
# chips -> topology. v4 / v5p: 3-D tori, accelerator types count TensorCores (2 per chip: v4-128 = 64 chips);
# v5e (gcloud: v5litepod-N) / v6e: 2-D tori, accelerator types count chips.
TOPOLOGIES_3D = {
  4: '2x2x1',
  8: '2x2x2',
  16: '2x2x4',
  32: '2x4x4',
  64: '4x4x4',
  128: '4x4x8',
  256: '4x8x8',
  512: '8x8x8',
}
TOPOLOGIES_2D = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16', 256: '16x16'}
FAMILY_ALIASES = {'v5litepod': 'v5e'}
DATASET_SIZES = {  # train split: (images, classes) -> steps per epoch and the proxies [C, D] of proxy losses
  'sop': (59551, 11318),
  'cub200': (5864, 100),
  'cars196': (8054, 98),
  'inshop': (25882, 3997),
  'omniglot': (19280, 964),
  'demo': (2000, 20),
}
TABLE_SLICES = ('v5e-16', 'v4-128', 'v5e-256')


@dataclasses.dataclass(frozen=True)
class Slice:
  accelerator: str  # the gcloud --accelerator-type (v5e: also v5e-N)
  family: str  # key of CHIPS
  chips: int
  topology: str  # e.g. 'v4:4x4x4' for jax.experimental.topologies ('' for cpu-N)

  @property
  def chip(self) -> Chip:
    return CHIPS[self.family]


def supported_accelerators() -> list[str]:
  names = [f'v4-{2 * c}' for c in TOPOLOGIES_3D] + [f'v5p-{2 * c}' for c in TOPOLOGIES_3D]
  names += [f'v5litepod-{c} (= v5e-{c})' for c in TOPOLOGIES_2D] + [f'v6e-{c}' for c in TOPOLOGIES_2D]
  return names


def parse_slice(name: str) -> Slice:
  """'v4-128' / 'v5e-16' / 'v5litepod-256' / 'v5p-32' / 'v6e-16' / 'cpu-4' -> Slice; ValueError names the valid."""
  m = re.fullmatch(r'(v4|v5p|v5e|v5litepod|v6e|cpu)-(\d+)', name.strip())
  if m:
    family, count = FAMILY_ALIASES.get(m.group(1), m.group(1)), int(m.group(2))
    if family == 'cpu':
      return Slice(name, 'cpu', count, '')
    if family in ('v4', 'v5p') and count % 2 == 0 and count // 2 in TOPOLOGIES_3D:
      return Slice(name, family, count // 2, f'{family}:{TOPOLOGIES_3D[count // 2]}')
    if family in ('v5e', 'v6e') and count in TOPOLOGIES_2D:
      return Slice(name, family, count, f'{family}:{TOPOLOGIES_2D[count]}')
  raise ValueError(
    f'Unknown or unsupported TPU accelerator type {name!r}; supported: {", ".join(supported_accelerators())}.'
  )


# --------------------------------------------------------------------------------------------------------------
# Configs: the trainer's config files, as the trainer reads them.
def load_config(spec: str, overrides: list[str] = ()):
  """'configs/sop.py:ms,feature' + ['train.batch_size=640', ...] -> the ConfigDict `main` would get."""
  path, _, arg = spec.partition(':')
  full = path if os.path.isabs(path) else os.path.join(ROOT, path) if not os.path.exists(path) else path
  module_spec = importlib.util.spec_from_file_location('_tpu_aot_config', full)
  if module_spec is None or not os.path.exists(full):
    raise ValueError(f'Config file {path!r} not found (e.g. configs/sop.py:ms,feature).')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for item in overrides:
    set_override(config, item)
  return config


def set_override(config, item: str) -> None:
  """'train.batch_size=640' (or '--config.train.batch_size=640') -> config.train.batch_size = 640."""
  key, sep, text = item.removeprefix('--').removeprefix('config.').partition('=')
  if not sep:
    raise ValueError(f'Override {item!r} must be KEY=VALUE, e.g. --config.train.batch_size=640.')
  *parents, leaf = key.split('.')
  node = config
  for p in parents:
    node = node[p]
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if isinstance(node.get(leaf), float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  node[leaf] = value


def recipe_config(spec: str, mode: str | None, overrides: list[str] = ()):
  """The config of `spec` at mix level `mode` (the recipe's own, e.g. 'configs/sop.py:ms' + 'feature' reads
  'configs/sop.py:ms,feature'), then `overrides`."""
  path, _, arg = spec.partition(':')
  if mode is not None:
    from metrix_jax import config_lib  # pylint: disable=g-import-not-at-top

    try:
      loss, _ = config_lib.parse_recipe_arg(arg or None)
      spec = f'{path}:{loss},{mode}'
    except (ValueError, TypeError):
      overrides = [f'mix.mode={mode}', *overrides]
  config = load_config(spec, overrides)
  if mode is not None:
    config.mix.mode = mode
  return config


def paper_batch(config, chips: int) -> int:
  """The config's global batch (the paper's 100) rounded up to a multiple of chips x images per class."""
  step = math.lcm(chips, int(config.dataset.images_per_class))
  return max(1, math.ceil(int(config.train.batch_size) / step)) * step


def batch_granularity(config, chips: int) -> int:
  return math.lcm(chips, int(config.dataset.images_per_class)) if config.dataset.sampler == 'balanced' else chips


def with_batch(config, batch: int):
  """config with train.batch_size = batch (balanced sampler: classes_per_batch = batch / images_per_class)."""
  c = config.copy_and_resolve_references()
  c.train.batch_size = int(batch)
  if c.dataset.sampler == 'balanced':
    per_class = int(c.dataset.images_per_class)
    if batch % per_class:
      raise ValueError(f'batch {batch} is not a multiple of dataset.images_per_class={per_class}.')
    c.dataset.classes_per_batch = batch // per_class
  return c


# --------------------------------------------------------------------------------------------------------------
# Devices, the step, the compile.
def slice_devices(sl: Slice, platform_name: str):
  """The devices of `sl`: compile-only TPU devices of its topology (libtpu), or this process's CPU devices."""
  import jax  # pylint: disable=g-import-not-at-top

  if platform_name == 'cpu' or sl.family == 'cpu':
    devices = jax.devices('cpu')
    if len(devices) < sl.chips:
      raise ValueError(
        f'{sl.accelerator} needs {sl.chips} CPU devices; this process has {len(devices)} '
        f'(set XLA_FLAGS=--xla_force_host_platform_device_count={sl.chips} before jax starts).'
      )
    return devices[: sl.chips]
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  kwargs = {'chip_config_name': 'megacore'} if sl.family == 'v4' else {}  # one device per v4 chip, as on the VMs
  devices = topologies.get_topology_desc(topology_name=sl.topology, platform='tpu', **kwargs).devices
  if len(devices) != sl.chips:
    raise RuntimeError(f'{sl.topology} gave {len(devices)} devices, expected {sl.chips} chips.')
  return devices


def trainer_parts(config, mesh, num_train_images: int, num_classes: int):
  """(model, loss, abstract TrainState, jitted train step), built as `train._setup` builds them."""
  import jax  # pylint: disable=g-import-not-at-top

  from metrix_jax import config_lib, embedding  # pylint: disable=g-import-not-at-top
  from metrix_jax import step as step_lib  # pylint: disable=g-import-not-at-top

  spe = config_lib.steps_per_epoch(num_train_images, config.train.batch_size)
  total = config_lib.total_steps(config, spe)
  model, loss_fn = embedding.create_model(config), step_lib.create_loss(config)

  tx_factory = step_lib.optimizer_factory(config, spe, total)
  state = jax.eval_shape(lambda: step_lib.init_state(config, model, loss_fn, tx_factory, num_classes, mesh))
  step_fn = step_lib.make_train_step(config, model, loss_fn, tx_factory(state.params), mesh)
  return model, loss_fn, state, step_fn


def abstract_batch(config):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  b, s = int(config.train.batch_size), int(config.dataset.image_size)
  return {'image': jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8), 'label': jax.ShapeDtypeStruct((b,), jnp.int32)}


def _nbytes(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


_DTYPE_BYTES = {
  'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4,
  's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16, 'f8e4m3fn': 1, 'f8e5m2': 1,
}  # fmt: skip
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute', 'collective-broadcast')
_INSTRUCTION = re.compile(
  r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.+?)\s(?P<op>' + '|'.join(COLLECTIVES) + r')(?P<start>-start)?\('
)
_SHAPE = re.compile(r'\b(' + '|'.join(_DTYPE_BYTES) + r')\[([0-9,]*)\]')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CHANNEL = re.compile(r'\bchannel_id=(\d+)')


def _shapes(type_text: str) -> list[tuple[str, int]]:
  out = []
  for dtype, dims in _SHAPE.findall(type_text):
    n = 1
    for d in filter(None, dims.split(',')):
      n *= int(d)
    out.append((dtype, n * _DTYPE_BYTES[dtype]))
  return out


def what_it_carries(op: str, op_name: str) -> str:
  """'bn_stats' (forward BatchNorm statistics of the global batch), 'gradients' (the backward pass and the
  optimiser's all-reduces), or 'other' (the loss / mixing on the global batch, metrics)."""
  if op == 'all-reduce' and 'transpose(' not in op_name and ('/bn' in op_name or '_bn' in op_name):
    return 'bn_stats'
  if 'transpose(' in op_name:
    return 'gradients'
  return 'other'


def collectives(hlo_text: str) -> dict[str, Any]:
  """The collectives of a compiled HLO module: {'ops': [{op, bytes, operands, dtypes, carries, op_name}], 'summary':
  {op: {'count', 'bytes', 'by_dtype': {dtype: bytes}, 'by_carries': {carries: [count, bytes]}}}}.

  One collective counts once: async pairs by their -start (for all-gather/collective-permute starts the result
  half of the tuple), and the pieces XLA:TPU splits one asynchronous collective into (the same instruction in the
  start, every continuation and the done computation, all with the same channel_id) by their channel_id.
  bytes: the full buffer (all-reduce operand, all-gather result, reduce-scatter operand)."""
  ops, channels = [], set()
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    channel = _CHANNEL.search(line)
    if channel:
      if (m.group('op'), channel.group(1)) in channels:
        continue
      channels.add((m.group('op'), channel.group(1)))
    op, shapes = m.group('op'), _shapes(m.group('type'))
    if m.group('start') and op in ('all-gather', 'collective-permute', 'reduce-scatter', 'all-to-all'):
      shapes = shapes[len(shapes) // 2 :] if op != 'collective-permute' else shapes[1:2]
    if op == 'reduce-scatter':
      operands = _shapes(line[m.end() :].split(')', 1)[0]) or shapes
      shapes = operands if sum(b for _, b in operands) > sum(b for _, b in shapes) else shapes
    name = _OP_NAME.search(line)
    op_name = name.group(1) if name else ''
    by_dtype: dict[str, int] = {}
    for dtype, nbytes in shapes:
      by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    ops.append(
      dict(
        op=op,
        bytes=sum(by_dtype.values()),
        operands=len(shapes),
        dtypes=by_dtype,
        carries=what_it_carries(op, op_name),
        op_name=op_name,
      )
    )
  summary: dict[str, Any] = {}
  for o in ops:
    s = summary.setdefault(o['op'], {'count': 0, 'bytes': 0, 'by_dtype': {}, 'by_carries': {}})
    s['count'] += 1
    s['bytes'] += o['bytes']
    for dtype, nbytes in o['dtypes'].items():
      s['by_dtype'][dtype] = s['by_dtype'].get(dtype, 0) + nbytes
    c = s['by_carries'].setdefault(o['carries'], [0, 0])
    c[0] += 1
    c[1] += o['bytes']
  return {'ops': ops, 'summary': summary}


_OOM = re.compile(r'Used\s+([\d.]+)([KMGT]?)\s+of\s+([\d.]+)([KMGT]?)\s+hbm', re.IGNORECASE)


# The other form XLA:TPU uses when the temporaries alone do not fit (e.g. embedding-level Metrix over every pair).
_OOM_TEMPORARIES = re.compile(
  r'memory required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)'
)


def _oom_bytes(message: str) -> tuple[float, float] | None:
  """(bytes needed, bytes available) from XLA:TPU's out-of-memory message (temporaries only in the second form:
  a lower bound of the whole program's need); None if the message is not an out-of-memory one."""
  m = _OOM.search(message) or _OOM_TEMPORARIES.search(message)
  if not m:
    return None
  unit = {'': 1, 'K': 1024, 'M': 1024**2, 'G': GIB, 'T': 1024 * GIB}
  return float(m.group(1)) * unit[m.group(2).upper()], float(m.group(3)) * unit[m.group(4).upper()]


def describe_config(config) -> dict[str, Any]:
  return {
    'dataset': config.dataset.name,
    'loss': config.loss.name,
    'mix': config.mix.mode,
    'bn': 'frozen' if config.model.bn_freeze else 'trainable',
    'optimizer': f'{config.optim.name} (clip {config.optim.clip_value}, wd {config.optim.weight_decay}, '
    f'warm-up {config.optim.warmup_epochs} epochs)',
    'depth': int(config.model.depth),
    'image_size': int(config.dataset.image_size),
    'dtype': config.model.dtype,
    'batch': int(config.train.batch_size),
  }


def compile_row(sl: Slice, config, *, platform_name: str = 'tpu', keep_hlo: str = '') -> dict[str, Any]:
  """Compiles the trainer's step of `config` for slice `sl`; returns the table row (module docstring).

  A program that does not fit the chip's memory is a row too: `compiled` False, the compiler's message, and the
  memory it reported needing where it says."""
  from metrix_jax import models, sharding  # pylint: disable=g-import-not-at-top

  if platform_name == 'tpu' and sl.family != 'cpu':  # conv_impl 'auto' resolves by the process's backend (CPU
    os.environ.setdefault(models.CONV_IMPL_ENV, 'xla')  # here): on a TPU the trainer traces the plain convs
  images, classes = DATASET_SIZES.get(config.dataset.name, (10 * int(config.train.batch_size), 100))
  devices = slice_devices(sl, platform_name)
  mesh = sharding.make_mesh(devices)
  sharding.per_host_batch_size(int(config.train.batch_size), mesh)  # the trainer's divisibility check
  row: dict[str, Any] = dict(
    slice=sl.accelerator,
    topology=sl.topology or f'{sl.chips} x cpu',
    chips=sl.chips,
    hosts=len({getattr(d, 'process_index', 0) for d in devices}),
    **describe_config(config),
    per_chip_batch=int(config.train.batch_size) // sl.chips,
    hbm_gib=sl.chip.hbm_gib,
  )
  t0 = time.perf_counter()
  _, _, state, step_fn = trainer_parts(config, mesh, images, classes)
  batch = abstract_batch(config)
  row['state_bytes'], row['batch_bytes'] = _nbytes(state), _nbytes(batch)  # logical sizes (replicated, global)
  lowered = step_fn.lower(state, batch)
  row['lower_s'] = round(time.perf_counter() - t0, 2)
  t0, c0 = time.perf_counter(), time.process_time()
  try:
    compiled = lowered.compile()
  except Exception as error:  # pylint: disable=broad-except
    message = str(error)
    row.update(
      compile_s=round(time.perf_counter() - t0, 1),
      compile_cpu_s=round(time.process_time() - c0, 1),
      compiled=False,
      error=message[:2000],
    )
    used = _oom_bytes(message)
    if used:
      row.update(per_chip_gib=used[0] / GIB, compiler_hbm_gib=used[1] / GIB, fits=False)
    elif 'RESOURCE_EXHAUSTED' in message or 'memory' in message.lower():
      row['fits'] = False
    else:
      raise
    return row
  row.update(compile_s=round(time.perf_counter() - t0, 1), compile_cpu_s=round(time.process_time() - c0, 1))
  row['compiled'] = True
  mem = compiled.memory_analysis()
  parts = {
    k: int(getattr(mem, f'{k}_size_in_bytes', 0) or 0)
    for k in ('argument', 'output', 'temp', 'alias', 'generated_code')
  }
  per_chip = parts['argument'] + parts['output'] + parts['temp'] - parts['alias']
  row.update(
    {f'{k}_gib': v / GIB for k, v in parts.items()}, per_chip_gib=per_chip / GIB, fits=per_chip <= sl.chip.hbm_gib * GIB
  )
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  flops, hbm_bytes = float(cost.get('flops', 0.0)), float(cost.get('bytes accessed', 0.0))
  row.update(flops_per_chip=flops, hbm_bytes_per_chip=hbm_bytes)
  t_flops = flops / (sl.chip.bf16_tflops * 1e12)
  t_hbm = hbm_bytes / (sl.chip.hbm_gb_s * 1e9)
  step_s = max(t_flops, t_hbm)
  row.update(
    roofline_ms=step_s * 1e3,
    roofline_bound='compute' if t_flops >= t_hbm else 'HBM',
    roofline_images_per_s_per_chip=row['per_chip_batch'] / step_s if step_s > 0 else float('nan'),
  )
  text = compiled.as_text()
  if keep_hlo:
    with open(keep_hlo, 'w', encoding='utf-8') as f:
      f.write(text)
  found = collectives(text)
  row['collectives'] = found['summary']
  row['largest_collectives'] = sorted(
    ({k: o[k] for k in ('op', 'bytes', 'operands', 'dtypes', 'carries', 'op_name')} for o in found['ops']),
    key=lambda o: -o['bytes'],
  )[:6]
  return row


# --------------------------------------------------------------------------------------------------------------
# The largest batch that fits.
def largest_fitting(
  sl: Slice, config, first: dict[str, Any], *, platform_name: str, max_compiles: int, on_row
) -> list[dict[str, Any]]:
  """Compiles up to `max_compiles` batches towards the largest that fits: per-chip memory as a line in the
  per-chip batch (the first guess treats the row's temporaries as proportional to the batch, which
  overestimates the slope: a safe first guess), each compile refining the line. A global batch never exceeds the
  training set (`DATASET_SIZES`): when that batch fits, the search ends there. Returns the rows compiled."""
  g = batch_granularity(config, sl.chips)
  limit = sl.chip.hbm_gib * GIB
  # A global batch cannot exceed the training set (the trainer refuses it): the search stops there.
  images = DATASET_SIZES.get(config.dataset.name, (10**9, 0))[0]
  cap = images // g * g
  points = [(first['batch'], first['per_chip_gib'] * GIB)] if first.get('per_chip_gib') else []
  fixed = (first.get('argument_gib', 0) + first.get('output_gib', 0) - first.get('alias_gib', 0)) * GIB
  rows, fit, no_fit = [], (first['batch'] if first.get('fits') else 0), (0 if first.get('fits') else first['batch'])
  for _ in range(max_compiles):
    if len(points) >= 2:
      (b1, m1), (b2, m2) = sorted(points)[-2:] if fit == 0 else _bracket(points, fit, no_fit)
      slope = (m2 - m1) / (b2 - b1) if b2 != b1 else (m2 - fixed) / b2
      base = m2 - slope * b2
    else:
      b2, m2 = points[0]
      slope, base = (m2 - fixed) / b2, fixed
    guess = int((limit - base) / max(slope, 1.0) // g * g)
    guess = max(guess, g)
    if no_fit:
      guess = min(guess, no_fit - g)
    if guess <= fit:
      guess = fit + g if not no_fit or fit + g < no_fit else 0
    if guess > cap:
      guess = cap
      if guess <= fit:  # the training set is the bound, and that batch fits
        break
    if guess <= 0 or guess in [r['batch'] for r in rows] or guess == first['batch']:
      break
    row = compile_row(sl, with_batch(config, guess), platform_name=platform_name)
    row['search'] = 'max'
    on_row(row)
    rows.append(row)
    if row.get('per_chip_gib'):
      points.append((guess, row['per_chip_gib'] * GIB))
    if row.get('fits'):
      fit = max(fit, guess)
    else:
      no_fit = guess if not no_fit else min(no_fit, guess)
    if fit and no_fit and no_fit - fit <= g:
      break
  return rows


def _bracket(points, fit, no_fit):
  by_batch = dict(points)
  lo = (fit, by_batch[fit]) if fit in by_batch else sorted(points)[0]
  hi = (no_fit, by_batch[no_fit]) if no_fit in by_batch else sorted(points)[-1]
  return (lo, hi) if lo[0] != hi[0] else sorted(points)[-2:]


# --------------------------------------------------------------------------------------------------------------
# Output.
def _gib(x) -> str:
  return '-' if x is None else f'{x:.2f}'


def collective_cell(row: dict[str, Any]) -> str:
  s = row.get('collectives') or {}
  parts = []
  for op in COLLECTIVES:
    if op in s:
      parts.append(f'{op} {s[op]["count"]} x / {s[op]["bytes"] / 2**20:,.1f} MiB')
  return '; '.join(parts) or '-'


def markdown_row(row: dict[str, Any]) -> str:
  fits = 'yes' if row.get('fits') else 'NO'
  if not row.get('compiled', True) and row.get('per_chip_gib') is None:
    fits = 'NO (compile failed)'
  mem = (
    f'{_gib(row.get("per_chip_gib"))} / {row["hbm_gib"]:g}'
    + (f' (args {_gib(row.get("argument_gib"))}, temp {_gib(row.get("temp_gib"))})' if row.get('compiled') else '')
  )  # fmt: skip
  tflop = f'{row["flops_per_chip"] / 1e12:.3f}' if row.get('compiled') else '-'
  roof = (
    f'{row["roofline_ms"]:.1f} ms ({row["roofline_bound"]}), {row["roofline_images_per_s_per_chip"]:,.0f}'
    if row.get('compiled')
    else '-'
  )
  compile_cell = f'{row.get("compile_s", "-")}' + (f' ({row["compile_cpu_s"]})' if row.get('compile_cpu_s') else '')
  return (
    f'| {row["slice"]} | {row["loss"]} | {row["mix"]} | {row["bn"]} | {row["batch"]} ({row["per_chip_batch"]}/chip) '
    f'| {compile_cell} | {mem} | {fits} | {tflop} | {collective_cell(row)} | {roof} |'
  )


TABLE_HEADER = (
  '| slice | loss | Metrix | BN | global batch | compile s (CPU s) | per-chip GiB / HBM | fits | TFLOP/chip/step '
  '| collectives (count / bytes per chip) | roofline step, images/s/chip |\n'
  '|---|---|---|---|---|---|---|---|---|---|---|'
)


def versions() -> dict[str, str]:
  import jax  # pylint: disable=g-import-not-at-top

  out = {'jax': jax.__version__, 'python': platform.python_version()}
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top

    out['libtpu'] = metadata.version('libtpu')
  except Exception:  # pylint: disable=broad-except
    out['libtpu'] = None
  return out


def write_json(path: str, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
  """The table as strict JSON (NaN -> null, atomic: `metrix_jax.jsonio`)."""
  if not path:
    return
  from metrix_jax import jsonio  # pylint: disable=g-import-not-at-top

  jsonio.write_json(path, {'meta': meta, 'rows': rows})


# --------------------------------------------------------------------------------------------------------------
# Preflight (launch/tpu_pod.sh).
# The BENCHMARKS.md table's rows: the committed --json_out of the table run (TABLE_JSON), read once at import:
# key (family, chips, loss, mix, bn, global batch, image_size, depth, dtype) -> (per-chip GiB, fits, chip HBM GiB).
TABLE_JSON = os.path.join(ROOT, 'benchmarks', 'tpu_aot_table.json')


def _table_key(accelerator: str, d: dict[str, Any]) -> tuple:
  """The key of a recorded row: the slice's chip family and count + the `describe_config` fields it depends on."""
  sl = parse_slice(accelerator)
  return (sl.family, sl.chips, d['loss'], d['mix'], d['bn'], d['batch'], d['image_size'], d['depth'], d['dtype'])


def recorded_rows(path: str = TABLE_JSON) -> dict[tuple, tuple[float, bool, float]]:
  """The memory rows of a --json_out file (every row with a per-chip figure and a fits verdict, except rows marked
  search='variant': configs the key cannot tell apart); {} if absent."""
  if not os.path.exists(path):
    return {}
  with open(path, encoding='utf-8') as f:
    rows = json.load(f)['rows']
  out = {}
  for r in rows:
    if r.get('per_chip_gib') is None or r.get('fits') is None or r.get('search') == 'variant':
      continue  # no memory figure, or a config variant the key does not describe (e.g. mix.all_pairs=False)
    key = _table_key(r['slice'], r)
    out[key] = (float(r['per_chip_gib']), bool(r['fits']), float(r['hbm_gib']))
  return out


RECORDED: dict[tuple, tuple[float, bool, float]] = recorded_rows()


def _record_key(accelerator: str, config) -> tuple:
  return _table_key(accelerator, describe_config(config))


def libtpu_available() -> bool:
  return importlib.util.find_spec('libtpu') is not None


def preflight(accelerator: str, spec: str, overrides: list[str], *, compile_here: str = 'auto') -> int:
  """The check `launch/tpu_pod.sh` runs before it creates a slice; prints one memory row. Returns the exit code."""
  try:
    sl = parse_slice(accelerator)
  except ValueError as error:
    print(f'preflight: {error}')
    return 2
  try:
    from metrix_jax import config_lib  # pylint: disable=g-import-not-at-top

    config = load_config(spec, overrides)
    config_lib.validate(config, check_files=False)
  except Exception as error:  # pylint: disable=broad-except
    print(f'preflight: --config={spec} {" ".join(overrides)}: {error}')
    return 2
  batch = int(config.train.batch_size)
  if batch % sl.chips:
    g = batch_granularity(config, sl.chips)
    print(
      f'preflight: global batch {batch} does not split over the {sl.chips} chips of {accelerator}; use a multiple '
      f'of {g}, e.g. --config.train.batch_size={math.ceil(batch / g) * g}'
      + (
        f' --config.dataset.classes_per_batch={math.ceil(batch / g) * g // int(config.dataset.images_per_class)}'
        if config.dataset.sampler == 'balanced'
        else ''
      )
      + '.'
    )
    return 2
  d = describe_config(config)
  what = (
    f'{accelerator} ({sl.chips} chips of {sl.chip.name}, {sl.chip.hbm_gib:g} GiB HBM each): {d["loss"]}, '
    f'mix {d["mix"]}, BN {d["bn"]}, ResNet-{d["depth"]} {d["image_size"]} px {d["dtype"]}, global batch {batch} '
    f'({batch // sl.chips}/chip)'
  )
  use_compiler = compile_here == 'yes' or (compile_here == 'auto' and libtpu_available())
  if use_compiler:
    print(f'preflight: compiling the train step for {what} (libtpu, ahead of time; minutes)...', flush=True)
    logging.disable(logging.WARNING)
    row = compile_row(sl, config)
    print(TABLE_HEADER.splitlines()[0])
    print(markdown_row(row))
    fits = bool(row.get('fits'))
  else:
    recorded = RECORDED.get(_record_key(accelerator, config))
    if recorded is None:
      near = sorted(
        (k, v)
        for k, v in RECORDED.items()
        if k[:2] == (sl.family, sl.chips) and k[2:5] == (d['loss'], d['mix'], d['bn'])
      )
      print(f'preflight: {what}: not in the recorded AOT table (benchmarks/tpu_aot.py RECORDED) and libtpu is not')
      print('  installed here, so its memory is unchecked. Recorded rows for this slice and config:')
      for k, (gib, ok, hbm) in near:
        print(f'    global batch {k[5]}: {gib:.2f} GiB per chip of {hbm:g} -> {"fits" if ok else "DOES NOT FIT"}')
      if not near:
        print('    (none)')
      print("  To check it: a venv with pip install -e . 'jax[tpu]==<jax version>', then PYTHON=<venv>/bin/python.")
      return 0
    gib, fits, hbm = recorded
    print(f'preflight: {what}: recorded AOT compile: {gib:.2f} GiB per chip of {hbm:g} GiB HBM.')
  if not fits:
    print('preflight: this step DOES NOT FIT the chip memory: lower --config.train.batch_size or pick a larger slice.')
    return 3
  print('preflight: fits.')
  return 0


# --------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/sop.py:ms', help='recipe: config file:loss (mode from --modes)')
  parser.add_argument('--slices', default=','.join(TABLE_SLICES), help='accelerator types, e.g. v5e-16,v4-128')
  parser.add_argument('--modes', default=','.join(MODES), help='Metrix levels; none = clean')
  parser.add_argument('--batches', default='paper,max', help="'paper', 'max' and/or global batch sizes")
  parser.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'))
  parser.add_argument('--depth', type=int, default=None, help='ResNet depth (default: the config, 50)')
  parser.add_argument('--image_size', type=int, default=None, help='default: the config (224)')
  parser.add_argument('--max_search_compiles', type=int, default=3, help="compiles per 'max' search")
  parser.add_argument('--platform', default='tpu', choices=('tpu', 'cpu'))
  parser.add_argument('--json_out', default='')
  parser.add_argument(
    '--first_rows', default='', help="comma-separated --json_out files: a 'max' search starts from their paper row"
  )
  parser.add_argument('--keep_hlo', default='', help='directory: write each compiled program as text')
  parser.add_argument('--preflight', action='store_true', help='launch/tpu_pod.sh check (module docstring)')
  parser.add_argument('--accelerator', default='', help='--preflight: the gcloud accelerator type')
  parser.add_argument(
    '--compile', default='auto', choices=('auto', 'yes', 'no'), help='--preflight: compile here (auto: if libtpu)'
  )
  args, rest = parser.parse_known_args(argv)
  overrides = [r for r in rest if r.startswith('--config.')]
  unknown = [r for r in rest if not r.startswith('--config.')]
  if unknown:
    parser.error(f'unrecognized arguments: {" ".join(unknown)}')
  args.overrides = overrides
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.preflight:
    if not args.accelerator:
      print('preflight: --accelerator is required (e.g. v4-128).')
      return 2
    return preflight(args.accelerator, args.config, args.overrides, compile_here=args.compile)
  if args.platform == 'cpu':
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  logging.disable(logging.WARNING)  # the random-init warning of every row
  overrides = list(args.overrides) + [f'model.dtype={args.dtype}', 'model.pretrained=None']
  if args.depth:
    overrides.append(f'model.depth={args.depth}')
  if args.image_size:
    overrides.append(f'dataset.image_size={args.image_size}')
  meta = dict(
    command=' '.join(['python', 'benchmarks/tpu_aot.py', *(argv if argv is not None else sys.argv[1:])]),
    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='minutes'),
    machine=f'{platform.machine()}, {os.cpu_count()} CPUs',
    chips={k: dataclasses.asdict(v) for k, v in CHIPS.items()},
    **versions(),
  )
  rows: list[dict[str, Any]] = []

  def on_row(row):
    rows.append(row)
    print(markdown_row(row), flush=True)
    write_json(args.json_out, rows, meta)

  print(TABLE_HEADER, flush=True)
  batches = [b.strip() for b in args.batches.split(',') if b.strip()]
  earlier = []
  for path in filter(None, args.first_rows.split(',')):
    with open(path, encoding='utf-8') as f:
      earlier += [r for r in json.load(f)['rows'] if r.get('compiled')]
  for name in [s.strip() for s in args.slices.split(',') if s.strip()]:
    sl = parse_slice(name)
    for mode in [m.strip() for m in args.modes.split(',') if m.strip()]:
      config = recipe_config(args.config, mode, overrides)
      first = None
      for b in batches:
        if b == 'max':
          same = describe_config(with_batch(config, paper_batch(config, sl.chips)))
          first = first or next(
            (r for r in earlier if r['slice'] == name and all(r.get(k) == v for k, v in same.items())), None
          )
          if first is None:
            first = compile_row(sl, with_batch(config, paper_batch(config, sl.chips)), platform_name=args.platform)
            on_row(first)
          largest_fitting(
            sl, config, first, platform_name=args.platform, max_compiles=args.max_search_compiles, on_row=on_row
          )
          continue
        batch = paper_batch(config, sl.chips) if b == 'paper' else int(b)
        hlo = os.path.join(args.keep_hlo, f'{name}_{mode}_{batch}.hlo.txt') if args.keep_hlo else ''
        row = compile_row(sl, with_batch(config, batch), platform_name=args.platform, keep_hlo=hlo)
        row['search'] = b
        on_row(row)
        first = first or row
  return 0


if __name__ == '__main__':
  sys.exit(main())
