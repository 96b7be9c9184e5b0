"""Where metafew looks for data and keeps its caches.

* data root: the ``root`` argument (``--data-root``), else ``$METAFEW_DATA``, else the user
  data dir ``<cache dir>/data`` (``~/.cache/metafew/data``). That one folder is where
  datasets are downloaded to and what messages name.
* development data: in a metafew source checkout with ``../shared/data`` beside it (this
  project's developers and CI), datasets missing from the user data dir are also looked
  for there when neither an argument nor ``$METAFEW_DATA`` is given; the first use prints
  one note saying so. Setting ``METAFEW_DATA`` (or passing a root) overrides it.
* cache dir: ``$METAFEW_CACHE``, else ``$XDG_CACHE_HOME/metafew``, else ``~/.cache/metafew``.

Data roots may be read-only (a shared mount); metafew only ever writes to the cache dir
and to a data root it downloaded into itself.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def cache_dir() -> Path:
    """The directory for decoded-image caches, downloads and pretrained weights."""
    env = os.environ.get("METAFEW_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "metafew"


def user_data_dir() -> Path:
    """The per-user data root used when neither a root nor ``$METAFEW_DATA`` is given: ``<cache dir>/data``."""
    return cache_dir() / "data"


def dev_data_dir() -> Path | None:
    """``../shared/data`` beside this metafew source checkout, when there is one (development and CI only).

    Only a checkout counts (the folder above the package holds metafew's ``pyproject.toml``),
    never an installed copy, so a user's machine never looks outside its own folders.
    """
    checkout = Path(__file__).resolve().parents[1]
    try:
        if 'name = "metafew"' not in (checkout / "pyproject.toml").read_text(errors="replace"):
            return None
    except OSError:
        return None
    shared = checkout.parent / "shared" / "data"
    return shared if shared.is_dir() else None


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The data root: the explicit argument, else ``$METAFEW_DATA``, else :func:`user_data_dir`.

    Downloads go here and messages name it; :func:`data_roots` adds the development
    fallback that finding a dataset also searches.
    """
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("METAFEW_DATA")
    if env:
        return Path(env).expanduser()
    return user_data_dir()


def data_roots(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Every folder a dataset is looked for in, in order: :func:`data_root`, then the development data.

    The development folder (:func:`dev_data_dir`) is only added when neither ``root`` nor
    ``$METAFEW_DATA`` is given, so either of them overrides it.
    """
    first = data_root(root)
    explicit = root is not None or bool(os.environ.get("METAFEW_DATA"))
    dev = None if explicit else dev_data_dir()
    return [first] if dev is None or dev == first else [first, dev]


_noted: set[Path] = set()


def data_candidates(root: str | os.PathLike[str] | None, relative: Sequence[str]) -> list[Path]:
    """Each of ``relative`` (e.g. ``"omniglot"``, ``"medmnist/x.npz"``; ``""`` is the root itself) under each data root."""
    return [(r / rel) if rel else r for r in data_roots(root) for rel in relative]


def find_data(
    root: str | os.PathLike[str] | None, relative: Sequence[str], found: Callable[[Path], bool]
) -> Path | None:
    """The first of :func:`data_candidates` for which ``found(path)`` holds, or None.

    A dataset found in the development folder prints, once per process, a one-line note
    saying so and how to override it, so this fallback is never silent.
    """
    roots = data_roots(root)
    for r in roots:
        for rel in relative:
            candidate = (r / rel) if rel else r
            if found(candidate):
                if len(roots) > 1 and r == roots[-1]:
                    note_dev_data(r)
                return candidate
    return None


def note_dev_data(folder: Path) -> None:
    """Say once (on stderr) that development data in ``folder`` is being used."""
    if folder in _noted:
        return
    _noted.add(folder)
    print(f"metafew: note: using development data in {folder} (set METAFEW_DATA to override)", file=sys.stderr)


def make_readable(path: str | os.PathLike[str]) -> None:
    """Give a file the usual permissions (``0o666`` less the umask): temp files start private."""
    mask = os.umask(0)
    os.umask(mask)
    try:
        os.chmod(path, 0o666 & ~mask)
    except OSError:
        pass


def atomic_write(path: Path, write: Callable[[str], None], *, fsync: bool = False) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, then move it into place.

    A crash or Ctrl-C mid-write leaves the previous file intact and no partial one behind;
    a process killed mid-write leaves its temp file, which the next write to ``path`` removes.
    """
    folder = path.parent if str(path.parent) else Path(".")
    clean_stale_tmp(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        make_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def clean_stale_tmp(path: Path, *, max_age: float = 3600.0) -> list[Path]:
    """Remove temp files of interrupted :func:`atomic_write` calls to ``path``; returns those removed.

    A temp file names its writer's pid (``.NAME.PID.XXXX.tmp``): it is stale when that
    process is gone. One without a pid (older metafew) is stale after ``max_age`` seconds.
    """
    folder = path.parent if str(path.parent) else Path(".")
    prefix = f".{path.name}."
    removed: list[Path] = []
    try:
        candidates = [p for p in folder.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")]
    except OSError:
        return removed
    for p in candidates:
        middle = p.name[len(prefix) : -len(".tmp")]
        pid_text = middle.split(".", 1)[0]
        try:
            if pid_text.isdigit() and "." in middle:
                stale = not _alive(int(pid_text))
            else:
                stale = time.time() - p.stat().st_mtime > max_age
            if stale and p.is_file():
                p.unlink()
                removed.append(p)
        except OSError:
            continue
    return removed
