"""Every path metafew writes goes through here: it never changes a file it did not write.

* :func:`guard_output`: a file output. A path that is free is fine; an existing file is
  replaced only when it is recognisably a metafew file of the same ``kind`` (by its
  content: a safetensors file with a metafew record, JSON with a metafew ``format``, a
  PNG metafew drew...) *and* ``overwrite`` says so. Anything else is refused with a
  one-line :class:`OutputError` and left untouched.
* :func:`guard_run_dir`: a run folder (``metafew train``). It may hold only files a
  run writes; an existing run is continued (``resume``) or replaced (``overwrite``),
  never both silently.
* :func:`run_lock`: one writer per run folder (``.metafew.lock`` holds the owner's pid;
  a lock whose process is gone is stale and taken over).
* :func:`writing` / :func:`write_error`: an ``OSError`` while writing (read-only folder,
  full disk, a folder where a file should be) becomes one line naming the path.
* :func:`check_writable`: create an output folder and prove it is writable before the
  work starts.

A new command gets all of this by calling :func:`guard_output` on each output path.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import MetafewError

MODEL_FORMAT = "metafew-adapted-model"
REPORT_FORMAT = "metafew-adaptation-report"
PREDICTIONS_FORMAT = "metafew-predictions"
EVALUATION_FORMAT = "metafew-evaluation"
RUN_FORMAT = "metafew-run"
LOCK_NAME = ".metafew.lock"
MARKER_NAME = ".metafew-run"
#: What a run folder may hold (a run's own files, bench's cached test result, the marker and lock).
RUN_FILES = (
    "last.safetensors",
    "best.safetensors",
    "log.jsonl",
    "learning_curve.png",
    "result.json",
    MARKER_NAME,
    LOCK_NAME,
)


class OutputError(MetafewError, FileExistsError):
    """An output path is taken by something metafew did not write, or is unusable."""


# -- recognising metafew's files by their content --------------------------------------


def _safetensors_doc(path: Path) -> dict | None:
    """The metafew header document of a safetensors file, or None."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("metafew")
        doc = json.loads(raw or "null")
        return doc if isinstance(doc, dict) and doc.get("format") == "metafew" else None
    except Exception:
        return None


