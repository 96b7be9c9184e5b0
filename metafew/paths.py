"""Where metafew looks for data and keeps its caches.

* data root: the ``root`` argument, else ``$METAFEW_DATA``, else ``~/.cache/metafew/data``.
* cache dir: ``$METAFEW_CACHE``, else ``$XDG_CACHE_HOME/metafew``, else ``~/.cache/metafew``.

Data roots may be read-only (a shared mount); metafew only ever writes to the cache dir
and to a data root it downloaded into itself.
"""

from __future__ import annotations

import os
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
