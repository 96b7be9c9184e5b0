"""Cheap checks of the images a backbone is fed, so a wrong size fails with one clear line.

Without them a Conv-4 built for 84x84 images and fed 28x28 ones fails deep in a learner's
head with torch's "mat1 and mat2 shapes cannot be multiplied (5x64 and 1600x5)". The checks
read only ``x.shape`` (no device sync, nothing computed), so they cost nothing per step.
"""

from __future__ import annotations

import torch

from ..errors import InputShapeError


def describe_shape(x: torch.Tensor) -> str:
    """``[N, C, H, W]`` with the batch size written as N: the image format, not the batch."""
    return "[N, " + ", ".join(str(d) for d in x.shape[1:]) + "]"


def check_images(
    name: str,
    x: torch.Tensor,
    in_channels: int,
    *,
    min_size: int = 1,
    image_size: tuple[int, int] | None = None,
    hint: str = "",
) -> None:
    """Raise InputShapeError unless ``x`` is ``[N, in_channels, H, W]`` with ``H, W >= min_size``.

    ``image_size`` (for a backbone whose features depend on the size) is named in the
    message as the size the backbone was built for.
    """
    if x.dim() != 4:
        raise InputShapeError(f"{name} backbone takes images [N, C, H, W], got a tensor of shape {list(x.shape)}")
    built = f"{image_size[0]}x{image_size[1]}" if image_size is not None else None
    if x.shape[1] != in_channels:
        size = f", {built}" if built else ""
        raise InputShapeError(
            f"{name} backbone expects {in_channels}-channel images{size}, got {describe_shape(x)}; "
            f"build it with in_channels={x.shape[1]} or convert the images"
        )
    h, w = int(x.shape[2]), int(x.shape[3])
    if min(h, w) < min_size:
        raise InputShapeError(
            f"{name} backbone needs images of at least {min_size}x{min_size}, got {h}x{w}"
            + (f"; {hint}" if hint else "")
        )
