"""Lake et al. (2015)'s 20 official within-alphabet 20-way one-shot classification runs.

Each run of ``all_runs.zip`` holds ``training/classNN.png`` (one drawing of each of 20
characters: the support set), ``test/itemNN.png`` (20 other drawings of the same
characters: the queries) and ``class_labels.txt``, one line per query,
``runNN/test/itemMM.png runNN/training/classKK.png``: query MM is of the character of
support image KK. People make 4.5% errors on these runs.

Images are preprocessed exactly like :func:`metafew.data.Omniglot` (28x28 LANCZOS,
inverted so strokes are 255, normalised with Omniglot's mean/std), so a learner trained
on Omniglot applies directly. The zip is read in place, never extracted.
"""

from __future__ import annotations

import os
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import DatasetError
from ..paths import data_candidates, find_data
from .base import cache_key, cached_array
from .decode import decode_drawing
from .download import check_md5_cached, dataset_not_found, download_file, offline
from .episodes import Episode, EpisodeSet
from .normalize import Normalize
from .omniglot import OMNIGLOT_MEAN, OMNIGLOT_STD

__all__ = ["LAKE_RUNS_MD5", "LAKE_RUNS_URL", "find_lake_runs", "lake_runs", "locate_lake_runs"]

LAKE_RUNS_URL = "https://github.com/brendenlake/omniglot/raw/master/python/one-shot-classification/all_runs.zip"
LAKE_RUNS_MD5 = "e8996daecdf12afeeb4a53a179f06b19"
N_RUNS = 20
N_WAY = 20
_VERSION = "lake-runs-v1"  # bump when the decode changes
_LINE = re.compile(r"^(run\d+)/test/item(\d+)\.png\s+(run\d+)/training/class(\d+)\.png$")


_LAYOUTS = (
    "omniglot/one-shot-classification/all_runs.zip",
    "omniglot-py/one-shot-classification/all_runs.zip",
    "one-shot-classification/all_runs.zip",
)


def _candidates(root: str | os.PathLike[str] | None) -> list[Path]:
    return data_candidates(root, _LAYOUTS)


def find_lake_runs(root: str | os.PathLike[str] | None = None) -> Path | None:
    """Path of ``all_runs.zip`` under a data root (:func:`metafew.paths.data_roots`), or None."""
    return find_data(root, _LAYOUTS, Path.is_file)


def locate_lake_runs(root: str | os.PathLike[str] | None = None, download: bool = False) -> Path:
    """Path of a checked ``all_runs.zip``, downloading it when missing and ``download`` is set."""
    path = find_lake_runs(root)
    if path is None:
        if not download or offline():
            raise dataset_not_found(
                "Omniglot one-shot runs (all_runs.zip)", _candidates(root), "omniglot", LAKE_RUNS_URL
            )
        path = download_file(LAKE_RUNS_URL, _candidates(root)[0], LAKE_RUNS_MD5)
    check_md5_cached(path, LAKE_RUNS_MD5)
    return path


def _read_answers(path: Path) -> np.ndarray:
    """``[20 runs, 20 queries]``: the support index (0..19) of each query, from ``class_labels.txt``."""
    out = np.full((N_RUNS, N_WAY), -1, dtype=np.int64)
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        for r in range(N_RUNS):
            run = f"run{r + 1:02d}"
            label_file = f"{run}/class_labels.txt"
            if label_file not in names:
                raise DatasetError(f"{path}: {label_file} is missing; not the official all_runs.zip?")
            for ln in z.read(label_file).decode().splitlines():
                if not ln.strip():
                    continue
                m = _LINE.match(ln.strip())
                if not m or m.group(1) != run or m.group(3) != run:
                    raise DatasetError(f"{path}: unexpected line {ln!r} in {label_file}")
                item, cls = int(m.group(2)), int(m.group(4))
                if not (1 <= item <= N_WAY and 1 <= cls <= N_WAY) or out[r, item - 1] != -1:
                    raise DatasetError(f"{path}: bad or repeated answer {ln!r} in {label_file}")
                out[r, item - 1] = cls - 1
            if (out[r] < 0).any():
                raise DatasetError(f"{path}: {label_file} gives no answer for some test items")
    return out


def _read_images(path: Path, size: int) -> np.ndarray:
    """``[20 runs, 40, S, S]`` uint8: support images class01..20, then queries item01..20."""
    out = np.zeros((N_RUNS, 2 * N_WAY, size, size), dtype=np.uint8)
    with zipfile.ZipFile(path) as z:
        for r in range(N_RUNS):
            run = f"run{r + 1:02d}"
            for j in range(N_WAY):
                out[r, j] = _decode_member(z, path, f"{run}/training/class{j + 1:02d}.png", size)
                out[r, N_WAY + j] = _decode_member(z, path, f"{run}/test/item{j + 1:02d}.png", size)
    return out


def _decode_member(z: zipfile.ZipFile, path: Path, member: str, size: int) -> np.ndarray:
    """One drawing of the zip; a missing or corrupt member is a one-line error naming it."""
    try:
        return decode_drawing(z.read(member), size)
    except KeyError:
        raise DatasetError(f"{path}: {member} is missing; not the official all_runs.zip?") from None
    except (zipfile.BadZipFile, zlib.error, OSError, ValueError, SyntaxError) as e:
        raise DatasetError(
            f"{path}: {member} is not a readable image ({e}); the archive is corrupt - delete it and download it again"
        ) from None


def lake_runs(root: str | os.PathLike[str] | None = None, download: bool = False, image_size: int = 28) -> EpisodeSet:
    """The 20 official 20-way 1-shot runs as an :class:`EpisodeSet` of CPU episodes.

    Episode ``r``: ``support_x`` = the 20 training drawings, ``support_y`` = ``0..19``
    (``classNN`` has label ``NN-1``), ``query_x`` = the 20 test drawings in item order,
    ``query_y`` = the official answers, ``classes`` = ``arange(20)``. Images are normalised
    float ``[1, S, S]`` with Omniglot's mean/std.
    """
    path = locate_lake_runs(root, download)
    st = path.stat()
    key = cache_key(_VERSION, image_size, st.st_size, st.st_mtime_ns)
    if not isinstance(image_size, int) or image_size < 1:
        raise DatasetError(f"image_size must be a positive integer, got {image_size!r}")
    answers = torch.from_numpy(_read_answers(path))
    raw = torch.from_numpy(cached_array(f"lake-runs-{image_size}", key, lambda: _read_images(path, image_size)))
    x = Normalize(OMNIGLOT_MEAN, OMNIGLOT_STD)(raw.unsqueeze(2))  # [R, 40, 1, S, S]
    labels = torch.arange(N_WAY)
    episodes = [
        Episode(
            support_x=x[r, :N_WAY].clone(),
            support_y=labels.clone(),
            query_x=x[r, N_WAY:].clone(),
            query_y=answers[r].clone(),
            classes=labels.clone(),
        )
        for r in range(N_RUNS)
    ]
    return EpisodeSet.from_episodes(episodes, name="omniglot/lake-runs 20-way 1-shot x20")
