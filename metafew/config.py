"""One run configuration, and the one function that builds a run from it.

A :class:`RunConfig` holds everything needed to rebuild a meta-training run: data,
backbone, learner, optimiser, schedule, episodes and precision. Every checkpoint that
:func:`train_run` writes stores it, so :func:`load_run` rebuilds the trained learner
from the file alone, and ``metafew train``, ``metafew eval`` and the benchmark suites
(``metafew.bench``: a suite row is a RunConfig plus the published figure) all go
through :func:`build`.

>>> from metafew.config import RunConfig, build, resolve
>>> config = RunConfig(learner="protonet", n_way=5, k_shot=1, train_way=20, steps=300)
>>> config.train_setting
(20, 1, 15)
>>> learner = build(config, device="cpu")        # Conv-4 for Omniglot's 1x28x28 images
>>> full = resolve(config)                        # what a checkpoint records
>>> type(learner).__name__, full.backbone, full.in_channels, full.image_size
('ProtoNet', 'conv4', 1, (28, 28))
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch

from .errors import CheckpointError, ConfigError
from .registry import check_options, did_you_mean

if TYPE_CHECKING:
    from .learners.base import Learner

#: Version of the ``config`` stored in checkpoint records. 0.1.0 stored a benchmark row
#: (no ``config_version``); those still load (see :meth:`RunConfig.from_record`).
CONFIG_VERSION = 2
T = TypeVar("T")

_AMP = (None, "bf16", "fp16")
_SCHEDULES = ("constant", "step", "cosine", "linear")
_OPTIMIZERS = ("adam", "adamw", "sgd")
# Keys a 0.1.0 checkpoint's config held that are about the benchmark report, not the run.
_LEGACY_KEYS = {"published", "source", "notes", "metric", "pretrained_backbone"}


def _opt(help: str, *, cli: bool = True) -> dict[str, Any]:
    return {"help": help, "cli": cli}


def check_keys(d: dict[str, Any], known: list[str], where: str) -> None:
    """Refuse a key not in ``known`` (a typo never silently falls back to a default), suggesting the close one."""
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}{did_you_mean(unknown[0], known)} (known keys: {', '.join(sorted(known))})"
        )


def from_plain(cls: type[T], d: dict[str, Any], where: str) -> T:
    """``cls(**d)`` for a config dataclass, with unknown keys and bad values as one line naming ``where``."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a table of keys, got {d!r}")
    check_keys(d, [f.name for f in fields(cls)], where)  # type: ignore[arg-type]
    try:
        return cls(**d)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e


