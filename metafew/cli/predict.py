"""``metafew predict``: classify new images with a model from ``metafew adapt``."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import warnings
from typing import Any

from .common import add_command, fetch_named_data, positive_int

EPILOG = """\
examples:
  metafew predict --model xray-model.safetensors new_images/             # CSV on stdout
  metafew predict --model xray-model.safetensors a.png b.png --format json
  metafew predict --model xray-model.safetensors new_images/ --out predictions.csv
  metafew predict --model xray-model.safetensors --evaluate labelled_test/   # accuracy, AUC, recall

A folder is searched recursively for image files. CSV columns: path, class (the
predicted one), p_<class> for every class (probabilities, summing to 1).
--out never overwrites a file that is not an earlier metafew predictions file, and
replaces one only with --overwrite.
--evaluate DIR|NAME scores the model on a labelled set instead (a root/<class>/<image>
folder, or a dataset name: its test split) and prints accuracy (Wilson 95% interval),
balanced accuracy, AUC (bootstrap 95% interval) and per-class recall; it warns when the
set holds the model's own support images."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "predict",
        help="classify images with an adapted model",
        description="Predict the class of images (files or folders) with a model written by `metafew adapt`.",
        epilog=EPILOG,
        common=("device", "download"),
    )
    p.add_argument("--model", required=True, metavar="MODEL", help="model file from `metafew adapt`")
    p.add_argument("images", nargs="*", metavar="IMAGES|DIR", help="image files and/or folders")
    p.add_argument(
        "--evaluate",
        metavar="DIR|NAME",
        help="score the model on this labelled folder (root/<class>/<image>) or dataset name instead of predicting",
    )
    p.add_argument(
        "--format", choices=["csv", "json"], default=None, help="output format (default: from --out's suffix, else csv)"
    )
    p.add_argument("--out", metavar="FILE", help="write here instead of stdout")
    p.add_argument(
        "--skip-bad", action="store_true", help="leave unreadable files out (with a warning) instead of stopping"
    )
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per forward pass")
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out if it is an earlier metafew predictions file"
    )
    return p


def to_csv(predictions: list, classes: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "class", *[f"p_{c}" for c in classes]])
    for i, p in enumerate(predictions):
        w.writerow([p.source or f"#{i}", p.label, *[f"{p.probabilities[c]:.6f}" for c in classes]])
    return buf.getvalue()


def to_json(predictions: list, classes: list[str], model: str) -> str:
    from ..adaptation.outputs import PREDICTIONS_FORMAT

    doc = {
        "format": PREDICTIONS_FORMAT,
        "model": model,
        "classes": classes,
        "predictions": [p.to_dict() for p in predictions],
    }
    return json.dumps(doc, indent=2) + "\n"


def run(args: argparse.Namespace) -> int:
    from ..adaptation import check_output, load
    from ..adaptation.outputs import write_text
    from ..errors import ConfigError

    if args.evaluate and args.images:
        raise ConfigError("give images to predict or --evaluate a labelled set, not both")
    if not args.evaluate and not args.images:
        raise ConfigError("give image files or folders to predict (or --evaluate DIR for a labelled set)")
    if args.evaluate:
        return _evaluate(args)

    fmt = args.format or ("json" if args.out and args.out.lower().endswith(".json") else "csv")
    out = check_output(args.out, "predictions", overwrite=args.overwrite) if args.out else None  # before any work
    model = load(args.model, device=args.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            preds = model.predict(args.images, skip_bad=args.skip_bad, batch_size=args.batch_size)
        finally:
            for w in caught:
                print(f"metafew: warning: {' '.join(str(w.message).split())}", file=sys.stderr)
    text = to_csv(preds, model.classes) if fmt == "csv" else to_json(preds, model.classes, args.model)
    if out is None:
        sys.stdout.write(text)
    else:
        write_text(out, text)
        print(f"{len(preds)} predictions written to {out}", file=sys.stderr)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """``--evaluate``: metrics of the model on a labelled set (stdout), warnings (e.g. its own support images) on stderr."""
    from ..adaptation import load
    from ..errors import ConfigError

    if args.out:
        raise ConfigError("--evaluate prints its metrics (--format json for JSON); --out is for predictions")
    model = load(args.model, device=args.device)
    fetch_named_data(args.evaluate, args, "test")  # a dataset name: downloaded on first use unless --no-download
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            metrics = model.evaluate(args.evaluate, skip_bad=args.skip_bad, batch_size=args.batch_size)
        finally:
            for w in caught:
                print(f"metafew: warning: {' '.join(str(w.message).split())}", file=sys.stderr)
    if args.format == "json":
        sys.stdout.write(json.dumps({"model": args.model, "data": args.evaluate, **metrics.to_dict()}, indent=2) + "\n")
    else:
        print(metrics.summary())
    return 0
