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

BatchNorm mode (`bn_mode`, a field of both modules):
* `'frozen'` (official recipe, `bn_freeze=1`): BN always normalises with the running statistics, which are never
  updated, `train` or not. gamma/beta stay ordinary parameters: whether they train is the optimiser's business
  (warm-up mask in `metrix_jax.optim`).
* `'trainable'`: `train=True` normalises with batch statistics and updates `batch_stats` (pass
  `mutable=['batch_stats']` to `apply`); `train=False` uses the running statistics.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any

BN_MODES = ('frozen', 'trainable')

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


def _make_layers(dtype: Dtype, use_running_average: bool):
  """Conv (bias-free, Kaiming fan-out) and BatchNorm (torch epsilon/momentum) factories."""
  conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype, kernel_init=kaiming_normal_fan_out)
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

  @nn.compact
  def __call__(self, x):
    conv, norm = _make_layers(self.dtype, self.use_running_average)
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

  @nn.compact
  def __call__(self, x):
    conv, norm = _make_layers(self.dtype, self.use_running_average)
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

  `__call__(x, train=False)`: x float [B, H, W, 3] (NHWC, ImageNet-normalised) -> last feature map
  [B, H', W', C] in `dtype`, C = `feature_channels(depth)`, H' = H / 32 for multiples of 32 (in general the
  PyTorch output size of the same strided stack, e.g. 8 for H = 225).
  """

  depth: int = 50
  dtype: Dtype = jnp.float32
  bn_mode: str = 'frozen'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _check_depth(self.depth)
    _check_bn_mode(self.bn_mode)
    use_running_average = self.bn_mode == 'frozen' or not train
    conv, norm = _make_layers(self.dtype, use_running_average)
    kind, stage_sizes = RESNET_STAGES[self.depth]
    block_cls = Bottleneck if kind == 'bottleneck' else BasicBlock

    x = conv(64, (7, 7), strides=2, padding=((3, 3), (3, 3)), name='conv1')(x)
    x = nn.relu(norm(name='bn1')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # pads with -inf
    for stage, (num_blocks, width) in enumerate(zip(stage_sizes, STAGE_WIDTHS), start=1):
      for block in range(num_blocks):
        stride = 2 if stage > 1 and block == 0 else 1
        x = block_cls(
          width, stride=stride, dtype=self.dtype, use_running_average=use_running_average, name=f'layer{stage}_{block}'
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

  def setup(self):
    self.backbone = ResNet(depth=self.depth, dtype=self.dtype, bn_mode=self.bn_mode)
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
