"""benchmarks/tpu_aot.py: the trainer's step compiled ahead of time for a mesh of devices that are not running it.

* Always (CI, .venv): accelerator names -> topologies, the paper batch per slice, the HLO collective parser on a
  hand-written module, the out-of-memory message, the largest-batch search on a known memory line, the preflight
  (recorded rows, batch that does not split, invalid config), and the same abstract compile path on 4 fake CPU
  devices (a subprocess): the real SOP-recipe step of the demo model, its memory, FLOPs and collectives checked
  against numbers computed here independently (state bytes, parameter count, BN channels, a forward's FLOPs).
* Opt-in (only where libtpu is importable, e.g. a venv with `pip install 'jax[tpu]==<jax version>'`): the same
  compile for a v5e-4 topology with libtpu's compiler. Skipped with a reason elsewhere; nothing here downloads it.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import tpu_aot  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

GIB = 1024**3


def test_accelerator_types_name_their_chips_and_topologies():
  assert tpu_aot.parse_slice('v4-128') == tpu_aot.Slice('v4-128', 'v4', 64, 'v4:4x4x4')  # 2 TensorCores per chip
  assert tpu_aot.parse_slice('v5e-16').topology == tpu_aot.parse_slice('v5litepod-16').topology == 'v5e:4x4'
  assert tpu_aot.parse_slice('v5e-256').chips == 256 and tpu_aot.parse_slice('v5e-256').topology == 'v5e:16x16'
  assert tpu_aot.parse_slice('v5p-32') == tpu_aot.Slice('v5p-32', 'v5p', 16, 'v5p:2x2x4')
  assert tpu_aot.parse_slice('v6e-16').chip.hbm_gib == 32
  assert tpu_aot.parse_slice('v4-64').chip.hbm_gib == 32 and tpu_aot.parse_slice('v5e-16').chip.hbm_gib == 16
  for bad in ('v4-100', 'v5e-12', 'v3-8', 'tpu'):
    with pytest.raises(ValueError, match='supported: v4-8'):
      tpu_aot.parse_slice(bad)


def test_paper_batch_rounds_up_to_chips_times_images_per_class():
  config = tpu_aot.recipe_config('configs/sop.py:ms', 'feature')
  assert (config.mix.mode, config.train.batch_size, config.dataset.images_per_class) == ('feature', 100, 5)
  assert [tpu_aot.paper_batch(config, n) for n in (16, 64, 256, 4)] == [160, 320, 1280, 100]
  c = tpu_aot.with_batch(config, 640)
  assert (c.train.batch_size, c.dataset.classes_per_batch, config.train.batch_size) == (640, 128, 100)
  with pytest.raises(ValueError, match='images_per_class'):
    tpu_aot.with_batch(config, 642)
  # the recipe follows the level (contrastive: BN frozen with Metrix only), overrides apply last
  assert tpu_aot.recipe_config('configs/sop.py:contrastive', 'none').model.bn_freeze is False
  assert tpu_aot.recipe_config('configs/sop.py:contrastive', 'feature').model.bn_freeze is True
  assert tpu_aot.recipe_config('configs/sop.py:ms', 'input', ['model.dtype=bfloat16']).model.dtype == 'bfloat16'


HLO = """
HloModule jit_train_step, entry_computation_layout={()}
ENTRY %main {
  %all-reduce.1 = (f32[64]{0:T(128)S(1)}, f32[64]{0:T(128)S(1)}) all-reduce(%a, %b), metadata={op_name="jvp/bn1/sum"}
  %ar.2 = (bf16[7,7,3,64]{3,2,1,0}, /*index=1*/f32[512]{0}) all-reduce(%c, %d), metadata={op_name="transpose(jvp)/c"}
  %all-gather.3 = f32[16,512]{1,0} all-gather(%e), channel_id=4, dimensions={0}, metadata={op_name="jvp()/dot"}
  %all-gather.4 = f32[16,512]{1,0} all-gather(%e2), channel_id=4, dimensions={0}, metadata={op_name="jvp()/dot"}
  %ags = ((bf16[4,7,7,2048]{3,2,1,0}), bf16[16,7,7,2048]{3,2,1,0}) all-gather-start(%f), dimensions={0}
  %agd = bf16[16,7,7,2048]{3,2,1,0} all-gather-done(%ags)
  %rs = f32[4,512]{1,0} reduce-scatter(f32[16,512]{1,0} %g), dimensions={0}, to_apply=%add
  %ar-start = s32[16]{0} all-reduce-start(%h), to_apply=%add
  %ar-done = s32[16]{0} all-reduce-done(%ar-start)
  %cp = f32[8]{0} collective-permute(%i), source_target_pairs={{0,1}}
  %not = f32[8]{0} add(%i, %i), metadata={op_name="all-reduce(x)"}
}
"""


def test_collectives_parser_counts_kinds_bytes_dtypes_and_what_they_carry():
  found = tpu_aot.collectives(HLO)
  s = found['summary']
  # the async pair counts once, so do the pieces of one split async collective (same channel_id: all-gather.3/4);
  # an op_name mentioning all-reduce is no op
  assert s['all-reduce']['count'] == 3
  assert s['all-reduce']['bytes'] == 2 * 64 * 4 + (7 * 7 * 3 * 64 * 2 + 512 * 4) + 16 * 4
  assert s['all-reduce']['by_dtype'] == {'f32': 2 * 64 * 4 + 512 * 4, 'bf16': 7 * 7 * 3 * 64 * 2, 's32': 64}
  assert s['all-reduce']['by_carries'] == {
    'bn_stats': [1, 512],
    'gradients': [1, 7 * 7 * 3 * 64 * 2 + 512 * 4],
    'other': [1, 64],
  }
  # all-gather: the result (the async start's second half), reduce-scatter: the operand it reduces
  assert (s['all-gather']['count'], s['all-gather']['bytes']) == (2, 16 * 512 * 4 + 16 * 7 * 7 * 2048 * 2)
  assert (s['reduce-scatter']['count'], s['reduce-scatter']['bytes']) == (1, 16 * 512 * 4)
  assert (s['collective-permute']['count'], s['collective-permute']['bytes']) == (1, 32)
  assert set(s) == {'all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute'}


def test_out_of_memory_message_gives_the_memory_needed():
  message = (
    'RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 17.25G of '
    '15.75G hbm. Exceeded hbm capacity by 1.50G.'
  )
  assert tpu_aot._oom_bytes(message) == (17.25 * GIB, 15.75 * GIB)
  assert tpu_aot._oom_bytes('Used 512.00M of 16.00G hbm') == (512 * 2**20, 16 * GIB)
  temporaries = (
    'RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (92.20G) exceeds '
    'available HBM (15.75G).'
  )
  assert tpu_aot._oom_bytes(temporaries) == (92.20 * GIB, 15.75 * GIB)
  assert tpu_aot._oom_bytes('some other error') is None


def test_largest_fitting_search_finds_the_largest_multiple_on_a_known_line(monkeypatch):
  """Memory = 0.3 GiB + 0.07 GiB per image per chip (fixed parts of the temporaries make the first row's
  per-image estimate too steep); v5e-16 (16 GiB): the largest per-chip batch that fits is 220 (a multiple of 5)."""
  sl = tpu_aot.parse_slice('v5e-16')
  config = tpu_aot.recipe_config('configs/sop.py:ms', 'none')
  calls = []

  def fake_compile(sl_, config_, platform_name='tpu', keep_hlo=''):
    b = int(config_.train.batch_size) // sl_.chips
    calls.append(b)
    gib = 0.3 + 0.5 + 0.07 * b  # 0.5 GiB of temporaries that do not grow with the batch
    return dict(batch=b * sl_.chips, per_chip_gib=gib, fits=gib <= 16, argument_gib=0.3, output_gib=0.3, alias_gib=0.3)

  monkeypatch.setattr(tpu_aot, 'compile_row', fake_compile)
  first = fake_compile(sl, tpu_aot.with_batch(config, 160))
  rows = []
  tpu_aot.largest_fitting(sl, config, first, platform_name='tpu', max_compiles=4, on_row=rows.append)
  fitting = [r['batch'] for r in rows if r['fits']]
  assert max(fitting) == 16 * 215  # (16 - 0.8) / 0.07 = 217.1 -> 215 per chip (multiples of 5)
  assert [r['batch'] for r in rows if not r['fits']] == [16 * 220]  # the next multiple, compiled: it does not fit
  assert len(calls) == 1 + len(rows) <= 1 + 4


def test_largest_fitting_search_stops_at_the_training_set(monkeypatch):
  """v5e-256 with 1 MiB per image: everything fits; the search compiles the largest multiple of 1,280 that the
  SOP training set (59,551 images) holds, 58,880, and stops (the trainer refuses a batch larger than the data)."""
  sl = tpu_aot.parse_slice('v5e-256')
  config = tpu_aot.recipe_config('configs/sop.py:ms', 'none')

  def fake_compile(sl_, config_, platform_name='tpu', keep_hlo=''):
    b = int(config_.train.batch_size) // sl_.chips
    gib = 0.3 + 0.001 * b
    return dict(batch=b * sl_.chips, per_chip_gib=gib, fits=True, argument_gib=0.3, output_gib=0.3, alias_gib=0.3)

  monkeypatch.setattr(tpu_aot, 'compile_row', fake_compile)
  rows = []
  first = fake_compile(sl, tpu_aot.with_batch(config, 1280))
  tpu_aot.largest_fitting(sl, config, first, platform_name='tpu', max_compiles=4, on_row=rows.append)
  assert [r['batch'] for r in rows] == [58880]  # 46 x lcm(256 chips, 5 images per class)


def test_markdown_row_reads_like_the_table():
  row = dict(
    slice='v5e-16', loss='multi_similarity', mix='feature', bn='trainable', batch=160, per_chip_batch=10,
    compile_s=101.0, per_chip_gib=1.5, hbm_gib=16.0, argument_gib=0.28, temp_gib=0.9, compiled=True, fits=True,
    flops_per_chip=2.4e11, roofline_ms=16.5, roofline_bound='HBM', roofline_images_per_s_per_chip=606.0,
    collectives={'all-reduce': {'count': 101, 'bytes': 52 * 2**20}, 'all-gather': {'count': 3, 'bytes': 2**20}},
  )  # fmt: skip
  line = tpu_aot.markdown_row(row)
  assert line.count('|') == tpu_aot.TABLE_HEADER.splitlines()[0].count('|')
  assert '| 160 (10/chip) |' in line and '| 1.50 / 16 (args 0.28, temp 0.90) | yes |' in line and '| 0.240 |' in line
  assert 'all-reduce 101 x / 52.0 MiB; all-gather 3 x / 1.0 MiB' in line and '16.5 ms (HBM), 606 |' in line
  failed = dict(row, compiled=False, fits=False, per_chip_gib=17.25)
  assert '| 17.25 / 16 | NO |' in tpu_aot.markdown_row(failed)


def test_preflight_uses_the_recorded_table_and_stops_what_cannot_fit(monkeypatch, capsys):
  monkeypatch.setattr(tpu_aot, 'libtpu_available', lambda: False)
  spec = 'configs/sop.py:ms,feature'
  over = ['--config.model.dtype=bfloat16', '--config.train.batch_size=160', '--config.dataset.classes_per_batch=32']
  config = tpu_aot.load_config(spec, over)
  key = tpu_aot._record_key('v5litepod-16', config)
  monkeypatch.setitem(tpu_aot.RECORDED, key, (1.25, True, 16.0))
  assert tpu_aot.preflight('v5litepod-16', spec, over) == 0
  assert 'recorded AOT compile: 1.25 GiB per chip of 16 GiB HBM' in capsys.readouterr().out
  monkeypatch.setitem(tpu_aot.RECORDED, key, (17.5, False, 16.0))
  assert tpu_aot.preflight('v5e-16', spec, over) == 3
  assert 'DOES NOT FIT' in capsys.readouterr().out
  # not recorded: unchecked, says so, goes on; the recorded rows of the slice are listed
  assert (
    tpu_aot.preflight(
      'v5e-16', spec, over[:1] + ['--config.train.batch_size=320', '--config.dataset.classes_per_batch=64']
    )
    == 0
  )
  out = capsys.readouterr().out
  assert 'not in the recorded AOT table' in out and 'global batch 160: 17.50 GiB per chip of 16 -> DOES NOT FIT' in out
  # mistakes: exit 2 before anything
  assert tpu_aot.preflight('v4-100', spec, over) == 2
  assert 'supported: v4-8' in capsys.readouterr().out
  assert tpu_aot.preflight('v4-128', spec, over) == 2  # 160 over 64 chips
  assert 'use a multiple of 320, e.g. --config.train.batch_size=320 --config.dataset.classes_per_batch=64' in (
    capsys.readouterr().out
  )
  assert tpu_aot.preflight('v5e-16', spec, ['--config.train.batch_size=128']) == 2  # balanced: 20 x 5 != 128
  assert 'classes_per_batch x images_per_class' in capsys.readouterr().out


# The step of the demo recipe (ResNet-18, MS + Metrix at feature or input level, trainable BN, Adam), float32,
# 64 px (at 32 px layer4's maps are 1 x 1 and XLA drops the kernel taps that only see padding from the gradients),
# global batch 16 on 4 devices, compiled through the script's own path; independent references computed alongside.
_SNIPPET = """
import json, os, sys
os.environ['METRIX_CONV_IMPL'] = 'xla'  # the plain convs in the step and in the forward reference, on any backend
sys.path.insert(0, 'benchmarks')
import jax, jax.numpy as jnp, numpy as np
import tpu_aot
from metrix_jax import embedding

