"""Cross-domain feature alignment: fit a pretrained backbone to the user's unlabeled images.

A backbone pretrained on one kind of image (the *source*: Caltech-101 photos, Omniglot
strokes) sees the user's images (the *target*: X-rays, skin lesions) through features
whose statistics no longer match. :func:`align_backbone` uses unlabeled target images to
correct that before the few-shot step, on a copy of the backbone:

* ``"bn"``: AdaBN (Li et al. 2016): every BatchNorm's running statistics are replaced by
  those of the target images; no training, no source data.
* ``"mmd"``: fine-tune the backbone so that the multi-kernel Gaussian MMD (Gretton et al.
  2012; the DAN recipe of Long et al. 2015) between source and target features shrinks,
  while a linear head keeps classifying the source sample (its labels) on the same features.
* ``"dann"``: the same source classification, plus a small domain classifier trained to
  tell source from target features through a gradient reversal layer (Ganin & Lempitsky
  2015), with the usual schedule ``lambda = 2 / (1 + exp(-10 p)) - 1`` over the training
  progress ``p``.

In MMD and DANN source and target batches go through the backbone separately (each
BatchNorm normalising with its own domain's batch statistics), and at the end the
BatchNorm running statistics are re-estimated on the target images, as ``"bn"`` does,
so the aligned backbone normalises target images as it did while being trained.

The source sample: the backbone record names its pretraining data (``"caltech101/train"``,
``"omniglot/lake-background"``, ``"medmnist/pneumoniamnist-train"``); :func:`load_source`
loads it through :func:`metafew.data.load_dataset` and takes a seeded sample of at most
:data:`SOURCE_SAMPLE` images (the pretraining head is not saved, so a new linear head is
fitted to the sample's labels first, on the frozen features, then trained jointly).
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import FewShotDataset, available_datasets, load_dataset
from ..data.decode import IMAGE_EXTENSIONS
from ..errors import ConfigError, DatasetError, DatasetNotFoundError, MetafewError
from ..learners.bn import batchnorms
from ..seeding import derive_seed, generator, seeded
from .preprocess import Preprocessing, convert_channels, list_images, read_inputs

ALIGN_METHODS = ("mmd", "dann", "bn")
SOURCE_SAMPLE = 2000  # source images kept for MMD/DANN
DEFAULT_STEPS = 200
DEFAULT_LR = 1e-4  # the backbone's; the new heads learn 10x faster
BATCH_SIZE = 64
MMD_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)  # multipliers of the median-free mean squared distance bandwidth
HEAD_WARMUP_STEPS = 100
DIAGNOSTIC_SAMPLE = 256  # images per domain for the before/after MMD and source accuracy (one chunk: exact statistics)


# -- the losses --------------------------------------------------------------------------


def gaussian_mmd(x: Tensor, y: Tensor, scales: Sequence[float] = MMD_SCALES) -> Tensor:
    """Squared MMD between samples ``x`` ``[n, d]`` and ``y`` ``[m, d]`` with a multi-kernel Gaussian.

    The kernel is the mean of ``exp(-|a - b|^2 / (s * h))`` over the ``scales`` s, with
    ``h`` the mean squared distance between all pooled points (held constant for the
    gradient). The biased (V-statistic) estimate: never negative, exactly 0 for
    identical samples.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"gaussian_mmd needs [n, d] and [m, d] features, got {tuple(x.shape)} and {tuple(y.shape)}")
    z = torch.cat([x, y]).float()
    d2 = torch.cdist(z, z).pow(2)
    n = len(z)
    h = (d2.detach().sum() / max(n * n - n, 1)).clamp_min(1e-12)
    k = sum(torch.exp(-d2 / (s * h)) for s in scales) / len(scales)
    assert isinstance(k, Tensor)
    nx = len(x)
    kxx, kyy, kxy = k[:nx, :nx].mean(), k[nx:, nx:].mean(), k[:nx, nx:].mean()
    return (kxx + kyy - 2 * kxy).clamp_min(0)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, lambd: float) -> Tensor:
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.lambd * grad, None


def grad_reverse(x: Tensor, lambd: float = 1.0) -> Tensor:
    """Identity forward; the gradient multiplied by ``-lambd`` backward (the gradient reversal layer)."""
    out = _GradReverse.apply(x, float(lambd))
    assert isinstance(out, Tensor)
    return out


