"""Where metafew looks for data and keeps its caches.

* data root: the ``root`` argument, else ``$METAFEW_DATA``, else ``~/.cache/metafew/data``.
* cache dir: ``$METAFEW_CACHE``, else ``$XDG_CACHE_HOME/metafew``, else ``~/.cache/metafew``.

Data roots may be read-only (a shared mount); metafew only ever writes to the cache dir
and to a data root it downloaded into itself.
"""

from __future__ import annotations

import os
import tempfile
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

    A crash or Ctrl-C mid-write leaves the previous file intact and no partial one behind.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.", suffix=".tmp")
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
