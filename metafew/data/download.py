"""Downloading, checksumming and extracting dataset archives, and "not found" messages.

Everything here writes atomically: a download streams into a partial file in the cache
dir (``<cache>/downloads/``) and is moved into place only once its md5 matches; an archive
is extracted into a temporary folder and its top-level entries are renamed into the
destination only when extraction finished. An interrupted download or extraction never
leaves a half-written dataset that would later look complete, nor an empty folder.

Downloads say what they fetch, from where, how big and where it goes (one line on
stderr); a dropped connection is retried and resumed from the partial file with an HTTP
``Range`` request (also by the next call, after a crash), and the md5 is checked over the
whole file at the end. Two environment variables steer them:

* ``METAFEW_MIRROR``: a base URL (or local folder) holding the official files under their
  own names (``images_background.zip``, ``pneumoniamnist.npz``, ...), used instead of the
  official hosts, e.g. behind a firewall. The md5s are checked as usual.
* ``METAFEW_OFFLINE=1``: never download; a missing dataset raises its "not found" error.

First use (:func:`load_on_first_use`, :func:`ensure_dataset`): the one place where a
caller that may download (``download=True`` in Python, every ``metafew`` command unless
``--no-download``) turns a "not found" into a download of the dataset's official files,
saying so in one line first; refused (``download=False``, ``--no-download``,
``$METAFEW_OFFLINE``), the "not found" error says where it looked and why nothing was
fetched. Like torchvision's ``download=True``, nothing is ever fetched unless asked: the
Python functions default to ``download=False``; the command line asks unless told not to.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import DatasetError, DatasetNotFoundError
from ..paths import cache_dir
from ..progress import progress

if TYPE_CHECKING:
    from .base import FewShotDataset

T = TypeVar("T")

__all__ = [
    "DownloadFailed",
    "check_md5",
    "check_md5_cached",
    "dataset_not_found",
    "download_and_extract",
    "download_and_extract_all",
    "download_file",
    "ensure_dataset",
    "extract_archive",
    "fetch_on_first_use",
    "forget_md5",
    "load_on_first_use",
    "making_dirs",
    "md5sum",
    "offline",
    "source_url",
]

_CHUNK = 1 << 20
_USER_AGENT = "metafew (https://github.com/metafew/metafew)"
_RETRIES = 3  # further attempts after a dropped connection, each resuming the partial file
_RETRY_WAIT = 1.0  # seconds before the first retry; doubled for each further one
_OFF = ("", "0", "false", "no", "off")


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


def offline() -> bool:
    """Whether ``$METAFEW_OFFLINE`` forbids downloading (any value but empty/0/false/no/off)."""
    return os.environ.get("METAFEW_OFFLINE", "").strip().lower() not in _OFF


def source_url(url: str) -> str:
    """Where ``url`` is fetched from: itself, or the file of the same name under ``$METAFEW_MIRROR``.

    The mirror is a base URL (``https://mirror.example/metafew``) or a local folder
    (``/mnt/datasets``) holding the official files under their own names.

    >>> import os; os.environ["METAFEW_MIRROR"] = "http://127.0.0.1:8000/data/"
    >>> source_url("https://zenodo.org/record/6496656/files/breastmnist.npz?download=1")
    'http://127.0.0.1:8000/data/breastmnist.npz'
    >>> del os.environ["METAFEW_MIRROR"]
    """
    mirror = os.environ.get("METAFEW_MIRROR", "").strip()
    if not mirror:
        return url
    name = _file_name(url)
    if "://" not in mirror:  # a local folder
        return Path(mirror).expanduser().absolute().joinpath(name).as_uri()
    return mirror.rstrip("/") + "/" + urllib.parse.quote(name)


def _file_name(url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path.rstrip("/").split("/")[-1]) or "download"


def _size(n: int | None) -> str:
    if n is None:
        return "size unknown"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@contextlib.contextmanager
def making_dirs(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Create the folder ``path`` (and missing parents) for the ``with`` block; on an error, remove
    again those of them that this created and that are still empty, so a failed download
    leaves no empty folder behind."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for d in missing:  # deepest first
            try:
                d.rmdir()  # only an empty folder
            except OSError:
                break
        raise


class DownloadFailed(DatasetError):
    """A download that did not complete or did not match its md5 (nothing was written to the data root)."""


class _Dropped(ConnectionError):
    """The server closed the connection before sending the whole file."""


def _partial_path(source: str, name: str, md5: str | None) -> Path:
    key = (md5 or hashlib.sha1(source.encode()).hexdigest())[:12].lower()
    return cache_dir() / "downloads" / f"{key}-{name}.partial"


def _fetch(source: str, partial: Path, timeout: float, into: Path, name: str) -> None:
    """Append ``source`` to ``partial`` from its current size (a ``Range`` request), until complete."""
    offset = partial.stat().st_size if partial.is_file() else 0
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(source, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            if (e.headers.get("Content-Range") or "").endswith(f"/{offset}"):
                return None  # the partial file is already whole (its md5 says whether it is right)
            partial.unlink()  # longer than the file: not a prefix of it, start again
            return _fetch(source, partial, timeout, into, name)
        raise
    with response:
        status = getattr(response, "status", None) or response.getcode()
        length = response.headers.get("Content-Length")
        size = int(length) if length and length.isdigit() else None
        total = None
        if offset and status == 206:
            total_text = (response.headers.get("Content-Range") or "").rpartition("/")[2]
            total = int(total_text) if total_text.isdigit() else (offset + size if size is not None else None)
        else:
            offset = 0  # a full answer (the server ignores Range, or a fresh start)
            total = size
        if offset:
            print(f"resuming {name} from {source} at {_size(offset)} of {_size(total)} to {into}", file=sys.stderr)
        else:
            print(f"downloading {name} from {source} ({_size(total)}) to {into}", file=sys.stderr)
        done = offset
        with (
            open(partial, "ab" if offset else "wb") as out,
            progress(
                total=total, initial=offset, desc=f"downloading {name}", unit="B", unit_scale=True, unit_divisor=1024
            ) as bar,
        ):
            for block in iter(lambda: response.read(_CHUNK), b""):
                out.write(block)
                done += len(block)
                bar.update(len(block))
    if total is not None and done < total:
        raise _Dropped(f"connection closed after {_size(done)} of {_size(total)}")


def _retryable(e: BaseException) -> bool:
    if isinstance(e, urllib.error.HTTPError):
        return e.code >= 500 or e.code in (408, 429)
    return isinstance(e, (ConnectionError, TimeoutError, http.client.HTTPException)) or (
        isinstance(e, urllib.error.URLError) and isinstance(e.reason, (ConnectionError, TimeoutError))
    )


@contextlib.contextmanager
def _one_downloader(partial: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock on ``partial``'s download, so two processes never append to one file.

    The lock file is removed when done (while still held); a waiter that then gets the
    lock of a removed file opens the current one again.
    """
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path = partial.with_name(partial.name + ".lock")
    while True:
        lock = open(path, "a")  # closed below, which releases the lock
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"waiting for another metafew process that is downloading {name}", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            current = os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        lock.close()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        lock.close()  # releases the lock


def _place(src: Path, dest: Path) -> None:
    """Move a finished download into place atomically, also across file systems."""
    try:
        os.replace(src, dest)
        return
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    src.unlink(missing_ok=True)


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    md5: str | None = None,
    *,
    timeout: float = 60.0,
    into: str | os.PathLike[str] | None = None,
    retries: int | None = None,
) -> Path:
    """Fetch ``url`` to ``dest`` (atomically), checking its md5 when given; resumable.

    Prints one line saying what is downloaded, from where, how big and where it goes
    (``into``, default ``dest``). The bytes go to a partial file in ``<cache>/downloads/``;
    a dropped connection is retried ``retries`` times (default 3), each resuming from the
    partial file with a ``Range`` request, and a partial file left by an earlier failed
    call is resumed too. The md5 is checked over the whole file at the end: on a mismatch
    the partial file is deleted (a resumed one is fetched once more from the start) and a
    :class:`DownloadFailed` (a :class:`DatasetError`) names the file, the source, the
    expected and the actual md5.
    ``$METAFEW_MIRROR`` replaces the host (:func:`source_url`); ``$METAFEW_OFFLINE`` refuses
    with a :class:`DatasetNotFoundError`. A folder this creates is removed again on failure.
    """
    dest = Path(dest)
    shown = Path(into) if into is not None else dest
    if offline():
        raise DatasetNotFoundError(
            f"{shown} is missing and METAFEW_OFFLINE is set, so {_file_name(url)} is not downloaded from {url}; "
            "unset METAFEW_OFFLINE, or point METAFEW_DATA (or --data-root) at a folder that already has it"
        )
    source = source_url(url)
    name = _file_name(url)
    partial = _partial_path(source, name, md5)
    attempts = 1 + (_RETRIES if retries is None else retries)
    with making_dirs(dest.parent), _one_downloader(partial, name):
        try:
            restarted = False
            failures = 0
            while True:
                resumed = partial.is_file() and partial.stat().st_size > 0
                try:
                    _fetch(source, partial, timeout, shown, name)
                except (OSError, http.client.HTTPException) as e:
                    failures += 1
                    if not _retryable(e) or failures >= attempts:
                        raise
                    wait = _RETRY_WAIT * 2 ** (failures - 1)
                    print(f"{name}: {e}; retrying in {wait:g} s", file=sys.stderr)
                    time.sleep(wait)
                    continue
                if md5 is not None:
                    actual = md5sum(partial)
                    if actual != md5.lower():
                        partial.unlink(missing_ok=True)
                        if resumed and not restarted:  # the old partial file may not belong: once from zero
                            restarted = True
                            continue
                        raise DownloadFailed(
                            f"checksum mismatch for {name} downloaded from {source}: expected md5 {md5}, "
                            f"got {actual}; the download was discarded and nothing was written to {shown} - "
                            "try again, or check that the source (METAFEW_MIRROR) serves the official file"
                        )
                break
            _place(partial, dest)
        except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError and disk errors are OSErrors
            kept = " (the partial download is kept and resumes next time)" if partial.is_file() else ""
            raise DownloadFailed(
                f"could not download {source} to {shown}: {e}{kept}; check the network or set METAFEW_MIRROR, "
                "or point METAFEW_DATA (or --data-root) at a folder that already has it"
            ) from e
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
    """Download an archive (resumable, see :func:`download_file`), check its md5, extract it into ``dest_dir``.

    Returns the extracted top-level entries. The archive itself is deleted afterwards; on
    a failure ``dest_dir`` is left as it was (a folder this created is removed again).
    """
    return download_and_extract_all([(url, md5)], dest_dir)


