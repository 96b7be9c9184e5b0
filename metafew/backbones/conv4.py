"""Conv-4: the standard few-shot backbone (Vinyals et al. 2016, Snell et al. 2017, Finn et al. 2017).

Four blocks of [conv 3x3, 64 filters, BatchNorm, ReLU, 2x2 max-pool], then flatten:
64 features on 28x28 Omniglot, 1600 on 84x84 images (``create("conv4")`` builds it for
``image_size=84``, the miniImageNet size, unless told otherwise).

With the default ``pool="flatten"`` the number of features depends on the image size, so
the backbone is built for one: fed images whose final feature map differs (28x28 images
into a Conv-4 built for 84x84), its forward raises a one-line
:class:`~metafew.errors.InputShapeError` naming both sizes, instead of torch's "mat1 and
mat2 shapes cannot be multiplied" further on. ``pool="avg"`` averages the last feature map
instead (global average pooling, as ResNet-12 does): ``hidden`` features for any image of at
least ``2**depth`` pixels a side.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError, InputShapeError
from .inputs import check_images, describe_shape
from .registry import register
from .weights import ShippedWeights, register_weights


class ChannelsLastConv2d(nn.Conv2d):
    """``nn.Conv2d`` computed in channels-last layout, whatever the layout of its weight and input.

    oneDNN's convolutions and PyTorch's max-pool, BatchNorm and ReLU are vectorised over channels in
    this layout: on one CPU core a Conv-4 training step on 80 images is 1.5x (float32) / 2.4x (bf16)
    faster and evaluation 2.3x / 3.7x faster than in NCHW (benchmarks/channels_last.py; RESULTS.md,
    "CPU speed"). The output is
    channels-last, so the layers after it stay so. Parameters stay NCHW (state dicts, MAML's fast
    weights and checkpoints are unchanged); reordering a 3x3 weight costs nothing beside a batch
    of activations. Inside ``torch.func.vmap`` (batched tensors have no memory format) it is a
    plain convolution.
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not (_batched(input) or _batched(weight)):
            # .to, not .contiguous: with one channel (grayscale input) both layouts count as contiguous
            # and .contiguous keeps the NCHW strides, which oneDNN then follows
            weight = weight.to(memory_format=torch.channels_last)
            input = input.to(memory_format=torch.channels_last)
        return super()._conv_forward(input, weight, bias)


def _batched(x: torch.Tensor) -> bool:
    """Whether ``x`` is batched by torch.func.vmap at any level (batched tensors take no memory format)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(x):  # grad / vmap wrappers, outermost first
        if functorch.is_batchedtensor(x):
            return True
        x = functorch.get_unwrapped(x)
    return False


def conv_block(in_channels: int, out_channels: int, channels_last: bool = True) -> nn.Sequential:
    """[conv 3x3 (padding 1), BatchNorm, ReLU, 2x2 max-pool]: halves each side (rounding down)."""
    conv = ChannelsLastConv2d if channels_last else nn.Conv2d
    return nn.Sequential(
        conv(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=False),
        nn.MaxPool2d(2),
    )


class Conv4(nn.Sequential):
    """``depth`` conv blocks, then flatten (``pool="flatten"``) or global average pooling (``pool="avg"``).

    ``image_size`` (with ``pool="flatten"``) is the size the features are counted for: its
    ``out_features`` is ``hidden * (H >> depth) * (W >> depth)``, and images giving another
    final map are refused in ``forward``. Without it (``Conv4()`` built directly) the size is
    not checked and ``out_features`` is left unset.
    """

    def __init__(
        self,
        in_channels: int = 3,
        hidden: int = 64,
        depth: int = 4,
        image_size: tuple[int, int] | None = None,
        pool: Literal["flatten", "avg"] = "flatten",
        channels_last: bool = True,
    ) -> None:
        if pool not in ("flatten", "avg"):
            raise ConfigError(f"conv4: pool must be 'flatten' or 'avg', got {pool!r}")
        if depth < 1 or hidden < 1:
            raise ConfigError(f"conv4: depth and hidden must be positive, got depth={depth}, hidden={hidden}")
        layers: list[nn.Module] = [
            conv_block(in_channels if i == 0 else hidden, hidden, channels_last) for i in range(depth)
        ]
        if pool == "avg":
            layers.append(nn.AdaptiveAvgPool2d(1))  # no parameters: block indices (state dict names) are unchanged
        super().__init__(*layers, nn.Flatten())
        self.pool_mode = pool
        self.hidden = hidden
        self.depth = depth
        self.expects = (in_channels, image_size)
        if pool == "avg":
            self.out_features = hidden
        elif image_size is not None:
            self.out_features = hidden * (image_size[0] >> depth) * (image_size[1] >> depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Features ``[N, out_features]`` of images ``[N, C, H, W]``; a wrong format is a one-line error."""
        channels, size = self.expects
        min_size = 1 << self.depth
        hint = "smaller images lose their last feature map to the max-pools; use a smaller depth or upsample"
        check_images("conv4", x, channels, min_size=min_size, image_size=size, hint=hint)
        if self.pool_mode == "flatten" and size is not None:
            d = self.depth
            h, w = int(x.shape[2]), int(x.shape[3])
            if (h >> d, w >> d) != (size[0] >> d, size[1] >> d):
                raise InputShapeError(
                    f"conv4 backbone was built for {size[0]}x{size[1]} images ({self.out_features} features) "
                    f"but got {describe_shape(x)} images ({self.hidden * (h >> d) * (w >> d)} features); "
                    f"build it with image_size={h if h == w else (h, w)}, resize the images, or use pool='avg' "
                    "(global average pooling: any size)"
                )
        return super().forward(x)


