"""Train input-pipeline throughput (images/s) for 1, 2 and all CPU cores.

    python benchmarks/bench_input_pipeline.py                      # demo + omniglot (if present) + photos
    python benchmarks/bench_input_pipeline.py --datasets=demo --batches=20

Data sets: `demo` (32 px, built on first use under --data_dir), `omniglot` from --omniglot_dir (the official
zips; default ../shared/data/omniglot_small or .data/omniglot_small of the development tree; 64 px, skipped when
absent) and `photos`: a synthetic stand-in for CUB/Cars (a fake CUB_200_2011.tgz of --photos 500 x 375 JPEGs,
built like the real one: stored at shorter side 256, read at 224 with the ImageNet RandomResizedCrop + flip),
which is what a GPU must be fed.

Cores: "1 core" = in-process, one thread; "N cores" = N grain worker processes with one thread each. The first
batch (worker start-up) is timed separately; throughput is measured over the following --batches batches. The
load average is printed: on a shared machine the numbers are a lower bound.
"""

import argparse
import io
import os
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

from metrix_jax import data

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ../shared/data/omniglot_small next to the checkout, or .data/omniglot_small (staged by ../shared/gpu/stage.sh).
OMNIGLOT_SMALL = next(
  (
    p
    for p in (
      os.path.join(_ROOT, '..', 'shared', 'data', 'omniglot_small'),
      os.path.join(_ROOT, '.data', 'omniglot_small'),
    )
    if os.path.isdir(p)
  ),
  os.path.join(_ROOT, '..', 'shared', 'data', 'omniglot_small'),
)


def fake_cub_archive(manual_dir, count):
  """CUB-layout archive of `count` photo-sized JPEGs (smooth colour fields + texture: realistic JPEG sizes)."""
  path = os.path.join(manual_dir, 'CUB_200_2011.tgz')
  if os.path.exists(path):
    return
  rng = np.random.default_rng(0)
  classes = max(1, min(100, count // 10))  # >= 5 images per class and split
  yy, xx = np.mgrid[0:375, 0:500] / 100.0
  with tarfile.open(path + '.tmp', 'w:gz') as tf:
    for i in range(count):
      phase = rng.uniform(0, 6, 3)
      base = np.stack([np.sin(xx * (1 + c) + yy * (2 - c) + phase[c]) for c in range(3)], -1)
      pixels = np.clip(128 + 80 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
      out = io.BytesIO()
      Image.fromarray(pixels).save(out, format='JPEG', quality=90)
      cls = 1 + (i % 2) * 100 + (i // 2) % classes  # alternately a train (1-...) and a test (101-...) class
      info = tarfile.TarInfo(f'CUB_200_2011/images/{cls:03d}.Class_{cls}/img_{i:05d}.jpg')
      info.size = out.tell()
      out.seek(0)
      tf.addfile(info, out)
  os.replace(path + '.tmp', path)


def measure(name, kwargs, workers, batches, batch_size):
  it = data.create_train_iterator(
    name, global_batch_size=batch_size, seed=0, num_workers=workers, num_threads=1, **kwargs
  )
  start = time.perf_counter()
  next(it)
  startup = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - start
  it.close()
  return startup, batches * batch_size / seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--datasets', default='demo,omniglot,photos')
  parser.add_argument('--data_dir', default=os.path.join(tempfile.gettempdir(), 'metrix_bench_data'))
  parser.add_argument('--batches', type=int, default=30)
  parser.add_argument('--batch_size', type=int, default=100)
  parser.add_argument('--photos', type=int, default=600)
  parser.add_argument('--omniglot_dir', default=OMNIGLOT_SMALL, help='folder with the official Omniglot zips')
  args = parser.parse_args()

  cores = os.cpu_count()
  settings = {
    'demo': dict(image_size=32, sampler='balanced', classes_per_batch=20, images_per_class=5),
    'omniglot': dict(
      image_size=64, sampler='balanced', classes_per_batch=20, images_per_class=5, manual_dir=args.omniglot_dir
    ),
    'photos': dict(
      image_size=224,
      sampler='random',
      manual_dir=os.path.join(args.data_dir, f'fake_cub_{args.photos}'),
      check_counts=False,
    ),
  }
  print(
    f'{cores} CPU cores, load average {os.getloadavg()[0]:.1f}; batch {args.batch_size}; {args.batches} timed batches'
  )
  print('| data set | image size | workers | start-up s | images/s |')
  print('|---|---|---|---|---|')
  for key in args.datasets.split(','):
    if key == 'omniglot' and not os.path.isdir(args.omniglot_dir):
      print(f'| omniglot | - | - | - | skipped: {args.omniglot_dir} absent (--omniglot_dir) |')
      continue
    if key not in settings:
      raise SystemExit(f'Unknown data set {key!r}; valid choices: {", ".join(settings)}.')
    data_dir = os.path.join(args.data_dir, f'built_{args.photos}') if key == 'photos' else args.data_dir
    kwargs = dict(settings[key], data_dir=data_dir)
    name = 'cub200' if key == 'photos' else key
    try:
      if key == 'photos':
        os.makedirs(kwargs['manual_dir'], exist_ok=True)
        fake_cub_archive(kwargs['manual_dir'], args.photos)
      data.prepare(name, data_dir, kwargs.get('manual_dir'), **({'check_counts': False} if key == 'photos' else {}))
    except Exception as e:  # pylint: disable=broad-except  (e.g. no matplotlib fonts for demo on a bare host)
      print(f'| {key} | - | - | - | skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]} |', flush=True)
      continue
    for workers in sorted({0, 2, cores}):
      startup, rate = measure(name, kwargs, workers, args.batches, args.batch_size)
      label = '0 (1 core, in-process)' if workers == 0 else str(workers)
      print(f'| {key} | {kwargs["image_size"]} | {label} | {startup:.1f} | {rate:,.0f} |', flush=True)


if __name__ == '__main__':
  main()
