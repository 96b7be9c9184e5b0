"""What the side-by-side benchmark scripts share: the machine record, the learn2learn
import, and running the datasets and writing the table and JSON."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path


def machine() -> dict:
    """CPU, cores, torch/learn2learn versions, load average and date, for RESULTS.md."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    try:
        import learn2learn

        l2l_version = learn2learn.__version__
    except ImportError:
        l2l_version = None
    return {
        "cpu": cpu,
        "cores": cores,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "learn2learn": l2l_version,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def require_learn2learn() -> None:
    """Import learn2learn quietly (gym prints an "unmaintained" notice), or exit with how to get it."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            import learn2learn  # noqa: F401
    except ImportError:
        sys.exit("learn2learn is not installed: run benchmarks/learn2learn/install.sh")


def side_by_side_parser(doc: str) -> argparse.ArgumentParser:
    """The options every side-by-side script takes: data root, datasets, rounds, threads, JSON out."""
    from metafew.paths import data_roots

    # One folder for both libraries: metafew's rule ($METAFEW_DATA, else the user data dir, or
    # ../shared/data beside a checkout), the last root as `make test` picks it.
    default_root = str(data_roots()[-1])
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=default_root, help="holds omniglot/ and caltech101/ (default: %(default)s)")
    p.add_argument("--datasets", default="omniglot,caltech101", help="comma-separated (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds; medians reported (default: %(default)s)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for both sides (default: %(default)s; 0 keeps torch's default). On a "
        "shared 2-core machine 2 threads stall every small op on the busy cores",
    )
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    return p


def set_threads(threads: int) -> None:
    """``--threads``: pin torch's intra-op threads for both sides (0 keeps torch's default)."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def run_datasets(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    settings: dict,
    bench: Callable[[str, argparse.Namespace], dict],
    markdown: Callable[[dict], str],
    title: str = "",
) -> int:
    """Run ``bench`` on each of ``args.datasets``, print the Markdown table, write ``args.json``."""
    require_learn2learn()
    results = {"machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv]), "datasets": {}}
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        if name not in settings:
            parser.error(f"unknown dataset {name!r}; choose from {', '.join(settings)}")
        results["datasets"][name] = bench(name, args)
    results["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    table = markdown(results)
    print("\n" + title + table)
    m = results["machine"]
    print(
        f"\n{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"learn2learn {m['learn2learn']}, {m['date']}"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**results, "table": table}, indent=2))
    return 0
