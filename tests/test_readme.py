"""Every code block of README.md runs exactly as printed, so the README cannot drift.

* Python blocks: each one on its own, in a fresh interpreter (its own imports and set-up),
  in a temporary working directory.
* Bash blocks: every command (a ``\\``-continued line counts as one) must start with
  ``metafew ``; each runs through the installed ``metafew`` command, in order, in one
  temporary working directory, and must exit 0. Any other command line fails the test.
  Only the blocks under the headings in ``EXEMPT`` are not run (the set-up and development
  commands: they build the environment or run this very suite); their make targets and
  scripts must exist.

The data root is set the way the README tells users to set it (``METAFEW_DATA``), to the
session's real datasets, with ``METAFEW_OFFLINE=1`` so that nothing is downloaded: the
README's ``download=True`` then only finds what is already there. The fresh machine is
``tests/test_first_use_download.py``: the same blocks (``BASH``, ``PYTHON``, ``commands``
below), each on an empty data root, with a loopback file server standing in for the
official sources, so that first-use downloads are what make them work.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SCRIPT = Path(sys.executable).with_name("metafew")  # the console script of this environment, as users type it
METAFEW = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "metafew"]

# Blocks not run, by the heading they sit under, and why.
EXEMPT = {
    "metafew": "the two set-up commands: `make bench` / `make test` create .venv and run the suites themselves",
    "Development": "the development commands run this test suite, lint and CI (tests/test_style.py runs the linters)",
}


@dataclass(frozen=True)
class Block:
    heading: str
    language: str
    code: str
    line: int  # of the opening fence in README.md
    index: int  # 1, 2, ... among the blocks of its language under its heading

    @property
    def id(self) -> str:
        """A test id that stays put when lines are added above the block: language, heading, index."""
        return f"{self.language}-{re.sub(r'[^A-Za-z0-9]+', '-', self.heading).strip('-')}-{self.index}"


def readme_blocks() -> list[Block]:
    """The fenced code blocks of README.md, with the heading each one sits under."""
    blocks: list[Block] = []
    heading, fence, body, start = "", None, [], 0
    for number, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1):
        if fence is None:
            if line.startswith("#") and not line.startswith("#!"):
                heading = line.lstrip("#").strip()
            elif line.startswith("```"):
                fence, body, start = line[3:].strip(), [], number
        elif line.startswith("```"):
            index = 1 + sum(b.heading == heading and b.language == fence for b in blocks)
            blocks.append(Block(heading, fence, "\n".join(body) + "\n", start, index))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"README.md: the code block opened at line {start} is never closed"
    return blocks


def commands(code: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, blank and comment-only lines left out."""
    joined = re.sub(r"\\\n", " ", code)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


BLOCKS = readme_blocks()
PYTHON = [b for b in BLOCKS if b.language == "python"]
BASH = [b for b in BLOCKS if b.language == "bash" and b.heading not in EXEMPT]