PLATFORM = {platform!r}
sl = tpu_aot.parse_slice({slice!r})
config = tpu_aot.recipe_config('configs/demo.py:ms', {level!r}, ['model.dtype=float32', 'dataset.image_size=64'])
config = tpu_aot.with_batch(config, 16)
row = tpu_aot.compile_row(sl, config, platform_name=PLATFORM, keep_hlo=os.environ.get('KEEP_HLO', ''))
model = embedding.create_model(config)
shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
fwd = None
if PLATFORM == 'cpu':  # the FLOPs of one image's forward (eval mode), compiled apart
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(shapes, x).compile().cost_analysis()
  fwd = (fwd[0] if isinstance(fwd, list) else fwd)['flops']
print('RESULT' + json.dumps(dict(
  row=row, fwd_flops=fwd,
  n_params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params'])),
  bn_channels=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['batch_stats'])) // 2), default=str))
"""


def _check_compiled_demo_step(result, *, level, gradient_dtype_bytes, layout_slack):
  row, n = result['row'], result['n_params']
  assert row['compiled'] and row['fits'] and (row['chips'], row['per_chip_batch'], row['hosts']) == (4, 4, 1)
  assert (row['loss'], row['mix'], row['bn'], row['depth'], row['image_size']) == (
    'multi_similarity',
    level,
    'trainable',
    18,
    64,
  )
  # memory: the replicated state (params + 2 Adam moments + BN statistics) and this chip's batch are the
  # arguments (+ the padding of the device's tiled layouts: layout_slack), the donated state comes back aliased
  arg, alias, out = (row[k] * GIB for k in ('argument_gib', 'alias_gib', 'output_gib'))
  state = row['state_bytes']
  assert 3 * 4 * n <= state <= 3 * 4 * n + 8 * result['bn_channels'] + 4096
  assert row['batch_bytes'] == 16 * 64 * 64 * 3 + 16 * 4
  assert 0 <= arg - (state + row['batch_bytes'] / 4) <= layout_slack * state, (arg, state)
  assert 0 <= alias - state <= layout_slack * state and out >= alias
  assert row['per_chip_gib'] == pytest.approx((arg + out + row['temp_gib'] * GIB - alias) / GIB)
  # collectives: ONE combined all-reduce carries (nearly) all the parameter gradients (62 leaves: ResNet-18 + BN +
  # head), the BN statistics of the global batch (mean and mean of squares, float32) are all-reduced in every
  # forward (input level: two), and what Metrix mixes across the global batch is gathered ONCE: the 16 feature
  # maps (2 x 2 x 512 at 64 px) or the 16 images; besides, only [B, D] / [M, D] embeddings cross devices
  s = row['collectives']
  largest = max(row['largest_collectives'], key=lambda o: o['bytes'])
  assert largest['op'] == 'all-reduce' and largest['carries'] == 'gradients' and largest['operands'] >= 40
  assert gradient_dtype_bytes * n * 0.95 <= largest['bytes'] <= 4 * n * 1.02
  assert s['all-reduce']['by_carries']['gradients'][1] <= 4 * n * 1.02 + 4 * 16 * 8 * 512
  forwards = 2 if level == 'input' else 1
  assert s['all-reduce']['by_carries']['bn_stats'][1] == forwards * 2 * 4 * result['bn_channels']
  gathers = [o for o in row['largest_collectives'] if o['op'] == 'all-gather']
  embeddings = 16 * 128 * 4 + (16 * 8 if level == 'feature' else 16) * 128 * 4  # [B, D] + [M, D] float32
  if level == 'feature':
    maps = 16 * 2 * 2 * 512 * 4
    assert maps <= s['all-gather']['bytes'] <= 2 * (maps + embeddings), s['all-gather']
    assert [o['bytes'] for o in gathers if o['bytes'] >= maps] == [maps]
  else:  # the images, once (uint8, or normalised: XLA picks where the gather goes)
    images = [o['bytes'] for o in gathers if o['bytes'] >= 16 * 64 * 64 * 3]
    assert len(images) == 1 and images[0] in [16 * 64 * 64 * 3 * k for k in (1, 2, 4)], gathers
    assert images[0] <= s['all-gather']['bytes'] <= images[0] + 2 * embeddings, s['all-gather']
  # FLOPs and the roofline
  assert row['flops_per_chip'] > 0 and row['hbm_bytes_per_chip'] > 0
  t = max(
    row['flops_per_chip'] / (row_chip(row).bf16_tflops * 1e12),
    row['hbm_bytes_per_chip'] / (row_chip(row).hbm_gb_s * 1e9),
  )
  assert row['roofline_ms'] == pytest.approx(t * 1e3)
  assert row['roofline_images_per_s_per_chip'] == pytest.approx(4 / t)
  if result['fwd_flops']:  # forward + backward of 4 images (+ the head on the 32 mixed maps, BN, loss): 3-5 forwards
    assert 3 * 4 <= row['flops_per_chip'] / result['fwd_flops'] <= 5 * 4 * forwards


def row_chip(row):
  return tpu_aot.parse_slice(row['slice']).chip


def test_abstract_compile_on_four_fake_cpu_devices(fake_devices_runner):
  proc = fake_devices_runner(
    _SNIPPET.format(platform='cpu', slice='cpu-4', level='feature'), num_devices=4, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.split('RESULT', 1)[1])
  _check_compiled_demo_step(result, level='feature', gradient_dtype_bytes=4, layout_slack=0.001)


@pytest.mark.skipif(
  importlib.util.find_spec('libtpu') is None,
  reason="opt-in: libtpu is not importable here (a venv with pip install -e . 'jax[tpu]==<jax version>' runs it)",
)
@pytest.mark.parametrize('level', ['feature', 'input'])
def test_tpu_topology_compile_v5e_4(level):
  """libtpu's compiler, a v5e 2x2 topology (4 chips, one host) that is not present (XLA:TPU splits an async
  collective into pieces that share a channel_id: counted once)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  proc = subprocess.run(
    [sys.executable, '-c', _SNIPPET.format(platform='tpu', slice='v5e-4', level=level)],
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.split('RESULT', 1)[1])
  assert result['row']['topology'] == 'v5e:2x2' and result['row']['hbm_gib'] == 16
  _check_compiled_demo_step(result, level=level, gradient_dtype_bytes=4, layout_slack=0.03)


