"""``metafew adapt``: a classifier for your own labelled images, with an honest estimate."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DatasetError
from .common import add_command, fetch_named_data, non_negative_int, parse_options, positive_int

EPILOG = """\
examples:
  metafew adapt --data xrays/ --backbone backbone.safetensors --shots 10 --out xray-model.safetensors
  metafew adapt --data pneumoniamnist --backbone omniglot-conv4.safetensors --method finetune --shots 5 \\
                --draws 100 --out pneumonia.safetensors --option steps=200
  metafew adapt --data xrays/ --backbone auto --candidate my-backbone.safetensors --method protonet,finetune \\
                --shots 10 --out xray-model.safetensors
  metafew predict --model xray-model.safetensors new_images/ --out predictions.csv

--data is a folder with one sub-folder of images per class (xrays/normal/*.png,
xrays/pneumonia/*.png), or a dataset name such as pneumoniamnist (its train split is
the labelled pool).
Images are converted to the backbone's channels and size (grayscale <-> RGB, resize
and center-crop) and normalised with the backbone's statistics.

The estimate: --draws times, a seeded support set of --shots images per class is
drawn, the model adapted to it and scored on the images NOT in it; the accuracy, AUC
and per-class recall are averaged over draws (± is the 95% CI of the mean; the
range shows how much a single draw varies). A class with K or fewer images gives up
one image per draw to be scored; a class with a single image is used but cannot be
scored. The saved model is adapted to one more seeded draw (--shots all: every image);
its probabilities are calibrated (one softmax temperature fitted on the held-out
predictions of the draws). ProtoNet and finetune re-estimate the backbone's BatchNorm
statistics on the support images (--bn-stats support), as MAML does by design.
On the same draws and held-out images, two baselines that need no backbone are
scored (nearest class mean and logistic regression on standardised pixels); the
summary shows the model's paired difference to each and says when it does not beat
one. Colour images into a grayscale backbone (or the reverse) is warned about.
The summary says what its intervals cover: ± is over support draws only, for one
backbone and your images as the only test set; beside it, a test-set bootstrap
interval (1,000 resamples of the scored images) and the 2.5-97.5% range of single draws.

--backbone auto: every shipped backbone and each --candidate is tried under each
--method (comma-separated; default protonet), scored by an inner 5-fold split of the
labelled images; the estimate is nested (each draw chooses on its own support images
and is scored on images the choice never saw), and the model uses the choice made on
all labelled images. The summary lists what was tried, what each scored and how often
each was chosen.

--unlabeled DIR --align mmd|dann|bn: first align the backbone to unlabeled images of
your domain (any size or mode, converted as the labelled ones): mmd or dann fine-tune
it so its features of DIR match those of its pretraining images (found from the
checkpoint's record, or --align-source), keeping their classification; bn only
re-estimates its BatchNorm statistics on DIR. Labelled images found in DIR are left
out unless --transductive; the report says which.
Next to MODEL: MODEL's name + .report.json (the estimate) and .confusion.png."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "adapt",
        help="adapt a pretrained backbone to your labelled images (with an honest estimate)",
        description="Adapt a pretrained backbone to a few labelled images per class, estimate how well the "
        "result classifies images it has not seen, and save the model for `metafew predict`.",
        epilog=EPILOG,
    )
    p.add_argument(
        "--data", required=True, metavar="DIR|NAME", help="image folder root/<class>/<image>, or a dataset name"
    )
    p.add_argument(
        "--backbone",
        required=True,
        metavar="CKPT",
        help="pretrained backbone checkpoint (metafew pretrain, metafew export-backbone, a shipped name) "
        "or a trained run's best/last.safetensors (metafew train, bench): its backbone; or 'auto': choose "
        "among the shipped backbones and --candidate files (nested in the estimate)",
    )
    p.add_argument(
        "--candidate",
        action="append",
        metavar="CKPT",
        help="with --backbone auto: one more backbone to try besides the shipped ones (repeatable, or comma-separated)",
    )
    p.add_argument(
        "--method",
        default=None,
        type=method_list,
        metavar="METHOD",
        help="how to adapt (a registered learner: " + ", ".join(_methods()) + "; default protonet); with "
        "--backbone auto, a comma-separated list to try",
    )
    p.add_argument("--shots", default="5", metavar="K|all", help="support images per class, or 'all'")
    p.add_argument("--out", required=True, metavar="MODEL", help="model file to write (.safetensors)")
    p.add_argument(
        "--draws", type=non_negative_int, default=20, help="support draws of the estimate (100 for a report; 0: none)"
    )
    p.add_argument(
        "--report-dir", metavar="DIR", help="where to write the JSON report and PNG (default: next to MODEL)"
    )
    p.add_argument(
        "--skip-bad", action="store_true", help="leave unreadable image files out (with a warning) instead of stopping"
    )
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="learner option, repeatable (e.g. steps=200)")
    p.add_argument(
        "--max-eval", type=positive_int, default=2000, help="score at most this many held-out images per draw"
    )
    p.add_argument(
        "--bn-stats",
        choices=["support", "backbone"],
        default=None,
        help="BatchNorm statistics of protonet/finetune: re-estimated on the support images, or the backbone's "
        "(default: support; backbone with --align, whose statistics are then the unlabeled images')",
    )
    p.add_argument(
        "--no-calibrate",
        dest="calibrate",
        action="store_false",
        help="keep the learner's raw softmax (default: temperature fitted on the estimate's held-out predictions)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace MODEL and its report if metafew wrote them earlier"
    )
    from ..adaptation.align import ALIGN_METHODS, DEFAULT_STEPS

    p.add_argument("--unlabeled", metavar="DIR", help="unlabeled images of your domain, to align the backbone with")
    p.add_argument(
        "--align",
        choices=ALIGN_METHODS,
        help="align the backbone to --unlabeled first: mmd or dann (fine-tuned, keeping its source classes), "
        "bn (BatchNorm statistics of the unlabeled images)",
    )
    p.add_argument(
        "--align-steps", type=non_negative_int, default=DEFAULT_STEPS, help="training steps of mmd/dann alignment"
    )
    p.add_argument(
        "--align-source",
        metavar="NAME",
        help="source data for mmd/dann (default: the dataset the backbone checkpoint records)",
    )
    p.add_argument(
        "--transductive",
        action="store_true",
        help="let --unlabeled include labelled images (by default those are left out so the estimate stays honest)",
    )
    return p


def _methods() -> tuple[str, ...]:
    from ..adaptation import methods

    return methods()


def method_list(text: str) -> list[str]:
    """``--method``: one registered learner name, or a comma-separated list of them."""
    names = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    bad = [n for n in names if n not in _methods()]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {(bad or [text])[0]!r} (choose from {', '.join(_methods())})"
        )
    return names


def parse_shots(text: str) -> int | str:
    if str(text).strip().lower() == "all":
        return "all"
    try:
        k = int(text)
    except ValueError:
        raise ConfigError(f"--shots must be a positive integer or 'all', got {text!r}") from None
    if k < 1:
        raise ConfigError(f"--shots must be a positive integer or 'all', got {text!r}")
    return k


def output_paths(out: str, report_dir: str | None) -> tuple[Path, Path, Path]:
    """(model, JSON report, confusion PNG) paths for ``--out`` and ``--report-dir``."""
    from ..checkpoint import checkpoint_path

    model = checkpoint_path(out)
    stem = model.name[: -len(model.suffix)] if model.suffix else model.name
    folder = Path(report_dir).expanduser() if report_dir else model.parent
    return model, folder / f"{stem}.report.json", folder / f"{stem}.confusion.png"


def _protected(data: str) -> Path | None:
    p = Path(data).expanduser()
    return p.resolve() if p.is_dir() else None


def run(args: argparse.Namespace) -> int:
    from ..adaptation import adapt, check_output

    shots = parse_shots(args.shots)
    if args.align and not args.unlabeled:
        raise ConfigError(f"--align {args.align} needs --unlabeled DIR (a folder of unlabeled images of your domain)")
    if args.unlabeled and not args.align:
        raise ConfigError("--unlabeled is used only to align the backbone: add --align mmd, dann or bn")
    if args.unlabeled:
        unlabeled = Path(args.unlabeled).expanduser()
        if not unlabeled.is_dir():
            raise DatasetError(f"--unlabeled folder not found: {unlabeled}")
    options = parse_options(args.option, "--option")
    if args.amp:
        options.setdefault("amp", args.amp)
    model_path, report_path, png_path = output_paths(args.out, args.report_dir)
    protect = _protected(args.data)
    over = args.overwrite
    check_output(args.out, "model", protect=protect, overwrite=over)  # a folder is refused before a suffix is added
    # Refuse before any work: never overwrite something metafew did not write (nor, without --overwrite, anything).
    check_output(model_path, "model", protect=protect, overwrite=over)
    check_output(report_path, "report", protect=protect, overwrite=over)
    check_output(png_path, "png", protect=protect, overwrite=over)

    auto = str(args.backbone).strip().lower() == "auto"
    candidates = [c.strip() for arg in args.candidate or () for c in arg.split(",") if c.strip()]
    if candidates and not auto:
        raise ConfigError("--candidate lists backbones for --backbone auto to try; add --backbone auto")
    if auto and (args.align or args.unlabeled):
        raise ConfigError("--backbone auto cannot be combined with --align: choose the backbone to align")
    if not auto and args.method and len(args.method) > 1:
        raise ConfigError("several --method values are tried only with --backbone auto; give one method")
    method: Any = args.method if auto else (args.method or ["protonet"])[0]
    fetch_data(args, auto=auto)
    from ..progress import progress as progress_bar

    bar = progress_bar(total=args.draws, desc="estimate", unit="draws", enable=args.progress)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = adapt(
                args.data, "auto" if auto else args.backbone, method=method, shots=shots, eval_draws=args.draws, seed=args.seed,
                device=args.device, skip_bad=args.skip_bad, max_eval=args.max_eval, data_root=args.data_root,
                bn_stats=args.bn_stats, calibrate=args.calibrate, progress=progress, unlabeled=args.unlabeled,
                align=args.align, align_steps=args.align_steps, align_source=args.align_source,
                transductive=args.transductive, candidates=candidates if auto else None, **options,
            )  # fmt: skip
        except DatasetError as e:
            raise DatasetError(str(e).replace("pass on_error='skip'", "use --skip-bad")) from e
        finally:
            bar.close()
            _print_warnings(caught)
    model.save(model_path)
    assert model.report is not None
    model.report.save_json(report_path)
    if model.report.draws:
        model.report.save_confusion(png_path)
    print(model.report.summary())
    print(f"model:  {model_path}")
    print(f"report: {report_path}" + (f"\nconfusion matrix: {png_path}" if model.report.draws else ""))
    return 0


def fetch_data(args: argparse.Namespace, *, auto: bool = False) -> None:
    """Download on first use the named datasets ``adapt`` will read (unless ``--no-download``).

    These are ``--data NAME``; a run checkpoint's training data when ``--backbone`` is one
    that does not record its normalisation; and, for ``--align mmd|dann``, the backbone's
    source images (``--align-source NAME``, else the dataset its checkpoint records).
    Anything else (folders, unknown names, unreadable files) is left to :func:`metafew.adapt`,
    whose messages say what is wrong.
    """
    from ..data.download import ensure_dataset

    fetch_named_data(args.data, args)
    source = args.align_source
    if not auto:
        trained_on, source_recorded = _backbone_data(args.backbone)
        if trained_on is not None:
            ensure_dataset(trained_on[0], trained_on[1], root=args.data_root, download=args.download)
        source = source or source_recorded
    if args.align in ("mmd", "dann") and source:
        from ..adaptation.align import source_dataset

        found = source_dataset(source)
        if found is not None and not found[0].startswith("folder:"):
            name, subset, options = found
            ensure_dataset(name, subset, root=args.data_root, download=args.download, **options)


def _backbone_data(backbone: str) -> tuple[tuple[str, str] | None, str | None]:
    """(the ``(dataset, subset)`` a run checkpoint needs for its normalisation, or None; the dataset it records)."""
    from ..checkpoint import read_backbone_record, read_header
    from ..errors import MetafewError

    try:
        _, doc = read_header(backbone)
        record = doc.get("record") or {}
        if doc.get("kind") == "backbone":
            return None, read_backbone_record(backbone).dataset
        config = record.get("config") or {}
        if not config:
            return None, None
        needs = (config.get("dataset", "omniglot"), config.get("train_subset", "train"))
        return (None if record.get("mean") and record.get("std") else needs), record.get("dataset") or needs[0]
    except MetafewError:
        return None, None  # adapt says what is wrong with the file


def _print_warnings(caught: list[warnings.WarningMessage]) -> None:
    seen: set[str] = set()
    for w in caught:
        msg = " ".join(str(w.message).split())
        if msg in seen or issubclass(w.category, (DeprecationWarning, FutureWarning)):
            continue
        seen.add(msg)
        print(f"metafew: warning: {msg}", file=sys.stderr)
