"""ResNet-12: the standard few-shot residual backbone.

As in TADAM (Oreshkin et al. 2018), MetaOptNet (Lee et al. 2019), FEAT (Ye et al.
2020) and Meta-Baseline (Chen et al. 2021): four residual blocks, each of three
[conv 3x3, BatchNorm, LeakyReLU(0.1)] layers (no activation after the third
BatchNorm before the residual sum) with a [conv 1x1, BatchNorm] shortcut,
LeakyReLU after the sum, then a 2x2 max-pool. Widths 64-160-320-640, global
average pooling at the end: 640 features for any input size (28x28 Omniglot:
28->14->7->3->1; 84x84 miniImageNet: 84->42->21->10->5).

DropBlock (used by MetaOptNet on miniImageNet) is left out; ``drop_rate`` adds
plain dropout after each block instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .inputs import check_images
from .registry import register


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)


class ResNet12Block(nn.Module):
    """Three conv3x3-BN(-LeakyReLU) layers plus a 1x1 conv-BN shortcut, then a 2x2 max-pool."""

    def __init__(self, in_channels: int, out_channels: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv3 = _conv3x3(out_channels, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.act(out + self.shortcut(x))
        return self.dropout(self.pool(out))


class ResNet12(nn.Module):
    """Four :class:`ResNet12Block` s and global average pooling: ``[M, C, H, W] -> [M, widths[-1]]``."""

    options: dict[str, Any]  # set by the resnet12 factory, for checkpoints

    def __init__(
        self, in_channels: int = 3, widths: Sequence[int] = (64, 160, 320, 640), drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"resnet12 needs 4 positive widths, got {widths}")
        chans = [in_channels, *widths]
        self.expects_channels = in_channels
        self.layers = nn.Sequential(*(ResNet12Block(chans[i], chans[i + 1], drop_rate) for i in range(4)))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = widths[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu", a=0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``[N, widths[-1]]`` of images ``[N, C, H, W]`` (any size of at least 16x16)."""
        check_images("resnet12", x, self.expects_channels, min_size=16, hint="4 max-pools need 16 px a side")
        return self.pool(self.layers(x)).flatten(1)


@register("resnet12")
def resnet12(
    in_channels: int = 3,
    image_size: tuple[int, int] = (84, 84),
    widths: Sequence[int] = (64, 160, 320, 640),
    drop_rate: float = 0.0,
) -> nn.Module:
    """ResNet-12 with the given block widths; ``image_size`` must be at least 16 px (4 poolings)."""
    if min(image_size) < 16:
        raise ValueError(f"resnet12 needs images of at least 16x16 (4 max-pools), got {image_size}")
    model = ResNet12(in_channels, widths, drop_rate)
    model.options = {"widths": [int(w) for w in widths], "drop_rate": float(drop_rate)}  # for checkpoints
    return model
