"""Benchmark suites: TOML files of rows (dataset x learner x backbone x N-way K-shot).

A suite file has optional ``name``/``description``, a ``[defaults]`` table applied to
every row, and ``[[rows]]`` tables; every key of a row is a field of :class:`RowSpec`
(unknown keys are an error, so a typo never silently falls back to a default)::

    name = "quick"
    [defaults]
    dataset = "omniglot"
    backbone = "conv4"
    [[rows]]
    learner = "protonet"
    n_way = 5
    k_shot = 1
    steps = 300
    published = 98.8
    source = "Snell et al. 2017, Table 1"

``--suite NAME`` resolves as a path, else ``./benchmarks/suites/NAME.toml``, else the
suites that came with metafew: ``<repo>/benchmarks/suites`` in a source checkout, the
same files installed as ``metafew/suites`` by a wheel (``pip install metafew``).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_REPO_SUITES = Path(__file__).resolve().parents[2] / "benchmarks" / "suites"
_WHEEL_SUITES = Path(__file__).resolve().parents[1] / "suites"  # pyproject maps benchmarks/suites here
SUITES_DIR = _REPO_SUITES if _REPO_SUITES.is_dir() else _WHEEL_SUITES


@dataclass
class RowSpec:
    """One benchmark row: what to train, how, how to test it, and the published figure beside it.

    Figures (``published``) are percentages: accuracy, or error rate when ``metric == "error"``.
    ``train_way``/``train_shot``/``train_query`` default to the test setting; set them when
    the paper trained differently (ProtoNet: 60-way training). ``steps = 0`` evaluates the
    learner untrained (or on a pretrained ``backbone_checkpoint``) without meta-training.
    ``test = "lake"`` evaluates on Lake et al.'s 20 official 20-way 1-shot runs instead of
    sampled episodes.
    """

    learner: str
    n_way: int
    k_shot: int
    name: str = ""
    dataset: str = "omniglot"
    train_subset: str = "train"
    val_subset: str | None = "val"
    test_subset: str = "test"
    test: Literal["episodes", "lake"] = "episodes"
    learner_options: dict[str, Any] = field(default_factory=dict)
    backbone: str | None = None  # None: conv4, or the architecture of backbone_checkpoint
    backbone_options: dict[str, Any] = field(default_factory=dict)
    backbone_checkpoint: str | None = None
    n_query: int = 15
    train_way: int | None = None
    train_shot: int | None = None
    train_query: int | None = None
    steps: int = 1000
    meta_batch_size: int = 1
    optimizer: str | dict[str, Any] | None = None
    lr: float | None = None
    schedule: str = "constant"
    step_size: int | None = None
    gamma: float = 0.5
    grad_clip: float | None = None
    val_episodes: int = 100
    val_every: int = 500
    log_every: int = 100
    checkpoint_every: int = 1000
    eval_episodes: int = 600
    eval_batch_size: int = 16
    seed: int = 0
    metric: Literal["accuracy", "error"] = "accuracy"
    published: float | None = None
    source: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        self.learner = self.learner.lower()
        if not self.name:
            self.name = f"{self.learner}-{self.n_way}w{self.k_shot}s"
        if self.test not in ("episodes", "lake"):
            raise ConfigError(f"row {self.name}: test must be 'episodes' or 'lake', got {self.test!r}")
        if self.metric not in ("accuracy", "error"):
            raise ConfigError(f"row {self.name}: metric must be 'accuracy' or 'error', got {self.metric!r}")
        for key in ("n_way", "k_shot", "meta_batch_size", "eval_episodes"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"row {self.name}: {key} must be a positive integer, got {v!r}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"row {self.name}: steps must be a non-negative integer, got {self.steps!r}")
        if self.val_subset in ("", "none"):
            self.val_subset = None

    # -- derived settings ---------------------------------------------------------
    @property
    def train_setting(self) -> tuple[int, int, int]:
        """(N, K, Q) of training episodes."""
        return (
            self.train_way or self.n_way,
            self.train_shot or self.k_shot,
            self.n_query if self.train_query is None else self.train_query,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def train_key(self) -> str:
        """Short hash of everything that determines the trained weights (not eval or report fields)."""
        skip = {"name", "test", "test_subset", "n_query", "eval_episodes", "eval_batch_size", "metric",
                "published", "source", "notes", "log_every", "checkpoint_every"}
        d = {k: v for k, v in self.to_dict().items() if k not in skip}
        d["train_setting"] = self.train_setting  # n_way/k_shot also set the validation episodes
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "row") -> RowSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(known))})")
        missing = [k for k in ("learner", "n_way", "k_shot") if k not in d]
        if missing:
            raise ConfigError(f"{where}: missing {missing[0]!r}")
        return cls(**d)


@dataclass
class Suite:
    name: str
    rows: list[RowSpec]
    description: str = ""
    path: Path | None = None


def resolve_suite(name_or_path: str | Path) -> Path:
    """A path, else ``./benchmarks/suites/NAME.toml``, else the suites that came with metafew."""
    p = Path(name_or_path).expanduser()
    candidates = [p, Path.cwd() / "benchmarks" / "suites" / f"{name_or_path}.toml", SUITES_DIR / f"{name_or_path}.toml"]
    for c in candidates:
        if c.is_file():
            return c
    shipped = sorted(x.stem for x in SUITES_DIR.glob("*.toml")) if SUITES_DIR.is_dir() else []
    hint = f"; available suites: {', '.join(shipped)}" if shipped else ""
    raise ConfigError(f"suite {str(name_or_path)!r} not found (not a file, nor benchmarks/suites/{name_or_path}.toml){hint}")


def load_suite(name_or_path: str | Path) -> Suite:
    """Read and check a suite TOML file."""
    path = resolve_suite(name_or_path)
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from e
    if "runner" in doc:  # a suite file with its own script (e.g. medical.toml), not rows for this runner
        raise ConfigError(f"{path} is not a `metafew bench` suite; run it with `python {doc['runner']}`")
    extra = sorted(set(doc) - {"name", "description", "defaults", "rows"})
    if extra:
        raise ConfigError(f"{path}: unknown top-level key {extra[0]!r} (expected name, description, [defaults], [[rows]])")
    defaults = doc.get("defaults", {})
    rows_doc = doc.get("rows", [])
    if not rows_doc:
        raise ConfigError(f"{path}: no [[rows]]")
    rows = [RowSpec.from_dict({**defaults, **r}, where=f"{path.name} row {i + 1}") for i, r in enumerate(rows_doc)]
    names = [r.name for r in rows]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"{path}: two rows are named {dup!r}; give them distinct `name`s")
    return Suite(str(doc.get("name", path.stem)), rows, str(doc.get("description", "")), path)
