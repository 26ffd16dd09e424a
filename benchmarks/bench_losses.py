"""Loss + gradient time: metrix_jax.losses (jitted) vs pytorch-metric-learning (PML) with the same hyperparameters.

    .venv/bin/python benchmarks/bench_losses.py                 # B in {100, 1000, 4000}, D = 512, every loss
    .venv/bin/python benchmarks/bench_losses.py --quick         # tiny smoke run (B in {16, 32}, D = 32)
    .venv/bin/python benchmarks/bench_losses.py --batch=100 --losses=multi_similarity,contrastive

Random float32 embeddings [B, D], labels with 5 items per class (B / 5 classes, as a 20 x 5 SOP batch), proxies
[C, D] for the proxy losses ([C*K, D] class centers for SoftTriple (K = 10) and sub-center ArcFace (K = 3); PML's
W / fc set to them). One step = loss value + gradient with respect to the embeddings (and the proxies):
jax: `jax.jit(jax.value_and_grad(loss))` (PML defaults of `losses.get(name)`), output blocked on; PML: the
matching class (MultiSimilarityLoss fed by MultiSimilarityMiner, ProxyAnchorLoss/ProxyNCALoss with our proxies)
forward + backward. Reported: the median wall time of --repeats steps after one warm-up step (jax: compilation is
the "compile" column), the process CPU time (all threads) of the same steps, and the relative difference of the
two loss values (a correctness check: both compute the same function).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

LOSSES = (
  'contrastive',
  'multi_similarity',
  'proxy_anchor',
  'circle',
  'proxy_nca',
  'lifted_structure',
  'normalized_softmax',
  'cosface',
  'arcface',
  'subcenter_arcface',
  'soft_triple',
  'margin',
  'pair_nca',
  'supcon',
  'ntxent',
)
# PML class and hyperparameters (PML defaults = those of losses.get(name)) of the pair-based and class-weight losses.
PML_CLASSES = {
  'margin': ('MarginLoss', dict(margin=0.2, beta=1.2)),
  'pair_nca': ('NCALoss', dict(softmax_scale=1.0)),
  'supcon': ('SupConLoss', dict(temperature=0.1)),
  'ntxent': ('NTXentLoss', dict(temperature=0.07)),
  'normalized_softmax': ('NormalizedSoftmaxLoss', dict(temperature=0.05)),
  'cosface': ('CosFaceLoss', dict(margin=0.35, scale=64.0)),
  'arcface': ('ArcFaceLoss', dict(margin=28.6, scale=64.0)),
  'subcenter_arcface': ('SubCenterArcFaceLoss', dict(margin=28.6, scale=64.0, sub_centers=3)),
  'soft_triple': ('SoftTripleLoss', dict(centers_per_class=10, la=20.0, gamma=0.1, margin=0.01)),
}


def make_data(batch: int, dim: int, seed: int = 0, per_class: int = 1):
  """Embeddings [B, D], labels (B / 5 classes), proxies [C * per_class, D] (K centers per class: SoftTriple,
  sub-center ArcFace)."""
  rng = np.random.default_rng(seed)
  classes = max(2, batch // 5)
  labels = rng.permutation(np.arange(batch) % classes).astype(np.int32)
  emb = rng.standard_normal((batch, dim), dtype=np.float32)
  proxies = rng.standard_normal((classes * per_class, dim), dtype=np.float32)
  return emb, labels, proxies


def per_class(name: str) -> int:
  from metrix_jax import losses  # pylint: disable=g-import-not-at-top

  return losses.get(name).proxies_per_class


def _timed(step, repeats: int) -> tuple[float, float, float, float]:
  """(first call s, median wall s, median CPU s, value) of `step() -> value` (first call = warm-up)."""
  start = time.perf_counter()
  value = step()
  first = time.perf_counter() - start
  walls, cpus = [], []
  for _ in range(repeats):
    w, c = time.perf_counter(), time.process_time()
    value = step()
    walls.append(time.perf_counter() - w)
    cpus.append(time.process_time() - c)
  return first, statistics.median(walls), statistics.median(cpus), value


def jax_step(name: str, emb, labels, proxies):
  import jax  # pylint: disable=g-import-not-at-top
  from metrix_jax import losses  # pylint: disable=g-import-not-at-top

  loss = losses.get(name)
  e, l = jax.device_put(emb), jax.device_put(labels)
  if loss.uses_proxies:
    fn = jax.jit(jax.value_and_grad(lambda e, p: loss(e, l, p), argnums=(0, 1)))
    p = jax.device_put(proxies)
    call = lambda: fn(e, p)  # noqa: E731
  else:
    fn = jax.jit(jax.value_and_grad(lambda e: loss(e, l)))
    call = lambda: fn(e)  # noqa: E731

  def step():
    value, grads = call()
    jax.block_until_ready(grads)
    return float(value)

  return step


def pml_step(name: str, emb, labels, proxies):
  import torch  # pylint: disable=g-import-not-at-top
  from pytorch_metric_learning import losses as pml_losses, miners  # pylint: disable=g-import-not-at-top

  labels_t = torch.as_tensor(labels, dtype=torch.long)
  miner = None
  if name == 'contrastive':
    loss = pml_losses.ContrastiveLoss(pos_margin=0.0, neg_margin=0.5)
  elif name == 'multi_similarity':
    loss, miner = pml_losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5), miners.MultiSimilarityMiner(0.1)
  elif name == 'circle':
    loss = pml_losses.CircleLoss(m=0.4, gamma=80.0)
  elif name == 'lifted_structure':
    loss = pml_losses.GeneralizedLiftedStructureLoss(neg_margin=1.0, pos_margin=0.0)
  elif name in PML_CLASSES:
    cls_name, kwargs = PML_CLASSES[name]
    cls = getattr(pml_losses, cls_name)
    if name in ('margin', 'pair_nca', 'supcon', 'ntxent'):
      loss = cls(**kwargs)
    else:  # class weights: PML's W / fc [D, C*K] = our proxies transposed
      k = per_class(name)
      loss = cls(num_classes=proxies.shape[0] // k, embedding_size=proxies.shape[1], **kwargs)
      weight = loss.fc if name == 'soft_triple' else loss.W
      weight.data = torch.as_tensor(np.ascontiguousarray(proxies.T))
  else:
    cls = pml_losses.ProxyAnchorLoss if name == 'proxy_anchor' else pml_losses.ProxyNCALoss
    kwargs = dict(margin=0.1, alpha=32.0) if name == 'proxy_anchor' else dict(softmax_scale=1.0)
    loss = cls(num_classes=proxies.shape[0], embedding_size=proxies.shape[1], **kwargs)
    loss.proxies.data = torch.as_tensor(proxies)

  def step():
    e = torch.as_tensor(emb).clone().requires_grad_(True)
    for param in loss.parameters():
      param.grad = None
    value = loss(e, labels_t, miner(e, labels_t)) if miner is not None else loss(e, labels_t)
    value.backward()
    return float(value.detach())

  return step


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch', default=None, help='comma-separated batch sizes (default 100,1000,4000)')
  parser.add_argument('--dim', type=int, default=None, help='embedding dimension (default 512)')
  parser.add_argument('--losses', default=','.join(LOSSES))
  parser.add_argument('--repeats', type=int, default=None, help='timed steps per cell (default 5; 2 with --quick)')
  parser.add_argument('--no-pml', action='store_true', help='skip pytorch-metric-learning')
  parser.add_argument(
    '--torch-threads', type=int, default=None, help="torch.set_num_threads for PML (default: torch's own choice)"
  )
  parser.add_argument('--quick', action='store_true', help='tiny smoke run: B in {16, 32}, D = 32')
  args = parser.parse_args()
  batches = [int(b) for b in (args.batch or ('16,32' if args.quick else '100,1000,4000')).split(',')]
  dim = args.dim or (32 if args.quick else 512)
  repeats = args.repeats or (2 if args.quick else 5)
  names = [n for n in args.losses.split(',') if n]
  unknown = sorted(set(names) - set(LOSSES))
  if unknown:
    raise SystemExit(f'unknown losses {unknown}; choose from {",".join(LOSSES)}')

  import jax  # pylint: disable=g-import-not-at-top

  versions = f'jax {jax.__version__} ({jax.devices()[0].platform}: {jax.devices()[0].device_kind})'
  if not args.no_pml:
    import pytorch_metric_learning  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top

    if args.torch_threads:
      torch.set_num_threads(args.torch_threads)
    versions += (
      f', torch {torch.__version__} ({torch.get_num_threads()} threads), '
      f'pytorch-metric-learning {pytorch_metric_learning.__version__}'
    )
  print(
    f'# {versions}, numpy {np.__version__}, Python {platform.python_version()}, D = {dim}, median of {repeats} steps'
  )
  print(
    '| loss | B | jax compile (s) | jax step (ms) | jax CPU (ms) | PML step (ms) | PML CPU (ms) | '
    'PML / jax | value rel. diff |'
  )
  print('|---|---|---|---|---|---|---|---|---|')
  for name in names:
    for batch in batches:
      emb, labels, proxies = make_data(batch, dim, per_class=per_class(name))
      first, wall, cpu, value = _timed(jax_step(name, emb, labels, proxies), repeats)
      row = f'| {name} | {batch} | {first:.2f} | {wall * 1e3:.2f} | {cpu * 1e3:.1f} |'
      if args.no_pml:
        row += ' - | - | - | - |'
      else:
        _, p_wall, p_cpu, p_value = _timed(pml_step(name, emb, labels, proxies), repeats)
        rel = abs(value - p_value) / max(abs(p_value), 1e-12)
        row += f' {p_wall * 1e3:.2f} | {p_cpu * 1e3:.1f} | {p_wall / wall:.1f}x | {rel:.1e} |'
      print(row, flush=True)


if __name__ == '__main__':
  main()
