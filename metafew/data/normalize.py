"""The one normalisation of images: uint8 ``0..255`` to float ``(x / 255 - mean) / std``, per channel, on the device.

Datasets state their ``mean``/``std`` in ``[0, 1]`` units (:attr:`FewShotDataset.mean`);
everything that turns their uint8 images into network inputs goes through
:class:`Normalize`: the episode sampler, ``FewShotDataset[i]``, pretraining batches,
Lake's runs and the preprocessing of ``metafew adapt``/``predict``.

Two equivalent forms, each bit-identical to what its callers computed before:

* ``norm(x)``: ``x.float() / 255``, minus ``mean``, divided by ``std`` (the reference form).
* ``norm.into_(out, x)``: ``out = x * scale + shift`` with ``scale = 1 / (255 std)`` and
  ``shift = -mean / std``: one multiply-add written into a preallocated float buffer,
  which the episode sampler runs a cache-sized chunk at a time.

>>> import torch
>>> norm = Normalize((0.5,), (0.25,))
>>> norm(torch.tensor([[[[0, 255]]]], dtype=torch.uint8)).tolist()
[[[[-2.0, 2.0]]]]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import DatasetError

__all__ = ["Normalize", "channel_stats"]


class Normalize:
    """Per-channel ``(x / 255 - mean) / std`` of uint8 images ``[..., C, H, W]``, on their device.

    Args:
        mean, std: one value per channel, in ``[0, 1]`` units.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != len(self.std) or not self.mean:
            raise DatasetError(f"normalisation needs one mean and one std per channel, got {self.mean} / {self.std}")
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._affine: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def identity(cls, channels: int) -> Normalize:
        """Only ``x / 255``: mean 0 and std 1 on every channel."""
        return cls((0.0,) * channels, (1.0,) * channels)

    @property
    def channels(self) -> int:
        """Number of channels it normalises."""
        return len(self.mean)

    def stats(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` as float32 ``[C, 1, 1]`` tensors on ``device`` (made once per device)."""
        dev = torch.device(device if device is not None else "cpu")
        if dev not in self._stats:
            mean = torch.tensor(self.mean, device=dev).view(-1, 1, 1)
            std = torch.tensor(self.std, device=dev).view(-1, 1, 1)
            self._stats[dev] = (mean, std)
        return self._stats[dev]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised float32 images of the same shape, on the images' device.

        uint8 input is read as ``0..255``; float input as already in ``[0, 1]`` (e.g. after
        resizing) and is never modified in place.
        """
        mean, std = self.stats(images.device)
        if images.dtype == torch.uint8:
            return images.float().div_(255).sub_(mean).div_(std)  # a fresh tensor: in place is safe
        return (images.float() - mean) / std

    def scale_shift(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)`` float32 ``[1, C, 1, 1]`` on ``device`` with ``x * scale + shift`` the normalised uint8 ``x``."""
        dev = torch.device(device if device is not None else "cpu")
        if dev not in self._affine:
            mean = torch.tensor(self.mean).view(1, -1, 1, 1)
            std = torch.tensor(self.std).view(1, -1, 1, 1)
            self._affine[dev] = ((1.0 / (255.0 * std)).to(dev), (-mean / std).to(dev))
        return self._affine[dev]

    def into_(self, out: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Write the normalised uint8 ``images [M, C, H, W]`` into the float32 buffer ``out`` (same shape); return it."""
        scale, shift = self.scale_shift(out.device)
        out.copy_(images)  # widen uint8 -> float32
        return out.mul_(scale).add_(shift)  # addcmul on uint8 takes a slow promotion path

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


def channel_stats(images: np.ndarray) -> np.ndarray:
    """Per-channel mean and std of uint8 ``[N, C, H, W]`` in ``[0, 1]`` units, ``[2, C]`` float64 (exact, in chunks).

    A constant channel gets std 1 (not 0), so normalising by it never divides by zero.
    """
    c = images.shape[1]
    s = np.zeros(c)
    ss = np.zeros(c)
    n = 0
    for i in range(0, len(images), 4096):
        x = images[i : i + 4096].astype(np.float64) / 255.0
        s += x.sum(axis=(0, 2, 3))
        ss += (x * x).sum(axis=(0, 2, 3))
        n += x.shape[0] * x.shape[2] * x.shape[3]
    if n == 0:
        return np.stack([np.full(c, 0.5), np.full(c, 0.5)])
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean**2, 0.0))
    return np.stack([mean, np.where(std > 0, std, 1.0)])
