"""Keys for metafew's caches: what produced a cached file, so that a change invalidates it.

A cached pretrained backbone or decoded dataset is only valid for the inputs that made
it. The parts of a key, each cheap to compute on every use:

* :func:`source_fingerprint` / :func:`dataset_fingerprint`: the data it was made from.
  The md5 of the source file when it is known (a MedMNIST ``.npz`` whose md5 metafew
  checks anyway), otherwise the sorted list of files under the source with their sizes
  (and modification times, unless ``mtimes=False``): one ``stat`` per file, no image read
  (Omniglot's 32,460 PNGs: well under a second), never a full hash of the images.
* :func:`code_checksum`: the metafew modules that compute it, as their syntax trees with
  docstrings left out, so reformatting, comments and docs do not invalidate a cache but a
  changed line of code does.
* :func:`library_versions`: metafew, torch, numpy and Pillow versions (local build tags
  such as ``+cu130`` are dropped: the same release computes the same thing on CPU and GPU).

:func:`decoded_cache_key` combines them for a decoded-images cache.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "code_checksum",
    "dataset_fingerprint",
    "decoded_cache_key",
    "library_versions",
    "source_fingerprint",
]

#: bump when what a fingerprint covers changes (every key then changes once)
FINGERPRINT_VERSION = 1

#: the modules whose code decides every decoded array
DECODE_MODULES = ("metafew.data.decode",)


def _hash(doc: Any, n: int = 16) -> str:
    return hashlib.sha1(json.dumps(doc, sort_keys=True, default=str, separators=(",", ":")).encode()).hexdigest()[:n]


def _files(root: Path, mtimes: bool) -> list[tuple[str, int, int]]:
    """``(relative posix path, size, mtime_ns or 0)`` of every file under ``root``, hidden entries left out, sorted."""
    base = str(root)
    cut = len(base) + 1
    stack = [base]
    out: list[tuple[str, int, int]] = []
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as it:
            for e in it:
                if e.name.startswith("."):
                    continue  # .DS_Store, editor and lock files: not part of a dataset
                if e.is_dir():
                    stack.append(e.path)
                elif e.is_file():
                    st = e.stat()
                    out.append((e.path[cut:].replace(os.sep, "/"), st.st_size, st.st_mtime_ns if mtimes else 0))
    out.sort()
    return out


def source_fingerprint(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    md5: str | None = None,
    mtimes: bool = True,
) -> str:
    """A short hash of the data at ``paths`` (files or folders), cheap enough to compute on every load.

    With ``md5`` (the known checksum of a single source file, e.g. a dataset archive or
    ``.npz``) the fingerprint is that checksum: moving or re-downloading the same file does
    not change it. Otherwise each file under ``paths`` contributes its path relative to its
    root, its size and, with ``mtimes`` (default), its modification time: an added, removed,
    renamed or rewritten file changes the fingerprint. A missing path raises FileNotFoundError.
    """
    if md5 is not None:
        return _hash({"v": FINGERPRINT_VERSION, "md5": md5.lower()})
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    listing: list[Any] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            listing.append([p.name, _files(p, mtimes)])
        else:
            st = p.stat()  # FileNotFoundError for a missing path
            listing.append([p.name, st.st_size, st.st_mtime_ns if mtimes else 0])
    return _hash({"v": FINGERPRINT_VERSION, "files": listing})


def dataset_fingerprint(name: str, root: str | os.PathLike[str] | None = None, *, mtimes: bool = True) -> str | None:
    """:func:`source_fingerprint` of where the registered dataset ``name`` was found, or None when it is not.

    Uses :func:`metafew.data.dataset_info` (no image is read): its ``path`` (a folder or a
    file) and its ``md5`` when the dataset states one.
    """
    from .data.registry import dataset_info

    info = dataset_info(name, root)
    path = info.get("path")
    if not info.get("found") or not path:
        return None
    md5 = info.get("md5") if Path(path).is_file() else None
    return source_fingerprint(path, md5=md5, mtimes=mtimes)


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def code_checksum(modules: Iterable[str]) -> dict[str, str]:
    """``{module: hash}`` of the code of each module (by import name), docstrings and comments left out.

    Hashes the module's syntax tree, so formatting, comments and docstrings do not count
    and a change to what the code does does. A module without Python source (compiled)
    is keyed by its file's size instead.
    """
    out: dict[str, str] = {}
    for name in sorted(set(modules)):
        module = importlib.import_module(name)
        try:
            source = inspect.getsource(module)
        except (OSError, TypeError):
            file = getattr(module, "__file__", None)
            out[name] = f"size:{Path(file).stat().st_size}" if file else "builtin"
            continue
        tree = _strip_docstrings(ast.parse(source))
        out[name] = hashlib.sha1(ast.dump(tree, include_attributes=False).encode()).hexdigest()[:12]
    return out


def _release(version: str) -> str:
    return version.split("+")[0]


def library_versions(*extra: str) -> dict[str, str]:
    """Versions of metafew and torch (and of the ``extra`` distributions, e.g. "numpy", "pillow")."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from . import __version__

    out = {"metafew": __version__, "torch": _release(torch.__version__)}
    for dist in extra:
        try:
            out[dist] = _release(version(dist))
        except PackageNotFoundError:
            out[dist] = "absent"
    return out


def decoded_cache_key(*parts: object, sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
                      md5: str | None = None) -> str:  # fmt: skip
    """A 16-hex key of a decoded-images cache: ``parts`` + the source data + decode code + library versions.

    ``parts`` are what the caller already keys by (its ``_VERSION`` tag, the image size,
    the file list...); ``sources`` (with ``md5`` when the source file's checksum is known)
    are fingerprinted by :func:`source_fingerprint`. The decoded pixels depend on
    :mod:`metafew.data.decode`, numpy and Pillow (its resampling), so those are in the key;
    torch is not (decoding never uses it).
    """
    doc = {
        "parts": [repr(p) for p in parts],
        "sources": None if sources is None and md5 is None else source_fingerprint(sources or [], md5=md5),
        "code": code_checksum(DECODE_MODULES),
        "versions": {k: v for k, v in library_versions("numpy", "pillow").items() if k != "torch"},
    }
    return _hash(doc)
