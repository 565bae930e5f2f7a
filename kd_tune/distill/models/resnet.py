"""The CIFAR ResNets of the knowledge-distillation literature: He et al. (2016), "Deep Residual Learning for Image
Recognition", section 4.2, as RepDistiller (Tian et al., 2020, "Contrastive Representation Distillation") ships them:
``resnet{8,14,20,32,44,56,110}`` with 16/16/32/64 filters and the wider ``resnet{8,32}x4`` with 32/64/128/256.

    Conv3x3(f0) -> BN -> ReLU -> 3 stages of n BasicBlocks (f1, f2, f3 filters; stride 1, 2, 2) -> global average pool
    -> Linear(num_classes), with depth = 6n + 2.

BatchNorm keeps running statistics: in training mode a batch's, in eval mode the running ones (teachers' logits and
every evaluation are computed in eval mode). Weights start as RepDistiller's: Kaiming-normal convolutions
(fan-out), BatchNorm weight 1 and bias 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd_tune.distill.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, filters: tuple[int, int, int, int], in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth {depth}: a CIFAR ResNet has depth 6n + 2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_shape[0], filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        stages: list[nn.Module] = []
        inplanes = filters[0]
        for planes, stride in zip(filters[1:], (1, 2, 2), strict=True):
            for i in range(n):
                stages.append(BasicBlock(inplanes, planes, stride if i == 0 else 1))
                inplanes = planes
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _register(depth: int, filters: tuple[int, int, int, int], name: str) -> None:
    def factory(in_shape: tuple[int, int, int], num_classes: int) -> CifarResNet:
        return CifarResNet(depth, filters, in_shape, num_classes)

    factory.__doc__ = f"The registry's ``{name}``: a CIFAR ResNet of depth {depth}, filters {filters}."
    register_model(name)(factory)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(_depth, (16, 16, 32, 64), f"resnet{_depth}")
for _depth in (8, 32):
    _register(_depth, (32, 64, 128, 256), f"resnet{_depth}x4")
