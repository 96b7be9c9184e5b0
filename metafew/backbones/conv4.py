"""Conv-4: the standard few-shot backbone (Vinyals et al. 2016, Snell et al. 2017, Finn et al. 2017).

Four blocks of [conv 3x3, 64 filters, BatchNorm, ReLU, 2x2 max-pool], then flatten:
64 features on 28x28 Omniglot, 1600 on 84x84 images.
"""

from __future__ import annotations

from torch import nn

from .registry import register
from .weights import ShippedWeights, register_weights


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