def dann_lambda(progress: float) -> float:
    """DANN's reversal weight at training progress ``progress`` in [0, 1]: ``2 / (1 + exp(-10 p)) - 1``."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


def domain_classifier(features: int, hidden: int = 256) -> nn.Module:
    """The small MLP of DANN: features -> source (1) / target (0) logit."""
    return nn.Sequential(
        nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
    )


# -- BatchNorm re-estimation (AdaBN) ----------------------------------------------------------


@torch.no_grad()
def reestimate_bn(
    backbone: nn.Module, images: Tensor | Sequence[Tensor], prep: Preprocessing, device: torch.device,
    batch_size: int = 256,
) -> int:  # fmt: skip
    """Replace every BatchNorm's running statistics by those of ``images`` (in place); returns the layer count.

    The backbone runs over the images in chunks of ``batch_size`` with BatchNorm in train
    mode and a cumulative average (``momentum=None``), other layers in eval mode; with one
    chunk the running mean/variance are exactly the images' batch statistics.
    """
    bns = [m for m in batchnorms(backbone).values() if m.track_running_stats]
    if not bns:
        return 0
    x_all = _stack(images)
    modes = [(m, m.training) for m in backbone.modules()]
    momenta = [m.momentum for m in bns]
    backbone.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for i in range(0, len(x_all), batch_size):
            backbone(prep(x_all[i : i + batch_size], device))
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        for module, training in modes:
            module.training = training
    return len(bns)


def _stack(images: Tensor | Sequence[Tensor]) -> Tensor:
    if isinstance(images, Tensor):
        return images
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) != 1:
        raise DatasetError(
            f"unlabeled images of different shapes {sorted(shapes)[:2]}: decode them with the backbone's"
        )
    return torch.stack(list(images))


# -- the source sample -----------------------------------------------------------------------


def source_dataset(recorded: str | None) -> tuple[str, str | None, dict[str, Any]] | None:
    """``(registered name, subset, options)`` for the pretraining data a backbone record names, or None.

    ``"caltech101/train"`` -> ``("caltech101", "train", {})`` (``-seed3`` -> ``{"seed": 3}``),
    ``"omniglot/vinyals-train"`` -> ``("omniglot", "train", {})``, ``"omniglot/lake-background"``
    -> ``("omniglot-lake", "background", {})``, ``"medmnist/pneumoniamnist-train"`` ->
    ``("pneumoniamnist", "train", {})``, ``"folder:/path"`` -> itself; a registered name as is.
    """
    if not recorded:
        return None
    text = str(recorded)
    names = available_datasets()
    if text.startswith("folder:"):
        return text, None, {}
    base, _, rest = text.partition(":")
    if base.lower() in names and not _:  # "pneumoniamnist"
        return base.lower(), None, {}
    if base.lower() in names:  # "pneumoniamnist:test"
        return base.lower(), rest, {}
    family, sep, sub = text.partition("/")
    if not sep:
        return None
    options: dict[str, Any] = {}
    seed = re.fullmatch(r"(.*)-seed(\d+)", sub)
    if seed:
        sub, options["seed"] = seed.group(1), int(seed.group(2))
    candidates: list[tuple[str, str]] = []
    if family == "omniglot":
        split, _, subset = sub.partition("-")
        candidates.append(("omniglot" if split == "vinyals" else f"omniglot-{split}", subset))
    elif family == "medmnist":
        name, _, subset = sub.rpartition("-")
        candidates.append((name, subset))
    candidates.append((family, sub))
    for name, subset in candidates:
        spec = names.get(name.lower())
        if spec is not None and (subset in spec.subsets or spec.open_subsets):
            return name.lower(), subset, options
    return None


def load_source(
    recorded: str | FewShotDataset | None,
    prep: Preprocessing,
    *,
    root: str | os.PathLike[str] | None = None,
    sample: int = SOURCE_SAMPLE,
    seed: int = 0,
    method: str = "mmd",
) -> tuple[Tensor, Tensor, str]:
    """``(uint8 images [n, C, H, W], labels [n], name)``: a seeded sample of at most ``sample`` source images.

    ``recorded``: the dataset a backbone record names (see :func:`source_dataset`), a
    dataset name as :func:`metafew.data.load_dataset` takes it, or a FewShotDataset.
    Images stay at their own size and channels; :class:`Preprocessing` converts them
    exactly as it converts the target images. A source that cannot be named or found is a
    one-line DatasetNotFoundError saying so and suggesting ``bn`` alignment.
    """
    hint = (
        f"{method} alignment needs the backbone's pretraining images: name them with align_source= "
        "(--align-source NAME), or use bn alignment (--align bn), which needs none"
    )
    if isinstance(recorded, FewShotDataset):
        ds = recorded
    else:
        found = source_dataset(recorded)
        if found is None:
            what = f"its record names {recorded!r}, not a dataset metafew knows" if recorded else "it records none"
            raise DatasetNotFoundError(f"cannot find the source data of this backbone ({what}): {hint}")
        name, subset, options = found
        spec = available_datasets()[name if not name.startswith("folder:") else "folder:PATH"]
        if "image_size" in spec.options and prep.image_size[0] == prep.image_size[1]:
            options["image_size"] = prep.image_size[0]
        try:
            ds = load_dataset(name, subset, root=root, **options)
        except MetafewError as e:
            raise DatasetNotFoundError(
                f"cannot load the backbone's source data {recorded!r} ({' '.join(str(e).split())}): {hint}"
            ) from e
    if len(ds) == 0:
        raise DatasetError(f"the source data {ds.name} has no images")
    n = min(sample, len(ds))
    index = torch.randperm(len(ds), generator=generator(seed, "align-source"))[:n].sort().values
    return ds.images[index], ds.labels[index], ds.name


# -- the alignment ---------------------------------------------------------------------------


def align_backbone(
    backbone: nn.Module,
    prep: Preprocessing,
    unlabeled_images: Tensor | Sequence[Tensor],
    method: str,
    *,
    source: tuple[Tensor, Tensor] | tuple[Tensor, Tensor, str] | None = None,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    batch_size: int = BATCH_SIZE,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """An aligned copy of ``backbone`` (eval mode, on ``device``) and a JSON description of what was done.

    Args:
        backbone: the pretrained feature extractor (left unchanged).
        prep: its preprocessing (target and source images are converted with it).
        unlabeled_images: uint8 target images ``[N, C, H, W]`` (or a list of ``[C, H, W]``).
        method: ``"mmd"``, ``"dann"`` or ``"bn"`` (:data:`ALIGN_METHODS`).
        source: ``(images, labels[, name])`` of the source sample; needed by mmd and dann.
        steps, lr, batch_size: MMD/DANN training (Adam; the new heads at ``10 * lr``);
            each step takes ``batch_size`` source and ``batch_size`` target images.
        seed: seeds the batches and the heads' initialisation.
    """
    start = time.perf_counter()
    method = str(method).lower()
    if method not in ALIGN_METHODS:
        raise ConfigError(f"unknown alignment method {method!r}; choose one of {', '.join(ALIGN_METHODS)}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ConfigError(f"align steps must be a non-negative integer, got {steps!r}")
    dev = torch.device(device)
    target = _stack(unlabeled_images)
    if len(target) == 0:
        raise DatasetError("no unlabeled images to align with")
    model = copy.deepcopy(backbone).to(dev).eval()
    info: dict[str, Any] = {"method": method, "target_images": len(target)}
    if method == "bn":
        info["bn_layers"] = reestimate_bn(model, target, prep, dev)
        info["seconds"] = round(time.perf_counter() - start, 2)
        return model.eval(), info
    if source is None:
        raise ConfigError(f"{method} alignment needs a source sample (the backbone's pretraining images)")
    src_x, src_y = source[0], source[1].long()
    if len(src_x) == 0:
        raise DatasetError("the source sample has no images")
    n_classes = int(src_y.max()) + 1
    with seeded(derive_seed(seed, "align-init"), dev):
        with torch.no_grad():
            dim = model(prep(src_x[:2], dev)).flatten(1).shape[1]
        head = nn.Linear(dim, n_classes).to(dev)
        domain = domain_classifier(dim).to(dev) if method == "dann" else None
    diag_gen = generator(seed, "align-diagnostic")
    diag_i = torch.randperm(len(src_x), generator=diag_gen)[:DIAGNOSTIC_SAMPLE]
    diag_s, diag_y = src_x[diag_i], src_y[diag_i]
    diag_t = target[torch.randperm(len(target), generator=diag_gen)[:DIAGNOSTIC_SAMPLE]]
    with torch.no_grad():
        info["mmd_unaligned"] = round(float(gaussian_mmd(_features(model, diag_s, prep, dev),
                                                         _features(model, diag_t, prep, dev))), 5)  # fmt: skip
        info["mmd_bn_only"] = round(float(domain_mmd(model, diag_s, diag_t, prep, dev)), 5)
    src_features = _features(model, src_x, prep, dev)
    _fit_head(head, src_features, src_y.to(dev), lr=1e-2)
    info["source_accuracy_before"] = _accuracy(head, src_features, src_y)  # on the sample, the new head fitted to it

    params = [{"params": model.parameters(), "lr": lr}, {"params": head.parameters(), "lr": 10 * lr}]
    if domain is not None:
        params.append({"params": domain.parameters(), "lr": 10 * lr})
    opt = torch.optim.Adam(params)
    gen = generator(seed, "align-batches")
    model.train()
    last: dict[str, float] = {}
    for step in range(steps):
        si = torch.randint(len(src_x), (batch_size,), generator=gen)
        ti = torch.randint(len(target), (batch_size,), generator=gen)
        fs = model(prep(src_x[si], dev)).flatten(1)
        ft = model(prep(target[ti], dev)).flatten(1)
        cls = F.cross_entropy(head(fs), src_y[si].to(dev))
        if domain is None:
            align = gaussian_mmd(fs, ft)
        else:
            lam = dann_lambda(step / max(steps - 1, 1))
            logits = domain(grad_reverse(torch.cat([fs, ft]), lam)).squeeze(1)
            is_source = torch.cat([torch.ones(len(fs)), torch.zeros(len(ft))]).to(dev)
            align = F.binary_cross_entropy_with_logits(logits, is_source)
        loss = cls + align
        if not torch.isfinite(loss):
            raise MetafewError(f"{method} alignment diverged at step {step + 1} (loss {float(loss)}); try a lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = {"source_loss": cls.item(), "align_loss": align.item()}
        if progress is not None:
            progress(step + 1, steps)
    model.eval()
    info["bn_layers"] = reestimate_bn(model, target, prep, dev)
    with torch.no_grad():
        info["mmd_after"] = round(float(domain_mmd(model, diag_s, diag_t, prep, dev)), 5)
    source_model = copy.deepcopy(model)  # the source as the training saw it: its own BatchNorm statistics
    reestimate_bn(source_model, diag_s, prep, dev)
    info["source_accuracy_after"] = _accuracy(head, _features(source_model, diag_s, prep, dev), diag_y)
    info.update(
        steps=steps, lr=lr, batch_size=batch_size, source_images=len(src_x), source_classes=n_classes,
        seed=seed, **{f"final_{k}": round(v, 4) for k, v in last.items()},
        seconds=round(time.perf_counter() - start, 2),
    )  # fmt: skip
    if len(source) > 2:
        info["source"] = str(source[2])  # type: ignore[misc]
    return model.eval(), info


def _features(model: nn.Module, images: Tensor, prep: Preprocessing, device: torch.device) -> Tensor:
    """Eval-mode features ``[n, d]`` of uint8 images, in chunks."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(prep(images[i : i + 256], device)).flatten(1) for i in range(0, len(images), 256)])
    model.train(was)
    return out