def _json_doc(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        return doc if isinstance(doc, dict) else None
    except Exception:
        return None


def _png_software(path: Path) -> str | None:
    try:
        from PIL import Image

        with Image.open(path) as img:
            return str(img.info.get("Software", "")) if img.format == "PNG" else None
    except Exception:
        return None


def is_model_file(path: Path) -> bool:
    """True when ``path`` is a safetensors file written by ``AdaptedModel.save`` (any format version)."""
    doc = _safetensors_doc(path)
    return doc is not None and (doc.get("record") or {}).get("model_format") == MODEL_FORMAT


def _is_backbone(path: Path) -> bool:
    doc = _safetensors_doc(path)
    return doc is not None and doc.get("kind") == "backbone"


def _is_state(path: Path) -> bool:
    doc = _safetensors_doc(path)
    return doc is not None and doc.get("kind") == "state" and not is_model_file(path)


def _is_report(path: Path) -> bool:
    return (_json_doc(path) or {}).get("format") == REPORT_FORMAT


def _is_png(path: Path) -> bool:
    return (_png_software(path) or "").startswith("metafew")


def _is_predictions(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096)
        if head.lstrip().startswith("{"):
            return (_json_doc(path) or {}).get("format") == PREDICTIONS_FORMAT
        first = next(csv.reader(io.StringIO(head)), [])
        return len(first) >= 3 and first[:2] == ["path", "class"] and all(c.startswith("p_") for c in first[2:])
    except Exception:
        return False


def _is_evaluation(path: Path) -> bool:
    doc = _json_doc(path) or {}
    return doc.get("format") == EVALUATION_FORMAT or {"checkpoint", "learner", "accuracies", "config"} <= set(doc)


def _is_bench(path: Path) -> bool:
    doc = _json_doc(path) or {}
    return {"suite", "metafew_version", "rows"} <= set(doc)


def _beside_bench(path: Path) -> bool:
    return _is_bench(path.with_suffix(".json"))


def _is_bench_md(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(64).startswith("# Benchmark suite `") and _beside_bench(path)
    except Exception:
        return False


def _is_bench_png(path: Path) -> bool:
    return _png_software(path) is not None and (_is_png(path) or _beside_bench(path))


def _is_jsonl_log(key: str) -> Callable[[Path], bool]:
    def check(path: Path) -> bool:
        try:
            with open(path, encoding="utf-8") as f:
                first = f.readline()
            row = json.loads(first)
            return isinstance(row, dict) and key in row
        except Exception:
            return False

    return check


CHECKS: dict[str, tuple[Callable[[Path], bool], str]] = {
    "model": (is_model_file, "a metafew model file"),
    "backbone": (_is_backbone, "a metafew backbone checkpoint"),
    "state": (_is_state, "a metafew training checkpoint"),
    "report": (_is_report, "a metafew adaptation report"),
    "png": (_is_png, "a metafew plot"),
    "predictions": (_is_predictions, "a metafew predictions file"),
    "evaluation": (_is_evaluation, "a metafew evaluation result"),
    "bench": (_is_bench, "a metafew benchmark results file"),
    "bench-md": (_is_bench_md, "a metafew benchmark table"),
    "bench-png": (_is_bench_png, "a metafew benchmark plot"),
    "pretrain-log": (_is_jsonl_log("epoch"), "a metafew pretraining log"),
    "train-log": (_is_jsonl_log("step"), "a metafew training log"),
}


def is_metafew_file(path: str | os.PathLike[str], kind: str) -> bool:
    """Whether ``path`` is a file metafew wrote, of ``kind`` (a key of :data:`CHECKS`)."""
    return CHECKS[kind][0](Path(path))


# -- the guard ------------------------------------------------------------------------


def _inside(p: Path, folder: Path) -> bool:
    try:
        p.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def guard_output(
    path: str | os.PathLike[str],
    kind: str,
    *,
    overwrite: bool = False,
    protect: Path | None = None,
    flag: str = "--overwrite",
) -> Path:
    """Raise OutputError unless ``path`` may be written: free, or a metafew ``kind`` file and ``overwrite``.

    Creates the parent folder (and proves it writable). ``protect``: a folder (the
    user's image data) nothing may be written into. ``flag`` names the option that
    allows replacing (for the message).
    """
    p = Path(path).expanduser()
    if protect is not None and _inside(p, protect):
        raise OutputError(f"refusing to write {p} inside the image folder {protect}; choose a path outside it")
    if p.is_dir():
        example = p / ("model.safetensors" if kind in ("model", "backbone") else "out")
        raise OutputError(f"{p} is a folder; give a file name, e.g. {example}")
    if p.exists() or p.is_symlink():
        ok, what = CHECKS[kind]
        if p.is_symlink() or not ok(p):
            raise OutputError(
                f"refusing to overwrite {p}: it exists and is not {what} (choose another path or remove it)"
            )
        if not overwrite:
            raise OutputError(f"{p} already exists (written by metafew); pass {flag} to replace it")
    check_writable(p.parent if str(p.parent) else Path("."), for_=p)
    return p


def check_writable(folder: Path, *, for_: Path | None = None) -> Path:
    """Create ``folder`` if needed and prove a file can be created in it (one-line OutputError if not)."""
    target = for_ or folder
    for up in [folder, *folder.parents]:
        if up.exists() and not up.is_dir():
            raise OutputError(f"cannot write {target}: {up} is a file, not a folder")
        if up.exists():
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".metafew-write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise write_error(target, e) from e
    return folder


def write_error(path: str | os.PathLike[str], e: OSError) -> OutputError:
    """A one-line OutputError for an OSError met while writing ``path``."""
    reason = {
        errno.ENOSPC: "the disk is full",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EISDIR: "it is a folder",
        errno.ENOTDIR: "a parent of it is a file, not a folder",
        errno.EDQUOT: "the disk quota is exceeded",
    }.get(e.errno or 0, e.strerror or str(e) or type(e).__name__)
    where = f" ({e.filename})" if e.filename and str(e.filename) != str(path) and ".tmp" not in str(e.filename) else ""
    advice = (
        "free some space or choose another location"
        if e.errno in (errno.ENOSPC, errno.EDQUOT)
        else "choose another location"
    )
    return OutputError(f"cannot write {path}: {reason}{where}; {advice}")


@contextlib.contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn an OSError inside the block into a one-line OutputError naming ``path``."""
    try:
        yield
    except OutputError:
        raise
    except OSError as e:
        raise write_error(path, e) from e


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` atomically (write errors as one line)."""
    from .paths import atomic_write

    def w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    with writing(path):
        return atomic_write(path, w)


def write_json(path: Path, doc: dict) -> Path:
    """Write strict JSON (no NaN/Infinity) atomically."""
    return write_text(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")


# -- run folders ------------------------------------------------------------------------


def _run_file_ok(p: Path) -> bool:
    name = p.name
    if name.startswith(".") and name.endswith(".tmp"):
        return True  # an interrupted atomic write's leftover: cleaned up by the next write
    if name == "tensorboard" and p.is_dir() and not p.is_symlink():  # --tensorboard's event files
        return all(e.name.startswith("events.out.tfevents.") and e.is_file() for e in p.iterdir())
    if name not in RUN_FILES or not p.is_file() or p.is_symlink():
        return False
    if name.endswith(".safetensors"):
        return _safetensors_doc(p) is not None
    if name == "log.jsonl":
        return p.stat().st_size == 0 or CHECKS["train-log"][0](p)
    if name == "learning_curve.png":
        return _png_software(p) is not None
    if name == "result.json":
        return {"spec", "row"} <= set(_json_doc(p) or {})
    return True


def holds_run(out: Path) -> bool:
    """Whether the run folder ``out`` holds weights of a run."""
    return (out / "last.safetensors").is_file() or (out / "best.safetensors").is_file()


def guard_run_dir(out: str | os.PathLike[str], *, resume: bool, overwrite: bool) -> Path:
    """Check a run folder before a run starts; creates it and writes its marker. Returns the path.

    Refused: a path that is a file; a folder holding anything a run does not write; a
    folder holding a run unless ``resume`` (continue it) or ``overwrite`` (replace it).
    """
    p = Path(out).expanduser()
    if p.exists() and not p.is_dir():
        raise OutputError(f"{p} is a file; a run folder is needed (choose another --out)")
    if p.is_dir():
        try:
            entries = sorted(p.iterdir())
        except OSError as e:
            raise OutputError(f"cannot read the run folder {p}: {e.strerror}") from e
        foreign = [e for e in entries if not _run_file_ok(e)]
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise OutputError(
                f"refusing to use {p} as a run folder: it holds {foreign[0].name}{more}, which metafew did not "
                "write (choose another --out or an empty folder)"
            )
        if holds_run(p) and not (resume or overwrite):
            raise OutputError(f"{p} already holds a run; pass --resume to continue it or --overwrite to start afresh")
    check_writable(p)
    marker = p / MARKER_NAME
    if not marker.exists():
        write_text(marker, json.dumps({"format": RUN_FORMAT}) + "\n")
    return p


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    except OSError:
        return False
    return True


def _read_lock(path: Path) -> tuple[int, str]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return int(doc.get("pid", -1)), str(doc.get("host", ""))
    except (OSError, ValueError, TypeError, AttributeError):
        return -1, ""


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Own ``folder`` for the block: a second process is refused (one line); a stale lock is taken over."""
    folder = Path(folder)
    lock = folder / LOCK_NAME
    host = socket.gethostname()
    me = json.dumps({"pid": os.getpid(), "host": host})
    for _ in range(3):
        try:
            with writing(lock):
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except OutputError as e:
            if not lock.exists():
                raise
            del e
            pid, owner_host = _read_lock(lock)
            if pid == os.getpid() and owner_host == host:
                raise OutputError(f"{folder} is already being written by this process") from None
            if _pid_alive(pid) and owner_host in ("", host):
                raise OutputError(
                    f"{folder} is in use by another metafew process (pid {pid}); wait for it to finish, "
                    f"or remove {lock} if no such process is running"
                ) from None
            if owner_host not in ("", host):
                raise OutputError(
                    f"{folder} is in use by process {pid} on {owner_host}; remove {lock} if that run has ended"
                ) from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        break
    else:  # pragma: no cover - a race lost three times
        raise OutputError(f"could not take the lock {lock}; try again")
    try:
        yield lock
    finally:
        if _read_lock(lock) == (os.getpid(), host):
            lock.unlink(missing_ok=True)
