"""``metafew eval``: accuracy (and AUC) of a trained learner on fixed test episodes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .. import distributed
from ..device import describe_device, resolve_device
from ..engine.evaluate import evaluate
from .common import add_command, add_config_arguments, config_overrides, parse_options

# RunConfig fields `metafew eval` takes, and the flag names it has always used for some of them.
EVAL_FLAGS = [
    "dataset",
    "test_subset",
    "n_way",
    "k_shot",
    "n_query",
    "eval_episodes",
    "learner",
    "backbone",
    "eval_batch_size",
    "skip_bad",
]
EVAL_RENAMES = {"test_subset": "--subset", "eval_episodes": "--episodes", "eval_batch_size": "--batch-size"}

EPILOG = """\
examples:
  metafew eval --checkpoint runs/protonet-5w1s/best.safetensors         # its own dataset and setting, 600 episodes
  metafew eval --checkpoint runs/protonet-5w1s/best.safetensors --n-way 20 --k-shot 5
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
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="FILE",
        help="best.safetensors / last.safetensors of a run, or a pretrained backbone",
    )
    g = p.add_argument_group("episodes (default: the checkpoint's own)")
    add_config_arguments(
        g, ["dataset", "test_subset", "n_way", "k_shot", "n_query"], flags=EVAL_RENAMES, show_defaults=False
    )
    add_config_arguments(g, ["eval_episodes", "skip_bad"], flags=EVAL_RENAMES)
    g.add_argument(
        "--lake", action="store_true", help="Lake et al.'s 20 official 20-way 1-shot runs (reports the error rate)"
    )
    g = p.add_argument_group("model (default: the checkpoint's own)")
    add_config_arguments(g, ["learner", "backbone"], show_defaults=False)
    g.add_argument(
        "--option", action="append", metavar="KEY=VALUE", help="learner option, repeatable (e.g. test_inner_steps=10)"
    )
    g = p.add_argument_group("output")
    add_config_arguments(g, ["eval_batch_size"], flags=EVAL_RENAMES)
    g.add_argument(
        "--auc", action=argparse.BooleanOptionalAction, default=None, help="macro one-vs-rest AUC (default: for 2-way)"
    )
    g.add_argument("--json", metavar="FILE", help="also write the result (with per-episode accuracies) as JSON")
    g.add_argument("--overwrite", action="store_true", help="replace --json if it is an earlier metafew result")
    return p


def run(args: argparse.Namespace) -> int:
    from ..config import load_run, test_episodes
    from ..outputs import EVALUATION_FORMAT, guard_output, write_json

    path = str(Path(args.checkpoint).expanduser())
    js = guard_output(args.json, "evaluation", overwrite=args.overwrite) if args.json else None  # before any work
    overrides = config_overrides(args, EVAL_FLAGS)
    overrides.setdefault("eval_episodes", 600)
    # --skip-bad is this evaluation's choice, never inherited from the run the checkpoint comes from
    overrides.update(seed=args.seed, amp=args.amp, skip_bad=bool(args.skip_bad))
    if args.option:
        overrides["learner_options"] = parse_options(args.option, "--option")
    if args.lake:
        overrides.update(test="lake", n_way=20, k_shot=1)
    dev = resolve_device(args.device)
    # The checkpoint is read once; its recorded config rebuilds the learner without reading any data.
    config, learner, _ = load_run(path, device=dev, overrides=overrides)
    episodes = test_episodes(config, data_root=args.data_root, device=dev, download=args.download)
    result = evaluate(learner, episodes, batch_size=config.eval_batch_size, auc=args.auc, progress=args.progress)
    what = f"{config.learner} on {episodes.name}"
    if config.test == "lake":
        print(
            f"{what}: error rate {100 * (1 - result.accuracy_mean):.2f} ± {100 * result.accuracy_ci95:.2f}% "
            f"({result.episodes} runs; people: 4.5%)"
        )
    else:
        print(f"{what}: {result}")
    if js is not None and distributed.is_main():  # rank 0 writes
        doc = {
            "format": EVALUATION_FORMAT,
            "checkpoint": path,
            "learner": config.learner,
            "dataset": config.dataset,
            "device": describe_device(dev),
            "config": config.to_dict(),
            **result.to_dict(per_episode=True),
        }
        write_json(js, json.loads(json.dumps(doc, default=str)))
    return 0
