#!/usr/bin/env python
"""Episode sampling: metafew's in-memory sampler against learn2learn, side by side.

For Omniglot (vinyals train, 5-way 1-shot 15-query) and Caltech-101 (train,
5-way 5-shot 15-query) this measures, in one run on one machine:

* metafew's load time: cold (a fresh, empty ``METAFEW_CACHE``: every image file
  is decoded) and cached (a second process on the same cache), each in a fresh
  subprocess, so the first does not warm the second's page cache of Python imports;
* metafew's episodes/second: ``EpisodeSampler.sample()`` one at a time, and
  ``sample_batch(32, reuse=last_batch)`` divided by 32 (as ``metafew.train`` calls it);
* learn2learn's episodes/second, the way an l2l user builds episodes:
  ``l2l.data.MetaDataset`` over a torch Dataset, then ``TaskDataset`` with
  ``NWays, KShots(k+q), LoadData, RemapLabels, ConsecutiveLabels``, then
  ``taskset.sample()`` split into support and query. Two datasets under it:

  - ``files``: the typical one. Every item decodes its image file from disk and
    transforms it (torchvision ``ImageFolder``-style ``PIL.Image.open().convert``
    + ``Resize`` + ``ToTensor``; for Omniglot the transform of l2l's own Omniglot
    examples: ``Resize(28, LANCZOS), ToTensor(), 1 - x``, plus the class's rotation).
    Same image files, same classes as metafew's dataset.
  - ``memory``: l2l over metafew's own in-memory ``FewShotDataset`` (its
    ``__getitem__`` decodes nothing), a kinder comparison.

  ``MetaDataset`` gets ``labels_to_indices`` up front, so it does not decode the
  whole dataset once to learn the labels (``--l2l-scan`` times that scan too).

The measured loops alternate (metafew, l2l, metafew, ...) for ``--repeats``
rounds and the median rate of each is reported, so load from other processes on
a shared machine hits both alike. Prints a Markdown table; ``--json`` writes
the figures.

    python benchmarks/sampling.py --data-root ../shared/data --json results/sampling.json

learn2learn is not a metafew dependency: install it with
``benchmarks/learn2learn/install.sh``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from common import run_datasets, set_threads, side_by_side_parser  # benchmarks/common.py

BATCH = 32


# -- the benchmark settings -------------------------------------------------------------

SETTINGS = {
    "omniglot": {"title": "Omniglot vinyals/train", "n_way": 5, "k_shot": 1, "n_query": 15},
    "caltech101": {"title": "Caltech-101 train", "n_way": 5, "k_shot": 5, "n_query": 15},
}


def load_metafew(name: str, root: str):
    """The metafew dataset of a setting, images decoded (or read from the cache)."""
    if name == "omniglot":
        try:
            from metafew.data import Omniglot
        except ImportError:  # before the package re-exports it
            from metafew.data.omniglot import Omniglot
        ds = Omniglot("train", split="vinyals", root=root)
    else:
        try:
            from metafew.data import Caltech101
        except ImportError:
            from metafew.data.caltech101 import Caltech101
        ds = Caltech101("train", root=root)
    ds.images  # noqa: B018 - decode or load from the cache now
    return ds


# -- cold and cached load, each in a fresh process --------------------------------------


def _child_load(name: str, root: str) -> None:
    """Subprocess entry: time the imports and the load, print JSON."""
    t0 = time.perf_counter()
    import metafew.data  # noqa: F401

    t1 = time.perf_counter()
    ds = load_metafew(name, root)
    t2 = time.perf_counter()
    print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "images": len(ds), "classes": ds.num_classes}))


def time_loads(name: str, root: str, threads: int) -> dict:
    out = {}
    with tempfile.TemporaryDirectory(prefix="metafew-cache-") as cache:
        env = {**os.environ, "METAFEW_CACHE": cache}
        for phase in ("cold", "cached"):
            t = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, __file__, "--_child-load", name, "--data-root", root, "--threads", str(threads)],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                raise RuntimeError(f"loading {name} ({phase}) failed:\n{proc.stderr}")
            rec = json.loads(proc.stdout.strip().splitlines()[-1])
            rec["process_s"] = wall
            out[phase] = rec
    return out


# -- learn2learn's side -----------------------------------------------------------------


def omniglot_files(ds, root: str) -> list[tuple[str, int, int]]:
    """(png path, label, rotation in degrees) of every image of metafew's vinyals dataset, in its order."""
    from metafew.data.omniglot import find_omniglot

    base = find_omniglot(root)
    items = []
    for label, line in enumerate(ds.classes):
        character, _, rot = line.rpartition("/")
        folder = next(
            base / s / character for s in ("images_background", "images_evaluation") if (base / s / character).is_dir()
        )
        pngs = sorted(p for p in os.listdir(folder) if p.lower().endswith(".png"))
        items += [(str(folder / p), label, int(rot.removeprefix("rot"))) for p in pngs]
    return items


