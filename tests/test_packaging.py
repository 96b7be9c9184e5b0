"""pyproject.toml's supported Python versions agree with each other and with what was tested.

``requires-python``, the ``Programming Language :: Python :: 3.X`` classifiers, the versions
``.ci/python-matrix`` runs by default and the versions it recorded as passing in
``benchmarks/results/python-matrix.json`` must all name the same versions, so a version is
claimed only once its install and smoke tests passed.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
MATRIX = REPO / "benchmarks" / "results" / "python-matrix.json"


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split("."))


def classified_versions() -> list[str]:
    """The ``3.X`` of every ``Programming Language :: Python :: 3.X`` classifier, in order."""
    found = [
        m.group(1)
        for c in PROJECT["classifiers"]
        if (m := re.fullmatch(r"Programming Language :: Python :: (3\.\d+)", c))
    ]
    return sorted(found, key=_key)


def matrix_default_versions() -> list[str]:
    """The versions ``.ci/python-matrix`` runs when given none."""
    text = (REPO / ".ci" / "python-matrix").read_text(encoding="utf-8")
    m = re.search(r"^\[ \$\{#VERSIONS\[@\]\} -eq 0 \] && VERSIONS=\(([^)]*)\)", text, re.M)
    assert m, ".ci/python-matrix no longer sets its default VERSIONS=(...) where this test looks"
    return m.group(1).split()


def test_classifiers_agree_with_requires_python() -> None:
    versions = classified_versions()
    assert versions, "pyproject.toml names no 'Programming Language :: Python :: 3.X' classifier"
    spec = SpecifierSet(PROJECT["requires-python"])
    for v in versions:
        assert f"{v}.0" in spec, f"classifier Python {v} is outside requires-python {spec}"
    lower = re.fullmatch(r">=\s*(3\.\d+)", PROJECT["requires-python"].strip())
    assert lower, f"requires-python should be a lower bound '>=3.X', got {PROJECT['requires-python']!r}"
    assert versions[0] == lower.group(1), (
        f"requires-python {PROJECT['requires-python']} but the oldest classifier is {versions[0]}"
    )
    minors = [_key(v)[1] for v in versions]
    assert minors == list(range(minors[0], minors[-1] + 1)), f"a version is missing between the classifiers {versions}"
    assert "Programming Language :: Python :: 3 :: Only" in PROJECT["classifiers"]


def test_classifiers_are_the_versions_the_matrix_passed() -> None:
    doc = json.loads(MATRIX.read_text(encoding="utf-8"))
    runs = {r["python"]: r for r in doc["versions"]}
    passed = sorted((v for v, r in runs.items() if r["status"] == "passed"), key=_key)
    assert passed == classified_versions(), (
        f"pyproject's classifiers {classified_versions()} but {MATRIX.name} records {passed} as passing "
        "(run `bash .ci/python-matrix` after changing either)"
    )
    for v in passed:
        r = runs[v]
        assert r["failed"] == 0 and r["passed"] > 0, r
        assert r["torch"] and r["python_full"].startswith(f"{v}."), r
    assert matrix_default_versions() == classified_versions()


def test_tomli_is_required_where_tomllib_is_missing() -> None:
    """metafew reads TOML suites with tomllib, which Python 3.10 lacks: tomli stands in there."""
    lowest = SpecifierSet(PROJECT["requires-python"])
    if "3.10.0" not in lowest:
        return
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    tomli = [r for r in reqs if r.name == "tomli"]
    assert tomli and tomli[0].marker is not None, "Python 3.10 is supported but tomli is not a dependency there"
    assert tomli[0].marker.evaluate({"python_version": "3.10"})
    assert not tomli[0].marker.evaluate({"python_version": "3.11"})


#: ``pip install metafew`` (or ``metafew[extra]``, ``-U metafew``...) as if it came from the package index.
_FROM_INDEX = re.compile(r"pip3? install\s+(?:-{1,2}[\w-]+\s+)*[\"']?metafew(?![\w./-])")
#: Wording that places such a command in the future, where the README has it.
_NOT_YET = re.compile(r"once (?:it|metafew) is on (?:PyPI|the package index)")


def test_no_text_offers_metafew_from_the_package_index() -> None:
    """metafew is not on PyPI: the package and README say `pip install -e ".[extra]"` from a clone instead."""
    texts = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "metafew").rglob("*.py"))]
    found = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for path in texts
        if path.exists()
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if _FROM_INDEX.search(line) and not _NOT_YET.search(line)
    ]
    assert not found, "metafew is not on PyPI; say `pip install -e .` from a clone:\n" + "\n".join(found)
    for offered in ("pip install metafew", "pip install metafew[tensorboard]", 'pip install -U "metafew[dev]"'):
        assert _FROM_INDEX.search(offered), offered  # the check itself bites
    for fine in ('pip install -e ".[tensorboard]"', "pip install dist/metafew-0.1.0-py3-none-any.whl"):
        assert not _FROM_INDEX.search(fine), fine
