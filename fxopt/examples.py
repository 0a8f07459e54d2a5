"""Built-in example models (random weights, no downloads), for the demo and the benchmarks."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Bottleneck(nn.Module):
    """ResNet-50's bottleneck: 1x1 -> 3x3 -> 1x1 convs, each followed by BatchNorm, plus a shortcut."""

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """ResNet-50-shaped classifier (3-4-6-3 bottlenecks). ``width`` scales every channel count."""

    def __init__(self, num_classes: int = 1000, width: int = 64):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width)
        self.relu, self.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        layers, cin = [], width
        for i, (blocks, stride) in enumerate([(3, 1), (4, 2), (6, 2), (3, 2)]):
            w = width * 2**i
            stage = [Bottleneck(cin, w, stride)] + [Bottleneck(w * 4, w) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*stage))
            cin = w * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style BatchNorm + activation: the BatchNorm is an F.batch_norm call on its own tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return F.relu(x)


class FunctionalBNNet(nn.Module):
    """A conv stack whose BatchNorms are functional calls: torch.fx's fuse() folds none of them."""

    def __init__(self, width: int = 64, depth: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 2, 1, bias=False)
        self.stem_bn = BatchNormAct2d(width)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, 1, 1, bias=False) for _ in range(depth))
        self.bns = nn.ModuleList(BatchNormAct2d(width) for _ in range(depth))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_bn(self.stem(x))
        for conv, bn in zip(self.convs, self.bns):
            x = bn(conv(x))
        return self.head(x.mean((2, 3)))


def randomize_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, as a trained model has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def resnet50(width: int = 64) -> nn.Module:
    return randomize_batch_norms(ResNet50(width=width)).eval()


def functional_bn_net(width: int = 64) -> nn.Module:
    return randomize_batch_norms(FunctionalBNNet(width=width)).eval()


EXAMPLES = {"resnet50": resnet50, "functional_bn_net": functional_bn_net}
