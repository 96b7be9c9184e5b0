"""Conv-4: the standard few-shot backbone (Vinyals et al. 2016, Snell et al. 2017, Finn et al. 2017).

Four blocks of [conv 3x3, 64 filters, BatchNorm, ReLU, 2x2 max-pool], then flatten:
64 features on 28x28 Omniglot, 1600 on 84x84 images.
"""

from __future__ import annotations

from torch import nn

from .registry import register


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=False),
        nn.MaxPool2d(2),
    )


class Conv4(nn.Sequential):
    def __init__(self, in_channels: int = 3, hidden: int = 64, depth: int = 4) -> None:
        layers = [conv_block(in_channels if i == 0 else hidden, hidden) for i in range(depth)]
        super().__init__(*layers, nn.Flatten())


@register("conv4")
def conv4(in_channels: int = 3, image_size: tuple[int, int] = (84, 84), hidden: int = 64, depth: int = 4) -> nn.Module:
    return Conv4(in_channels, hidden, depth)