def user_env(data_root: Path) -> dict[str, str]:
    """The environment of a user who did `export METAFEW_DATA=...` (one thread: CI runs two workers)."""
    env = dict(os.environ)
    env.update(
        METAFEW_DATA=str(data_root), METAFEW_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg"
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture()
def user_folders(tmp_path: Path, data_root: Path) -> Path:
    """A working directory holding the folders the README calls the user's own, made of real PneumoniaMNIST images.

    The test prepares them: ``my_xrays/<class>/`` (labelled, 20 training images per class),
    ``more_xrays/`` (60 other unlabeled training images) and ``new_images/`` (8 test images).
    """
    from PIL import Image

    with np.load(data_root / "medmnist" / "pneumoniamnist.npz") as f:
        images, labels, test = f["train_images"], f["train_labels"].reshape(-1), f["test_images"]
    for c, name in enumerate(("normal", "pneumonia")):
        (tmp_path / "my_xrays" / name).mkdir(parents=True)
        for i, j in enumerate(np.flatnonzero(labels == c)[:20]):
            Image.fromarray(images[j]).save(tmp_path / "my_xrays" / name / f"{i:03d}.png")
    (tmp_path / "more_xrays").mkdir()
    for i, j in enumerate(np.concatenate([np.flatnonzero(labels == c)[20:50] for c in (0, 1)])):
        Image.fromarray(images[j]).save(tmp_path / "more_xrays" / f"{i:03d}.png")
    (tmp_path / "new_images").mkdir()
    for i in range(8):
        Image.fromarray(test[i]).save(tmp_path / "new_images" / f"{i:03d}.png")
    return tmp_path


def test_readme_has_the_blocks_this_test_runs() -> None:
    assert len(PYTHON) >= 3 and BASH, [b.id for b in BLOCKS]
    unknown = [b.id for b in BLOCKS if b.language not in ("python", "bash")]
    assert not unknown, f"README blocks of a language this test does not run: {unknown}"
    exempt = [b for b in BLOCKS if b.language == "bash" and b.heading in EXEMPT]
    assert sorted({b.heading for b in exempt}) == sorted(EXEMPT), "an exempt heading lost its block"
    for b in BASH:  # fails on any line that is not a metafew command, before anything runs
        others = [c for c in commands(b.code) if not c.startswith("metafew ")]
        assert not others, f"README line {b.line}: only `metafew ...` commands are run by the tests: {others}"


def test_exempt_blocks_name_real_targets_and_scripts() -> None:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", makefile, re.M))
    for b in BLOCKS:
        if b.language != "bash" or b.heading not in EXEMPT:
            continue
        for command in commands(b.code):
            words = shlex.split(command, comments=True)
            if words[0] == "make":
                named = [w for w in words[1:] if "=" not in w]
                assert set(named) <= targets, f"README line {b.line}: no such make target in {command!r}"
            elif words[0] == "bash" or "/" in words[0]:
                script = words[1] if words[0] == "bash" else words[0]
                assert (REPO / script).is_file(), f"README line {b.line}: {script} does not exist"
            else:
                assert words[0].startswith(".venv/bin/"), f"README line {b.line}: unknown command {command!r}"


def test_readme_names_every_notebook_and_the_extras_it_offers() -> None:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib

    text = README.read_text(encoding="utf-8")
    for notebook in sorted((REPO / "notebooks").glob("*.ipynb")):
        assert f"`{notebook.stem}`" in text, f"README does not mention notebooks/{notebook.name}"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    offered = {e for group in re.findall(r'pip install -e "\.\[([\w,]+)\]"', text) for e in group.split(",")}
    assert {"dev", "notebooks"} <= offered, offered
    assert offered <= set(extras), f"README offers extras pyproject.toml lacks: {offered - set(extras)}"
    assert any(re.match(r"(jupyterlab|notebook)\b", d) for d in extras["notebooks"]), extras["notebooks"]
    if "python -m build" in text:  # the README's way to make a wheel works in the dev environment it sets up
        assert any(re.match(r"build\b", d) for d in extras["dev"]), extras["dev"]


def test_wheel_ships_data_weights_suites_and_every_subpackage(tmp_path: Path) -> None:
    """`python -m build` / `pip wheel .` from a clone: the README's way to install without the package index.

    Built from a copy of the sources, so no build/ or egg-info is written into the checkout
    (and a stale build/lib there cannot hide a missing package).
    """
    import shutil

    pytest.importorskip("setuptools", minversion="77", reason="building without isolation needs setuptools >= 77")
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in ("metafew", "benchmarks/suites"):
        shutil.copytree(REPO / part, src / part, ignore=ignore)
    for part in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / part, src / part)
    if importlib.util.find_spec("build") is not None:  # the dev extra has it: the README's command, as printed
        builder = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(src)]
    else:  # an environment installed before `build` joined the dev extra
        builder = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path)]
        builder.append(str(src))
    done = subprocess.run(builder, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (wheel,) = tmp_path.glob("metafew-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for pattern in ("metafew/data/splits/*/*.txt", "metafew/backbones/weights/*.safetensors", "metafew/suites/*.toml"):
        assert any(Path(n).match(pattern) for n in names), f"the wheel has no {pattern}"
    assert "metafew/suites/quick.toml" in names  # `metafew bench` after a plain install
    for init in REPO.glob("metafew/**/__init__.py"):  # every subpackage is listed in pyproject's packages
        assert init.relative_to(REPO).as_posix() in names, f"the wheel lacks {init.parent.relative_to(REPO)}"
    for split in (REPO / "metafew" / "data" / "splits").rglob("*.txt"):
        assert split.relative_to(REPO).as_posix() in names, f"the wheel lacks {split.relative_to(REPO)}"


@pytest.mark.slow
@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_block_runs_as_printed(block: Block, tmp_path: Path, data_root: Path) -> None:
    script = tmp_path / "readme_block.py"
    script.write_text(block.code, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, script.name],
        cwd=tmp_path,
        env=user_env(data_root),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"README line {block.line}:\n{done.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("block", BASH, ids=[b.id for b in BASH])
def test_command_block_runs_as_printed(block: Block, user_folders: Path, data_root: Path) -> None:
    env = user_env(data_root)
    for command in commands(block.code):
        assert command.startswith("metafew "), f"README line {block.line}: not a metafew command: {command!r}"
        argv = [*METAFEW, *shlex.split(command, comments=True)[1:]]
        done = subprocess.run(argv, cwd=user_folders, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (
            f"README line {block.line}: `{command}` exited {done.returncode}:\n{done.stderr[-3000:]}"
        )
