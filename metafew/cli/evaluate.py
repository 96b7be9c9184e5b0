"""``metafew eval``: accuracy (and AUC) of a trained learner on fixed test episodes."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..bench.runner import build_learner, describe_device, fixed_test_episodes
from ..bench.suite import RowSpec
from ..checkpoint import load_state
from ..data import load_dataset
from ..device import resolve_device
from ..engine.evaluate import evaluate
from ..engine.train import load_weights
from ..errors import CheckpointError
from .common import add_command, parse_options

EPILOG = """\
examples:
  metafew eval --checkpoint runs/proto-5w1s/best.safetensors            # its own dataset and setting, 600 episodes
  metafew eval --checkpoint runs/proto-5w1s/best.safetensors --n-way 20 --k-shot 5
  metafew eval --checkpoint backbone.safetensors --learner protonet --dataset omniglot --n-way 5 --k-shot 1
  metafew eval --checkpoint runs/proto-lake/best.safetensors --lake   # Lake et al.'s 20 official runs
  metafew eval --checkpoint runs/x/best.safetensors --dataset pneumoniamnist --n-way 2 --k-shot 5 --json out.json

A checkpoint written by `metafew train` knows its learner, backbone, dataset and setting;
a pretrained backbone (`metafew pretrain`) is evaluated with --learner (default protonet).
The episodes depend only on the dataset, setting and --seed, so every learner is scored
on the same episodes. Accuracy is the mean over episodes with a 95% CI (1.96*std/sqrt(n))."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "eval",
        help="evaluate a trained learner on fixed test episodes",
        description="Evaluate a checkpoint on fixed N-way K-shot test episodes: mean accuracy with its 95% "
        "confidence interval, and the macro one-vs-rest AUC for binary tasks (or with --auc).",
        epilog=EPILOG,
    )
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="best.safetensors / last.safetensors of a run, or a pretrained backbone")
    g = p.add_argument_group("episodes (default: the checkpoint's own)")
    g.add_argument("--dataset", metavar="NAME", help="dataset to test on")
    g.add_argument("--subset", metavar="NAME", help="subset to test on (default: test)")
    g.add_argument("--n-way", type=int, metavar="N", help="classes per episode")
    g.add_argument("--k-shot", type=int, metavar="N", help="support images per class")
    g.add_argument("--n-query", type=int, metavar="N", help="query images per class (default: 15)")
    g.add_argument("--episodes", type=int, default=600, metavar="N", help="number of fixed test episodes")
    g.add_argument("--lake", action="store_true", help="Lake et al.'s 20 official 20-way 1-shot runs (reports the error rate)")
    g = p.add_argument_group("model (default: the checkpoint's own)")
    g.add_argument("--learner", metavar="NAME", help="learner to wrap a pretrained backbone in (default: protonet)")
    g.add_argument("--backbone", metavar="NAME", help="backbone architecture (must match the checkpoint)")
    g.add_argument("--option", action="append", metavar="KEY=VALUE", help="learner option, repeatable (e.g. test_inner_steps=10)")
    g = p.add_argument_group("output")
    g.add_argument("--batch-size", type=int, default=16, metavar="N", help="episodes per evaluation batch")
    g.add_argument("--auc", action=argparse.BooleanOptionalAction, default=None, help="macro one-vs-rest AUC (default: for 2-way)")
    g.add_argument("--json", metavar="FILE", help="also write the result (with per-episode accuracies) as JSON")
    return p


def spec_from_checkpoint(path: str, args: argparse.Namespace) -> tuple[RowSpec, bool]:
    """The row a checkpoint was trained as (with the command-line overrides), and whether it is a bare backbone."""
    _, record = load_state(path)
    config = record.get("config")
    if config:
        known = {f.name for f in fields(RowSpec)}
        d = {k: v for k, v in config.items() if k in known}
        d["backbone_checkpoint"] = None
        bare = False
    elif "arch" in record:  # a pretrained backbone: wrap it in a learner
        d = {"learner": args.learner or "protonet", "backbone_checkpoint": path, "backbone": record["arch"],
             "dataset": record.get("dataset") or "omniglot", "n_way": 5, "k_shot": 1}
        bare = True
    else:
        raise CheckpointError(f"{path} records no run configuration (not written by metafew train or metafew pretrain)")
    d.pop("name", None)
    overrides = {"dataset": args.dataset, "test_subset": args.subset, "n_way": args.n_way, "k_shot": args.k_shot,
                 "n_query": args.n_query, "learner": args.learner, "backbone": args.backbone}
    if args.dataset is not None and args.subset is None:
        d["test_subset"] = "test"
    if args.backbone is not None and args.backbone != d.get("backbone"):
        d["backbone_options"] = {}  # options of the recorded architecture do not carry over
    d.update({k: v for k, v in overrides.items() if v is not None})
    if args.option:
        d["learner_options"] = {**d.get("learner_options", {}), **parse_options(args.option, "--option")}
    d.update(eval_episodes=args.episodes, eval_batch_size=args.batch_size, seed=args.seed)
    if args.lake:
        d.update(test="lake", n_way=20, k_shot=1, metric="error")
    return RowSpec.from_dict(d, where=str(path)), bare


def run(args: argparse.Namespace) -> int:
    path = str(Path(args.checkpoint).expanduser())
    spec, bare = spec_from_checkpoint(path, args)
    dev = resolve_device(args.device)
    episodes = fixed_test_episodes(spec, data_root=args.data_root, device=dev)
    # The learner is built for the data's image format (nothing is decoded); a trained learner then gets its weights.
    subset = spec.test_subset if spec.test != "lake" else spec.train_subset
    shape_ds = load_dataset(spec.dataset, subset, root=args.data_root)
    learner = build_learner(spec, shape_ds, dev)
    if not bare:
        load_weights(learner, path, dev)
    result = evaluate(learner, episodes, batch_size=args.batch_size, auc=args.auc, progress=args.progress)
    what = f"{spec.learner} on {episodes.name}"
    if spec.metric == "error":
        print(f"{what}: error rate {100 * (1 - result.accuracy_mean):.2f} ± {100 * result.accuracy_ci95:.2f}% "
              f"({result.episodes} runs; people: 4.5%)")
    else:
        print(f"{what}: {result}")
    if args.json:
        doc = {"checkpoint": path, "learner": spec.learner, "dataset": spec.dataset, "device": describe_device(dev),
               **result.to_dict(per_episode=True)}
        Path(args.json).expanduser().write_text(json.dumps(doc, indent=2) + "\n")
    return 0
