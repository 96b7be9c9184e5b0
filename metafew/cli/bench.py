"""``metafew bench``: run a benchmark suite and report it beside the published figures."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from ..bench.runner import run_suite
from ..bench.suite import load_suite
from .common import add_command

EPILOG = """\
examples:
  metafew bench                                        # the quick suite (a few minutes on a laptop CPU)
  metafew bench --suite omniglot --out results/omniglot.json
  metafew bench --suite lake                           # Lake et al.'s 20 runs, error rate beside people's 4.5%
  metafew bench --suite omniglot --row protonet-5w1s --row maml-5w1s
  metafew bench --suite path/to/my_suite.toml --list

A suite is a TOML file: benchmarks/suites/NAME.toml in the current folder or in the
metafew repository, or any path. Each row is trained in WORK/<row>-<hash>/ and picked up
where it stopped when the command is run again (finished rows are not retrained).
Writes OUT (JSON rows), OUT with .md (a Markdown table) and .png (a plot).

A dataset a row needs that is not in the data root (--data-root, else $METAFEW_DATA, else
~/.cache/metafew/data) is downloaded from its official source on first use, md5-checked
(--no-download or METAFEW_OFFLINE=1 refuse; METAFEW_MIRROR fetches the same files elsewhere)."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "bench",
        help="run a benchmark suite (default: quick)",
        description="Train and test every row of a benchmark suite on fixed test episodes, and report the "
        "accuracy with its 95% CI beside the figure published for it.",
        epilog=EPILOG,
    )
    p.add_argument("--suite", default="quick", help="suite name or TOML path")
    p.add_argument("--out", metavar="FILE", help="JSON results file (default: results/<suite>.json)")
    p.add_argument("--work-dir", metavar="DIR", help="where rows are trained (default: <out folder>/runs/<suite>)")
    p.add_argument("--row", action="append", metavar="NAME", help="run only this row (repeatable)")
    p.add_argument("--list", action="store_true", help="list the suite's rows and exit")
    p.add_argument("--overwrite", action="store_true", help="replace OUT (and its .md, .png) from an earlier bench")
    return p


def run(args: argparse.Namespace) -> int:
    suite = load_suite(args.suite)
    if args.seed:  # --seed N replaces the rows' own seeds (0 unless the suite says otherwise)
        for r in suite.rows:
            r.config.seed = args.seed
    if args.list:
        print(f"suite {suite.name} ({suite.path}): {suite.description}")
        for r in suite.rows:
            c = r.config
            way, shot, query = c.train_setting
            pub = f", published {r.published}" if r.published is not None else ""
            print(
                f"  {r.name}: {c.dataset} {c.n_way}-way {c.k_shot}-shot, {c.learner}, {c.steps} steps "
                f"of {c.meta_batch_size} x {way}-way {shot}-shot {query}-query{pub}"
            )
        return 0
    from ..outputs import check_writable, guard_output

    out = Path(args.out or f"results/{suite.name}.json").expanduser()
    if out.suffix != ".json":
        out = out.with_suffix(".json")
    # Before any row runs: the three reports may replace only an earlier bench's, with --overwrite.
    guard_output(out, "bench", overwrite=args.overwrite)
    guard_output(out.with_suffix(".md"), "bench-md", overwrite=args.overwrite)
    guard_output(out.with_suffix(".png"), "bench-png", overwrite=args.overwrite)
    work = Path(args.work_dir).expanduser() if args.work_dir else out.parent / "runs" / suite.name
    if work.exists() and not work.is_dir():
        from ..outputs import OutputError

        raise OutputError(f"--work-dir {work} is a file; give a folder")
    check_writable(work)
    from .. import distributed

    run_suite(
        suite,
        # under torchrun every rank trains and scores each row together; rank 0's reports are kept
        out if distributed.is_main() else Path(tempfile.mkdtemp(prefix="metafew-bench-")) / out.name,
        work_dir=str(work),
        only=args.row,
        data_root=args.data_root,
        device=args.device,
        amp=args.amp,
        progress=args.progress,
        download=args.download,
    )
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return 0
