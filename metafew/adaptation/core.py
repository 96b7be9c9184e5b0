"""``metafew.adapt``: from a pretrained backbone and a few labelled images per class to a model.

The steps, each one documented where it is done:

1. the backbone (a checkpoint, or a module with its mean/std) fixes the preprocessing:
   channels, image size and normalisation (:mod:`.preprocess`);
2. the labelled images (a ``root/<class>/<image>`` folder, a dataset name or a
   :class:`~metafew.data.FewShotDataset`) are decoded to that size and channel count (:mod:`.inputs`);
3. the honest estimate: ``eval_draws`` seeded support draws, each scored on the
   images not in its support (:mod:`.estimate`);
4. the final model: the learner adapted to one more seeded draw of ``shots`` images
   per class (or every image with ``shots="all"``).

With ``unlabeled=`` and ``align=``, between steps 2 and 3 the backbone is aligned to the
unlabeled target images (:mod:`.align`); the estimate and the final model both use the
aligned backbone, which is saved with the model.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data import FewShotDataset
from ..device import resolve_device
from ..errors import ConfigError, DatasetError
from ..learners import LEARNERS, available
from ..learners import create as create_learner
from ..seeding import derive_seed, generator
from .align import ALIGN_METHODS, DEFAULT_STEPS, align_backbone, load_source, unlabeled_pool
from .estimate import (
    AdaptationReport,
    AdaptationWarning,
    BNStats,
    QueryBN,
    Shots,
    adapt_on,
    deployment_policy,
    draw_support,
    estimate,
    support_sizes,
)
from .inputs import resolve_backbone, resolve_data
from .model import AdaptedModel, image_hashes


def methods() -> tuple[str, ...]:
    """The registered learners :func:`adapt` offers: those declaring ``adapt_defaults``."""
    return tuple(n for n in available() if getattr(LEARNERS.get(n), "adapt_defaults", None) is not None)


def default_options(method: str) -> dict[str, Any]:
    """Learner options :func:`adapt` uses unless given (the learner's ``adapt_defaults``)."""
    return dict(getattr(LEARNERS.get(method), "adapt_defaults", None) or {})


def __getattr__(name: str) -> Any:
    """``METHODS`` and ``DEFAULT_OPTIONS``, read from the learner registry when asked for
    (not at import, so that a broken learner plug-in never breaks ``import metafew``)."""
    if name == "METHODS":
        return methods()
    if name == "DEFAULT_OPTIONS":
        return {m: default_options(m) for m in methods()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- adapt -----------------------------------------------------------------------------


def adapt(
    data: FewShotDataset | str | os.PathLike[str],
    backbone: str | os.PathLike[str] | nn.Module,
    *,
    method: str | Sequence[str] = "protonet",
    shots: Shots = 5,
    eval_draws: int = 20,
    seed: int = 0,
    device: str | torch.device = "auto",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    skip_bad: bool = False,
    query_bn: QueryBN = "support",
    bn_stats: BNStats | None = None,
    max_eval: int | None = 2000,
    batch_size: int = 256,
    data_root: str | os.PathLike[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    calibrate: bool = True,
    unlabeled: Any = None,
    align: str | None = None,
    align_steps: int = DEFAULT_STEPS,
    align_source: FewShotDataset | str | None = None,
    transductive: bool = False,
    candidates: Sequence[str | os.PathLike[str]] | None = None,
    **options: Any,
) -> AdaptedModel:
    """Adapt a pretrained backbone to a few labelled images per class, with an honest estimate.

    Args:
        data: a ``root/<class>/<image>`` folder, a dataset name (its train split is the
            labelled pool: ``"pneumoniamnist"``), or a FewShotDataset.
        backbone: a backbone checkpoint (:func:`metafew.checkpoint.save_backbone`), a
            module from :func:`metafew.backbones.create` with ``mean``/``std``, or
            ``"auto"``: try every shipped backbone and those in ``candidates`` under each
            ``method``, choose on an inner split of the labelled images, nested in the
            estimate so that the choice never sees the images it is scored on
            (:mod:`metafew.adaptation.select`); ``model.report.selection`` says what was
            tried, what each scored and what was chosen.
        method: ``"protonet"`` (class-mean prototypes), ``"maml"`` (a few SGD steps of the
            whole network from Proto-MAML's head), ``"finetune"`` (a new linear head), or
            any registered learner declaring ``adapt_defaults`` (:func:`methods`). With
            ``backbone="auto"``: a list (or comma-separated string) of methods to try
            (default ``"protonet"``, the cheap one).
        shots: support images per class for the final model (a class with fewer uses all of
            them, with a warning), or ``"all"``: every image.
        eval_draws: support draws of the estimate (0: no estimate). 20 by default, which
            takes seconds on a CPU; use 100 for a report (the CI shrinks as 1/sqrt(draws)).
        seed: seeds the support draws and the adaptation; same seed, same model and estimate.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:1"``...
        skip_bad: leave unreadable files in the folder out (with a warning) instead of raising.
        query_bn: for MAML (transductive BatchNorm), normalise predictions with the
            support set's statistics (``"support"``: every image predicted on its own) or
            with each prediction batch's (``"batch"``: MAML's original test-time behaviour).
        bn_stats: ``"support"`` (the default without ``align``): ProtoNet and fine-tuning
            re-estimate the backbone's BatchNorm statistics on the support images before
            adapting (AdaBN: a backbone pretrained on other kinds of images then fits the new
            ones much better; MAML does this by design); ``"backbone"`` (the default with
            ``align``): keep the backbone's statistics (with ``align``, those of the unlabeled images).
        max_eval: score at most this many held-out images per draw (large pools only).
        batch_size: images per forward pass.
        data_root: where dataset names are looked up (default ``$METAFEW_DATA``).
        progress: ``progress(done, total)`` after each estimate draw.
        calibrate: divide the final model's logits by a temperature fitted to the held-out
            predictions of the estimate draws, so that its probabilities are calibrated
            (classes and accuracy are unchanged). Needs ``eval_draws > 0``.
        unlabeled: unlabeled images of the target domain (a folder, files, tensors or a
            FewShotDataset; any size or mode, converted as the labelled images are), used by ``align``.
        align: align the backbone to ``unlabeled`` before the few-shot step: ``"mmd"``
            (multi-kernel MMD between source and target features), ``"dann"`` (a domain
            classifier through gradient reversal), both keeping source classification on a
            sample of the backbone's pretraining data, or ``"bn"`` (BatchNorm statistics of
            the unlabeled images, no training, no source) (:mod:`metafew.adaptation.align`).
        align_steps: training steps of mmd/dann alignment.
        align_source: the source data for mmd/dann (a dataset name or a FewShotDataset);
            default: the dataset the backbone checkpoint records.
        transductive: let the unlabeled pool include labelled images (which the estimate
            scores). By default any unlabeled image that is also a labelled one (same file,
            or same pixels) is left out, so the estimate stays honest; the report says which.
        candidates: with ``backbone="auto"``, backbone files or names tried besides the shipped ones.
        **options: learner options, e.g. ``steps=200`` for finetune, ``test_inner_lr=0.05``
            (with several methods, each gets those its learner accepts).

    Returns:
        An :class:`AdaptedModel`; ``model.report`` holds the estimate.

    >>> import metafew, torch
    >>> images = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    >>> data = metafew.FewShotDataset("toy", [0] * 6 + [1] * 6, ["a", "b"], images, channels=1, image_size=(28, 28))
    >>> backbone = metafew.create_backbone("conv4", in_channels=1, image_size=28)
    >>> model = metafew.adapt(data, backbone, mean=[0.5], std=[0.25], shots=2, eval_draws=2, device="cpu")
    >>> model.classes, model.report.draws, len(model.predict(images[:3]))
    (['a', 'b'], 2, 3)
    """
    if isinstance(backbone, str) and backbone.strip().lower() == "auto":
        if align is not None or unlabeled is not None:
            raise ConfigError("backbone='auto' cannot be combined with align: choose a backbone to align")
        if mean is not None or std is not None:
            raise ConfigError("backbone='auto' tries checkpoints, which record their mean/std: leave mean/std out")
        return _adapt_auto(
            data, method, candidates, shots=shots, eval_draws=eval_draws, seed=seed, device=device,
            skip_bad=skip_bad, query_bn=query_bn, bn_stats=bn_stats, max_eval=max_eval, batch_size=batch_size,
            data_root=data_root, progress=progress, calibrate=calibrate, options=options,
        )  # fmt: skip
    if candidates is not None:
        raise ConfigError("candidates= lists backbones for backbone='auto' to try; give backbone='auto'")
    if not isinstance(method, str):
        raise ConfigError("several methods are tried only with backbone='auto'; give one method")
    method = method.lower()
    if method not in methods():
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(methods())}")
    if not isinstance(eval_draws, int) or eval_draws < 0:
        raise ConfigError(f"eval_draws must be a non-negative integer, got {eval_draws!r}")
    if align is not None:
        align = str(align).lower()
        if align not in ALIGN_METHODS:
            raise ConfigError(f"unknown alignment method {align!r}; choose one of {', '.join(ALIGN_METHODS)}")
        if unlabeled is None:
            raise ConfigError(f"align={align!r} needs unlabeled images (unlabeled=FOLDER)")
    elif unlabeled is not None:
        raise ConfigError("unlabeled images are used only to align the backbone: give align='mmd', 'dann' or 'bn'")
    if bn_stats is None:
        bn_stats = "backbone" if align else "support"
    if bn_stats not in ("support", "backbone"):
        raise ConfigError(f"bn_stats must be 'support' or 'backbone', got {bn_stats!r}")
    if query_bn not in ("support", "batch"):
        raise ConfigError(f"query_bn must be 'support' or 'batch', got {query_bn!r}")
    dev = resolve_device(device)
    module, prep, backbone_info = resolve_backbone(backbone, mean=mean, std=std, device=dev, data_root=data_root)
    ds = resolve_data(data, prep, skip_bad=skip_bad, root=data_root)
    if len(ds) == 0:
        raise DatasetError(f"{ds.name}: no images")
    if ds.channels not in (1, 2, 3, 4) and ds.channels != prep.channels:
        raise DatasetError(f"{ds.name}: cannot convert {ds.channels}-channel images to the backbone's {prep.channels}")
    support_sizes(ds.class_counts().tolist(), shots, ds.classes)  # validates shots before any work
    folder = (
        Path(data).expanduser().resolve()
        if isinstance(data, (str, os.PathLike)) and Path(data).expanduser().is_dir()
        else None
    )
    alignment = None
    if align is not None:
        module, alignment = _align(
            module, prep, backbone_info, unlabeled, align, ds=ds, folder=folder, transductive=transductive,
            skip_bad=skip_bad, steps=align_steps, source=align_source, data_root=data_root, seed=seed, device=dev,
            bn_stats=bn_stats,
        )  # fmt: skip
        backbone_info = {**backbone_info, "aligned": alignment}

    opts = {**default_options(method), **options}
    learner = create_learner(method, module, **opts).to(dev).eval()
    images, labels = ds.images, ds.labels
    report = estimate(
        learner, images, labels, ds.classes, prep,
        method=method, shots=shots, draws=eval_draws, seed=seed, device=dev, query_bn=query_bn,
        max_eval=max_eval, batch_size=batch_size, progress=progress, calibrate=calibrate, bn_stats=bn_stats,
    )  # fmt: skip
    report.alignment = alignment
    mismatch = channel_mismatch(folder_channels(folder) if folder is not None else ds.channels, prep.channels)
    if mismatch:
        report.warnings.append(mismatch)
        warnings.warn(mismatch, AdaptationWarning, stacklevel=2)
    if alignment and alignment.get("note"):
        report.notes.append(alignment["note"])

    _, final_k, _ = support_sizes(ds.class_counts().tolist(), shots, ds.classes)
    support, _ = draw_support(labels, final_k, generator(seed, "final"))
    bn = deployment_policy(learner, bn_stats, query_bn)
    classifier = adapt_on(learner, images, labels, support, prep, dev, derive_seed(seed, "adapt-final"), bn)
    support_record = _support_record(ds, folder, support, final_k, seed, bn_stats)
    return AdaptedModel(
        classifier,
        classes=ds.classes,
        temperature=report.temperature if calibrate and report.temperature is not None else 1.0,
        preprocessing=prep,
        method=method,
        options=opts,
        backbone_info=backbone_info,
        report=report,
        support=support_record,
        device=dev,
    )


def _support_record(
    ds: FewShotDataset, folder: Path | None, support: Tensor, final_k: Sequence[int], seed: int, bn_stats: str
) -> dict[str, Any]:
    """What the final model was adapted on, saved with it (``sha1``: see :func:`.model.image_hashes`)."""
    order = sorted(support.tolist())
    return {
        "data": ds.name,
        "folder": str(folder) if folder else None,
        "indices": order,
        "per_class": {c: int(k) for c, k in zip(ds.classes, final_k)},
        "seed": seed,
        "bn_stats": bn_stats,
        "sha1": image_hashes(ds.images[torch.tensor(order, dtype=torch.long)]),
    }


def _adapt_auto(
    data: FewShotDataset | str | os.PathLike[str], method: str | Sequence[str] | None,
    candidates: Sequence[str | os.PathLike[str]] | None, *, shots: Shots, eval_draws: int, seed: int,
    device: str | torch.device, skip_bad: bool, query_bn: QueryBN, bn_stats: BNStats | None, max_eval: int | None,
    batch_size: int, data_root: Any, progress: Callable[[int, int], None] | None, calibrate: bool,
    options: dict[str, Any],
) -> AdaptedModel:  # fmt: skip
    """:func:`adapt` with ``backbone="auto"``: the nested choice (:mod:`.select`), its estimate and the model."""
    from .select import Selection, candidate_backbones, folds_for, parse_methods

    tried = parse_methods(None if method in (None, "auto") else method, methods())
    if not isinstance(eval_draws, int) or eval_draws < 0:
        raise ConfigError(f"eval_draws must be a non-negative integer, got {eval_draws!r}")
    bn_stats = bn_stats or "support"
    if bn_stats not in ("support", "backbone"):
        raise ConfigError(f"bn_stats must be 'support' or 'backbone', got {bn_stats!r}")
    if query_bn not in ("support", "batch"):
        raise ConfigError(f"query_bn must be 'support' or 'batch', got {query_bn!r}")
    dev = resolve_device(device)
    folder = (
        Path(data).expanduser().resolve()
        if isinstance(data, (str, os.PathLike)) and Path(data).expanduser().is_dir()
        else None
    )
    stored = folder_channels(folder) if folder is not None else None

    def note(channels: int) -> str | None:
        data_channels = stored if folder is not None else (data.channels if isinstance(data, FewShotDataset) else None)
        if channel_mismatch(data_channels, channels) is None:
            return None
        return "colour images converted to grayscale" if channels == 1 else "grayscale images repeated to RGB"

    sel = Selection(
        data, candidate_backbones(candidates), tried, default_options={m: default_options(m) for m in tried},
        options=options, device=dev, data_root=data_root, skip_bad=skip_bad, bn_stats=bn_stats,
        query_bn=query_bn, seed=seed, batch_size=batch_size, channels_of=note,
    )  # fmt: skip
    ds = sel.dataset
    assert ds is not None
    if len(ds) == 0:
        raise DatasetError(f"{ds.name}: no images")
    counts = ds.class_counts().tolist()
    draw_k, final_k, _ = support_sizes(counts, shots, ds.classes)
    chosen = sel.choose_all()  # on every labelled image: the model's choice (and a probe of each candidate)
    report = estimate(
        chosen.learner, chosen.images, ds.labels, ds.classes, chosen.prep,
        method=chosen.method, shots=shots, draws=eval_draws, seed=seed, device=dev, query_bn=query_bn,
        max_eval=max_eval, batch_size=batch_size, progress=progress, calibrate=calibrate, bn_stats=bn_stats,
        choose=sel.choose, calibrate_on=chosen.name,
    )  # fmt: skip
    report.selection = sel.report(chosen, folds_for(draw_k if eval_draws else counts))
    mismatch = channel_mismatch(stored if folder is not None else ds.channels, chosen.prep.channels)
    if mismatch:
        report.warnings.append(mismatch)
        warnings.warn(mismatch, AdaptationWarning, stacklevel=3)
    support, _ = draw_support(ds.labels, final_k, generator(seed, "final"))
    bn = deployment_policy(chosen.learner, bn_stats, query_bn)
    classifier = adapt_on(
        chosen.learner, chosen.images, ds.labels, support, chosen.prep, dev, derive_seed(seed, "adapt-final"), bn
    )
    return AdaptedModel(
        classifier,
        classes=ds.classes,
        temperature=report.temperature if calibrate and report.temperature is not None else 1.0,
        preprocessing=chosen.prep,
        method=chosen.method,
        options=chosen.options,
        backbone_info={**chosen.info, "chosen_by": "auto"},
        report=report,
        support=_support_record(ds, folder, support, final_k, seed, bn_stats),
        device=dev,
    )


def folder_channels(folder: Path, limit: int = 1000) -> int | None:
    """The channels of a folder's images as they are stored: 1 if all are grayscale, else 3 (None: none readable).

    Read from the headers of at most ``limit`` image files (the folder itself is decoded
    at the backbone's channels, which hides what the files were).
    """
    from ..data.decode import image_channels, open_image
    from .preprocess import list_images

    seen: set[int] = set()
    for p in list_images(folder)[0][:limit]:
        try:
            with open_image(p) as img:
                seen.add(image_channels(img))
        except Exception:  # unreadable files are reported by the folder's decode
            continue
        if 3 in seen:
            return 3
    return 1 if seen else None


def channel_mismatch(data_channels: int | None, backbone_channels: int) -> str | None:
    """A warning when colour images go into a grayscale backbone or grayscale images into a colour one."""
    data = {1: 1, 2: 1, 3: 3, 4: 3}.get(data_channels or 0)
    if data is None or data == backbone_channels:
        return None
    if data == 3:
        return (
            "colour images into a grayscale backbone: they are converted to luminance, so colour is lost; "
            "a backbone pretrained on colour images may do better"
        )
    return (
        "grayscale images into a colour (RGB) backbone: the channel is repeated three times, so the backbone "
        "sees images unlike those it was pretrained on; a grayscale backbone may do better"
    )


def _align(
    module: nn.Module, prep: Any, backbone_info: dict[str, Any], unlabeled: Any, method: str, *,
    ds: FewShotDataset, folder: Path | None, transductive: bool, skip_bad: bool, steps: int,
    source: FewShotDataset | str | None, data_root: Any, seed: int, device: torch.device, bn_stats: str,
) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    """The backbone aligned to the unlabeled pool, and the JSON description saved with the model and report."""
    pool, counts = unlabeled_pool(
        unlabeled, prep, labelled=ds.images, labelled_folder=folder, transductive=transductive, skip_bad=skip_bad
    )
    src = None
    if method != "bn":
        src = load_source(
            source if source is not None else backbone_info.get("pretrained_on"), prep,
            root=data_root, seed=seed, method=method,
        )  # fmt: skip
    aligned, info = align_backbone(module, prep, pool, method, source=src, steps=steps, seed=seed, device=device)
    info["pool"] = counts
    info["unlabeled"] = (
        str(Path(unlabeled).expanduser().resolve()) if isinstance(unlabeled, (str, os.PathLike)) else None
    )
    if bn_stats == "support" and method == "bn":
        info["note"] = "bn_stats='support' replaces the aligned statistics by the support set's for protonet/finetune"
    return aligned, info


__all__ = ["AdaptationReport", "adapt", "default_options", "methods", "resolve_backbone", "resolve_data"]
