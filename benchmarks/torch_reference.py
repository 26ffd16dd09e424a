"""PyTorch reference train step for `bench_train.py`: what the official code runs, and what a strong user runs.

ResNet-50 (torchvision with random weights when installed, else `tests/reference/torch_resnet.py`, the same
module structure written out) -> GAP + GMP (summed) -> Linear(2048 -> 512) -> L2 normalisation; Multi-Similarity
loss (spec 1.4: PML `MultiSimilarityLoss(17.97, 75.66, 0.77)` fed by `MultiSimilarityMiner(0.39)`, written out
here so no pytorch_metric_learning is needed; `tests/test_benchmarks.py` checks it against PML); the official
optimiser: element-wise clip to [-10, 10], Adam with coupled L2 weight decay 1e-4. BN as the official
`bn_freeze=1` after warm-up with warm = 0 (the JAX benchmark's configuration): running statistics frozen (BN in
eval mode), BN gamma/beta frozen, everything else trains.

Variants (`make_step(..., variant=)`):
  * 'fp32': float32 eager, NCHW (the official code);
  * 'bf16_cl': bfloat16 autocast + channels_last + cudnn.benchmark (what a strong PyTorch user does).
Input: float32 images already normalised, NCHW, on the device (the official DataLoader normalises on the CPU; the
JAX step instead takes uint8 and normalises inside the step, so this favours PyTorch slightly).
"""

from __future__ import annotations

import importlib.util
import math
import os
import time

import torch
from torch import nn

MS_HPARAMS = dict(alpha=17.97, beta=75.66, base=0.77, epsilon=0.39)  # spec 1.4 (official code)
VARIANTS = ('fp32', 'bf16_cl')


def _resnet(depth: int) -> nn.Module:
  """torchvision's resnet{depth}() with random weights, or the repo's written-out copy when it is absent."""
  try:
    import torchvision  # pylint: disable=g-import-not-at-top

    return getattr(torchvision.models, f'resnet{depth}')(weights=None), 'torchvision ' + torchvision.__version__
  except ImportError:
    path = os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests', 'reference', 'torch_resnet.py'
    )
    spec = importlib.util.spec_from_file_location('metrix_torch_resnet', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.resnet(depth), 'tests/reference/torch_resnet.py (torchvision not installed)'


class EmbeddingNet(nn.Module):
  """ResNet backbone (fc removed) + the official head. NCHW float images -> float32 [B, 512], unit norm."""

  def __init__(self, depth: int = 50, embedding_dim: int = 512):
    super().__init__()
    self.backbone, self.source = _resnet(depth)
    self.backbone.fc = nn.Identity()
    channels = 2048 if depth >= 50 else 512
    self.linear = nn.Linear(channels, embedding_dim)
    nn.init.kaiming_normal_(self.linear.weight, mode='fan_out')
    nn.init.zeros_(self.linear.bias)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b = self.backbone
    x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
    x = b.layer4(b.layer3(b.layer2(b.layer1(x))))
    pooled = x.mean(dim=(2, 3)) + x.amax(dim=(2, 3))
    e = self.linear(pooled).float()
    return e / torch.sqrt(torch.sum(e * e, dim=1, keepdim=True) + 1e-12)


def multi_similarity_loss(
  embeddings: torch.Tensor,
  labels: torch.Tensor,
  *,
  alpha: float = 17.97,
  beta: float = 75.66,
  base: float = 0.77,
  epsilon: float = 0.39,
) -> torch.Tensor:
  """PML MultiSimilarityMiner(epsilon) + MultiSimilarityLoss(alpha, beta, base), written out. Scalar.

  embeddings: float32 [B, D] (unit norm; cosine similarity); labels: int [B]. Mining (no gradient): positive p of
  anchor i kept if s_ip - eps < max_n s_in; negative n kept if s_in + eps > min_p s_ip. Per anchor
  (1/alpha) log(1 + sum_p e^{-alpha (s - base)}) + (1/beta) log(1 + sum_n e^{beta (s - base)}); mean over all B.
  """
  sim = embeddings @ embeddings.t()
  same = labels[:, None] == labels[None, :]
  eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
  pos, neg = same & ~eye, ~same
  with torch.no_grad():
    inf = torch.tensor(math.inf, device=sim.device, dtype=sim.dtype)
    hardest_neg = torch.where(neg, sim, -inf).amax(dim=1, keepdim=True)
    easiest_pos = torch.where(pos, sim, inf).amin(dim=1, keepdim=True)
    pos_kept = pos & (sim - epsilon < hardest_neg)
    neg_kept = neg & (sim + epsilon > easiest_pos)

  def softplus_sum(logits, mask):  # log(1 + sum_mask e^logits), log-sum-exp safe, 0 when the mask is empty
    logits = torch.where(mask, logits, torch.full_like(logits, -math.inf))
    zero = torch.zeros_like(logits[:, :1])
    return torch.logsumexp(torch.cat([zero, logits], dim=1), dim=1)

  pos_term = softplus_sum(-alpha * (sim - base), pos_kept) / alpha
  neg_term = softplus_sum(beta * (sim - base), neg_kept) / beta
  return (pos_term + neg_term).mean()


def make_step(
  model: EmbeddingNet, *, variant: str, lr: float = 1e-4, weight_decay: float = 1e-4, clip_value: float = 10.0
):
  """(images NCHW float32, labels) -> loss: one official optimiser step. Prepares `model` for the variant."""
  if variant not in VARIANTS:
    raise ValueError(f'Unknown PyTorch variant {variant!r}; valid choices: {", ".join(VARIANTS)}.')
  model.train()
  for m in model.modules():  # bn_freeze=1, warm=0: running stats and gamma/beta frozen
    if isinstance(m, nn.BatchNorm2d):
      m.eval()
      for p in m.parameters():
        p.requires_grad_(False)
  bf16 = variant == 'bf16_cl'
  device_type = next(model.parameters()).device.type
  if bf16:
    model.to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = True
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)

  def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if bf16:
      images = images.contiguous(memory_format=torch.channels_last)
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16):
      embeddings = model(images)
    loss = multi_similarity_loss(embeddings.float(), labels, **MS_HPARAMS)
    loss.backward()
    torch.nn.utils.clip_grad_value_(params, clip_value)
    opt.step()
    return loss

  return step