def _fit_head(head: nn.Linear, features: Tensor, labels: Tensor, lr: float) -> None:
    """Fit the new source head on frozen features (full batch), so joint training starts from a sensible head."""
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(HEAD_WARMUP_STEPS):
        loss = F.cross_entropy(head(features), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _accuracy(head: nn.Module, features: Tensor, labels: Tensor) -> float:
    with torch.no_grad():
        return round(float((head(features).argmax(1).cpu() == labels).float().mean()), 4)


def domain_mmd(model: nn.Module, source: Tensor, target: Tensor, prep: Preprocessing, device: torch.device) -> Tensor:
    """:func:`gaussian_mmd` of eval-mode features, each domain's BatchNorm statistics re-estimated on its own images.

    The distance alignment leaves: with ``model`` unchanged it is what AdaBN alone gives.
    """
    feats = []
    for images in (source, target):
        m = copy.deepcopy(model)
        reestimate_bn(m, images, prep, device)
        feats.append(_features(m, images, prep, device))
    return gaussian_mmd(feats[0], feats[1])


# -- the unlabeled pool ----------------------------------------------------------------------


def unlabeled_pool(
    unlabeled: Any,
    prep: Preprocessing,
    *,
    labelled: Tensor | None = None,
    labelled_folder: str | os.PathLike[str] | None = None,
    transductive: bool = False,
    skip_bad: bool = False,
) -> tuple[Tensor, dict[str, Any]]:
    """The unlabeled target images as uint8 ``[N, C, H, W]`` at the backbone's format, and counts.

    ``unlabeled``: a folder (every image in it, recursively; any size or mode, converted
    as the labelled images are), files, tensors or a FewShotDataset
    (:func:`~metafew.adaptation.preprocess.read_inputs`). Unless ``transductive``, any
    image that is also a labelled one, by resolved path (files inside ``labelled_folder``)
    or by content (the same decoded pixels as one of ``labelled``), is dropped, so the
    images the estimate scores never took part in the alignment. Counts:
    ``found``, ``labelled_overlap`` (by path or content), ``used``, ``transductive``, ``skipped``.
    """
    where = "unlabeled images"
    if isinstance(unlabeled, (str, os.PathLike)):
        p = Path(unlabeled).expanduser()
        where = f"unlabeled folder {p}"
        if not p.exists():
            raise DatasetNotFoundError(f"unlabeled folder not found: {p}")
        if p.is_dir() and not list_images(p)[0]:
            raise DatasetError(f"{where} has no image files ({' '.join(IMAGE_EXTENSIONS)})")
    try:
        sources, images, skipped = read_inputs(unlabeled, prep, skip_bad=skip_bad)
    except DatasetError as e:
        raise DatasetError(f"{where}: {e}") from e
    if not images:
        raise DatasetError(f"{where}: no readable images" + (f" ({len(skipped)} left out)" if skipped else ""))
    resized = [
        t if t.dtype == torch.uint8 and tuple(t.shape) == (prep.channels, *prep.image_size) else _as_uint8(t, prep)
        for t in images
    ]
    in_folder: set[Path] = set()
    if labelled_folder is not None:
        root = Path(labelled_folder).expanduser()
        in_folder = {f.resolve() for f in list_images(root)[0]} if root.is_dir() else set()
    seen = {_digest(t) for t in labelled} if labelled is not None else set()
    overlap = [
        (src is not None and Path(src).resolve() in in_folder) or _digest(t) in seen for src, t in zip(sources, resized)
    ]
    keep = resized if transductive else [t for t, o in zip(resized, overlap) if not o]
    if not keep:
        raise DatasetError(
            f"{where}: every image is also a labelled one; give other images, or allow them with transductive=True"
        )
    counts = {
        "found": len(resized),
        "labelled_overlap": int(sum(overlap)),
        "used": len(keep),
        "transductive": bool(transductive),
        "skipped": len(skipped),
    }
    return torch.stack(keep), counts


def _as_uint8(t: Tensor, prep: Preprocessing) -> Tensor:
    """A tensor image of another size/channels/dtype in the backbone's uint8 format (as :class:`Preprocessing` converts)."""
    x = t.float().div(255) if t.dtype == torch.uint8 else t.float()
    x = convert_channels(x.unsqueeze(0), prep.channels)
    if tuple(x.shape[-2:]) != prep.image_size:
        x = F.interpolate(x, size=prep.image_size, mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)[0]


def _digest(t: Tensor) -> bytes:
    return hashlib.blake2b(str(tuple(t.shape)).encode() + t.contiguous().numpy().tobytes(), digest_size=16).digest()


__all__ = [
    "ALIGN_METHODS",
    "align_backbone",
    "dann_lambda",
    "domain_classifier",
    "domain_mmd",
    "gaussian_mmd",
    "grad_reverse",
    "load_source",
    "reestimate_bn",
    "source_dataset",
    "unlabeled_pool",
]
