"""What the standard few-shot benchmarks share: packaged class splits, safe unpickling, array resizing.

* :func:`split_classes` reads ``metafew/data/splits/<dataset>/<subset>.txt`` (one class per
  line, ``#`` comments naming the paper and repository the split comes from).
* :func:`load_pickle` reads the pickles those datasets are distributed as (CIFAR-100's
  python version, mini-ImageNet's ``mini-imagenet-cache-*.pkl``, tieredImageNet's
  ``*_labels.pkl`` and ``*_images_png.pkl``) with an unpickler that builds only plain
  containers and numpy arrays, so a tampered file cannot run code.
* :func:`resize_array` brings an already decoded ``[N, C, H, W]`` uint8 array to another
  size with the decode policy of :mod:`metafew.data.decode` (bicubic cover-crop).
"""

from __future__ import annotations

import io
import os
import pickle
from importlib import resources
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from ..errors import DatasetError
from .decode import convert_image

__all__ = [
    "as_text",
    "decode_bytes",
    "file_stamp",
    "load_pickle",
    "resize_array",
    "split_classes",
    "split_fields",
    "str_keys",
]

# The only globals a distributed dataset pickle needs: numpy's array and scalar rebuilders
# (numpy 1.x and 2.x spell the module differently) and the codecs call Python 3 uses to
# pickle bytes at protocol 2.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("collections", "OrderedDict"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (only numpy arrays are allowed)")


def load_pickle(source: str | os.PathLike[str] | IO[bytes], what: str | None = None) -> Any:
    """Unpickle a dataset file (path or open binary file) that holds only containers and numpy arrays.

    Python 2 pickles are read with ``encoding="bytes"``, so their ``str`` keys come back as
    ``bytes`` (use :func:`str_keys`). Any other global, or a corrupt file, is a one-line
    :class:`DatasetError` naming ``what`` (default: the path).
    """
    name = what or str(source)
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                return _SafeUnpickler(f, encoding="bytes").load()
        return _SafeUnpickler(source, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as e:
        raise DatasetError(f"{name}: not a readable dataset pickle ({type(e).__name__}: {e})") from e


def str_keys(d: Any, what: str) -> dict[str, Any]:
    """A pickled dict with its ``bytes`` keys (Python 2 pickles) decoded to ``str``."""
    if not isinstance(d, dict):
        raise DatasetError(f"{what}: expected a pickled dict, got {type(d).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in d.items()}


def as_text(values: Any) -> list[str]:
    """A pickled list of names (``str``, ``bytes`` or numpy strings) as ``str``."""
    return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in list(values)]


def split_fields(dataset: str, subset: str) -> list[list[str]]:
    """The comma-separated fields of every class line of a packaged split file (comments skipped)."""
    try:
        text = (
            resources.files("metafew.data").joinpath("splits").joinpath(dataset).joinpath(f"{subset}.txt").read_text()
        )
    except FileNotFoundError as e:
        raise DatasetError(f"metafew has no packaged {dataset} split {subset!r}") from e
    return [ln.strip().split(",") for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def split_classes(dataset: str, subset: str) -> list[str]:
    """The classes of a packaged split, in file order: ``split_classes("mini-imagenet", "val")[0] == "n01855672"``."""
    return [fields[0] for fields in split_fields(dataset, subset)]


def resize_array(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 ``[N, C, H, W]`` to ``[N, C, *size]`` with :func:`~metafew.data.decode.convert_image`'s cover-crop."""
    if images.shape[2:] == tuple(size):
        return images
    channels = images.shape[1]
    out = np.empty((len(images), channels, *size), dtype=np.uint8)
    for i, img in enumerate(images):
        hwc = img[0] if channels == 1 else img.transpose(1, 2, 0)
        out[i] = convert_image(Image.fromarray(np.ascontiguousarray(hwc)), size, channels)
    return out


def decode_bytes(data: bytes | np.ndarray, size: tuple[int, int], channels: int) -> np.ndarray:
    """One encoded image (PNG/JPEG bytes, or a uint8 numpy buffer as ``cv2.imencode`` makes) to ``[C, *size]``."""
    raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    with Image.open(io.BytesIO(raw)) as img:
        return convert_image(img, size, channels)


def file_stamp(paths: list[Path]) -> list[tuple[str, int, int]]:
    """``(path, size, mtime_ns)`` of each file: the cache-key part that changes when a source file does."""
    out = []
    for p in paths:
        st = p.stat()
        out.append((str(p.resolve()), st.st_size, st.st_mtime_ns))
    return out
