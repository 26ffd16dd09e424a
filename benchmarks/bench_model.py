"""EmbeddingNet throughput: forward (eval) and forward+backward (train step shape), per dtype and conv path.

    python benchmarks/bench_model.py                          # ResNet-50, 224 px, batch 100 (the paper's)
    python benchmarks/bench_model.py --depth=18 --batch=8 --size=64 --steps=3   # CPU smoke run
    python benchmarks/bench_model.py --depth=18 --batch=64 --size=32 --dtypes=float32 --conv_impls=xla,auto --rounds=5

Prints one table row per (dtype, conv path, mode): compile seconds, then ms/step and images/s as min and median
over --rounds rounds of --steps steps. The variants are timed in turn within each round (A B A B ...), so a
machine whose speed drifts (other jobs) affects them alike. Random weights (speed does not depend on them);
float32 runs use the default matmul precision of the device (TF32 on recent NVIDIA GPUs). --conv_impls picks
`models.EmbeddingNet.conv_impl`: 'auto' (the default: on CPU, patches + matmul where XLA:CPU's conv is slow),
'xla' (plain `lax.conv_general_dilated` everywhere), 'patches' (patches + matmul everywhere).
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from metrix_jax import models


def time_steps(fn, args, steps):
  start = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--depth', type=int, default=50, choices=(18, 34, 50))
  parser.add_argument('--batch', type=int, default=100)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--steps', type=int, default=20, help='steps per round')
  parser.add_argument('--rounds', type=int, default=1, help='rounds; each times every variant in turn')
  parser.add_argument('--bn_mode', default='frozen', choices=models.BN_MODES)
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--conv_impls', default='auto', help=f'comma-separated, of {models.CONV_IMPLS}')
  parser.add_argument('--modes', default='forward,fwd+bwd')
  args = parser.parse_args()

  images = jax.random.normal(jax.random.key(1), (args.batch, args.size, args.size, 3), jnp.float32)
  init_model = models.EmbeddingNet(args.depth)
  variables = jax.jit(init_model.init)(jax.random.key(0, impl='rbg'), images[:1])
  print(
    f'device: {jax.devices()[0].device_kind} ({jax.default_backend()}); ResNet-{args.depth}, batch {args.batch}, '
    f'{args.size} px, bn_mode={args.bn_mode}; {args.rounds} rounds x {args.steps} steps'
  )
  variants = []  # (label, fn)
  for dtype_name in args.dtypes.split(','):
    dtype = jnp.dtype(dtype_name)
    for conv_impl in args.conv_impls.split(','):
      model = models.EmbeddingNet(args.depth, dtype=dtype, bn_mode=args.bn_mode, conv_impl=conv_impl)

      def forward(variables, x, model=model):
        return model.apply(variables, x)[0]

      def forward_backward(variables, x, model=model):
        def loss_fn(params):
          (emb, _), updates = model.apply(
            {'params': params, 'batch_stats': variables['batch_stats']}, x, train=True, mutable=['batch_stats']
          )
          return jnp.sum(emb @ emb.T), updates

        return jax.grad(loss_fn, has_aux=True)(variables['params'])

      for mode, fn in (('forward', forward), ('fwd+bwd', forward_backward)):
        if mode in args.modes.split(','):
          variants.append((f'{dtype.name:9s} {conv_impl:8s} {mode:8s}', jax.jit(fn)))

  compile_s = {}
  for label, fn in variants:
    start = time.perf_counter()
    jax.block_until_ready(fn(variables, images))
    compile_s[label] = time.perf_counter() - start
  seconds = {label: [] for label, _ in variants}
  for _ in range(args.rounds):
    for label, fn in variants:
      seconds[label].append(time_steps(fn, (variables, images), args.steps))

  print(
    f'{"dtype":9s} {"conv":8s} {"mode":8s} {"compile s":>9s} {"ms min":>8s} {"ms med":>8s} {"img/s max":>9s} '
    f'{"img/s med":>9s}'
  )
  for label, _ in variants:
    lo, med = min(seconds[label]), statistics.median(seconds[label])
    print(
      f'{label} {compile_s[label]:9.1f} {1e3 * lo:8.1f} {1e3 * med:8.1f} {args.batch / lo:9.1f} {args.batch / med:9.1f}'
    )


if __name__ == '__main__':
  main()