def download_and_extract_all(
    archives: Sequence[tuple[str, str | None]], dest_dir: str | os.PathLike[str]
) -> list[Path]:
    """Download every ``(url, md5)`` archive first, then extract them all into ``dest_dir``.

    A dataset shipped as several archives (Omniglot's two image sets) is thus extracted
    only when all of them arrived intact: a failed download or checksum leaves nothing
    extracted and no empty folder. Returns the extracted top-level entries.
    """
    dest_dir = Path(dest_dir)
    entries: list[Path] = []
    with making_dirs(dest_dir):
        work = cache_dir() / "downloads"
        work.mkdir(parents=True, exist_ok=True)
        fetched: list[Path] = []
        try:
            for url, md5 in archives:
                staging = Path(tempfile.mkdtemp(dir=work, prefix=".archive-"))
                fetched.append(staging)
                download_file(url, staging / _file_name(url), md5, into=dest_dir)
            for staging in fetched:
                for archive in staging.iterdir():
                    entries.extend(extract_archive(archive, dest_dir))
        finally:
            for staging in fetched:
                shutil.rmtree(staging, ignore_errors=True)
    return entries


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
    if can_download and offline():
        how = f"unset METAFEW_OFFLINE and pass download=True or run `metafew data download {cli_name}`, or "
    elif can_download:
        how = f"pass download=True or run `metafew data download {cli_name}`, or "
    else:
        how = "download it yourself, or "
    return DatasetNotFoundError(
        f"{title} not found: looked for {where}. To get it, {how}point METAFEW_DATA "
        f"(or --data-root) at a folder that already has it. Official source: {' and '.join(urls)}"
    )


