"""Baselines that need no backbone, scored beside the model on the same draws.

If a pretrained backbone does not beat a classifier on the raw pixels, it is not
helping. :func:`metafew.adaptation.estimate.estimate` scores two such baselines on
every draw's support set and held-out images:

* ``nearest_mean_pixels``: nearest class mean (Euclidean) on standardised pixels;
* ``logistic_pixels``: a multinomial logistic-regression probe on the same pixels,
  fitted by a fixed number of L-BFGS iterations with weight decay (from zero weights,
  so the same support set always gives the same probe).

Both give logits; :func:`log_probabilities` turns them into the log-probabilities that
the estimate scores, as it scores the model's (accuracy from their argmax, macro
one-vs-rest AUC from their ranking, :func:`metafew.adaptation.metrics.compute_metrics`):

* nearest class mean: the softmax of minus the squared Euclidean distances to the class
  means, the head ProtoNet puts on its features (here on the pixels themselves; the
  posterior of Gaussian classes with a shared isotropic covariance and equal priors);
* logistic probe: its own softmax, the probabilities it was fitted to.

Neither is calibrated (the distance scale grows with the number of pixels), which does
not change the accuracy or the AUC.

Pixels are ``[0, 255] -> [0, 1]``, average-pooled to at most :data:`MAX_SIDE` per side
(a 224x224 image would otherwise give 150k features per image), flattened, and
standardised by the support set's per-feature mean and standard deviation (a feature
constant on the support set is only centred). Pure torch, on whatever device the
images are on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_SIDE = 32  # pixels per side the baselines see at most
LOGISTIC_STEPS = 100  # L-BFGS iterations
WEIGHT_DECAY = 1e-3  # on the mean cross-entropy, times ||W||^2 / 2

BASELINES: dict[str, str] = {
    "nearest_mean_pixels": "nearest class mean on standardised pixels",
    "logistic_pixels": "logistic regression on standardised pixels",
}

__all__ = [
    "BASELINES",
    "FUNCTIONS",
    "BaselineFn",
    "log_probabilities",
    "logistic_pixels",
    "nearest_mean_pixels",
    "pixel_features",
    "standardise",
]

BaselineFn = Callable[[Tensor, Tensor, Tensor, int], Tensor]


def pixel_features(images: Tensor, max_side: int = MAX_SIDE, chunk: int = 256) -> Tensor:
    """Float ``[M, D]`` pixel features of images ``[M, C, H, W]`` (uint8 0..255 or float 0..1), in chunks."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    h, w = images.shape[-2:]
    out = []
    for i in range(0, len(images), chunk):
        x = images[i : i + chunk]
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        if h > max_side or w > max_side:
            x = F.adaptive_avg_pool2d(x, (min(h, max_side), min(w, max_side)))
        out.append(x.flatten(1))
    if not out:
        side = (min(h, max_side), min(w, max_side))
        return torch.zeros(0, images.shape[1] * side[0] * side[1], device=images.device)
    return torch.cat(out)


def standardise(support: Tensor, query: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``(support, query)`` standardised by the support set's per-feature mean and std."""
    mean = support.mean(0, keepdim=True)
    std = support.std(0, correction=0, keepdim=True)
    std = torch.where(std > eps, std, torch.ones_like(std))
    return (support - mean) / std, (query - mean) / std


def nearest_mean_pixels(support: Tensor, labels: Tensor, query: Tensor, num_classes: int) -> Tensor:
    """Logits ``[M, num_classes]`` (minus squared Euclidean distance to each class mean) of the query images.

    ``support``/``query``: images ``[n, C, H, W]``/``[M, C, H, W]``; a class absent from
    the support set gets ``-inf``.
    """
    s, q = standardise(pixel_features(support), pixel_features(query))
    y = labels.to(s.device).long()
    means = torch.zeros(num_classes, s.shape[1], device=s.device, dtype=s.dtype)
    counts = torch.bincount(y, minlength=num_classes).to(s.dtype)
    means.index_add_(0, y, s)
    means = means / counts.clamp(min=1).unsqueeze(1)
    logits = -torch.cdist(q.double(), means.double()).pow(2)
    logits[:, counts == 0] = float("-inf")
    return logits.float()


def logistic_pixels(
    support: Tensor,
    labels: Tensor,
    query: Tensor,
    num_classes: int,
    *,
    steps: int = LOGISTIC_STEPS,
    weight_decay: float = WEIGHT_DECAY,
) -> Tensor:
    """Logits ``[M, num_classes]`` of a logistic-regression probe fitted on the standardised support pixels."""
    s, q = standardise(pixel_features(support), pixel_features(query))
    y = labels.to(s.device).long()
    w = torch.zeros(s.shape[1], num_classes, device=s.device, requires_grad=True)
    b = torch.zeros(num_classes, device=s.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, history_size=10, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(s @ w + b, y) + 0.5 * weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        logits = q @ w + b
        absent = torch.bincount(y, minlength=num_classes) == 0
        logits[:, absent] = float("-inf")
    return logits.detach()


FUNCTIONS: dict[str, BaselineFn] = {"nearest_mean_pixels": nearest_mean_pixels, "logistic_pixels": logistic_pixels}


def log_probabilities(name: str, support: Tensor, labels: Tensor, query: Tensor, num_classes: int) -> Tensor:
    """Log-probabilities ``[M, num_classes]`` (float64, on the CPU) of baseline ``name`` on the query images.

    The log-softmax of the baseline's logits, kept in float64: squared pixel distances
    differ by hundreds, and in float32 the log-probability of every confident image would
    round to exactly 0, ties that lower the AUC. A class absent from the support set
    stays at ``-inf``.
    """
    logits = FUNCTIONS[name](support, labels, query, num_classes)
    return logits.double().log_softmax(-1).cpu()