def caltech_files(ds, root: str) -> list[tuple[str, int, int]]:
    """(jpeg path, label, 0) of every image of metafew's Caltech-101 dataset, in its order."""
    from metafew.data.caltech101 import find_caltech101

    folder = find_caltech101(root)
    items = []
    for label, c in enumerate(ds.classes):
        jpgs = sorted(
            f for f in os.listdir(folder / c) if f.lower().endswith((".jpg", ".jpeg")) and not f.startswith(".")
        )
        items += [(str(folder / c / f), label, 0) for f in jpgs]
    return items


def file_dataset(name: str, items: list[tuple[str, int, int]], image_size: int):
    """A torch Dataset that decodes and transforms its image file on every access, as l2l users do."""
    import torch
    from PIL import Image
    from torchvision import transforms as T

    if name == "omniglot":
        mode = "L"
        # the transform of learn2learn's Omniglot examples (maml_omniglot.py, FullOmniglot)
        transform = T.Compose(
            [T.Resize(image_size, interpolation=T.InterpolationMode.LANCZOS), T.ToTensor(), lambda x: 1.0 - x]
        )
    else:
        mode = "RGB"
        transform = T.Compose(
            [
                T.Resize(image_size),
                T.CenterCrop(image_size),
                T.ToTensor(),
                T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        )

    class FileImages(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.items = items

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, i: int):
            path, label, rot = self.items[i]
            with open(path, "rb") as f:  # torchvision's pil_loader
                img = Image.open(f).convert(mode)
            if rot:
                img = img.rotate(rot)
            return transform(img), label

    return FileImages()


def as_torch_dataset(ds):
    """metafew's FewShotDataset follows the torch Dataset protocol but l2l's MetaDataset
    checks ``isinstance(dataset, torch.utils.data.Dataset)``: a one-line wrapper."""
    import torch

    class Wrapped(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(ds)

        def __getitem__(self, i: int):
            return ds[i]

    return ds if isinstance(ds, torch.utils.data.Dataset) else Wrapped()


def l2l_taskset(dataset, labels: list[int], n_way: int, k_shot: int, n_query: int):
    import learn2learn as l2l
    from learn2learn.data.transforms import ConsecutiveLabels, KShots, LoadData, NWays, RemapLabels

    labels_to_indices: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        labels_to_indices.setdefault(int(y), []).append(i)
    meta = l2l.data.MetaDataset(dataset, labels_to_indices=labels_to_indices)
    transforms = [
        NWays(meta, n_way),
        KShots(meta, k_shot + n_query),
        LoadData(meta),
        RemapLabels(meta),
        ConsecutiveLabels(meta),
    ]
    return l2l.data.TaskDataset(meta, task_transforms=transforms, num_tasks=-1)


def l2l_episode(taskset, n_way: int, k_shot: int, n_query: int):
    """One episode as an l2l user gets it: sample(), then split support/query per class."""
    import torch

    x, y = taskset.sample()
    order = torch.argsort(y, stable=True)  # ConsecutiveLabels sorts already; cheap and explicit
    x, y = x[order], y[order]
    per = k_shot + n_query
    is_support = (torch.arange(len(y)) % per) < k_shot
    return x[is_support], y[is_support], x[~is_support], y[~is_support]


# -- measuring --------------------------------------------------------------------------


def rate(fn: Callable[[], object], per_call: int, episodes: int, min_time: float, warmup: int = 2) -> float:
    """Episodes/second of ``fn`` (``per_call`` episodes a call): at least ``episodes`` and ``min_time`` s."""
    for _ in range(warmup):
        fn()
    done, t0 = 0, time.perf_counter()
    while True:
        fn()
        done += per_call
        dt = time.perf_counter() - t0
        if done >= episodes and dt >= min_time:
            return done / dt


def bench(name: str, args: argparse.Namespace) -> dict:
    import torch

    from metafew.data import EpisodeSampler

    s = SETTINGS[name]
    n, k, q = s["n_way"], s["k_shot"], s["n_query"]
    print(f"\n== {s['title']}: {n}-way {k}-shot {q}-query", flush=True)
    res: dict = {"setting": dict(s)}
    if not args.skip_load:
        res["load"] = time_loads(name, args.data_root, args.threads)
        print(
            f"   load: cold {res['load']['cold']['load_s']:.2f} s, cached {res['load']['cached']['load_s']:.2f} s",
            flush=True,
        )

    ds = load_metafew(name, args.data_root)
    res["setting"].update(images=len(ds), classes=ds.num_classes, shape=list(ds.images.shape[1:]))
    sampler = EpisodeSampler(ds, n, k, q, seed=0, device=args.device)
    items = omniglot_files(ds, args.data_root) if name == "omniglot" else caltech_files(ds, args.data_root)
    counts = torch.bincount(torch.tensor([y for _, y, _ in items]), minlength=ds.num_classes)
    if len(items) != len(ds) or not torch.equal(counts, ds.class_counts()):
        raise RuntimeError(
            f"{name}: the file listing does not match metafew's dataset ({len(items)} vs {len(ds)} images)"
        )
    files = file_dataset(name, items, ds.image_size[0])
    labels = [y for _, y, _ in items]
    ts_files = l2l_taskset(files, labels, n, k, q)
    ts_memory = l2l_taskset(as_torch_dataset(ds), ds.labels.tolist(), n, k, q)

    if args.l2l_scan:  # what MetaDataset costs when not told the labels: one decode of every item
        import learn2learn as l2l

        t = time.perf_counter()
        l2l.data.MetaDataset(files)
        res["l2l_scan_s"] = time.perf_counter() - t
        print(f"   l2l MetaDataset label scan of the files: {res['l2l_scan_s']:.1f} s", flush=True)

    # sanity: both sides give episodes of the same shapes
    ep = sampler.sample()
    sx, sy, qx, qy = l2l_episode(ts_files, n, k, q)
    assert tuple(sx.shape) == tuple(ep.support_x.shape) and tuple(qx.shape) == tuple(ep.query_x.shape), (
        sx.shape,
        ep.support_x.shape,
    )
    assert sy.tolist() == ep.support_y.tolist() and qy.tolist() == ep.query_y.tolist()
    sx, _, qx, _ = l2l_episode(ts_memory, n, k, q)
    assert tuple(sx.shape) == tuple(ep.support_x.shape) and tuple(qx.shape) == tuple(ep.query_x.shape)

    last = [sampler.sample_batch(BATCH)]

    def batch32() -> None:  # as metafew.train does: the spent batch's memory is reused
        last[0] = sampler.sample_batch(BATCH, reuse=last[0])

    methods = {
        "metafew_sample": (lambda: sampler.sample(), 1, args.min_time),
        "metafew_batch32": (batch32, BATCH, args.min_time),
        "l2l_files": (lambda: l2l_episode(ts_files, n, k, q), 1, 0.0),
        "l2l_memory": (lambda: l2l_episode(ts_memory, n, k, q), 1, args.min_time),
    }
    runs: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.repeats):
        for m, (fn, per_call, min_time) in methods.items():
            runs[m].append(rate(fn, per_call, args.episodes, min_time))
        print(f"   round {r + 1}: " + ", ".join(f"{m} {v[-1]:,.1f}/s" for m, v in runs.items()), flush=True)
    res["episodes_per_s"] = {m: statistics.median(v) for m, v in runs.items()}
    res["episodes_per_s_rounds"] = runs
    e = res["episodes_per_s"]
    res["ratio"] = {
        f"{mf}/{lm}": e[mf] / e[lm]
        for mf in ("metafew_sample", "metafew_batch32")
        for lm in ("l2l_files", "l2l_memory")
    }
    return res


def markdown(results: dict) -> str:
    lines = [
        "| dataset, task | metafew cold load (s) | cached load (s) | metafew `sample()` ep/s | metafew `sample_batch(32)` ep/s "
        "| l2l, decode files ep/s | l2l over metafew's in-memory dataset ep/s "
        "| ratio `sample()` / l2l files | ratio batch / l2l files | ratio `sample()` / l2l memory | ratio batch / l2l memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["datasets"].values():
        s, e, x = r["setting"], r["episodes_per_s"], r["ratio"]
        load = r.get("load")
        cold = f"{load['cold']['load_s']:.2f}" if load else "-"
        cached = f"{load['cached']['load_s']:.2f}" if load else "-"
        lines.append(
            f"| {s['title']} ({s['classes']} classes, {s['images']} images), {s['n_way']}-way {s['k_shot']}-shot "
            f"{s['n_query']}-query | {cold} | {cached} | {e['metafew_sample']:,.0f} | {e['metafew_batch32']:,.0f} "
            f"| {e['l2l_files']:,.1f} | {e['l2l_memory']:,.0f} "
            f"| {x['metafew_sample/l2l_files']:,.0f}x | {x['metafew_batch32/l2l_files']:,.0f}x "
            f"| {x['metafew_sample/l2l_memory']:,.1f}x | {x['metafew_batch32/l2l_memory']:,.1f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = side_by_side_parser(__doc__)
    p.add_argument(
        "--episodes", type=int, default=100, help="episodes per measured loop, at least (default: %(default)s)"
    )
    p.add_argument(
        "--min-time", type=float, default=1.0, help="seconds per fast measured loop, at least (default: %(default)s)"
    )
    p.add_argument("--device", default="cpu", help="metafew sampler device (default: %(default)s)")
    p.add_argument("--skip-load", action="store_true", help="do not time cold/cached loads")
    p.add_argument(
        "--l2l-scan", action="store_true", help="also time l2l's MetaDataset label scan (decodes every file)"
    )
    p.add_argument("--_child-load", dest="child_load", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    set_threads(args.threads)
    if args.child_load:
        _child_load(args.child_load, args.data_root)
        return 0

    return run_datasets(p, args, SETTINGS, bench, markdown, "")


if __name__ == "__main__":
    raise SystemExit(main())