# -- first use: download a missing dataset when the caller may ---------------------------------

REFUSED_BY_CALLER = "--no-download / download=False"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def fetch_on_first_use(
    what: str,
    load: Callable[[bool], T],
    *,
    download: bool,
    official: bool | Callable[[], bool] = True,
    root: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> T:
    """``load(False)``; when that raises "not found", download and ``load(True)`` if allowed.

    The shared first-use rule of every front (``metafew train/eval/pretrain/adapt/bench``,
    :func:`metafew.train_run` and friends with ``download=True``): a dataset with an official
    source (``official``) that is not in the data root is fetched into it, after one line
    (to ``log``, default stderr) saying that and how to refuse or point at a copy; the
    download itself then prints what, from where, how big and where to. Refused
    (``download`` False, or ``$METAFEW_OFFLINE`` set), the :class:`DatasetNotFoundError`
    says where it looked and why nothing was downloaded; a download that fails (no network,
    a checksum mismatch: :class:`DownloadFailed`, nothing left behind) is a
    :class:`DatasetNotFoundError` saying both. Processes that find the same dataset missing
    at once (the ranks of a ``torchrun`` job) take turns: one downloads, the others wait
    and then load what it fetched. A dataset without an official source
    (``folder:PATH``, mini-ImageNet) raises its own error unchanged.
    """
    try:
        return load(False)
    except DatasetNotFoundError as e:
        if not (official() if callable(official) else official):
            raise
        refused = REFUSED_BY_CALLER if not download else "METAFEW_OFFLINE is set" if offline() else None
        if refused is not None:
            raise DatasetNotFoundError(f"{e} (not downloaded: {refused})") from e
    from ..paths import data_roots

    where = " or ".join(str(r) for r in data_roots(root))
    key = hashlib.sha1(f"{what}\n{where}".encode()).hexdigest()[:12]
    # One process fetches (the ranks of a torchrun job, two commands started together); the
    # others wait for it, then find the dataset there.
    with _one_downloader(cache_dir() / "downloads" / f"first-use-{key}", what):
        try:
            return load(False)
        except DatasetNotFoundError:
            pass
        (log or _stderr)(
            f"{what} is not in {where}: downloading it from its official source on first use "
            "(--no-download or download=False refuses; --data-root or METAFEW_DATA points at a copy you already have)"
        )
        try:
            return load(True)
        except DownloadFailed as e:  # offline machine, firewall, bad mirror: say both what is missing and why
            raise DatasetNotFoundError(f"{what} not found in {where}, and downloading it failed: {e}") from e


def _downloadable(name: str) -> bool:
    """Whether ``name`` has an official source metafew downloads (not ``folder:``, not mini-ImageNet)."""
    from .registry import _lookup

    spec = _lookup(name)[0]
    return bool(spec.url) and spec.download is not None


def load_on_first_use(
    name: str,
    subset: str | None = None,
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> FewShotDataset:
    """:func:`metafew.load_dataset` under the first-use rule (:func:`fetch_on_first_use`).

    What :func:`metafew.train_run`, :func:`metafew.config.test_episodes` and
    :func:`metafew.config.run_pretrain` load their named datasets with: found, it is
    loaded once; missing, it is downloaded first when ``download`` is True (and
    ``$METAFEW_OFFLINE`` is not set), else the "not found" error names where it looked.
    """
    from .registry import load_dataset

    return fetch_on_first_use(
        name,
        lambda dl: load_dataset(name, subset, root=root, download=dl, **options),
        download=download,
        official=lambda: _downloadable(name),
        root=root,
        log=log,
    )


def ensure_dataset(
    name: str,
    subset: str | None = None,
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> None:
    """Make sure dataset ``name`` is in a data root before code that loads it by name runs.

    Cheap when it is there (:func:`metafew.data.dataset_info`, nothing decoded); otherwise
    :func:`load_on_first_use` fetches it (``download``) or raises its "not found" error.
    For the commands whose loading happens deeper down (``metafew bench``, ``adapt``,
    ``predict --evaluate NAME``).
    """
    from .registry import dataset_info

    if dataset_info(name, root).get("found"):
        return
    load_on_first_use(name, subset, root=root, download=download, log=log, **options)