def _table_row(slice_name, mix, batch, per_chip_gib, fits, hbm_gib=16.0, **extra):
  return dict(
    slice=slice_name,
    loss='multi_similarity',
    mix=mix,
    bn='frozen',
    batch=batch,
    image_size=224,
    depth=50,
    dtype='bfloat16',
    hbm_gib=hbm_gib,
    per_chip_gib=per_chip_gib,
    fits=fits,
    **extra,
  )


def test_recorded_rows_read_back_what_the_table_run_writes(tmp_path):
  path = str(tmp_path / 'table.json')
  rows = [
    _table_row('v5e-16', 'feature', 160, 3.5, True, roofline_images_per_s_per_chip=float('nan')),
    _table_row('v4-128', 'none', 640, 40.25, False, hbm_gib=32.0, compiled=False),  # v4-128 = 64 chips
    _table_row('v5e-256', 'input', 1280, None, None, compiled=False, error='INTERNAL: something else'),
    _table_row('v5e-16', 'feature', 160, 0.5, True, search='variant', note='mix.all_pairs=False'),  # not the key's
  ]
  tpu_aot.write_json(path, rows, {'command': 'python benchmarks/tpu_aot.py'})
  with open(path, encoding='utf-8') as f:
    assert 'NaN' not in f.read()  # strict JSON
  recorded = tpu_aot.recorded_rows(path)
  assert recorded == {
    ('v5e', 16, 'multi_similarity', 'feature', 'frozen', 160, 224, 50, 'bfloat16'): (3.5, True, 16.0),
    ('v4', 64, 'multi_similarity', 'none', 'frozen', 640, 224, 50, 'bfloat16'): (40.25, False, 32.0),
  }
  assert tpu_aot.recorded_rows(str(tmp_path / 'absent.json')) == {}


def test_the_committed_table_covers_three_slices_and_four_levels():
  if not os.path.exists(tpu_aot.TABLE_JSON):
    pytest.skip('no committed AOT table yet')
  with open(tpu_aot.TABLE_JSON, encoding='utf-8') as f:
    table = json.load(f)
  assert not any(os.path.isabs(str(v)) for v in table['meta'].values() if isinstance(v, str))
  compiled = {(r['slice'], r['mix']) for r in table['rows'] if r.get('compiled')}
  assert compiled >= {(s, m) for s in tpu_aot.TABLE_SLICES for m in tpu_aot.MODES}
  assert tpu_aot.RECORDED and all(gib > 0 for gib, _, _ in tpu_aot.RECORDED.values())
