"""``metafew train``: meta-train a learner on episodes, with validation, checkpoints and resume."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from ..bench.runner import train_row
from ..bench.suite import RowSpec, load_suite
from ..errors import ConfigError
from .common import add_command, parse_options

EPILOG = """\
examples:
  # ProtoNet as in Snell et al. 2017: 60-way 5-query training, Adam 1e-3 halved every 2000 episodes
  metafew train --dataset omniglot --learner protonet --n-way 5 --k-shot 1 --train-way 60 --train-query 5 \\
                --steps 20000 --schedule step --step-size 2000 --out runs/proto-5w1s
  # MAML, 5-way 1-shot (Finn et al. 2017): inner lr 0.4, 1 step, meta-batch 32
  metafew train --learner maml --n-way 5 --k-shot 1 --option inner_lr=0.4 --option inner_steps=1 \\
                --meta-batch-size 32 --steps 60000 --out runs/maml-5w1s
  # the exact settings of a row of a benchmark suite
  metafew train --suite omniglot --row reptile-5w1s --out runs/reptile-5w1s
  # continue an interrupted run (Ctrl-C saves a checkpoint)
  metafew train --out runs/proto-5w1s --resume ...same options...

Writes OUT/last.safetensors (full training state), OUT/best.safetensors (best validation
weights), OUT/log.jsonl and OUT/learning_curve.png. Evaluate with `metafew eval --checkpoint OUT/best.safetensors`."""

# RowSpec fields settable from the command line (None: not given).
SPEC_FLAGS: list[tuple[str, type, str]] = [
    ("dataset", str, "dataset name, e.g. omniglot, omniglot-lake, pneumoniamnist, caltech101, folder:PATH"),
    ("learner", str, "protonet, maml, fomaml, reptile or finetune (default: protonet)"),
    ("backbone", str, "backbone architecture: conv4, resnet12, resnet18 (default: conv4, or the checkpoint's)"),
    ("backbone_checkpoint", str, "start from a pretrained backbone file (metafew pretrain)"),
    ("n_way", int, "classes per episode (validation/test) (default: 5)"),
    ("k_shot", int, "support images per class (default: 1)"),
    ("n_query", int, "query images per class (validation/test)"),
    ("train_way", int, "classes per training episode (default: --n-way)"),
    ("train_shot", int, "support images per class in training (default: --k-shot)"),
    ("train_query", int, "query images per class in training (default: --n-query)"),
    ("train_subset", str, "subset to train on"),
    ("val_subset", str, "subset to validate on ('none': no validation)"),
    ("steps", int, "meta-training steps (meta-batches)"),
    ("meta_batch_size", int, "episodes per step"),
    ("optimizer", str, "adam, adamw or sgd (default: the learner's)"),
    ("lr", float, "outer learning rate (default: the learner's)"),
    ("schedule", str, "learning-rate schedule: constant, step, cosine or linear (to 0)"),
    ("step_size", int, "steps between decays of the 'step' schedule"),
    ("gamma", float, "decay factor of the 'step' schedule"),
    ("grad_clip", float, "clip the gradient norm to this value"),
    ("val_episodes", int, "fixed validation episodes (0: no validation)"),
    ("val_every", int, "validate every N steps"),
    ("log_every", int, "log every N steps"),
    ("checkpoint_every", int, "save last.safetensors every N steps"),
]


def add_spec_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to train (defaults: the suite row, else the usual few-shot settings)")
    defaults = {f.name: f.default for f in fields(RowSpec)}
    for name, typ, help in SPEC_FLAGS:
        if "default" not in help and defaults.get(name) not in (None, MISSING):
            help += f" (default: {defaults[name]})"
        metavar = "FILE" if name.endswith("checkpoint") else {int: "N", float: "X"}.get(typ, "NAME")
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, metavar=metavar, help=help)
    g.add_argument("--option", action="append", metavar="KEY=VALUE", help="learner option, repeatable (e.g. inner_lr=0.4)")
    g.add_argument("--backbone-option", action="append", metavar="KEY=VALUE", help="backbone option, repeatable")
    g.add_argument("--suite", help="take the settings of a row of this benchmark suite (with --row)")
    g.add_argument("--row", help="row name in --suite")


def spec_from_args(args: argparse.Namespace) -> RowSpec:
    """A RowSpec from ``--suite/--row`` (if given), overridden by the explicit flags."""
    base: dict[str, Any] = {}
    if args.suite or args.row:
        if not (args.suite and args.row):
            raise ConfigError("--suite and --row go together")
        suite = load_suite(args.suite)
        match = [r for r in suite.rows if r.name == args.row]
        if not match:
            raise ConfigError(f"suite {suite.name} has no row {args.row!r}; rows: {', '.join(r.name for r in suite.rows)}")
        base = match[0].to_dict()
    for name, _, _ in SPEC_FLAGS:
        value = getattr(args, name)
        if value is not None:
            base[name] = value
    if args.option:
        base["learner_options"] = {**base.get("learner_options", {}), **parse_options(args.option, "--option")}
    if args.backbone_option:
        base["backbone_options"] = {**base.get("backbone_options", {}), **parse_options(args.backbone_option, "--backbone-option")}
    base.setdefault("learner", "protonet")
    base.setdefault("n_way", 5)
    base.setdefault("k_shot", 1)
    base["seed"] = args.seed
    if not args.suite:
        base.pop("name", None)
    return RowSpec.from_dict(base, where="options")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "train",
        help="meta-train a learner on episodes",
        description="Meta-train a few-shot learner on N-way K-shot episodes of a dataset's training classes, "
        "validating on fixed episodes of its validation classes and keeping the best weights.",
        epilog=EPILOG,
    )
    add_spec_arguments(p)
    g = p.add_argument_group("run")
    g.add_argument("--out", metavar="DIR", help="run folder (default: runs/<row name>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from last.safetensors")
    g.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a run")
    return p


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    out = Path(args.out or f"runs/{spec.name}").expanduser()
    if (out / "last.safetensors").exists() and not (args.resume or args.overwrite):
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or --overwrite to start afresh")
    way, shot, query = spec.train_setting
    print(f"training {spec.learner} on {spec.dataset}/{spec.train_subset}: {way}-way {shot}-shot {query}-query, "
          f"{spec.steps} steps x {spec.meta_batch_size} episodes -> {out}")
    _, result = train_row(spec, out, data_root=args.data_root, device=args.device, amp=args.amp,
                          progress=args.progress, resume=args.resume)
    if result is None:
        print("steps = 0: nothing to train")
        return 0
    best = f", best validation accuracy {100 * result.best_val_acc:.2f}% at step {result.best_step}" if result.best_val_acc is not None else ""
    print(f"done: {result.steps} steps in {result.seconds:.0f} s{best}")
    print(f"weights: {result.checkpoint}")
    if result.out_dir is not None and (result.out_dir / "learning_curve.png").is_file():
        print(f"learning curve: {result.out_dir / 'learning_curve.png'}")
    print(f"evaluate: metafew eval --checkpoint {result.checkpoint}")
    return 0
