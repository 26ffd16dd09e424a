"""Recall@K at SOP scale: metrix_jax.evaluation.recall_at_k vs a straightforward numpy baseline.

    .venv/bin/python benchmarks/bench_recall.py                 # 60,502 x 512-d, 11,316 classes (SOP test size)
    .venv/bin/python benchmarks/bench_recall.py --n=10000       # smaller; classes scale with n

Random unit vectors, labels = a random assignment with every class of size >= n // classes. Each method runs in
its own subprocess so that its peak resident memory (getrusage ru_maxrss) is its own; "extra" is the peak minus
the resident size right after the data was generated (for jax it includes the runtime and the compiler).
"time" is the best of --repeats runs (wall clock), "first run" the first one (for jax it includes compilation,
one program per shape); both include the host -> device copies. "CPU time" is the process's user + system time
of the best run, all threads (robust to other load on a shared machine, unlike wall time). On an accelerator the jax
row adds the device's peak bytes.

Baseline (numpy, leave-one-out): per block of queries, sims = q @ g.T, own column set to -inf,
argpartition for the top max(K), sort those, hit at K if a same-class item is among the first K. This is the
usual faiss-style top-k definition (ties broken arbitrarily); on random data it agrees with metrix_jax's
tie-robust rule, and the script checks that the recalls agree.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

SOP_N, SOP_CLASSES = 60_502, 11_316


def make_data(n: int, dim: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """float32 [n, dim] unit vectors and int32 [n] labels (every class has n // num_classes or more items)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, dim), dtype=np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
  return x, labels


def numpy_recall_at_k(x: np.ndarray, labels: np.ndarray, ks: tuple[int, ...], *, chunk: int) -> dict[int, float]:
  """Leave-one-out Recall@K with blockwise matmul + argpartition (the straightforward baseline)."""
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  k_max = max(ks)
  hits = {k: 0 for k in ks}
  for start in range(0, len(x), chunk):
    stop = min(start + chunk, len(x))
    sims = x[start:stop] @ x.T
    sims[np.arange(stop - start), np.arange(start, stop)] = -np.inf
    top = np.argpartition(-sims, k_max - 1, axis=1)[:, :k_max]
    order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
    top = np.take_along_axis(top, order, axis=1)
    match = labels[top] == labels[start:stop, None]
    first = np.where(match.any(axis=1), match.argmax(axis=1), k_max)
    for k in ks:
      hits[k] += int(np.sum(first < k))
  return {k: hits[k] / len(x) for k in ks}


def run_one(args) -> dict:
  ks = tuple(int(k) for k in args.ks.split(','))
  x, labels = make_data(args.n, args.dim, args.classes, args.seed)
  rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  extra = {}
  if args.method == 'numpy':
    seconds, cpu = [], []
    for _ in range(args.repeats):
      start, cpu_start = time.perf_counter(), time.process_time()
      recall = numpy_recall_at_k(x, labels, ks, chunk=args.numpy_chunk)
      seconds.append(time.perf_counter() - start)
      cpu.append(time.process_time() - cpu_start)
    extra['chunk'] = args.numpy_chunk
  else:
    import jax

    from metrix_jax import evaluation

    chunk = args.chunk or evaluation.default_query_chunk_size(len(x))
    seconds, cpu = [], []
    for _ in range(args.repeats):  # the first run includes compilation
      start, cpu_start = time.perf_counter(), time.process_time()
      recall = evaluation.recall_at_k(x, labels, ks, query_chunk_size=chunk)
      seconds.append(time.perf_counter() - start)
      cpu.append(time.process_time() - cpu_start)
    extra['chunk'] = chunk
    device = jax.devices()[0]
    extra['device'] = f'{jax.device_count()} x {device.device_kind}'
    stats = device.memory_stats() if device.platform != 'cpu' else None
    if stats and 'peak_bytes_in_use' in stats:
      extra['device_peak_mib'] = stats['peak_bytes_in_use'] / 2**20
  rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  best = int(np.argmin(seconds))
  return {
    'method': args.method,
    'seconds': seconds[best],
    'first_seconds': seconds[0],
    'cpu_seconds': cpu[best],
    'recall': recall,
    'peak_rss_mib': rss_peak / 1024,
    'extra_rss_mib': (rss_peak - rss_data) / 1024,
    **extra,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--n', type=int, default=SOP_N, help='number of vectors (default: SOP test set)')
  parser.add_argument('--dim', type=int, default=512)
  parser.add_argument(
    '--classes', type=int, default=None, help="number of classes (default: SOP's 11,316 scaled by n / 60,502)"
  )
  parser.add_argument('--ks', default='1,10,100,1000')
  parser.add_argument(
    '--chunk', type=int, default=0, help='metrix_jax query rows per device per step (0: the library default)'
  )
  parser.add_argument('--numpy-chunk', type=int, default=1024, help='numpy baseline query rows per block')
  parser.add_argument('--repeats', type=int, default=1, help='timed runs per method (the best is reported)')
  parser.add_argument('--methods', default='metrix_jax,numpy')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--method', help=argparse.SUPPRESS)  # internal: run one method in this process
  args = parser.parse_args()
  if args.classes is None:
    args.classes = max(1, round(SOP_CLASSES * args.n / SOP_N))
  if args.method:
    print('RESULT' + json.dumps(run_one(args)))
    return

  rows = []
  load_before = os.getloadavg()
  for method in args.methods.split(','):
    cmd = [
      sys.executable,
      os.path.abspath(__file__),
      f'--n={args.n}',
      f'--dim={args.dim}',
      f'--classes={args.classes}',
      f'--ks={args.ks}',
      f'--chunk={args.chunk}',
      f'--seed={args.seed}',
      f'--numpy-chunk={args.numpy_chunk}',
      f'--repeats={args.repeats}',
      f'--method={method}',
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
      sys.exit(f'{method} failed:\n{proc.stderr[-3000:]}')
    rows.append(json.loads(proc.stdout.split('RESULT', 1)[1]))

  ks = args.ks.split(',')
  print(
    f'Recall@K leave-one-out: n={args.n:,} dim={args.dim} classes={args.classes:,} '
    f'cpu_count={os.cpu_count()} repeats={args.repeats}'
  )
  print(
    f'load average (1/5/15 min) before: {" ".join(f"{v:.2f}" for v in load_before)}, after: '
    f'{" ".join(f"{v:.2f}" for v in os.getloadavg())}'
  )
  header = (
    '| method | device | chunk | time (s) | first run (s) | CPU time (s) | peak RSS (MiB) | extra RSS (MiB) | '
    + ' | '.join(f'R@{k}' for k in ks)
  )
  print(header + ' |')
  print('|' + '---|' * (8 + len(ks)))
  for row in rows:
    device = row.get('device', 'numpy (host)')
    if 'device_peak_mib' in row:
      device += f', peak {row["device_peak_mib"]:.0f} MiB'
    recalls = ' | '.join(f'{row["recall"][k]:.4f}' for k in ks)
    print(
      f'| {row["method"]} | {device} | {row["chunk"]} | {row["seconds"]:.1f} | {row["first_seconds"]:.1f} | '
      f'{row["cpu_seconds"]:.1f} | '
      f'{row["peak_rss_mib"]:.0f} | '
      f'{row["extra_rss_mib"]:.0f} | {recalls} |'
    )
  if len(rows) > 1:
    same = all(abs(rows[0]['recall'][k] - r['recall'][k]) < 1e-12 for r in rows[1:] for k in ks)
    print('recalls agree' if same else 'RECALLS DIFFER (ties, or a bug)')


if __name__ == '__main__':
  main()
