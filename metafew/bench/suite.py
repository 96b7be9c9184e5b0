"""Benchmark suites: TOML files of rows (dataset x learner x backbone x N-way K-shot).

A suite file has optional ``name``/``description``, a ``[defaults]`` table applied to
every row, and ``[[rows]]`` tables; every key of a row is a field of :class:`~metafew.config.RunConfig` or a report key of :class:`BenchRow`
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

A ``[pretrain]`` table (a :class:`~metafew.config.PretrainConfig`) makes the runner
pretrain one backbone first (once: it is kept, keyed by the recipe) and start every row
that names no ``backbone_checkpoint`` from it.

``--suite NAME`` resolves as a path, else ``./benchmarks/suites/NAME.toml``, else the
suites that came with metafew: ``<repo>/benchmarks/suites`` in a source checkout, the
same files installed as ``metafew/suites`` by a wheel (``python -m build`` in a clone, then ``pip install dist/metafew-*.whl``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from ..config import PretrainConfig, RunConfig, check_keys
from ..errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_REPO_SUITES = Path(__file__).resolve().parents[2] / "benchmarks" / "suites"
_WHEEL_SUITES = Path(__file__).resolve().parents[1] / "suites"  # pyproject maps benchmarks/suites here
SUITES_DIR = _REPO_SUITES if _REPO_SUITES.is_dir() else _WHEEL_SUITES


@dataclass
class BenchRow:
    """One benchmark row: a :class:`~metafew.config.RunConfig` and the published figure beside it.

    ``published`` is a percentage: accuracy, or error rate when ``metric == "error"``.
    In a suite file a row is flat: its keys are RunConfig fields plus ``published``,
    ``source``, ``notes``, ``metric`` and ``expected_seconds`` (what the row took where the
    suite was made, training and test: the runner's plan and ETA add these up).
    """

    config: RunConfig
    published: float | None = None
    source: str = ""
    notes: str = ""
    metric: Literal["accuracy", "error"] = "accuracy"
    expected_seconds: float | None = None

    REPORT_KEYS: ClassVar[tuple[str, ...]] = ("published", "source", "notes", "metric", "expected_seconds")

    def __post_init__(self) -> None:
        if self.metric not in ("accuracy", "error"):
            raise ConfigError(f"row {self.name}: metric must be 'accuracy' or 'error', got {self.metric!r}")
        if self.published is not None and (
            not isinstance(self.published, (int, float)) or isinstance(self.published, bool)
        ):
            raise ConfigError(f"row {self.name}: published must be a number, got {self.published!r}")
        if self.expected_seconds is not None and (
            not isinstance(self.expected_seconds, (int, float))
            or isinstance(self.expected_seconds, bool)
            or not self.expected_seconds >= 0
        ):
            raise ConfigError(f"row {self.name}: expected_seconds must be a number >= 0, got {self.expected_seconds!r}")
        for key in ("source", "notes"):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"row {self.name}: {key} must be a string, got {getattr(self, key)!r}")

    @property
    def name(self) -> str:
        return self.config.name

    def to_dict(self) -> dict[str, Any]:
        """The flat row, as a suite file writes it."""
        return {**self.config.to_dict(), **{k: getattr(self, k) for k in self.REPORT_KEYS}}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "row") -> BenchRow:
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: a row must be a table of keys, got {d!r}")
        check_keys(d, RunConfig.field_names() + list(cls.REPORT_KEYS), where)
        missing = [k for k in ("learner", "n_way", "k_shot") if k not in d]
        if missing:
            raise ConfigError(f"{where}: missing {missing[0]!r}")
        report = {k: d[k] for k in cls.REPORT_KEYS if k in d}
        config = RunConfig.from_dict({k: v for k, v in d.items() if k not in cls.REPORT_KEYS}, where=where)
        try:
            return cls(config, **report)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e


@dataclass
class Suite:
    name: str
    rows: list[BenchRow]
    description: str = ""
    path: Path | None = None
    pretrain: PretrainConfig | None = None  # a [pretrain] recipe: the backbone every row starts from
    published_label: str = "published"  # what the published figures are, in tables and plots


def resolve_suite(name_or_path: str | Path) -> Path:
    """A path, else ``./benchmarks/suites/NAME.toml``, else the suites that came with metafew."""
    p = Path(name_or_path).expanduser()
    candidates = [p, Path.cwd() / "benchmarks" / "suites" / f"{name_or_path}.toml", SUITES_DIR / f"{name_or_path}.toml"]
    for c in candidates:
        if c.is_file():
            return c
    shipped = sorted(x.stem for x in SUITES_DIR.glob("*.toml")) if SUITES_DIR.is_dir() else []
    hint = f"; available suites: {', '.join(shipped)}" if shipped else ""
    raise ConfigError(
        f"suite {str(name_or_path)!r} not found (not a file, nor benchmarks/suites/{name_or_path}.toml){hint}"
    )


def load_suite(name_or_path: str | Path) -> Suite:
    """Read and check a suite TOML file."""
    path = resolve_suite(name_or_path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from e
    if "runner" in doc:  # a suite file with its own script (e.g. medical.toml), not rows for this runner
        raise ConfigError(f"{path} is not a `metafew bench` suite; run it with `python {doc['runner']}`")
    extra = sorted(set(doc) - {"name", "description", "published_label", "defaults", "rows", "pretrain"})
    if extra:
        raise ConfigError(
            f"{path}: unknown top-level key {extra[0]!r} "
            "(expected name, description, published_label, [pretrain], [defaults], [[rows]])"
        )
    label = doc.get("published_label", "published")
    if not isinstance(label, str) or not label.strip():
        raise ConfigError(f"{path}: published_label must be a non-empty string, got {label!r}")
    pretrain = None
    if "pretrain" in doc:
        if not isinstance(doc["pretrain"], dict):
            raise ConfigError(f"{path}: [pretrain] must be a table, got {doc['pretrain']!r}")
        pretrain = PretrainConfig.from_dict(doc["pretrain"], where=f"{path.name} [pretrain]")
    defaults = doc.get("defaults", {})
    rows_doc = doc.get("rows", [])
    if not rows_doc:
        raise ConfigError(f"{path}: no [[rows]]")
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: [defaults] must be a table, got {defaults!r}")
    if not isinstance(rows_doc, list):
        raise ConfigError(f"{path}: rows must be [[rows]] tables, got {rows_doc!r}")
    rows = [
        BenchRow.from_dict({**defaults, **r} if isinstance(r, dict) else r, where=f"{path.name} row {i + 1}")
        for i, r in enumerate(rows_doc)
    ]
    names = [r.name for r in rows]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"{path}: two rows are named {dup!r}; give them distinct `name`s")
    return Suite(str(doc.get("name", path.stem)), rows, str(doc.get("description", "")), path, pretrain, label)
