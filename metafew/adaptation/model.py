"""An adapted model: a classifier with its preprocessing, class names, temperature and report.

Model file: one safetensors file written with :func:`metafew.checkpoint.save_state`
(atomic). ``model_format_version`` 2: the tensors are the classifier's ``state_dict()``
under its own names (``learner.backbone.*``, ``prototypes``, ``params.*``, ``head.*``,
``bn_stats.*``); the record holds ``model_format`` (``"metafew-adapted-model"``), the
version, the metafew version, method and learner options (to rebuild the learner),
the classifier type, the BatchNorm policy, class names, preprocessing, temperature,
the backbone's architecture and provenance, the support images used, and the estimate.
Version 1 files (metafew 0.1.0: learner state, classifier attributes and BatchNorm
statistics as nested tensors) are read too.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..backbones import create as create_backbone
from ..checkpoint import _existing_path, check_state_dict, checkpoint_path, load_state, save_state
from ..data import FewShotDataset
from ..device import resolve_device
from ..errors import CheckpointError, DatasetError
from ..learners import Classifier
from ..learners import create as create_learner
from .estimate import AdaptationReport, AdaptationWarning, predict_logits
from .inputs import resolve_data
from .metrics import Metrics, compute_metrics
from .outputs import MODEL_FORMAT, check_output
from .preprocess import Preprocessing, read_inputs, stack_for

MODEL_FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


def image_hashes(images: Tensor) -> list[str]:
    """The sha1 of each image ``[C, H, W]`` of ``images`` as decoded (its bytes, shape and dtype).

    Saved with an adapted model (``support["sha1"]``), so that :meth:`AdaptedModel.evaluate`
    can tell when a labelled set holds the model's own support images: the same file
    decodes to the same bytes at the model's image size and channels.
    """
    out = []
    for img in images:
        a = img.detach().cpu().contiguous()
        h = hashlib.sha1(f"{a.dtype}:{tuple(a.shape)}:".encode())
        h.update(a.numpy().tobytes())
        out.append(h.hexdigest())
    return out


@dataclass
class Prediction:
    """The predicted class of one image and the probability of every class."""

    source: str | None  # the file it came from, if any
    label: str
    index: int
    probabilities: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.source, "class": self.label, "probabilities": self.probabilities}


class AdaptedModel:
    """A classifier adapted from a few labelled images per class, on a pretrained backbone.

    Made by :func:`metafew.adapt` or :func:`metafew.load`: ``classifier`` (an
    ``nn.Module``, query images to logits), the ``preprocessing`` its inputs get, the
    ``classes`` (column order), the softmax ``temperature`` (fitted on the estimate's
    held-out predictions; it never changes the predicted class) and ``report`` (the
    estimate; None when loaded from a file saved without one).
    """

    def __init__(
        self,
        classifier: Classifier,
        *,
        classes: Sequence[str],
        preprocessing: Preprocessing,
        temperature: float = 1.0,
        method: str,
        options: dict[str, Any],
        backbone_info: dict[str, Any],
        report: AdaptationReport | None = None,
        support: dict[str, Any] | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.classifier = classifier.eval()
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.temperature = float(temperature)
        self.method = method
        self.options = dict(options)
        self.backbone_info = dict(backbone_info)
        self.report = report
        self.support = dict(support or {})
        self.device = device or next(iter(classifier.parameters())).device
        self.metafew_version = _version()

    @property
    def learner(self) -> Any:
        """The learner the classifier was adapted by (its backbone included)."""
        return self.classifier.learner

    def __repr__(self) -> str:
        c, (h, w) = self.preprocessing.channels, self.preprocessing.image_size
        return (
            f"AdaptedModel(method={self.method!r}, classes={self.classes}, backbone={self.backbone_info.get('arch')!r}, "
            f"input={c}x{h}x{w}, device={self.device})"
        )

    def to(self, device: str | torch.device) -> AdaptedModel:
        """Move the model to ``device`` ("auto": CUDA if available)."""
        self.device = resolve_device(device)
        self.classifier.to(self.device)
        return self

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        """Float32 logits ``[M, N]`` of preprocessed images ``[M, C, H, W]``, divided by the temperature."""
        out = self.classifier(x).float()
        return out if self.temperature == 1.0 else out / self.temperature

    # -- prediction ----------------------------------------------------------------
    def _read(self, images: Any, skip_bad: bool) -> tuple[list[str | None], Tensor]:
        sources, imgs, _ = read_inputs(images, self.preprocessing, skip_bad=skip_bad)
        if not imgs:
            raise DatasetError("no images to predict")
        return sources, stack_for(imgs, self.preprocessing, self.device)

    def predict_proba(self, images: Any, *, skip_bad: bool = False, batch_size: int = 256) -> Tensor:
        """Class probabilities ``[M, N]`` (CPU float32, columns in :attr:`classes` order).

        ``images``: file paths, a folder (every image in it, recursively), PIL images,
        uint8 (0-255) or float (0-1) tensors ``[C, H, W]``/``[M, C, H, W]`` of any size
        and 1 or 3 channels, a FewShotDataset, or a list of these. ``skip_bad`` leaves
        unreadable files out (with a warning) instead of raising.
        """
        return self._predict(images, skip_bad, batch_size)[1].softmax(-1)

    def _predict(self, images: Any, skip_bad: bool, batch_size: int) -> tuple[list[str | None], Tensor]:
        sources, x = self._read(images, skip_bad)
        out = [self.logits(x[i : i + batch_size]).cpu() for i in range(0, len(x), batch_size)]
        return sources, torch.cat(out)

    def predict(self, images: Any, *, skip_bad: bool = False, batch_size: int = 256) -> list[Prediction]:
        """The predicted class and class probabilities of each image (inputs as in :meth:`predict_proba`)."""
        sources, logits = self._predict(images, skip_bad, batch_size)
        probs = logits.softmax(-1)
        idx = probs.argmax(-1).tolist()
        return [
            Prediction(src, self.classes[k], k, {c: float(p) for c, p in zip(self.classes, row.tolist())})
            for src, k, row in zip(sources, idx, probs)
        ]

    # -- evaluation ----------------------------------------------------------------
    def evaluate(
        self,
        data: FewShotDataset | str | os.PathLike[str],
        *,
        split: str = "test",
        skip_bad: bool = False,
        batch_size: int = 256,
    ) -> Metrics:
        """Accuracy (with a Wilson 95% interval), balanced accuracy, AUC (bootstrap 95% interval),
        per-class recall and confusion matrix on a labelled set.

        ``data``: a FewShotDataset, an image folder (``root/<class>/<image>``), or a dataset
        name such as ``"pneumoniamnist"`` (its ``split``, default the official test split;
        ``"pneumoniamnist:val"`` also works). Its class names must be among the model's.

        When ``data`` holds some of the images the model was adapted on (same decoded
        pixels as its support images, whose hashes the model keeps), a UserWarning
        (:class:`~metafew.adaptation.AdaptationWarning`) says so and ``notes`` repeat it:
        the figures would then overstate how the model does on new images. Models saved
        before the hashes were kept never warn.
        """
        ds = resolve_data(data, self.preprocessing, skip_bad=skip_bad, split=split)
        labels = self._map_labels(ds)
        overlap = self.support_overlap(ds.images)
        logits = predict_logits(self.logits, ds.images, self.preprocessing, self.device, batch_size)
        m = compute_metrics(logits.log_softmax(-1), labels, self.classes, intervals=True)
        missing = [c for c in self.classes if c not in ds.classes]
        if missing:
            m.notes.append(
                f"{ds.name} has no images of class(es) {', '.join(map(repr, missing))}: their recall is unknown"
            )
        if overlap:
            msg = (
                f"{overlap} of the {len(ds)} images in {ds.name} are images this model was adapted on (its support "
                "set), so these figures overstate how well it classifies new images; evaluate on images it has not seen"
            )
            m.notes.append(msg)
            warnings.warn(msg, AdaptationWarning, stacklevel=2)
        return m

    def support_overlap(self, images: Tensor) -> int:
        """How many of ``images`` (decoded ``[M, C, H, W]``) are the model's own support images (0 when unknown)."""
        known = set(self.support.get("sha1") or ())
        if not known or len(images) == 0:
            return 0
        return sum(h in known for h in image_hashes(images))

    def _map_labels(self, ds: FewShotDataset) -> Tensor:
        unknown = [c for c in ds.classes if c not in self.classes]
        if unknown:
            raise DatasetError(
                f"{ds.name}: class(es) {', '.join(map(repr, unknown[:3]))} are not classes of this model "
                f"({', '.join(map(repr, self.classes))}); the class folder names must match"
            )
        remap = torch.tensor([self.classes.index(c) for c in ds.classes], dtype=torch.long)
        return remap[ds.labels]

    # -- saving --------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the model to one ``.safetensors`` file (suffix added when missing); returns the path.

        Overwrites only an earlier metafew model file: any other existing file, and
        anything inside the folder the model was adapted on, is refused (OutputError).
        """
        protect = Path(self.support["folder"]) if self.support.get("folder") else None
        check_output(path, "model", protect=protect)  # a folder is refused before a suffix is added
        p = check_output(checkpoint_path(path), "model", protect=protect)
        record = {
            "model_format": MODEL_FORMAT,
            "model_format_version": MODEL_FORMAT_VERSION,
            "method": self.method,
            "options": self.options,
            "classifier": type(self.classifier).__name__,
            "bn": self.classifier.bn.describe(),
            "classes": self.classes,
            "preprocessing": self.preprocessing.to_dict(),
            "temperature": self.temperature,
            "backbone": self.backbone_info,
            "support": self.support,
            "report": None if self.report is None else self.report.to_dict(),
            "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        return save_state(dict(self.classifier.state_dict()), p, record)


def load(path: str | os.PathLike[str], *, device: str | torch.device = "auto") -> AdaptedModel:
    """Load a model saved by :meth:`AdaptedModel.save` (format version 1 or 2).

    A file that is not an adapted model, or that this metafew cannot read, is a
    one-line CheckpointError naming the file, its format version and this metafew's.
    """
    dev = resolve_device(device)
    p = _existing_path(path)
    state, record = load_state(p, "cpu")
    if record.get("model_format") != MODEL_FORMAT:
        what = (record.get("arch") and "a backbone checkpoint") or "a metafew checkpoint"
        raise CheckpointError(f"{p} is {what}, not an adapted model (make one with `metafew adapt`)")
    version = record.get("model_format_version")

    def unreadable(why: str) -> CheckpointError:
        by = record.get("metafew_version", "another version")
        newer = isinstance(version, int) and version > MODEL_FORMAT_VERSION
        return CheckpointError(
            f"{p} is an adapted model in format version {version} (written by metafew {by}); this metafew "
            f"{_version()} reads versions {', '.join(map(str, READABLE_VERSIONS))}{why}: "
            + ("upgrade metafew" if newer else "adapt it again")
        )

    if version not in READABLE_VERSIONS:
        raise unreadable("")
    try:
        prep = Preprocessing.from_dict(record["preprocessing"])
        bb = record["backbone"]
        backbone = create_backbone(
            bb["arch"], in_channels=prep.channels, image_size=prep.image_size, **(bb.get("options") or {})
        )
        learner = create_learner(record["method"], backbone, **(record.get("options") or {}))
        if version == 1:
            state = _state_from_v1(state, record, learner.classifier_type.__name__)
            temperature = float(record.get("temperature", 1.0))
        else:
            temperature = float(record["temperature"])
    except CheckpointError as e:
        raise unreadable(f" ({e})") from e
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{p}: incomplete or inconsistent model record ({type(e).__name__}: {e})") from e
    check_state_dict(learner, {k[len("learner.") :]: v for k, v in state.items() if k.startswith("learner.")}, str(p))
    try:
        classifier = learner.classifier_type.from_state_dict(learner, state)
    except CheckpointError as e:
        raise (unreadable(f" ({e})") if version == 1 else CheckpointError(f"{p}: {e}")) from e
    report = AdaptationReport.from_dict(record["report"]) if record.get("report") else None
    model = AdaptedModel(
        classifier.to(dev),
        classes=record["classes"],
        preprocessing=prep,
        temperature=temperature,
        method=record["method"],
        options=record.get("options") or {},
        backbone_info=bb,
        report=report,
        support=record.get("support"),
        device=dev,
    )
    model.metafew_version = str(record.get("metafew_version", ""))
    return model


def _state_from_v1(state: Any, record: dict[str, Any], classifier: str) -> dict[str, Tensor]:
    """A version-1 file's nested state as the version-2 ``state_dict`` of ``classifier``.

    Version 1 held ``{"learner": state_dict, "classifier": {attribute: tensor or dict},
    "bn_stats": {"backbone.<layer>": {"mean", "var"}}}``; the attributes were named as
    the version-2 buffers are.
    """
    saved = str(record.get("classifier_class", "")).rpartition(":")[2]
    if saved != classifier:
        raise CheckpointError(f"its classifier type {saved or 'is unknown'!r} is not this learner's {classifier!r}")
    if not isinstance(state, dict) or not isinstance(state.get("learner"), dict):
        raise CheckpointError("it has no learner weights")
    flat = {f"learner.{k}": v for k, v in state["learner"].items()}
    for name, value in (state.get("classifier") or {}).items():
        if isinstance(value, Tensor):
            flat[name] = value
        elif isinstance(value, dict):
            flat.update({f"{name}.{k}": v for k, v in value.items()})
        elif value is not None:
            raise CheckpointError(f"its classifier attribute {name!r} is a {type(value).__name__}")
    for layer, mv in (state.get("bn_stats") or {}).items():
        layer = layer.removeprefix("backbone.")
        flat[f"bn_stats.{layer}.mean"], flat[f"bn_stats.{layer}.var"] = mv["mean"], mv["var"]
    return flat


def _version() -> str:
    from .. import __version__  # late: metafew/__init__ imports this package

    return __version__


__all__ = ["MODEL_FORMAT_VERSION", "AdaptedModel", "Prediction", "load"]
