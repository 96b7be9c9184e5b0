"""An adapted model: predict, evaluate, save and load.

Model file (``model_format_version`` 1): one safetensors file written with
:func:`metafew.checkpoint.save_state` (atomic). Tensors: the learner's state (the
backbone weights, and any learner parameter), the adapted classifier's state
(prototypes, a trained head, or MAML's adapted parameters) and, for transductive
learners, the recorded support BatchNorm statistics. Record: ``model_format``
(``"metafew-adapted-model"``), ``model_format_version``, the metafew version, method
and options, class names, preprocessing (channels, image size, mean, std), the
backbone's architecture and provenance, the support images used, and the estimate.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data.base import FewShotDataset
from ..device import resolve_device
from ..errors import CheckpointError, DatasetError
from .estimate import AdaptationReport, predict_logits
from .metrics import Metrics, compute_metrics
from .outputs import MODEL_FORMAT, check_output
from .predictor import Predictor
from .preprocess import Preprocessing, read_inputs, stack_for

MODEL_FORMAT_VERSION = 1


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

    Made by :func:`metafew.adapt` or :func:`metafew.load`. ``report`` holds the estimate
    of its accuracy (None when it was loaded from a file saved without one).
    """

    def __init__(
        self,
        learner: nn.Module,
        predictor: Predictor,
        *,
        classes: Sequence[str],
        preprocessing: Preprocessing,
        method: str,
        options: dict[str, Any],
        backbone_info: dict[str, Any],
        report: AdaptationReport | None = None,
        support: dict[str, Any] | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.learner = learner
        self.predictor = predictor
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.method = method
        self.options = dict(options)
        self.backbone_info = dict(backbone_info)
        self.report = report
        self.support = dict(support or {})
        self.device = device or next(iter(learner.parameters())).device
        self.metafew_version = _version()

    def __repr__(self) -> str:
        c, (h, w) = self.preprocessing.channels, self.preprocessing.image_size
        return (
            f"AdaptedModel(method={self.method!r}, classes={self.classes}, backbone={self.backbone_info.get('arch')!r}, "
            f"input={c}x{h}x{w}, device={self.device})"
        )

    def to(self, device: str | torch.device) -> AdaptedModel:
        """Move the model to ``device`` ("auto": CUDA if available)."""
        self.device = resolve_device(device)
        self.learner.to(self.device)
        self.predictor.to(self.device)
        return self

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
        out = [self.predictor.logits(x[i : i + batch_size]).cpu() for i in range(0, len(x), batch_size)]
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
        self, data: FewShotDataset | str | os.PathLike[str], *, split: str = "test", skip_bad: bool = False, batch_size: int = 256
    ) -> Metrics:
        """Accuracy (with a Wilson 95% interval), balanced accuracy, AUC (bootstrap 95% interval),
        per-class recall and confusion matrix on a labelled set.

        ``data``: a FewShotDataset, an image folder (``root/<class>/<image>``), or a dataset
        name such as ``"pneumoniamnist"`` (its ``split``, default the official test split;
        ``"pneumoniamnist:val"`` also works). Its class names must be among the model's.
        """
        from .core import resolve_data

        ds = resolve_data(data, self.preprocessing, skip_bad=skip_bad, split=split)
        labels = self._map_labels(ds)
        logits = predict_logits(self.predictor, ds.images, self.preprocessing, self.device, batch_size)
        m = compute_metrics(logits.log_softmax(-1), labels, self.classes, intervals=True)
        missing = [c for c in self.classes if c not in ds.classes]
        if missing:
            m.notes.append(f"{ds.name} has no images of class(es) {', '.join(map(repr, missing))}: their recall is unknown")
        return m

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
        from ..checkpoint import checkpoint_path, save_state

        protect = Path(self.support["folder"]) if self.support.get("folder") else None
        check_output(path, "model", protect=protect)  # a folder is refused before a suffix is added
        p = check_output(checkpoint_path(path), "model", protect=protect)
        tensors, clf_record = self.predictor.state()
        state = {"learner": dict(self.learner.state_dict()), **tensors}
        record = {
            "model_format": MODEL_FORMAT,
            "model_format_version": MODEL_FORMAT_VERSION,
            "method": self.method,
            "options": self.options,
            "classes": self.classes,
            "preprocessing": self.preprocessing.to_dict(),
            "backbone": self.backbone_info,
            "support": self.support,
            "report": None if self.report is None else self.report.to_dict(),
            "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **clf_record,
        }
        return save_state(state, p, record)


def load(path: str | os.PathLike[str], *, device: str | torch.device = "auto") -> AdaptedModel:
    """Load a model saved by :meth:`AdaptedModel.save`; CheckpointError (one line) if it is not one,
    or was written in another model format version."""
    from ..backbones import create as create_backbone
    from ..checkpoint import _existing_path, check_state_dict, load_state
    from ..learners import create as create_learner

    dev = resolve_device(device)
    p = _existing_path(path)
    state, record = load_state(p, "cpu")
    if record.get("model_format") != MODEL_FORMAT:
        what = record.get("arch") and "a backbone checkpoint" or "a metafew checkpoint"
        raise CheckpointError(f"{p} is {what}, not an adapted model (make one with `metafew adapt`)")
    version = record.get("model_format_version")
    if version != MODEL_FORMAT_VERSION:
        by = record.get("metafew_version", "another version")
        hint = "upgrade metafew" if isinstance(version, int) and version > MODEL_FORMAT_VERSION else "adapt it again"
        raise CheckpointError(
            f"{p} is an adapted model in format version {version} (written by metafew {by}); "
            f"this metafew {_version()} reads version {MODEL_FORMAT_VERSION}: {hint}"
        )
    try:
        prep = Preprocessing.from_dict(record["preprocessing"])
        bb = record["backbone"]
        backbone = create_backbone(bb["arch"], in_channels=prep.channels, image_size=prep.image_size, **(bb.get("options") or {}))
        learner = create_learner(record["method"], backbone, **(record.get("options") or {}))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: incomplete or inconsistent model record ({type(e).__name__}: {e})") from e
    learner_state = state.get("learner") if isinstance(state, dict) else None
    if not isinstance(learner_state, dict):
        raise CheckpointError(f"{p}: the model file has no learner weights")
    check_state_dict(learner, learner_state, str(p))
    learner.load_state_dict(learner_state, strict=True)
    learner.to(dev).eval()
    tensors = {k: v for k, v in state.items() if k != "learner"}
    predictor = Predictor.from_state(learner, tensors, record, str(p)).to(dev)
    report = AdaptationReport.from_dict(record["report"]) if record.get("report") else None
    model = AdaptedModel(
        learner,
        predictor,
        classes=record["classes"],
        preprocessing=prep,
        method=record["method"],
        options=record.get("options") or {},
        backbone_info=bb,
        report=report,
        support=record.get("support"),
        device=dev,
    )
    model.metafew_version = str(record.get("metafew_version", ""))
    return model


def _version() -> str:
    from .. import __version__

    return __version__


__all__ = ["AdaptedModel", "Prediction", "load", "MODEL_FORMAT_VERSION"]
