"""A torch ResNet-18/34/50 with torchvision's exact module structure and state-dict key names.

Used only by tests (torchvision is not a dependency): `resnet(depth).state_dict()` has the same keys, shapes
and layout as `torchvision.models.resnet{depth}().state_dict()` (320 entries and 25,557,032 parameters for
ResNet-50), and `forward_features` is torchvision's forward up to `layer4`. Written from torchvision's
`models/resnet.py` (v1.5: stride on the bottleneck's 3x3 conv).
"""

from __future__ import annotations

import torch
from torch import nn

STAGES = {18: ('basic', (2, 2, 2, 2)), 34: ('basic', (3, 4, 6, 3)), 50: ('bottleneck', (3, 4, 6, 3))}


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
    super().__init__()
    self.conv1 = conv3x3(inplanes, planes, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample
    self.stride = stride

  def forward(self, x):
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
      identity = self.downsample(x)
    return self.relu(out + identity)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
    super().__init__()
    self.conv1 = conv1x1(inplanes, planes)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = conv3x3(planes, planes, stride)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = conv1x1(planes, planes * self.expansion)
    self.bn3 = nn.BatchNorm2d(planes * self.expansion)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample
    self.stride = stride

  def forward(self, x):
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
      identity = self.downsample(x)
    return self.relu(out + identity)


class ResNet(nn.Module):
  def __init__(self, block, layers, num_classes: int = 1000):
    super().__init__()
    self.inplanes = 64
    self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(self.inplanes)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    self.layer1 = self._make_layer(block, 64, layers[0])
    self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
    self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
    self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512 * block.expansion, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)

  def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
        conv1x1(self.inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
      )
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward_features(self, x: torch.Tensor) -> torch.Tensor:
    """NCHW images -> layer4 output [B, C, H/32, W/32] (torchvision's forward before avgpool)."""
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc(torch.flatten(self.avgpool(self.forward_features(x)), 1))


def resnet(depth: int) -> ResNet:
  kind, layers = STAGES[depth]
  return ResNet(Bottleneck if kind == 'bottleneck' else BasicBlock, layers)


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
  """Random BN affine parameters and running statistics, so that a port that mixes them up fails."""
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(torch.rand(n, generator=generator) * 0.5 + 0.5)
        m.bias.copy_(torch.randn(n, generator=generator) * 0.1)
        m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
        m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


def embedding_head(feature_map: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
  """The official code's head: GAP + GMP (summed) -> Linear -> x / sqrt(sum x^2 + 1e-12). NCHW input."""
  pooled = feature_map.mean(dim=(2, 3)) + feature_map.amax(dim=(2, 3))
  x = linear(pooled)
  return x / torch.sqrt(torch.sum(x * x, dim=1, keepdim=True) + 1e-12)


def random_resnet(depth: int, seed: int = 0) -> ResNet:
  """A ResNet with random (Kaiming) weights and random BN affine parameters and statistics, in eval mode."""
  torch.manual_seed(seed)
  model = resnet(depth)
  randomize_batchnorm(model, torch.Generator().manual_seed(seed + 1))
  return model.eval()
