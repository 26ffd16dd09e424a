"""EmbeddingNet throughput: forward (eval) and forward+backward (train step shape) in float32 and bfloat16.

    python benchmarks/bench_model.py                          # ResNet-50, 224 px, batch 100 (the paper's)
    python benchmarks/bench_model.py --depth=18 --batch=8 --size=64 --steps=3   # CPU smoke run

Prints one table row per (dtype, mode): compile seconds, ms/step, images/s. Random weights (speed does not
depend on them); float32 runs use the default matmul precision of the device (TF32 on recent NVIDIA GPUs).
"""

import argparse
import time

import jax
import jax.numpy as jnp

from metrix_jax import models


def bench(fn, args, steps):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  jax.block_until_ready(out)
  return compile_s, (time.perf_counter() - start) / steps


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--depth', type=int, default=50, choices=(18, 34, 50))
  parser.add_argument('--batch', type=int, default=100)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--bn_mode', default='frozen', choices=models.BN_MODES)
  args = parser.parse_args()

  images = jax.random.normal(jax.random.key(1), (args.batch, args.size, args.size, 3), jnp.float32)
  init_model = models.EmbeddingNet(args.depth)
  variables = jax.jit(init_model.init)(jax.random.key(0, impl='rbg'), images[:1])
  print(
    f'device: {jax.devices()[0].device_kind}; ResNet-{args.depth}, batch {args.batch}, {args.size} px, '
    f'bn_mode={args.bn_mode}'
  )
  print(f'{"dtype":10s} {"mode":14s} {"compile s":>10s} {"ms/step":>10s} {"img/s":>10s}')
  for dtype in (jnp.float32, jnp.bfloat16):
    model = models.EmbeddingNet(args.depth, dtype=dtype, bn_mode=args.bn_mode)

    @jax.jit
    def forward(variables, x):
      return model.apply(variables, x)[0]

    @jax.jit
    def forward_backward(variables, x):
      def loss_fn(params):
        (emb, _), updates = model.apply(
          {'params': params, 'batch_stats': variables['batch_stats']}, x, train=True, mutable=['batch_stats']
        )
        return jnp.sum(emb @ emb.T), updates

      return jax.grad(loss_fn, has_aux=True)(variables['params'])

    for mode, fn in (('forward', forward), ('fwd+bwd', forward_backward)):
      compile_s, step_s = bench(fn, (variables, images), args.steps)
      print(
        f'{jnp.dtype(dtype).name:10s} {mode:14s} {compile_s:10.1f} {1e3 * step_s:10.1f} {args.batch / step_s:10.1f}'
      )


if __name__ == '__main__':
  main()
