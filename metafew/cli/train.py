"""``metafew train``: meta-train a learner on episodes, with validation, checkpoints and resume."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import RunConfig, train_run
from ..errors import ConfigError
from ..registry import did_you_mean
from .common import add_command, add_config_arguments, config_overrides, parse_options

EPILOG = """\
examples:
  # ProtoNet as in Snell et al. 2017: 60-way 5-query training, Adam 1e-3 halved every 2000 episodes
  metafew train --dataset omniglot --learner protonet --n-way 5 --k-shot 1 --train-way 60 --train-query 5 \\
                --steps 20000 --schedule step --step-size 2000 --out runs/protonet-5w1s
  # MAML, 5-way 1-shot (Finn et al. 2017): inner lr 0.4, 1 step, meta-batch 32
  metafew train --learner maml --n-way 5 --k-shot 1 --option inner_lr=0.4 --option inner_steps=1 \\
                --meta-batch-size 32 --steps 60000 --out runs/maml-5w1s
  # the exact settings of a row of a benchmark suite
  metafew train --suite omniglot --row reptile-5w1s --out runs/reptile-5w1s
  # continue an interrupted run (Ctrl-C saves a checkpoint)
  metafew train --out runs/protonet-5w1s --resume ...same options...

Writes OUT/last.safetensors (full training state), OUT/best.safetensors (best validation
weights), OUT/log.jsonl and OUT/learning_curve.png. Evaluate with `metafew eval --checkpoint OUT/best.safetensors`.

--tensorboard [DIR] also writes each row of log.jsonl (training loss and accuracy, learning
rate, validation accuracy with its 95% CI, time per step) as TensorBoard scalars, into DIR
(default: OUT/tensorboard); it needs `pip install -e ".[tensorboard]"` from the clone.
  metafew train --out runs/protonet-5w1s --tensorboard ...   then: tensorboard --logdir runs"""

# RunConfig fields `metafew train` takes as flags.
CONFIG_FLAGS = [
    "dataset",
    "learner",
    "backbone",
    "backbone_checkpoint",
    "n_way",
    "k_shot",
    "n_query",
    "train_way",
    "train_shot",
    "train_query",
    "train_subset",
    "val_subset",
    "skip_bad",
    "steps",
    "meta_batch_size",
    "optimizer",
    "lr",
    "schedule",
    "step_size",
    "gamma",
    "grad_clip",
    "val_episodes",
    "val_every",
    "log_every",
    "checkpoint_every",
]


def add_config_flags(p: argparse.ArgumentParser) -> None:
    title = "what to train (defaults: the suite row, else the usual few-shot settings)"
    g = p.add_argument_group(title)
    add_config_arguments(g, CONFIG_FLAGS)
    g.add_argument(
        "--option", action="append", metavar="KEY=VALUE", help="learner option, repeatable (e.g. inner_lr=0.4)"
    )
    g.add_argument("--backbone-option", action="append", metavar="KEY=VALUE", help="backbone option, repeatable")
    g.add_argument("--suite", help="take the settings of a row of this benchmark suite (with --row)")
    g.add_argument("--row", help="row name in --suite")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of ``--suite/--row`` (if given), overridden by the explicit flags."""
    base: dict[str, Any] = {}
    if args.suite or args.row:
        if not (args.suite and args.row):
            raise ConfigError("--suite and --row go together")
        from ..bench.suite import load_suite  # a suite row is a RunConfig plus its published figure

        suite = load_suite(args.suite)
        match = [r for r in suite.rows if r.name == args.row]
        if not match:
            names = [r.name for r in suite.rows]
            raise ConfigError(
                f"suite {suite.name} has no row {args.row!r}{did_you_mean(args.row, names)}; rows: {', '.join(names)}"
            )
        base = match[0].config.to_dict()
    base.update(config_overrides(args, CONFIG_FLAGS))
    if args.option:
        base["learner_options"] = {**base.get("learner_options", {}), **parse_options(args.option, "--option")}
    if args.backbone_option:
        base["backbone_options"] = {
            **base.get("backbone_options", {}),
            **parse_options(args.backbone_option, "--backbone-option"),
        }
    base["seed"] = args.seed
    if args.amp is not None:
        base["amp"] = args.amp
    if getattr(args, "tensorboard", None) is not None:
        base["tensorboard"] = args.tensorboard
    if not args.suite:
        base.pop("name", None)
    return RunConfig.from_dict(base, where="options")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "train",
        help="meta-train a learner on episodes",
        description="Meta-train a few-shot learner on N-way K-shot episodes of a dataset's training classes, "
        "validating on fixed episodes of its validation classes and keeping the best weights.",
        epilog=EPILOG,
    )
    add_config_flags(p)
    g = p.add_argument_group("run")
    g.add_argument("--out", metavar="DIR", help="run folder (default: runs/<row name>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from last.safetensors")
    g.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a run (replacing it)")
    g.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: continue even if the settings differ from the run's (log.jsonl records the change)",
    )
    g.add_argument(
        "--tensorboard",
        nargs="?",
        const=True,
        default=None,
        metavar="DIR",
        help=(
            "also log to TensorBoard, into DIR (default: OUT/tensorboard); "
            'needs pip install -e ".[tensorboard]" from the clone'
        ),
    )
    return p


def run(args: argparse.Namespace) -> int:
    spec = config_from_args(args)
    from ..outputs import guard_run_dir, holds_run

    out = Path(args.out or f"runs/{spec.name}").expanduser()
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it: pass one of them")
    if args.allow_config_change and not args.resume:
        raise ConfigError("--allow-config-change only applies with --resume")
    if args.resume and spec.steps > 0 and not (out / "last.safetensors").is_file():
        found = "holds no run" if not holds_run(out) else "holds no last.safetensors to continue from"
        raise ConfigError(f"--resume: {out} {found}; drop --resume to start a new run there")
    if spec.steps > 0 and spec.tensorboard:
        from ..engine.tensorboard import require_tensorboard

        require_tensorboard()  # before anything is written
    if spec.steps > 0:
        guard_run_dir(out, resume=args.resume, overwrite=args.overwrite)  # before any data is read
    way, shot, query = spec.train_setting
    print(
        f"training {spec.learner} on {spec.dataset}/{spec.train_subset}: {way}-way {shot}-shot {query}-query, "
        f"{spec.steps} steps x {spec.meta_batch_size} episodes -> {out}"
    )
    _, result = train_run(
        spec,
        out,
        data_root=args.data_root,
        device=args.device,
        progress=args.progress,
        resume=args.resume,
        overwrite=args.overwrite,
        allow_changes=args.allow_config_change,
        download=args.download,
    )
    if result is None:
        print("steps = 0: nothing to train")
        return 0
    best = (
        f", best validation accuracy {100 * result.best_val_acc:.2f}% at step {result.best_step}"
        if result.best_val_acc is not None
        else ""
    )
    print(f"done: {result.steps} steps in {result.seconds:.0f} s{best}")
    print(f"weights: {result.checkpoint}")
    if result.out_dir is not None and (result.out_dir / "learning_curve.png").is_file():
        print(f"learning curve: {result.out_dir / 'learning_curve.png'}")
    print(f"evaluate: metafew eval --checkpoint {result.checkpoint}")
    return 0
