#!/usr/bin/env python
# (Not named mmap.py: run as a script its folder comes first on sys.path, and it would shadow the stdlib mmap.)
"""Memory-mapped against in-memory datasets: sampling and meta-training throughput.

For each setting the same subset is loaded twice, ``storage="memory"`` and
``storage="mmap"`` (the mapped copy under ``<cache>/mapped/``), and this measures:

* sampling: ``EpisodeSampler.sample_batch(B, reuse=last)`` episodes/second (as
  ``metafew.train`` calls it; the mapped sampler prefetches the next batch in its
  background thread);
* meta-training: ``metafew.train`` steps/second of a ProtoNet (Conv-4), the whole
  step (sampling, forward, backward, Adam), its process CPU time per step, and the
  time each step waits in ``sample_batch`` (the only part of a step the storage can
  change: the images, and so the compute, are the same). On a busy shared machine the
  wall-clock rates scatter by tens of percent from round to round, so the data wait
  over the memory step time is the figure that resolves a few percent;

with the page cache warm (the map read once before) and cold: before a cold
round the mapped file's pages are dropped with ``posix_fadvise(POSIX_FADV_DONTNEED)``
(no root needed; only clean, unmapped pages are dropped, so every map of the file
is closed first) and ``mincore`` checks how much of it is still resident. Memory
and mapped rounds alternate, ``--repeats`` times, and the median is reported, so
load from other processes hits both alike. One torch thread (``--threads``).

``--decode-peak`` measures the one-time decode instead: a fresh cache, the dataset loaded with
``storage="mmap"`` and with ``"memory"``, each in its own process, and the peak memory of
reading ``.images`` (decode, cache write, map): what Python and numpy allocated (``tracemalloc``)
and the process's anonymous resident memory (``RssAnon`` sampled every 10 ms; the pages of the
file being written are not in it), next to the decoded size. With ``--decode-workers 1`` every
decode runs in the measured process.

    python benchmarks/mmap_storage.py --data-root ../shared/data --json benchmarks/results/mmap.json
    python benchmarks/mmap_storage.py --decode-peak caltech101:all --decode-workers 1 --json benchmarks/results/mmap-decode.json
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

from common import machine, set_threads  # benchmarks/common.py

SETTINGS = {
    "omniglot-5way": {"dataset": "omniglot", "subset": "train", "options": {}, "way": 5, "shot": 1, "query": 15,
                      "meta_batch": 1, "sample_batch": 32},
    "omniglot-20way": {"dataset": "omniglot", "subset": "train", "options": {}, "way": 20, "shot": 1, "query": 15,
                       "meta_batch": 1, "sample_batch": 8},
    "caltech101-5way": {"dataset": "caltech101", "subset": "train", "options": {"image_size": 84}, "way": 5,
                        "shot": 1, "query": 15, "meta_batch": 1, "sample_batch": 8},
}  # fmt: skip


# -- page cache -----------------------------------------------------------------------------


def drop_page_cache(path: Path) -> None:
    """Ask the kernel to forget the file's clean cached pages (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(path: Path) -> float | None:
    """Fraction of the file's pages in the page cache (``mincore`` on a fresh map), or None where it cannot be asked."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None or not hasattr(mmap, "MAP_SHARED"):
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f:
        ptr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    if ptr is None or ptr == ctypes.c_void_p(-1).value:
        return None
    try:
        if libc.mincore(ctypes.c_void_p(ptr), size, vec) != 0:
            return None
    finally:
        libc.munmap(ctypes.c_void_p(ptr), size)
    return sum(v & 1 for v in vec) / max(1, pages)


# -- measurements ---------------------------------------------------------------------------


def sampling_rate(sampler, batch: int, seconds: float) -> float:
    """Episodes/second of ``sample_batch(batch, reuse=last)`` over about ``seconds``."""
    last = sampler.sample_batch(batch)
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        last = sampler.sample_batch(batch, reuse=last)
        n += batch
    SAMPLE_CPU.append((time.process_time() - c0) / n)
    return n / (time.perf_counter() - t0)


CPU_SECONDS: list[float] = []  # process CPU seconds per step of each training round (both threads)
SAMPLE_CPU: list[float] = []  # process CPU seconds per episode of each sampling round
DATA_WAIT: list[float] = []  # seconds per step spent in sample_batch after the first, of each training round
FIRST_WAIT: list[float] = []  # seconds the first step of each training round waited


def training_rate(learner, sampler, meta_batch: int, steps: int) -> float:
    """``metafew.train`` meta-steps/second over ``steps`` steps (the learner keeps training across calls)."""
    from metafew.engine import train

    waited: list[float] = []
    draw = sampler.sample_batch

    def timed(*a, **kw):  # the time the training step waits for its meta-batch
        t = time.perf_counter()
        try:
            return draw(*a, **kw)
        finally:
            waited.append(time.perf_counter() - t)

    sampler.sample_batch = timed
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        train(learner, sampler, steps=steps, meta_batch_size=meta_batch, log_every=10**9, progress=False)
    finally:
        del sampler.sample_batch
    CPU_SECONDS.append((time.process_time() - c0) / steps)
    DATA_WAIT.append(statistics.mean(waited[1:] or waited))  # the 1st batch of a fresh sampler is never prefetched
    FIRST_WAIT.append(waited[0])
    return steps / (time.perf_counter() - t0)


def bench(name: str, args: argparse.Namespace) -> dict:
    import torch

    from metafew.backbones import create as create_backbone
    from metafew.data import EpisodeSampler, load_dataset
    from metafew.learners import create as create_learner

    s = SETTINGS[name]
    load = lambda storage: load_dataset(s["dataset"], s["subset"], root=args.data_root, storage=storage,  # noqa: E731
                                        **s["options"])  # fmt: skip
    memory = load("memory")
    memory.images  # noqa: B018 - read now
    mapped = load("mmap")
    mapped.images  # noqa: B018 - writes the mapped copy the first time
    path = mapped.mapped_path
    assert path is not None and torch.equal(memory.images[:64], mapped.images[:64])

    def make(ds, seed: int):
        torch.manual_seed(0)
        c, h, _ = ds.channels, *ds.image_size
        learner = create_learner("protonet", create_backbone("conv4", in_channels=c, image_size=h))
        return learner, EpisodeSampler(ds, s["way"], s["shot"], s["query"], seed=seed, device="cpu")

    res: dict = {
        "setting": {**s, "images": len(memory), "classes": memory.num_classes,
                    "shape": list(memory.images.shape[1:]), "mapped_file": str(path),
                    "mapped_mb": round(path.stat().st_size / 2**20, 1)},
    }  # fmt: skip
    print(f"== {name}: {res['setting']['images']} images {res['setting']['shape']}, "
          f"{res['setting']['mapped_mb']} MB mapped", flush=True)  # fmt: skip

    # -- warm: both copies in RAM / the page cache; rounds alternate ABBA and are compared in pairs
    samplers = {"memory": make(memory, 1), "mmap": make(mapped, 1)}
    trainers = {k: make(ds, 2)[1] for k, ds in (("memory", memory), ("mmap", mapped))}  # a stream of one batch size
    for kind, (learner, sampler) in samplers.items():  # warm-up: first touches, allocator, map in cache
        sampling_rate(sampler, s["sample_batch"], 0.3)
        training_rate(learner, trainers[kind], s["meta_batch"], 2)
    warm: list[dict[str, dict[str, float]]] = []
    for r in range(args.repeats):
        rec: dict[str, dict[str, float]] = {}
        for kind in ("memory", "mmap") if r % 2 == 0 else ("mmap", "memory"):
            learner, sampler = samplers[kind]
            rate = sampling_rate(sampler, s["sample_batch"], args.sample_seconds)
            steps = training_rate(learner, trainers[kind], s["meta_batch"], args.steps[name])
            rec[kind] = {"episodes_per_s": rate, "cpu_us_per_episode": 1e6 * SAMPLE_CPU[-1], "steps_per_s": steps,
                         "cpu_s_per_step": CPU_SECONDS[-1], "data_wait_ms_per_step": 1e3 * DATA_WAIT[-1]}  # fmt: skip
        warm.append(rec)
        print(f"   warm round {r + 1}: " + ", ".join(
            f"{k} {v['episodes_per_s']:,.0f} ep/s, {v['steps_per_s']:.2f} steps/s, {v['cpu_s_per_step']:.3f} cpu-s/step, "
            f"{v['data_wait_ms_per_step']:.2f} ms data wait/step"
            for k, v in rec.items()), flush=True)  # fmt: skip
    memory_learner, memory_sampler = samplers["memory"]
    memory_trainer = trainers["memory"]
    cold_learner = samplers["mmap"][0]  # a warmed-up learner, as the memory rounds have: only the data is cold
    del samplers, trainers, learner, sampler  # every map of the file closed: its pages can then be dropped

    # -- cold: a fresh map of the file after its pages were dropped, paired with a memory round
    cold: list[dict[str, float | None]] = []
    del mapped
    gc.collect()
    for r in range(args.repeats):
        drop_page_cache(path)
        resident = resident_fraction(path)
        ds = load("mmap")
        sampler = make(ds, 100 + r)[1]
        rate = sampling_rate(sampler, s["sample_batch"], args.sample_seconds)
        del ds, sampler
        gc.collect()
        drop_page_cache(path)  # and a fresh map again, for the training round
        ds = load("mmap")
        sampler = make(ds, 200 + r)[1]
        steps = training_rate(cold_learner, sampler, s["meta_batch"], args.steps[name])
        cpu, wait, first = CPU_SECONDS[-1], DATA_WAIT[-1], FIRST_WAIT[-1]
        memory_rate = sampling_rate(memory_sampler, s["sample_batch"], args.sample_seconds)
        memory_steps = training_rate(memory_learner, memory_trainer, s["meta_batch"], args.steps[name])
        cold.append({"resident_before": resident, "episodes_per_s": rate, "steps_per_s": steps, "cpu_s_per_step": cpu,
                     "memory_episodes_per_s": memory_rate, "memory_steps_per_s": memory_steps,
                     "memory_cpu_s_per_step": CPU_SECONDS[-1], "data_wait_ms_per_step": 1e3 * wait,
                     "first_batch_ms": 1e3 * first,
                     "memory_data_wait_ms_per_step": 1e3 * DATA_WAIT[-1]})  # fmt: skip
        del ds, sampler
        gc.collect()
        print(f"   cold round {r + 1} (resident before: {resident}): {rate:,.0f} ep/s, {steps:.2f} steps/s, "
              f"{cpu:.3f} cpu-s/step; memory {memory_rate:,.0f} ep/s, {memory_steps:.2f} steps/s", flush=True)  # fmt: skip

    med = statistics.median
    res["warm"] = {
        "episodes_per_s": {k: med(r[k]["episodes_per_s"] for r in warm) for k in ("memory", "mmap")},
        "steps_per_s": {k: med(r[k]["steps_per_s"] for r in warm) for k in ("memory", "mmap")},
        "cpu_s_per_step": {k: med(r[k]["cpu_s_per_step"] for r in warm) for k in ("memory", "mmap")},
        # the medians of the paired ratios, mapped over memory (1.0: the same speed)
        "sampling_ratio": med(r["mmap"]["episodes_per_s"] / r["memory"]["episodes_per_s"] for r in warm),
        "cpu_us_per_episode": {k: med(r[k]["cpu_us_per_episode"] for r in warm) for k in ("memory", "mmap")},
        "data_wait_ms_per_step": {k: med(r[k]["data_wait_ms_per_step"] for r in warm) for k in ("memory", "mmap")},
        "training_ratio": med(r["mmap"]["steps_per_s"] / r["memory"]["steps_per_s"] for r in warm),
        "training_cpu_ratio": med(r["mmap"]["cpu_s_per_step"] / r["memory"]["cpu_s_per_step"] for r in warm),
        "rounds": warm,
    }
    f = lambda r, k: float(r[k] or 0.0)  # noqa: E731
    res["cold"] = {
        "episodes_per_s": med(f(r, "episodes_per_s") for r in cold),
        "steps_per_s": med(f(r, "steps_per_s") for r in cold),
        "sampling_ratio": med(f(r, "episodes_per_s") / f(r, "memory_episodes_per_s") for r in cold),
        "training_ratio": med(f(r, "steps_per_s") / f(r, "memory_steps_per_s") for r in cold),
        "training_cpu_ratio": med(f(r, "cpu_s_per_step") / f(r, "memory_cpu_s_per_step") for r in cold),
        "data_wait_ms_per_step": {
            "memory": med(f(r, "memory_data_wait_ms_per_step") for r in cold),
            "mmap": med(f(r, "data_wait_ms_per_step") for r in cold),
        },
        "rounds": cold,
    }
    # What the map can cost a step: only its wait for data differs (same images, same compute).
    step_ms = 1e3 / res["warm"]["steps_per_s"]["memory"]
    for part in ("warm", "cold"):
        w = res[part]["data_wait_ms_per_step"]
        res[part]["data_wait_slowdown_pct"] = 100.0 * (w["mmap"] - w["memory"]) / step_ms
    return res


def markdown(results: dict) -> str:
    lines = [
        "| setting | sampling ep/s memory / mmap warm / mmap cold | training steps/s memory / mmap warm / mmap cold "
        "| mmap/memory training speed warm, cold (wall; CPU time) | data wait ms/step memory / mmap warm / mmap cold "
        "(slowdown it implies, warm / cold) |",
        "|---|---|---|---|---|",
    ]
    for name, r in results["settings"].items():
        w, c = r["warm"], r["cold"]
        lines.append(
            f"| {name} | {w['episodes_per_s']['memory']:,.0f} / {w['episodes_per_s']['mmap']:,.0f} / "
            f"{c['episodes_per_s']:,.0f} | {w['steps_per_s']['memory']:.2f} / {w['steps_per_s']['mmap']:.2f} / "
            f"{c['steps_per_s']:.2f} | {w['training_ratio']:.3f}, {c['training_ratio']:.3f} "
            f"({1 / w['training_cpu_ratio']:.3f}, {1 / c['training_cpu_ratio']:.3f}) | "
            f"{w['data_wait_ms_per_step']['memory']:.2f} / {w['data_wait_ms_per_step']['mmap']:.2f} / "
            f"{c['data_wait_ms_per_step']['mmap']:.2f} ({w['data_wait_slowdown_pct']:+.2f}% / "
            f"{c['data_wait_slowdown_pct']:+.2f}%) |"
        )
    return "\n".join(lines)


# -- the one-time decode: peak memory -----------------------------------------------------------


def _rss_anon_kib() -> int:
    """This process's anonymous resident memory (heap, not file-backed pages), KiB; 0 where unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def decode_child(spec: str, storage: str, image_size: int) -> dict:
    """In this (fresh) process: load ``spec`` (``dataset:subset``) with ``storage``, read its images
    once into an empty cache, and report the peak memory of that read."""
    from metafew.data import load_dataset

    name, _, subset = spec.partition(":")
    options = {"image_size": image_size} if image_size else {}
    ds = load_dataset(name, subset or "train", storage=storage, **options)
    base_kib, peak = _rss_anon_kib(), [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], _rss_anon_kib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tracemalloc.start()
    t0 = time.perf_counter()
    images = ds.images
    seconds = time.perf_counter() - t0
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    done.set()
    sampler.join()
    checksum = int(images[:: max(1, len(images) // 64)].double().sum())  # the same bits both ways
    return {"storage": storage, "mapped": ds.is_mapped, "images": len(ds), "shape": list(images.shape[1:]),
            "decoded_mib": ds.nbytes / 2**20, "seconds": seconds, "tracemalloc_peak_mib": traced_peak / 2**20,
            "rss_anon_peak_over_start_mib": max(0, max(peak[0], _rss_anon_kib()) - base_kib) / 1024,
            "checksum": checksum}  # fmt: skip


def decode_peak(args: argparse.Namespace) -> dict:
    """``--decode-peak``: the decode of one dataset into a map and into memory, each in a fresh process."""
    rows = []
    for storage in ("mmap", "memory"):
        with tempfile.TemporaryDirectory(prefix="metafew-decode-peak-") as cache:
            env = {**os.environ, "METAFEW_CACHE": cache, "METAFEW_DECODE_WORKERS": str(args.decode_workers),
                   "OMP_NUM_THREADS": "1"}  # fmt: skip
            if args.data_root:
                env["METAFEW_DATA"] = str(args.data_root)
            cmd = [sys.executable, __file__, "--decode-child", args.decode_peak, storage, str(args.image_size)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"the {storage} decode failed:\n{out.stderr[-2000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"   {storage}: {r['images']} images {r['shape']} ({r['decoded_mib']:.0f} MiB decoded) in "
                  f"{r['seconds']:.1f} s; peak tracemalloc {r['tracemalloc_peak_mib']:.1f} MiB, "
                  f"RssAnon +{r['rss_anon_peak_over_start_mib']:.1f} MiB", flush=True)  # fmt: skip
    if rows[0]["checksum"] != rows[1]["checksum"]:
        raise SystemExit("the mapped and in-memory decodes differ")
    return {"dataset": args.decode_peak, "image_size": args.image_size, "decode_workers": args.decode_workers,
            "rows": rows}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", help="default: metafew's rule (metafew.paths.data_roots)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--sample-seconds", type=float, default=0.5)
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiplies the training steps per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--decode-peak",
        metavar="DATASET:SUBSET",
        default=None,
        help="measure the peak memory of decoding this dataset into a map and into memory",
    )
    parser.add_argument("--decode-workers", type=int, default=1, help="decode processes for --decode-peak")
    parser.add_argument("--image-size", type=int, default=84, help="image side for --decode-peak (0: default)")
    parser.add_argument("--decode-child", nargs=3, metavar=("SPEC", "STORAGE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.decode_child:  # one measured decode, in the process --decode-peak started
        spec, storage, size = args.decode_child
        print(json.dumps(decode_child(spec, storage, int(size))))
        return 0
    set_threads(args.threads)
    if args.decode_peak:
        results = {"machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
                   "decode_peak": decode_peak(args)}  # fmt: skip
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        return 0
    base_steps = {"omniglot-5way": 6, "omniglot-20way": 2, "caltech101-5way": 2}
    args.steps = {k: max(2, round(v * args.steps_scale)) for k, v in base_steps.items()}
    results: dict = {"machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
                     "settings": {}}  # fmt: skip
    for name in [n.strip() for n in args.settings.split(",") if n.strip()]:
        if name not in SETTINGS:
            parser.error(f"unknown setting {name!r}; choose from {', '.join(SETTINGS)}")
        results["settings"][name] = bench(name, args)
    results["machine"]["load_average_end"] = list(os.getloadavg())
    results["table"] = markdown(results)
    print("\n" + results["table"])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
