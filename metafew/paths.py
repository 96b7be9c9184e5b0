"""Where metafew looks for data and keeps its caches.

* data root: the ``root`` argument, else ``$METAFEW_DATA``, else ``~/.cache/metafew/data``.
* cache dir: ``$METAFEW_CACHE``, else ``$XDG_CACHE_HOME/metafew``, else ``~/.cache/metafew``.

Data roots may be read-only (a shared mount); metafew only ever writes to the cache dir
and to a data root it downloaded into itself.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """The directory for decoded-image caches, downloads and pretrained weights."""
    env = os.environ.get("METAFEW_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "metafew"


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the data root: explicit argument, ``$METAFEW_DATA``, then the cache."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("METAFEW_DATA")
    if env:
        return Path(env).expanduser()
    return cache_dir() / "data"


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