@dataclass
class RunConfig:
    """Everything that determines a meta-training run and its evaluation.

    ``train_way``/``train_shot``/``train_query`` default to the test setting (``n_way``,
    ``k_shot``, ``n_query``); set them when a paper trained differently (ProtoNet:
    60-way training). ``steps = 0`` evaluates the learner untrained, or on a pretrained
    ``backbone_checkpoint``. ``test = "lake"`` evaluates on Lake et al.'s 20 official
    20-way one-shot runs instead of sampled episodes. ``in_channels``/``image_size`` are
    filled in from the dataset by :func:`build` and recorded, so that a checkpoint
    rebuilds without reading any data.
    """

    # -- data ------------------------------------------------------------------------
    dataset: str = field(
        default="omniglot",
        metadata=_opt("dataset name, e.g. omniglot, omniglot-lake, pneumoniamnist, caltech101, folder:PATH"),
    )
    train_subset: str = field(default="train", metadata=_opt("subset to train on"))
    val_subset: str | None = field(default="val", metadata=_opt("subset to validate on ('none': no validation)"))
    test_subset: str = field(default="test", metadata=_opt("subset to test on"))
    skip_bad: bool = field(
        default=False,
        metadata=_opt(
            "leave unreadable image files (folder: datasets) and classes with too few images for an episode "
            "out, with a warning, instead of stopping"
        ),
    )
    test: Literal["episodes", "lake"] = field(
        default="episodes", metadata=_opt("test on sampled episodes or Lake's 20 runs", cli=False)
    )
    # -- model -----------------------------------------------------------------------
    learner: str = field(default="protonet", metadata=_opt("learner name (see metafew.list_learners())"))
    learner_options: dict[str, Any] = field(default_factory=dict, metadata=_opt("learner keyword options", cli=False))
    backbone: str | None = field(
        default=None,
        metadata=_opt("backbone architecture: conv4, resnet12, resnet18 (default: conv4, or the checkpoint's)"),
    )
    backbone_options: dict[str, Any] = field(default_factory=dict, metadata=_opt("backbone keyword options", cli=False))
    backbone_checkpoint: str | None = field(
        default=None, metadata=_opt("start from a pretrained backbone file (metafew pretrain)")
    )
    in_channels: int | None = field(default=None, metadata=_opt("image channels (default: the dataset's)", cli=False))
    image_size: tuple[int, int] | None = field(
        default=None, metadata=_opt("image size (default: the dataset's)", cli=False)
    )
    # -- episodes --------------------------------------------------------------------
    n_way: int = field(default=5, metadata=_opt("classes per episode (validation/test)"))
    k_shot: int = field(default=1, metadata=_opt("support images per class"))
    n_query: int = field(default=15, metadata=_opt("query images per class (validation/test)"))
    train_way: int | None = field(default=None, metadata=_opt("classes per training episode (default: --n-way)"))
    train_shot: int | None = field(
        default=None, metadata=_opt("support images per class in training (default: --k-shot)")
    )
    train_query: int | None = field(
        default=None, metadata=_opt("query images per class in training (default: --n-query)")
    )
    # -- optimisation ----------------------------------------------------------------
    steps: int = field(default=1000, metadata=_opt("meta-training steps (meta-batches)"))
    meta_batch_size: int = field(default=1, metadata=_opt("episodes per step"))
    optimizer: str | dict[str, Any] | None = field(
        default=None, metadata=_opt("adam, adamw or sgd (default: the learner's)")
    )
    lr: float | None = field(default=None, metadata=_opt("outer learning rate (default: the learner's)"))
    schedule: str = field(
        default="constant", metadata={**_opt("learning-rate schedule (linear: to 0)"), "choices": list(_SCHEDULES)}
    )
    step_size: int | None = field(default=None, metadata=_opt("steps between decays of the 'step' schedule"))
    gamma: float = field(default=0.5, metadata=_opt("decay factor of the 'step' schedule"))
    grad_clip: float | None = field(default=None, metadata=_opt("clip the gradient norm to this value"))
    # -- validation, logging, evaluation ----------------------------------------------
    val_episodes: int = field(default=100, metadata=_opt("fixed validation episodes (0: no validation)"))
    val_every: int = field(default=500, metadata=_opt("validate every N steps"))
    log_every: int = field(default=100, metadata=_opt("log every N steps"))
    checkpoint_every: int = field(default=1000, metadata=_opt("save last.safetensors every N steps"))
    tensorboard: bool | str | None = field(
        default=None,
        metadata=_opt("also log to TensorBoard: true (<run folder>/tensorboard) or a folder", cli=False),
    )
    eval_episodes: int = field(default=600, metadata=_opt("fixed test episodes"))
    eval_batch_size: int = field(default=16, metadata=_opt("episodes per evaluation batch"))
    # -- precision, seed, name -------------------------------------------------------
    amp: str | None = field(default=None, metadata=_opt("mixed precision: bf16 or fp16 (default: float32)", cli=False))
    seed: int = field(default=0, metadata=_opt("seed of the initialisation and of the episodes", cli=False))
    name: str = field(default="", metadata=_opt("run name (default: <learner>-<N>w<K>s)", cli=False))

    def __post_init__(self) -> None:
        self.learner = str(self.learner).lower()
        if not self.name:
            self.name = f"{self.learner}-{self.n_way}w{self.k_shot}s"
        if self.val_subset in ("", "none"):
            self.val_subset = None
        if self.image_size is not None:
            size = self.image_size
            self.image_size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self._check()

    def _check(self) -> None:
        """Refuse values that cannot be right, naming the field and the value."""
        where = f"run {self.name}"

        def integer(key: str, low: int, optional: bool = False) -> None:
            v = getattr(self, key)
            if optional and v is None:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ConfigError(f"{where}: {key} must be an integer >= {low}, got {v!r}")

        def number(key: str, low: float, optional: bool = False, strict: bool = False) -> None:
            v = getattr(self, key)
            if optional and v is None:
                return
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < low or (strict and v == low):
                raise ConfigError(f"{where}: {key} must be a number {'>' if strict else '>='} {low}, got {v!r}")

        for key in ("dataset", "learner", "train_subset", "test_subset", "schedule", "name"):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"{where}: {key} must be a string, got {getattr(self, key)!r}")
        for key in ("learner_options", "backbone_options"):
            if not isinstance(getattr(self, key), dict):
                raise ConfigError(f"{where}: {key} must be a table of options, got {getattr(self, key)!r}")
        integer("n_way", 2)
        integer("k_shot", 1)
        integer("n_query", 1)
        integer("train_way", 2, optional=True)
        integer("train_shot", 1, optional=True)
        integer("train_query", 1, optional=True)
        integer("steps", 0)
        for key in (
            "meta_batch_size",
            "val_every",
            "log_every",
            "checkpoint_every",
            "eval_episodes",
            "eval_batch_size",
        ):
            integer(key, 1)
        integer("val_episodes", 0)
        integer("step_size", 1, optional=True)
        integer("seed", 0)
        number("lr", 0.0, optional=True, strict=True)
        number("gamma", 0.0, strict=True)
        number("grad_clip", 0.0, optional=True, strict=True)
        if not isinstance(self.skip_bad, bool):
            raise ConfigError(f"{where}: skip_bad must be true or false, got {self.skip_bad!r}")
        _check_tensorboard(self.tensorboard, where)
        if self.test not in ("episodes", "lake"):
            raise ConfigError(f"{where}: test must be 'episodes' or 'lake', got {self.test!r}")
        if self.schedule not in _SCHEDULES:
            raise ConfigError(
                f"{where}: schedule must be one of {', '.join(_SCHEDULES)}, got {self.schedule!r}{did_you_mean(str(self.schedule), list(_SCHEDULES))}"
            )
        if self.schedule == "step" and self.step_size is None:
            raise ConfigError(f"{where}: schedule 'step' needs step_size")
        opt = (
            self.optimizer["name"] if isinstance(self.optimizer, dict) and "name" in self.optimizer else self.optimizer
        )
        if opt is not None and str(opt).lower() not in _OPTIMIZERS:
            raise ConfigError(
                f"{where}: optimizer must be one of {', '.join(_OPTIMIZERS)}, got {opt!r}{did_you_mean(str(opt), list(_OPTIMIZERS))}"
            )
        if self.amp not in _AMP:
            raise ConfigError(f"{where}: amp must be 'bf16', 'fp16' or none, got {self.amp!r}")
        from .backbones import BACKBONES
        from .learners import LEARNERS

        # unknown names and options of the wrong type fail here, with a suggestion, before any work
        check_options(LEARNERS.get(self.learner), self.learner_kwargs(), f"learner {self.learner!r}", None)
        if self.backbone is not None:
            BACKBONES.get(self.backbone)

    # -- derived settings --------------------------------------------------------------
    def learner_kwargs(self) -> dict[str, Any]:
        """The learner's keyword options: ``learner_options`` plus ``n_way`` and ``amp`` from the run, where it takes them."""
        from .learners import accepts

        options = dict(self.learner_options)
        if "n_way" not in options and accepts(self.learner, "n_way"):
            options["n_way"] = self.train_setting[0]
        if self.amp and "amp" not in options and accepts(self.learner, "amp"):
            options["amp"] = self.amp
        return options

    def dataset_options(self) -> dict[str, Any]:
        """The ``load_dataset`` options of this run's dataset: ``on_error="skip"`` with ``skip_bad``, where it takes it."""
        from .data.registry import dataset_options

        return {"on_error": "skip"} if self.skip_bad and "on_error" in dataset_options(self.dataset) else {}

    @property
    def too_few(self) -> Literal["error", "skip"]:
        """What the episode samplers do with a class too small for an episode (``skip`` with ``skip_bad``)."""
        return "skip" if self.skip_bad else "error"

    @property
    def train_setting(self) -> tuple[int, int, int]:
        """(N, K, Q) of training episodes."""
        return (
            self.train_way or self.n_way,
            self.train_shot or self.k_shot,
            self.n_query if self.train_query is None else self.train_query,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (what checkpoints store)."""
        d = asdict(self)
        d["image_size"] = list(self.image_size) if self.image_size is not None else None
        return d

    def train_key(self) -> str:
        """Short hash of everything that determines the trained weights (not evaluation or naming)."""
        skip = {
            "name",
            "test",
            "test_subset",
            "n_query",
            "eval_episodes",
            "eval_batch_size",
            "log_every",
            "checkpoint_every",
            "tensorboard",
            "in_channels",
            "image_size",
        }
        d = {k: v for k, v in self.to_dict().items() if k not in skip}
        if d.get("amp") is None:
            d.pop("amp")  # keeps the run folders of 0.1.0 (which had no amp field) valid
        if not d.get("skip_bad"):
            d.pop("skip_bad", None)  # keeps the run folders written before skip_bad existed valid
        d["train_setting"] = self.train_setting  # n_way/k_shot also set the validation episodes
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> RunConfig:
        """A RunConfig from plain values; an unknown key is an error with a suggestion (a typo never falls back)."""
        return from_plain(cls, d, where)

    @classmethod
    def from_record(cls, record: dict[str, Any], path: str | Path) -> RunConfig:
        """The config stored in a checkpoint record by :func:`train_run` (this version or 0.1.0)."""
        version = record["config"].get("config_version", 1)
        if not isinstance(version, int) or version > CONFIG_VERSION:
            raise CheckpointError(
                f"{path}: run configuration version {version!r}, this metafew reads versions 1 to {CONFIG_VERSION}; "
                "upgrade metafew to load it"
            )
        d = {k: v for k, v in dict(record["config"]).items() if k not in _LEGACY_KEYS | {"config_version"}}
        if version == 1 and record["config"].get("pretrained_backbone"):
            d["backbone_checkpoint"] = (
                None  # 0.1.0 recorded the file it started from; its weights are in the checkpoint
            )
        return cls.from_dict(d, where=str(path))


@dataclass
class PretrainConfig:
    """A supervised pretraining recipe (:func:`metafew.pretrain`): cross-entropy over a dataset's base classes.

    ``augment`` is None or ``{"name": "flipcrop", "padding": 4, "flip": true}``; ``keep``
    picks the weights of the last epoch or of the best validation epoch (``val_subset``
    classes; test classes are never seen).

    >>> PretrainConfig(dataset="omniglot", subset="train", val_subset="val", epochs=5).key() == PretrainConfig(
    ...     dataset="omniglot", subset="train", val_subset="val", epochs=5).key()
    True
    """

    dataset: str = field(default="omniglot", metadata=_opt("dataset name"))
    subset: str = field(default="train", metadata=_opt("subset of base classes to train on"))
    val_subset: str | None = field(
        default=None, metadata=_opt("validation subset checked every epoch (few-shot accuracy; 'none': no validation)")
    )
    dataset_options: dict[str, Any] = field(
        default_factory=dict, metadata=_opt("dataset keyword options, e.g. image_size", cli=False)
    )
    backbone: str = field(default="conv4", metadata=_opt("backbone architecture"))
    backbone_options: dict[str, Any] = field(default_factory=dict, metadata=_opt("backbone keyword options", cli=False))
    epochs: int = field(default=30, metadata=_opt("passes over the training images"))
    batch_size: int = field(default=128, metadata=_opt("images per step"))
    lr: float = field(default=0.05, metadata=_opt("initial SGD learning rate"))
    weight_decay: float = field(default=5e-4, metadata=_opt("SGD weight decay"))
    label_smoothing: float = field(default=0.0, metadata=_opt("cross-entropy label smoothing"))
    augment: dict[str, Any] | None = field(default=None, metadata=_opt("on-device augmentation", cli=False))
    keep: str = field(
        default="last",
        metadata={**_opt("keep the 'last' epoch or the 'best' on validation"), "choices": ["last", "best"]},
    )
    amp: str | None = field(default=None, metadata=_opt("mixed precision", cli=False))
    seed: int = field(default=0, metadata=_opt("seed", cli=False))
    checkpoint_every: int | None = field(
        default=None,
        metadata=_opt("also save the resumable checkpoint every N steps (default: at the end of each epoch only)"),
    )
    tensorboard: bool | str | None = field(
        default=None,
        metadata=_opt("also log to TensorBoard: true (<out>.tensorboard/) or a folder", cli=False),
    )

    def __post_init__(self) -> None:
        where = "pretrain"
        if self.val_subset in ("", "none"):  # as RunConfig: 'none' means no validation
            self.val_subset = None
        for key in ("epochs", "batch_size"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{where}: {key} must be a positive integer, got {v!r}")
        for key, low in (("lr", 0.0), ("weight_decay", 0.0), ("label_smoothing", 0.0)):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < low or (key == "lr" and v == 0):
                raise ConfigError(f"{where}: {key} must be a number {'>' if key == 'lr' else '>='} 0, got {v!r}")
        if self.label_smoothing >= 1:
            raise ConfigError(f"{where}: label_smoothing must be below 1, got {self.label_smoothing!r}")
        if self.keep not in ("last", "best"):
            raise ConfigError(f"{where}: keep must be 'last' or 'best', got {self.keep!r}")
        if self.keep == "best" and not self.val_subset:
            raise ConfigError(f"{where}: keep = 'best' needs a val_subset to choose the best epoch")
        if self.amp not in _AMP:
            raise ConfigError(f"{where}: amp must be 'bf16', 'fp16' or none, got {self.amp!r}")
        v = self.checkpoint_every
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"{where}: checkpoint_every must be a positive integer, got {v!r}")
        _check_tensorboard(self.tensorboard, where)
        if self.augment is not None and (not isinstance(self.augment, dict) or self.augment.get("name") != "flipcrop"):
            raise ConfigError(
                f"{where}: augment must be {{name = 'flipcrop', padding = N, flip = BOOL}} or absent, got {self.augment!r}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "pretrain") -> PretrainConfig:
        """A recipe from plain values (a suite's ``[pretrain]`` table, the CLI flags)."""
        return from_plain(cls, d, where)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def training_options(self) -> dict[str, Any]:
        """The recipe's keyword arguments of :func:`metafew.pretrain` (schedule, precision, seed, checkpoint choice)."""
        names = ("epochs", "batch_size", "lr", "weight_decay", "label_smoothing", "amp", "seed", "keep")
        return {name: getattr(self, name) for name in names}

    def key(self) -> str:
        """Short hash of the recipe and of what else decides the weights (metafew and torch versions)."""
        from . import __version__

        d = {**self.to_dict(), "metafew": __version__, "torch": torch.__version__.split("+")[0]}
        for name in _NOT_RECIPE:  # where the run writes its checkpoints and logs: not what it computes
            d.pop(name)
        if not d["dataset_options"]:
            d.pop("dataset_options")
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]


#: PretrainConfig fields about where a run writes, left out of its key (the key of a recipe
#: written before they existed stays the same).
_NOT_RECIPE = ("checkpoint_every", "tensorboard")


def _check_tensorboard(value: Any, where: str) -> None:
    if not (value is None or isinstance(value, bool) or (isinstance(value, str) and value)):
        raise ConfigError(f"{where}: tensorboard must be true, false or a folder, got {value!r}")


def run_pretrain(
    recipe: PretrainConfig,
    out: str | Path,
    *,
    data_root: str | Path | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
    log: Any = None,
    overwrite: bool = False,
    download: bool = False,
    resume: bool = False,
) -> Path:
    """Pretrain the recipe's backbone and save it at ``out`` (with the recipe in its record); returns the file.

    ``out``, its ``.log.jsonl`` and its resumable checkpoint ``.resume.safetensors`` are
    checked before any data is read (:func:`metafew.engine.pretrain.check_outputs`): an
    existing metafew backbone is replaced only with ``overwrite=True``, an interrupted run
    is continued only with ``resume=True`` (bit-identically), anything else is never touched.
    ``download=True`` fetches a missing dataset from its official source first, as
    ``metafew pretrain`` does unless ``--no-download`` (:func:`metafew.data.download.load_on_first_use`).
    """
    from .checkpoint import checkpoint_path
    from .data import FlipCrop
    from .data.download import load_on_first_use
    from .engine.pretrain import check_outputs, pretrain
    from .engine.tensorboard import require_tensorboard

    path = checkpoint_path(out)
    log_file = path.with_suffix(".log.jsonl")
    check_outputs(out, log if log is not None else log_file, overwrite=overwrite, resume=resume)
    if recipe.tensorboard:
        require_tensorboard()
    dataset = load_on_first_use(
        recipe.dataset, recipe.subset, root=data_root, download=download, **recipe.dataset_options
    )
    val = (
        load_on_first_use(
            recipe.dataset, recipe.val_subset, root=data_root, download=download, **recipe.dataset_options
        )
        if recipe.val_subset
        else None
    )
    augment = None
    if recipe.augment:
        opts = {k: v for k, v in recipe.augment.items() if k != "name"}
        augment = FlipCrop(**opts)
    pretrain(
        recipe.backbone,
        dataset,
        **recipe.training_options(),
        device=device,
        val=val,
        augment=augment,
        out=path,
        progress=progress,
        log=log if log is not None else log_file,
        backbone_options=recipe.backbone_options or None,
        overwrite=overwrite,
        resume=resume,
        checkpoint_every=recipe.checkpoint_every,
        tensorboard=recipe.tensorboard,
    )
    return path


# -- assembling a run -----------------------------------------------------------------
def resolve(config: RunConfig, *, data_root: str | Path | None = None) -> RunConfig:
    """A copy of ``config`` with what it leaves open filled in: image format and backbone architecture.

    The image format is read from the dataset's listing (nothing is decoded) unless
    recorded; a ``backbone_checkpoint`` gives the architecture and its options. The
    result rebuilds the same learner without the dataset or the backbone file.
    """
    d = config.to_dict()
    if config.in_channels is None or config.image_size is None:
        from .data import load_dataset

        ds = load_dataset(config.dataset, config.train_subset, root=data_root, **config.dataset_options())
        d["in_channels"], d["image_size"] = ds.channels, (int(ds.image_size[0]), int(ds.image_size[1]))
    if config.backbone_checkpoint:
        from .checkpoint import read_backbone_record

        rec = read_backbone_record(config.backbone_checkpoint)
        if config.backbone not in (None, rec.arch):
            raise CheckpointError(f"{config.backbone_checkpoint} holds a {rec.arch} backbone, not {config.backbone}")
        # the recorded options rebuild the saved weights; the config's own ones (channels_last=False) apply on top
        d["backbone"], d["backbone_options"] = rec.arch, {**rec.options, **config.backbone_options}
    d["backbone"] = d["backbone"] or "conv4"
    return RunConfig(**d)


def build(config: RunConfig, *, device: str | torch.device = "auto", data_root: str | Path | None = None) -> Learner:
    """The backbone (new, or the pretrained ``backbone_checkpoint``) and learner of ``config``, on ``device``.

    Seeded by ``config.seed``; ``config`` itself is not changed (see :func:`resolve`).

    >>> learner = build(RunConfig(learner="maml", n_way=5, train_way=5), device="cpu")
    >>> type(learner).__name__, learner.n_way
    ('MAML', 5)
    """
    from .backbones import create as create_backbone
    from .checkpoint import load_backbone
    from .device import resolve_device
    from .learners import create as create_learner

    full = resolve(config, data_root=data_root)
    size: tuple[int, int] = full.image_size  # type: ignore[assignment]
    torch.manual_seed(full.seed)
    if full.backbone_checkpoint:
        backbone, _ = load_backbone(
            full.backbone_checkpoint,
            in_channels=full.in_channels,
            image_size=size,
            arch=full.backbone,
            options=full.backbone_options,
        )
        backbone.train()
    else:
        backbone = create_backbone(
            full.backbone or "conv4", in_channels=full.in_channels or 3, image_size=size, **full.backbone_options
        )
    return create_learner(full.learner, backbone, **full.learner_kwargs()).to(resolve_device(device))


def train_run(
    config: RunConfig,
    out_dir: str | Path | None,
    *,
    data_root: str | Path | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
    resume: bool = True,
    overwrite: bool = False,
    allow_changes: bool = False,
    download: bool = False,
) -> tuple[Learner, Any]:
    """Meta-train ``config``'s learner (resuming in ``out_dir``) and load its best weights.

    ``out_dir`` is checked before any data is read (:func:`metafew.outputs.guard_run_dir`);
    ``overwrite`` replaces a run there, ``allow_changes`` resumes it with other settings.
    ``download=True`` fetches a missing dataset from its official source into the data
    root first (md5-checked, resumable, one line saying what, from where, how big and
    where to), as ``metafew train`` does unless ``--no-download``; without it (the default,
    as torchvision's ``download=False``) a missing dataset is a "not found" error naming
    where it looked. ``$METAFEW_OFFLINE`` refuses either way.

    Returns ``(learner, TrainResult)``; the result is None when ``config.steps == 0``.
    Every checkpoint records ``config`` (with the pretrained backbone's weights inside
    the learner's), so :func:`load_run` needs nothing but the file.

    >>> import tempfile
    >>> run = tempfile.mkdtemp()
    >>> config = RunConfig(learner="protonet", train_way=5, steps=3, val_episodes=0)
    >>> learner, result = train_run(config, run, device="cpu", progress=False)
    >>> result.steps
    3
    >>> loaded, learner, record = load_run(f"{run}/last.safetensors")
    >>> loaded.learner, loaded.steps, record["step"]
    ('protonet', 3, 3)
    """
    from .data import EpisodeSampler
    from .data.download import load_on_first_use
    from .device import resolve_device
    from .engine.tensorboard import require_tensorboard
    from .engine.train import load_weights, train

    if config.tensorboard and config.steps > 0:
        require_tensorboard()  # before any work
    if out_dir is not None and config.steps > 0:
        from .outputs import guard_run_dir

        guard_run_dir(out_dir, resume=resume, overwrite=overwrite)  # before any work
    dev = resolve_device(device)
    options = config.dataset_options()
    train_ds = load_on_first_use(config.dataset, config.train_subset, root=data_root, download=download, **options)
    learner = build(config, device=dev, data_root=data_root)
    if config.steps == 0:
        return learner, None
    way, shot, query = config.train_setting
    sampler = EpisodeSampler(train_ds, way, shot, query, seed=config.seed, device=dev, too_few=config.too_few)
    val = None
    if config.val_subset and config.val_episodes > 0:
        val_ds = load_on_first_use(config.dataset, config.val_subset, root=data_root, download=download, **options)
        val = EpisodeSampler(
            val_ds, config.n_way, config.k_shot, config.n_query, seed=config.seed, device=dev, too_few=config.too_few
        ).fixed(config.val_episodes)
    # The config that rebuilds this learner; the pretrained backbone's weights live in the checkpoint.
    recorded = {
        **resolve(config, data_root=data_root).to_dict(),
        "backbone_checkpoint": None,
        "config_version": CONFIG_VERSION,
    }
    result = train(
        learner,
        sampler,
        steps=config.steps,
        meta_batch_size=config.meta_batch_size,
        optimizer=config.optimizer,
        lr=config.lr,
        schedule=config.schedule,
        step_size=config.step_size,
        gamma=config.gamma,
        val_episodes=val,
        val_every=config.val_every,
        val_batch_size=config.eval_batch_size,
        log_every=config.log_every,
        out_dir=out_dir,
        checkpoint_every=config.checkpoint_every,
        resume=resume,
        amp=config.amp,
        grad_clip=config.grad_clip,
        progress=progress,
        seed=config.seed,
        config=recorded,
        overwrite=overwrite,
        allow_changes=allow_changes,
        tensorboard=config.tensorboard,
    )
    if result.checkpoint is not None and result.checkpoint.name == "best.safetensors":
        load_weights(learner, result.checkpoint, dev)
    return learner, result


def test_episodes(
    config: RunConfig,
    *,
    data_root: str | Path | None = None,
    device: str | torch.device = "auto",
    download: bool = False,
) -> Any:
    """The fixed test episodes of ``config``: ``eval_episodes`` drawn with ``seed``, or Lake's 20 runs.

    ``download=True`` fetches a missing dataset (or Lake's runs) from its official source
    first, as ``metafew eval`` does unless ``--no-download``; see :func:`train_run`.
    """
    from .data import EpisodeSampler, lake_runs
    from .data.download import fetch_on_first_use, load_on_first_use

    if config.test == "lake":
        return fetch_on_first_use(
            "Lake's one-shot runs", lambda dl: lake_runs(data_root, download=dl), download=download, root=data_root
        )
    test_ds = load_on_first_use(
        config.dataset, config.test_subset, root=data_root, download=download, **config.dataset_options()
    )
    return EpisodeSampler(
        test_ds, config.n_way, config.k_shot, config.n_query, seed=config.seed, device=device, too_few=config.too_few
    ).fixed(config.eval_episodes)


test_episodes.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def load_run(
    path: str | Path, *, device: str | torch.device = "cpu", overrides: dict[str, Any] | None = None
) -> tuple[RunConfig, Learner, dict[str, Any]]:
    """Rebuild a trained learner from a checkpoint of :func:`train_run`, reading the file once.

    ``overrides`` change evaluation settings (dataset, N, K, ...) of the recorded config;
    a pretrained backbone file (``metafew pretrain``) is wrapped in the ``learner`` the
    overrides name (default ProtoNet). Returns ``(config, learner, record)``.

    >>> import tempfile
    >>> run = tempfile.mkdtemp()
    >>> _ = train_run(RunConfig(train_way=5, steps=2, val_episodes=0), run, device="cpu", progress=False)
    >>> config, learner, _ = load_run(f"{run}/last.safetensors", overrides={"n_way": 20})
    >>> config.n_way, type(learner).__name__
    (20, 'ProtoNet')
    """
    from .checkpoint import check_state_dict, load_state, read_backbone_record
    from .device import resolve_device

    dev = resolve_device(device)
    state, record = load_state(path, dev)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if record.get("config"):
        config = RunConfig.from_record(record, path)
        if overrides.get("backbone") not in (None, config.backbone):
            raise CheckpointError(f"{path} holds a {config.backbone} backbone, not {overrides['backbone']}")
        weights = state.get("learner", state) if isinstance(state, dict) and "learner" in state else state
    elif "arch" in record:  # a bare pretrained backbone: wrap it in a learner
        rec = read_backbone_record(path)
        config = RunConfig(
            learner=overrides.get("learner", "protonet"),
            backbone=rec.arch,
            backbone_options=dict(rec.options),
            backbone_checkpoint=str(path),
            dataset=_loadable(record.get("dataset")),
            in_channels=rec.in_channels,
            image_size=rec.image_size,
            steps=0,
        )
        weights = None
    else:
        raise CheckpointError(f"{path} records no run configuration (not written by metafew train or metafew pretrain)")
    if overrides:
        if "dataset" in overrides and "test_subset" not in overrides:
            overrides["test_subset"] = "test"
        d = {**config.to_dict(), **overrides}
        d["name"] = ""
        config = RunConfig.from_dict(d, where=str(path))
    learner = build(config, device=dev)
    if weights is not None:
        check_state_dict(learner, weights, str(path))
        learner.load_state_dict(weights)
    return config, learner, record


def is_run_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a checkpoint of a trained run (``best``/``last.safetensors`` of train or bench)."""
    from .checkpoint import read_header

    _, doc = read_header(path)
    return doc.get("kind") == "state" and bool((doc.get("record") or {}).get("config"))


def run_backbone(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    data_root: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained backbone of a run checkpoint (in eval mode) and what :func:`~metafew.checkpoint.save_backbone` records.

    The second item holds ``mean``, ``std``, ``dataset``, ``classes`` and ``extra``: the
    normalisation of a run is that of its training dataset (read from the record when it
    holds one, else from ``load_dataset(config.dataset, config.train_subset)``'s spec).
    That dataset is loaded under the first-use rule: ``download=True`` fetches it when it is
    missing (:func:`metafew.data.download.load_on_first_use`), as ``metafew export-backbone``
    does unless ``--no-download``.

    >>> import tempfile
    >>> run = tempfile.mkdtemp()
    >>> _ = train_run(RunConfig(train_way=5, steps=2, val_episodes=0), run, device="cpu", progress=False)
    >>> backbone, info = run_backbone(f"{run}/last.safetensors")
    >>> type(backbone).__name__, info["dataset"], len(info["mean"])
    ('Conv4', 'omniglot/vinyals-train', 1)
    """
    config, learner, record = load_run(Path(path), device=device)
    if not record.get("config"):
        raise CheckpointError(f"{path} is not a run checkpoint (it records no run configuration)")
    mean, std, dataset, classes = record.get("mean"), record.get("std"), record.get("dataset"), None
    if mean is None or std is None:
        from .data.download import load_on_first_use

        train_ds = load_on_first_use(
            config.dataset, config.train_subset, root=data_root, download=download, **config.dataset_options()
        )
        mean, std, dataset, classes = train_ds.mean, train_ds.std, train_ds.name, list(train_ds.classes)
    extra = {
        "run": {"checkpoint": str(Path(path).expanduser()), "learner": config.learner, "step": record.get("step")},
        "config": config.to_dict(),
    }
    info = {"mean": tuple(mean), "std": tuple(std), "dataset": dataset, "classes": classes, "extra": extra}
    return learner.backbone.eval(), info


def export_backbone(
    checkpoint: str | Path,
    out: str | Path,
    *,
    data_root: str | Path | None = None,
    overwrite: bool = False,
    download: bool = False,
) -> Path:
    """Write the backbone of a run checkpoint as a plain backbone file (:func:`metafew.checkpoint.save_backbone`).

    ``out`` is checked before anything is read: an existing metafew backbone is
    replaced only with ``overwrite=True``, anything else never. Returns the file written.
    The run's training dataset (its normalisation and classes) is read from ``data_root``;
    ``download=True`` fetches it there on first use (see :func:`run_backbone`).
    """
    from .checkpoint import checkpoint_path, save_backbone
    from .outputs import guard_output

    if Path(out).expanduser().is_dir():  # before a suffix is added: a folder is never a backbone file
        guard_output(out, "backbone", overwrite=overwrite)
    path = guard_output(checkpoint_path(out), "backbone", overwrite=overwrite)
    if not is_run_checkpoint(checkpoint):
        raise CheckpointError(
            f"{checkpoint} is not a run checkpoint (best/last.safetensors of metafew train or bench); "
            "a backbone file needs no export"
        )
    backbone, info = run_backbone(checkpoint, data_root=data_root, download=download)
    return save_backbone(
        backbone,
        path,
        mean=info["mean"],
        std=info["std"],
        dataset=info["dataset"],
        classes=info["classes"],
        extra=info["extra"],
    )


def _loadable(dataset: Any) -> str:
    """A dataset name a backbone record names, as :func:`metafew.load_dataset` takes it."""
    from .data import available_datasets

    name = str(dataset or "omniglot")
    base = name.split("/")[-1].split("-")[0] if "/" in name else name
    return base if base in available_datasets() else name


def config_defaults() -> dict[str, Any]:
    """Each field's default (for help texts)."""
    out: dict[str, Any] = {}
    for f in fields(RunConfig):
        if f.default is not MISSING:
            out[f.name] = f.default
    return out
