"""Flax ResNet-18/34/50 in torchvision layout and the Metrix embedding network (spec section 3).

`ResNet(depth)` maps NHWC float images to the last convolutional feature map (torchvision `layer4` output,
before pooling). Its variable tree mirrors torchvision's module names (`conv1`, `bn1`, `layer{s}_{b}/conv1`,
`layer{s}_{b}/downsample_conv`, ...) so that `metrix_jax.weights.load_torchvision` ports a torchvision
checkpoint exactly. Porting rules kept here:

* explicit symmetric PyTorch padding, never 'SAME' (stem ((3, 3), (3, 3)), 3x3 convs ((1, 1), (1, 1)),
  max-pool ((1, 1), (1, 1)) padded with -inf, 1x1 convs 'VALID');
* ResNet v1.5: the stride of a bottleneck sits on its 3x3 conv;
* BatchNorm epsilon 1e-5 and Flax momentum 0.9 (= PyTorch momentum 0.1). Flax updates the running variance
  with the biased batch variance, PyTorch with the unbiased one (a factor n / (n - 1), n = B * H * W; only
  matters with `bn_mode='trainable'`);
* random init as torchvision: convs Kaiming normal fan-out (untruncated), BN scale 1, bias 0.

`EmbeddingNet` = backbone -> GAP + GMP (summed) -> Dense(embedding_dim) -> L2 normalisation. The head is
callable alone on a (mixed) feature map for Metrix feature-level mixing:
`EmbeddingNet(...).apply(variables, feature_map, method='head')`.

Convolution implementation (`conv_impl`, a field of every module here; never changes the variable tree):
* `'auto'` (default): on the CPU backend (`jax.default_backend() == 'cpu'` when the module is traced), the convs
  XLA:CPU runs on its slow generic path go through `conv_patches` (shifted slices + one matmul), the rest stay
  `lax.conv_general_dilated`; on GPU/TPU every conv is the plain `lax.conv_general_dilated`. Frozen and
  trainable BN alike (a float32 trainable-BN step can be ~1e-2 off float64 on both paths alike, when float32
  crosses a ReLU kink float64 does not and batch-statistics BN spreads that over the channel;
  tests/test_models_cpu.py).
* `'xla'`: always the plain `lax.conv_general_dilated`.
* `'patches'`: every supported conv through `conv_patches` (tests and benchmarks).
The environment variable `METRIX_CONV_IMPL` (`xla` or `patches`), when set, replaces `'auto'`: the A/B switch
for whole commands (demo, tests) without touching configs. The CPU path also computes the stem's 3x3/2 max pool
as the maximum of 9 strided slices with XLA's gradient rule (`max_pool_slices`).
Why: XLA:CPU (jax 0.10) runs a conv whose spatial extent is smaller than its kernel (a 3x3 conv on a 2x2 or 1x1
map, and the input gradient of a stride-2 3x3 conv with a 2x2 output) at ~2 GFLOP/s instead of the ~50-100
GFLOP/s of its other convs: at the demo size (ResNet-18, 32 px: stages 3-4 run on 2x2 and 1x1 maps) those few
convs were ~90% of the train step (BENCHMARKS.md, "CPU convolutions"). `conv_patches` computes the same sums in
another order (float32 differences ~1e-6 relative, `tests/test_models_cpu.py`).

BatchNorm mode (`bn_mode`, a field of both modules):
* `'frozen'` (official recipe, `bn_freeze=1`): BN always normalises with the running statistics, which are never
  updated, `train` or not. gamma/beta stay ordinary parameters: whether they train is the optimiser's business
  (warm-up mask in `metrix_jax.optim`).
* `'trainable'`: `train=True` normalises with batch statistics and updates `batch_stats` (pass
  `mutable=['batch_stats']` to `apply`); `train=False` uses the running statistics.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax import lax

Dtype = Any

BN_MODES = ('frozen', 'trainable')
CONV_IMPLS = ('auto', 'xla', 'patches')
CONV_IMPL_ENV = 'METRIX_CONV_IMPL'  # overrides 'auto' (A/B of whole commands): 'xla' or 'patches'

# depth -> (block type, blocks per stage)
RESNET_STAGES = {
  18: ('basic', (2, 2, 2, 2)),
  34: ('basic', (3, 4, 6, 3)),
  50: ('bottleneck', (3, 4, 6, 3)),
}
STAGE_WIDTHS = (64, 128, 256, 512)
BN_MOMENTUM = 0.9  # Flax convention: running = momentum * running + (1 - momentum) * batch (torch 0.1).
BN_EPSILON = 1e-5
L2_EPSILON = 1e-12

# torchvision: nn.init.kaiming_normal_(w, mode='fan_out', nonlinearity='relu'): N(0, 2 / fan_out),
# untruncated. For HWIO kernels fan_out = H * W * O, as PyTorch's for OIHW. For the head's Dense (in, out)
# fan_out = out, i.e. N(0, 2 / 512) for D = 512.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def feature_channels(depth: int) -> int:
  """Channels of the last feature map: 2048 for ResNet-50, 512 for ResNet-18/34."""
  _check_depth(depth)
  return STAGE_WIDTHS[-1] * (4 if RESNET_STAGES[depth][0] == 'bottleneck' else 1)


def _check_depth(depth: int) -> None:
  if depth not in RESNET_STAGES:
    raise ValueError(f'ResNet depth {depth!r} is not supported; valid depths: {sorted(RESNET_STAGES)}.')


def _check_bn_mode(bn_mode: str) -> None:
  if bn_mode not in BN_MODES:
    raise ValueError(f'bn_mode={bn_mode!r} is not valid; choose one of {BN_MODES}.')


def _check_conv_impl(conv_impl: str) -> None:
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl={conv_impl!r} is not valid; choose one of {CONV_IMPLS}.')


def _patches_supported(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count) -> bool:
  """True for an undilated, ungrouped 2-D NHWC x HWIO -> NHWC conv (what nn.Conv passes for images)."""
  if lhs.ndim != 4 or rhs.ndim != 4 or feature_group_count != 1:
    return False
  if any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ())):
    return False
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))
  return lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc


def _explicit_padding(lhs, rhs, window_strides, padding):
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding))
  return tuple(tuple(p) for p in padding)


def _output_spatial(lhs, rhs, window_strides, pads):
  return tuple(
    (n + lo + hi - k) // s + 1 for n, (lo, hi), k, s in zip(lhs.shape[1:3], pads, rhs.shape[:2], window_strides)
  )


def conv_patches(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  precision=None,
  preferred_element_type=None,
):
  """`lax.conv_general_dilated` for 2-D NHWC x HWIO -> NHWC convs as shifted strided slices + one matmul.

  Same signature and result as `lax.conv_general_dilated` (up to float summation order). The input is padded,
  each kernel tap (i, j) reads the strided slice of the padded input it multiplies, the slices are concatenated
  along channels ([B, H', W', taps * C_in], tap-major like the HWIO kernel's reshape) and contracted with the
  kernel [taps * C_in, C_out] in one `dot_general`. Kernel rows / columns that read only padding for every output
  position (e.g. the outer ones of a padded 3x3 conv on a 1x1 map) add exact zeros and are left out. Its
  gradients are slices, pads and matmuls (autodiff), which XLA:CPU runs at matmul speed. Anything else (dilation,
  groups, another layout) goes to `lax.conv_general_dilated` unchanged.
  """
  kwargs = dict(
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  if not _patches_supported(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
  pads = _explicit_padding(lhs, rhs, window_strides, padding)
  (pad_top, pad_bottom), (pad_left, pad_right) = pads
  stride_h, stride_w = window_strides
  batch, height, width, channels = lhs.shape
  kernel_h, kernel_w, _, out_channels = rhs.shape
  out_h, out_w = _output_spatial(lhs, rhs, window_strides, pads)
  x = lhs
  if pad_top or pad_bottom or pad_left or pad_right:
    x = jnp.pad(lhs, ((0, 0), (pad_top, pad_bottom), (pad_left, pad_right), (0, 0)))
  # Kernel rows / columns that meet at least one real (unpadded) input row / column.
  rows = [i for i in range(kernel_h) if any(pad_top <= i + stride_h * o < pad_top + height for o in range(out_h))]
  cols = [j for j in range(kernel_w) if any(pad_left <= j + stride_w * o < pad_left + width for o in range(out_w))]
  if not rows or not cols:  # every tap reads padding only: exact zeros, as the plain conv gives
    dtype = preferred_element_type or jnp.result_type(lhs, rhs)
    return jnp.zeros((batch, out_h, out_w, out_channels), dtype)
  slices = [
    lax.slice(
      x,
      (0, i, j, 0),
      (batch, i + stride_h * (out_h - 1) + 1, j + stride_w * (out_w - 1) + 1, channels),
      (1, stride_h, stride_w, 1),
    )
    for i in rows
    for j in cols
  ]
  patches = slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=-1)
  if rows == list(range(rows[0], rows[-1] + 1)) and cols == list(range(cols[0], cols[-1] + 1)):
    kernel = rhs[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
  else:  # kept rows / columns with gaps (a stride larger than the input)
    kernel = rhs[jnp.asarray(rows)][:, jnp.asarray(cols)]
  kernel = kernel.reshape(len(rows) * len(cols) * channels, out_channels)
  return lax.dot_general(
    patches, kernel, (((3,), (0,)), ((), ())), precision=precision, preferred_element_type=preferred_element_type
  )


def xla_cpu_conv_is_slow(in_spatial, out_spatial, kernel_spatial) -> bool:
  """Whether XLA:CPU runs this conv, or its input gradient, on its slow generic path: a spatial size (input or
  output) smaller than the kernel along some axis. 1x1 kernels never are."""
  return any(k > 1 and min(i, o) < k for i, o, k in zip(in_spatial, out_spatial, kernel_spatial))


def conv_cpu(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  precision=None,
  preferred_element_type=None,
):
  """`conv_patches` where `xla_cpu_conv_is_slow` (decided from static shapes), else `lax.conv_general_dilated`."""
  kwargs = dict(
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  if _patches_supported(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count):
    pads = _explicit_padding(lhs, rhs, window_strides, padding)
    out_spatial = _output_spatial(lhs, rhs, window_strides, pads)
    if xla_cpu_conv_is_slow(lhs.shape[1:3], out_spatial, rhs.shape[:2]):
      return conv_patches(lhs, rhs, window_strides, padding, **kwargs)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)


def conv_function(conv_impl: str):
  """The `conv_general_dilated` that `nn.Conv` gets for `conv_impl` (None: Flax's default, the plain conv).

  'auto' is resolved here (`resolve_conv_impl`), i.e. when the module is traced: `conv_cpu` on CPU, else None.
  """
  return {'xla': None, 'cpu': conv_cpu, 'patches': conv_patches}[resolve_conv_impl(conv_impl)]


def _use_cpu_path(conv_impl: str) -> bool:
  """Whether the CPU path (patches convs where XLA:CPU's are slow, slice max pool) is on for `conv_impl`."""
  return resolve_conv_impl(conv_impl) != 'xla'


def resolve_conv_impl(conv_impl: str) -> str:
  """'auto' -> $METRIX_CONV_IMPL when set (an A/B switch for whole commands), else 'cpu' on the CPU backend and
  'xla' elsewhere; 'xla' and 'patches' stay. Resolved when the module is traced."""
  _check_conv_impl(conv_impl)
  if conv_impl != 'auto':
    return conv_impl
  forced = os.environ.get(CONV_IMPL_ENV, '').strip()
  if forced and forced != 'auto':
    if forced not in CONV_IMPLS:
      raise ValueError(f'${CONV_IMPL_ENV}={forced!r} is not valid; choose one of {CONV_IMPLS}.')
    return forced
  return 'cpu' if jax.default_backend() == 'cpu' else 'xla'


def _pool_taps(x, window, strides, padding):
  """The strided slices of x padded with -inf that a max-pool window's taps read, tap-major (row-major window)."""
  (pad_top, pad_bottom), (pad_left, pad_right) = padding
  xp = jnp.pad(x, ((0, 0), (pad_top, pad_bottom), (pad_left, pad_right), (0, 0)), constant_values=-jnp.inf)
  batch, height, width, channels = xp.shape
  out_h, out_w = (height - window[0]) // strides[0] + 1, (width - window[1]) // strides[1] + 1
  taps = []
  for i in range(window[0]):
    for j in range(window[1]):
      limit = (batch, i + strides[0] * (out_h - 1) + 1, j + strides[1] * (out_w - 1) + 1, channels)
      taps.append(((i, j), lax.slice(xp, (0, i, j, 0), limit, (1, strides[0], strides[1], 1))))
  return xp.shape, taps


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool_slices(x, window, strides, padding):
  """`nn.max_pool(x, window, strides, padding)` (NHWC, -inf padding) as the maximum of the window's strided
  slices; its gradient, as XLA's, goes to the first maximum of each window (row-major window order), so both
  the value and the gradient equal the plain max pool's exactly, ties included. XLA:CPU computes the plain
  max pool's gradient through a variadic reduce-window with index arrays, several times slower."""
  _, taps = _pool_taps(x, window, strides, padding)
  return functools.reduce(jnp.maximum, [tap for _, tap in taps])


def _max_pool_slices_fwd(x, window, strides, padding):
  out = max_pool_slices(x, window, strides, padding)
  return out, (x, out)


def _max_pool_slices_bwd(window, strides, padding, residuals, g):
  x, out = residuals
  padded_shape, taps = _pool_taps(x, window, strides, padding)
  zero = jnp.zeros((), g.dtype)
  free = jnp.ones(out.shape, bool)  # windows whose maximum has not been claimed by an earlier tap
  grad = jnp.zeros(padded_shape, g.dtype)
  for (i, j), tap in taps:
    chosen = free & (tap == out)
    free = free & ~chosen
    config = (
      [(0, 0, 0)]
      + [
        (offset, size - offset - (stride * (n - 1) + 1), stride - 1)
        for offset, size, stride, n in zip((i, j), padded_shape[1:3], strides, out.shape[1:3])
      ]
      + [(0, 0, 0)]
    )
    grad = grad + lax.pad(jnp.where(chosen, g, zero), zero, config)
  (pad_top, _), (pad_left, _) = padding
  return (
    lax.slice(grad, (0, pad_top, pad_left, 0), (x.shape[0], pad_top + x.shape[1], pad_left + x.shape[2], x.shape[3])),
  )


max_pool_slices.defvjp(_max_pool_slices_fwd, _max_pool_slices_bwd)


def _make_layers(dtype: Dtype, use_running_average: bool, conv_impl: str = 'auto'):
  """Conv (bias-free, Kaiming fan-out) and BatchNorm (torch epsilon/momentum) factories."""
  conv = functools.partial(
    nn.Conv,
    use_bias=False,
    dtype=dtype,
    kernel_init=kaiming_normal_fan_out,
    conv_general_dilated=conv_function(conv_impl),
  )
  norm = functools.partial(
    nn.BatchNorm, use_running_average=use_running_average, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype
  )
  return conv, norm


class BasicBlock(nn.Module):
  """torchvision BasicBlock (ResNet-18/34): 3x3 conv-BN-ReLU, 3x3 conv-BN, + shortcut, ReLU.

  Input [B, H, W, C_in] -> output [B, ceil(H / stride), ceil(W / stride), width] in `dtype`.
  """

  width: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  use_running_average: bool = True
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    conv, norm = _make_layers(self.dtype, self.use_running_average, self.conv_impl)
    pad = ((1, 1), (1, 1))
    y = conv(self.width, (3, 3), strides=self.stride, padding=pad, name='conv1')(x)
    y = nn.relu(norm(name='bn1')(y))
    y = conv(self.width, (3, 3), padding=pad, name='conv2')(y)
    y = norm(name='bn2')(y)
    if self.stride != 1 or x.shape[-1] != self.width:
      x = conv(self.width, (1, 1), strides=self.stride, padding='VALID', name='downsample_conv')(x)
      x = norm(name='downsample_bn')(x)
    return nn.relu(y + x)


class Bottleneck(nn.Module):
  """torchvision Bottleneck (ResNet v1.5, stride on the 3x3 conv): 1x1 -> 3x3 -> 1x1 (x4), + shortcut.

  Input [B, H, W, C_in] -> output [B, ceil(H / stride), ceil(W / stride), 4 * width] in `dtype`.
  """

  width: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  use_running_average: bool = True
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    conv, norm = _make_layers(self.dtype, self.use_running_average, self.conv_impl)
    out_channels = 4 * self.width
    y = conv(self.width, (1, 1), padding='VALID', name='conv1')(x)
    y = nn.relu(norm(name='bn1')(y))
    y = conv(self.width, (3, 3), strides=self.stride, padding=((1, 1), (1, 1)), name='conv2')(y)
    y = nn.relu(norm(name='bn2')(y))
    y = conv(out_channels, (1, 1), padding='VALID', name='conv3')(y)
    y = norm(name='bn3')(y)
    if self.stride != 1 or x.shape[-1] != out_channels:
      x = conv(out_channels, (1, 1), strides=self.stride, padding='VALID', name='downsample_conv')(x)
      x = norm(name='downsample_bn')(x)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """ResNet-18/34/50 backbone in torchvision layout, without pooling and classifier.

  Attributes:
    depth: 18, 34 or 50.
    dtype: computation dtype (e.g. `jnp.bfloat16` on GPU/TPU); parameters and BN statistics stay float32,
      BN reductions run in float32.
    bn_mode: 'frozen' (running statistics always, never updated) or 'trainable' (see module docstring).
    conv_impl: 'auto', 'xla' or 'patches': how convs are computed, never what (module docstring).

  `__call__(x, train=False)`: x float [B, H, W, 3] (NHWC, ImageNet-normalised) -> last feature map
  [B, H', W', C] in `dtype`, C = `feature_channels(depth)`, H' = H / 32 for multiples of 32 (in general the
  PyTorch output size of the same strided stack, e.g. 8 for H = 225).
  """

  depth: int = 50
  dtype: Dtype = jnp.float32
  bn_mode: str = 'frozen'
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _check_depth(self.depth)
    _check_bn_mode(self.bn_mode)
    use_running_average = self.bn_mode == 'frozen' or not train
    conv, norm = _make_layers(self.dtype, use_running_average, self.conv_impl)
    kind, stage_sizes = RESNET_STAGES[self.depth]
    block_cls = Bottleneck if kind == 'bottleneck' else BasicBlock

    x = conv(64, (7, 7), strides=2, padding=((3, 3), (3, 3)), name='conv1')(x)
    x = nn.relu(norm(name='bn1')(x))
    if _use_cpu_path(self.conv_impl):
      x = max_pool_slices(x, (3, 3), (2, 2), ((1, 1), (1, 1)))  # the same values and gradients, faster on CPU
    else:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # pads with -inf
    for stage, (num_blocks, width) in enumerate(zip(stage_sizes, STAGE_WIDTHS), start=1):
      for block in range(num_blocks):
        stride = 2 if stage > 1 and block == 0 else 1
        x = block_cls(
          width,
          stride=stride,
          dtype=self.dtype,
          use_running_average=use_running_average,
          conv_impl=self.conv_impl,
          name=f'layer{stage}_{block}',
        )(x)
    return x


def global_pool(feature_map: jax.Array) -> jax.Array:
  """GAP + GMP, summed, in float32: [B, H, W, C] (any float dtype) -> [B, C] float32."""
  feature_map = feature_map.astype(jnp.float32)
  return jnp.mean(feature_map, axis=(1, 2)) + jnp.max(feature_map, axis=(1, 2))


def l2_normalize(x: jax.Array) -> jax.Array:
  """x / sqrt(sum x^2 + 1e-12) over the last axis (the official code's `l2_norm`)."""
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + L2_EPSILON)


class EmbeddingNet(nn.Module):
  """Metrix embedding network: ResNet -> GAP + GMP (summed) -> Dense(embedding_dim) -> L2 norm.

  Attributes:
    depth: backbone depth (18, 34, 50).
    embedding_dim: D (512 in every paper run).
    dtype: backbone computation dtype; the head (pooling, Dense, normalisation) always runs in float32.
    bn_mode: 'frozen' or 'trainable' (module docstring). Default 'frozen' = the official `bn_freeze=1`.
    conv_impl: 'auto' (default), 'xla' or 'patches' (module docstring; the variables are the same).

  Variables: {'params': {'backbone': ..., 'head': {'kernel' [C, D], 'bias' [D]}},
              'batch_stats': {'backbone': ...}}.

  Methods (each usable through `apply(variables, ..., method=...)`):
    `__call__(x, train=False) -> (embeddings [B, D] float32 unit-norm, feature_map [B, H', W', C] dtype)`;
    `features(x, train=False) -> feature_map`;
    `head(feature_map) -> embeddings` (e.g. on mixed feature maps);
    `project(pooled [B, C]) -> embeddings` (Dense + L2 on already pooled features).
  """

  depth: int = 50
  embedding_dim: int = 512
  dtype: Dtype = jnp.float32
  bn_mode: str = 'frozen'
  conv_impl: str = 'auto'

  def setup(self):
    self.backbone = ResNet(depth=self.depth, dtype=self.dtype, bn_mode=self.bn_mode, conv_impl=self.conv_impl)
    self.head_dense = nn.Dense(
      self.embedding_dim,
      dtype=jnp.float32,
      kernel_init=kaiming_normal_fan_out,
      bias_init=nn.initializers.zeros,
      name='head',
    )

  def features(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, 3] float images -> last feature map [B, H', W', C] in `dtype`."""
    return self.backbone(x, train=train)

  def project(self, pooled: jax.Array) -> jax.Array:
    """[B, C] pooled features -> [B, D] float32 unit-norm embeddings."""
    return l2_normalize(self.head_dense(pooled.astype(jnp.float32)))

  def head(self, feature_map: jax.Array) -> jax.Array:
    """[B, H', W', C] feature map (any float dtype, may be a mix of maps) -> [B, D] float32 embeddings."""
    return self.project(global_pool(feature_map))

  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """[B, H, W, 3] -> (embeddings [B, D] float32, feature_map [B, H', W', C] in `dtype`)."""
    feature_map = self.features(x, train=train)
    return self.head(feature_map), feature_map
