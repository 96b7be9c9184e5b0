"""On-device augmentation for training episodes.

Random parameters come from the sampler's CPU generator (so runs are reproducible
on any device); the pixel work is batched tensor indexing on the images' device.
"""

from __future__ import annotations

import torch


class FlipCrop:
    """Random horizontal flip and random crop after zero padding (the usual few-shot recipe)."""

    def __init__(self, padding: int = 4, flip: bool = True) -> None:
        self.padding = padding
        self.flip = flip

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        m, _, h, w = x.shape
        p = self.padding
        dev = x.device
        if self.flip:
            flip = (torch.rand(m, generator=generator) < 0.5).to(dev, non_blocking=True)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if p > 0:
            off = torch.randint(0, 2 * p + 1, (2, m), generator=generator).to(dev, non_blocking=True)
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            rows = (off[0].view(m, 1) + torch.arange(h, device=dev)).view(m, 1, h, 1)
            cols = (off[1].view(m, 1) + torch.arange(w, device=dev)).view(m, 1, 1, w)
            batch = torch.arange(m, device=dev).view(m, 1, 1, 1)
            chan = torch.arange(x.shape[1], device=dev).view(1, -1, 1, 1)
            x = padded[batch, chan, rows, cols]
        return x

    def __repr__(self) -> str:
        return f"FlipCrop(padding={self.padding}, flip={self.flip})"