def _sync(device: torch.device):
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalized_nchw(images_uint8) -> torch.Tensor:
  """uint8 [B, H, W, 3] (numpy) -> float32 [B, 3, H, W], ImageNet mean/std (what the official DataLoader gives)."""
  x = torch.as_tensor(images_uint8).permute(0, 3, 1, 2).float() / 255.0
  return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def time_variant(
  variant: str, *, depth: int, images_uint8, labels, steps: int, warmup: int, device: str | None = None, seed: int = 0
) -> dict:
  """Times `steps` steps after `warmup` (device-synchronised) on one fixed device-resident batch.

  images_uint8: uint8 [B, H, W, 3]; labels: int [B]. Returns images/s, ms/step, peak memory (CUDA), last loss.
  """
  device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
  torch.manual_seed(seed)
  model = EmbeddingNet(depth).to(device)
  step = make_step(model, variant=variant)
  images = normalized_nchw(images_uint8).to(device)
  batch_size = images.shape[0]
  labels = torch.as_tensor(labels, dtype=torch.int64, device=device)
  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats(device)
  for _ in range(warmup):
    loss = step(images, labels)
  _sync(device)
  start = time.perf_counter()
  for _ in range(steps):
    loss = step(images, labels)
  _sync(device)
  seconds = (time.perf_counter() - start) / steps
  peak = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else None
  result = dict(
    variant=variant,
    images_per_s=batch_size / seconds,
    ms_per_step=1000 * seconds,
    peak_bytes=peak,
    loss=float(loss.detach()),
    source=model.source,
    device=str(device),
  )
  del model, step, images
  if device.type == 'cuda':
    torch.cuda.empty_cache()
  return result


def describe_device() -> str:
  if torch.cuda.is_available():
    return f'torch {torch.__version__}, {torch.cuda.get_device_name(0)}'
  return f'torch {torch.__version__}, CPU ({torch.get_num_threads()} threads)'
