"""Downloading, checksumming and extracting dataset archives, and "not found" messages.

Everything here writes atomically: a download streams into a temporary file next to
its destination and is renamed into place only once its md5 matches; an archive is
extracted into a temporary folder and its top-level entries are renamed into the
destination only when extraction finished. An interrupted download or extraction
never leaves a half-written dataset that would later look complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

from ..errors import DatasetError, DatasetNotFoundError
from ..paths import cache_dir
from ..progress import progress

__all__ = [
    "check_md5",
    "check_md5_cached",
    "dataset_not_found",
    "download_and_extract",
    "download_file",
    "extract_archive",
    "forget_md5",
    "md5sum",
]

_CHUNK = 1 << 20
_USER_AGENT = "metafew (https://github.com/metafew/metafew)"


def md5sum(path: str | os.PathLike[str]) -> str:
    """The hex md5 of a file, read in 1 MiB chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _mismatch(name: str, expected: str, actual: str, source: str | None = None) -> DatasetError:
    src = f" (from {source})" if source else ""
    return DatasetError(
        f"checksum mismatch for {name}{src}: expected md5 {expected}, got {actual}; "
        "the file is corrupt or incomplete - delete it and download it again"
    )


def check_md5(path: str | os.PathLike[str], expected: str) -> None:
    """Raise :class:`DatasetError` naming the file, expected and actual md5 unless they match."""
    actual = md5sum(path)
    if actual.lower() != expected.lower():
        raise _mismatch(str(path), expected, actual)


def check_md5_cached(path: str | os.PathLike[str], expected: str) -> None:
    """Like :func:`check_md5`, but hash each file only once.

    A passing verdict is remembered in the cache dir, keyed by the file's absolute path,
    size and mtime, so repeated loads of a large ``.npz`` cost one ``stat``. A file that
    changes on disk (new size or mtime) is hashed again.
    """
    p = Path(path).resolve()
    st = p.stat()
    stamp = {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "md5": expected.lower()}
    marker = _md5_marker(p)
    try:
        if json.loads(marker.read_text()) == stamp:
            return
    except (OSError, ValueError):
        pass
    check_md5(p, expected)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=marker.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(stamp, f)
        os.replace(tmp, marker)
    except OSError:
        pass  # a read-only cache only costs hashing again next time


def _md5_marker(resolved: Path) -> Path:
    return cache_dir() / "checksums" / (hashlib.sha1(str(resolved).encode()).hexdigest()[:16] + ".json")


def forget_md5(path: str | os.PathLike[str]) -> None:
    """Drop the cached passing md5 verdict of ``path`` (:func:`check_md5_cached`), so the next check hashes it.

    For a file found corrupt when read although its size and mtime still match the verdict
    (a flipped byte); never raises.
    """
    try:
        _md5_marker(Path(path).resolve()).unlink(missing_ok=True)
    except OSError:
        pass


def download_file(url: str, dest: str | os.PathLike[str], md5: str | None = None, *, timeout: float = 60.0) -> Path:
    """Stream ``url`` to ``dest`` (atomically), checking its md5 when given.

    The bytes go to a hidden temporary file in ``dest``'s folder and are hashed while
    they stream; on a checksum mismatch the temporary file is deleted and a
    :class:`DatasetError` names the file, the expected and the actual md5.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
    tmp = Path(tmp_name)
    h = hashlib.md5()
    try:
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            total = response.headers.get("Content-Length")
            size = int(total) if total and total.isdigit() else None
            with progress(
                total=size, desc=f"downloading {dest.name}", unit="B", unit_scale=True, unit_divisor=1024
            ) as bar:
                for block in iter(lambda: response.read(_CHUNK), b""):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
        if md5 is not None and h.hexdigest() != md5.lower():
            raise _mismatch(dest.name, md5, h.hexdigest(), url)
        os.replace(tmp, dest)
    except OSError as e:  # URLError, HTTPError and disk errors are all OSErrors
        raise DatasetError(f"could not download {url} to {dest}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def extract_archive(archive: str | os.PathLike[str], dest_dir: str | os.PathLike[str]) -> list[Path]:
    """Extract a ``.zip``/``.tar``/``.tar.gz``/``.tgz`` into ``dest_dir``; return its top-level entries.

    Extraction happens in a temporary folder inside ``dest_dir``; each top-level entry
    is then renamed into place (replacing a previous copy), so ``dest_dir`` never holds
    a partially extracted tree. Paths escaping the folder are refused.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest_dir, prefix=".extract-"))
    try:
        try:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as z:
                    z.extractall(staging)  # zipfile drops absolute and ".." components
            elif tarfile.is_tarfile(archive):
                with tarfile.open(archive) as t:
                    if hasattr(tarfile, "data_filter"):
                        t.extractall(staging, filter="data")
                    else:  # Python < 3.11.4: check member paths by hand
                        root = staging.resolve()
                        for m in t.getmembers():
                            if not (staging / m.name).resolve().is_relative_to(root) or m.issym() or m.islnk():
                                raise DatasetError(f"{archive}: refusing to extract unsafe member {m.name!r}")
                        t.extractall(staging)
            else:
                raise DatasetError(f"{archive} is neither a zip nor a tar archive")
        except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
            raise DatasetError(f"{archive} is a corrupt archive: {e}") from e
        entries = []
        for item in sorted(staging.iterdir()):
            if item.name == "__MACOSX":
                continue
            target = dest_dir / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(item, target)
            entries.append(target)
        return entries
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_and_extract(url: str, md5: str | None, dest_dir: str | os.PathLike[str]) -> list[Path]:
    """Download an archive to a temporary file in ``dest_dir``, check its md5, extract it there.

    Returns the extracted top-level entries. The archive itself is deleted afterwards.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    name = url.rstrip("/").split("/")[-1].split("?")[0] or "archive"
    tmp_dir = Path(tempfile.mkdtemp(dir=dest_dir, prefix=".download-"))
    try:
        archive = download_file(url, tmp_dir / name, md5)
        return extract_archive(archive, dest_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def dataset_not_found(
    title: str,
    looked: Sequence[str | os.PathLike[str]],
    cli_name: str,
    url: str | Sequence[str],
    *,
    can_download: bool = True,
) -> DatasetNotFoundError:
    """The error for a missing dataset: where we looked and how to get it, in one line.

    Args:
        title: readable dataset name, e.g. ``"Omniglot"``.
        looked: the full paths checked, the preferred one first.
        cli_name: the name for ``metafew data download NAME``.
        url: the official source(s).
        can_download: whether ``download=True`` can fetch it.
    """
    paths = [str(Path(p).expanduser().absolute()) for p in looked]
    where = paths[0] + (f" (also tried {', '.join(paths[1:])})" if len(paths) > 1 else "")
    urls = [url] if isinstance(url, str) else list(url)
    how = (
        f"pass download=True or run `metafew data download {cli_name}`, or "
        if can_download
        else "download it yourself, or "
    )
    return DatasetNotFoundError(
        f"{title} not found: looked for {where}. To get it, {how}point METAFEW_DATA "
        f"(or --data-root) at a folder that already has it. Official source: {' and '.join(urls)}"
    )