@register("conv4")
def conv4(
    in_channels: int = 3,
    image_size: tuple[int, int] = (84, 84),
    hidden: int = 64,
    depth: int = 4,
    pool: Literal["flatten", "avg"] = "flatten",
    channels_last: bool = True,
) -> nn.Module:
    """Conv-4 for ``image_size`` images (default 84x84): flattened features, or ``pool="avg"`` for any size.

    ``channels_last=False`` computes in NCHW (:class:`ChannelsLastConv2d` says what the default buys);
    the weights are the same either way.
    """
    if min(image_size) < (1 << depth):
        raise ConfigError(
            f"conv4 with depth {depth} needs images of at least {1 << depth}x{1 << depth} "
            f"({depth} 2x2 max-pools), got {image_size[0]}x{image_size[1]}"
        )
    size = (int(image_size[0]), int(image_size[1]))
    return Conv4(in_channels, hidden, depth, image_size=size, pool=pool, channels_last=channels_last)


# -- pretrained Conv-4 backbones shipped with metafew (files in backbones/weights/) -------------------------
# Each was made by the command shown, on a 2-core CPU, and its check figure (ProtoNet without
# meta-training on 100 fixed episodes of classes the backbone never saw) is re-measured by
# tests/test_shipped_weights.py.
register_weights(
    ShippedWeights(
        name="omniglot-conv4",
        arch="conv4",
        weights="omniglot",
        file="omniglot-conv4.safetensors",
        description="Omniglot, Vinyals et al.'s 1,028 training characters x 4 rotations (4,112 classes, 28x28, "
        "grayscale); the epoch kept is the best on the validation classes; the omniglot-pretrained and quick suites' backbone",
        command="metafew pretrain --dataset omniglot --subset train --val-subset val --keep best --backbone conv4 "
        "--epochs 5 --lr 0.1 --amp bf16 --out omniglot-conv4 --device cpu",
        check={
            "dataset": "omniglot",
            "subset": "val",
            "n_way": 5,
            "k_shot": 1,
            "episodes": 100,
            "accuracy": 0.9808000046014785,
        },
    )
)
register_weights(
    ShippedWeights(
        name="omniglot-background-conv4",
        arch="conv4",
        weights="omniglot-background",
        file="omniglot-background-conv4.safetensors",
        description="Omniglot, Lake et al.'s 30 background alphabets (964 characters, 28x28, grayscale); "
        "the medical suite's Omniglot backbone",
        command="metafew pretrain --dataset omniglot-lake --subset background --backbone conv4 --epochs 20 "
        "--lr 0.05 --out omniglot-background-conv4 --device cpu",
        check={
            "dataset": "omniglot-lake",
            "subset": "evaluation",
            "n_way": 5,
            "k_shot": 1,
            "episodes": 100,
            "accuracy": 0.9621333384513855,
        },
    )
)
register_weights(
    ShippedWeights(
        name="caltech101-conv4",
        arch="conv4",
        weights="caltech101",
        file="caltech101-conv4.safetensors",
        description="Caltech-101, the 65 training classes of metafew's seeded split (28x28, RGB); "
        "the medical suite's Caltech-101 backbone",
        command="metafew pretrain --dataset caltech101 --subset train --dataset-option image_size=28 "
        "--backbone conv4 --epochs 30 --lr 0.05 --out caltech101-conv4 --device cpu",
        check={
            "dataset": "caltech101",
            "subset": "val",
            "options": {"image_size": 28},
            "n_way": 5,
            "k_shot": 5,
            "episodes": 100,
            "accuracy": 0.6221333348751068,
        },
    )
)
