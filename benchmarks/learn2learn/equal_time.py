"""metafew's pretrained recipe against learn2learn's own MAML example, at equal wall time (Omniglot 5-way 1-shot).

What a user would run instead of metafew is learn2learn's ``examples/vision/maml_omniglot.py``.
This runs it unchanged (its code is imported from a snapshot of the learn2learn repository, never
copied here), but for three things a new machine forces: the data path (its ``~/data`` is pointed at
the local Omniglot folders, and torchvision's check for the official zips accepts the extracted
folders), the thread count (one) and the device (``main(cuda=False)``: there is no GPU). Its weights
are snapshotted every ``--every`` seconds of wall time, counted from the call of its ``main`` (its
data loading included), at the end of an optimizer step; the run stops at ``--budget``.

metafew's side is the ``omniglot-pretrained`` suite's ``[pretrain]`` recipe (supervised Conv-4,
5 epochs, bf16, best validation epoch), timed the same way, snapshotted after each epoch; its
few-shot classifier is the pretrained backbone as a prototypical network (the suite's floor rows).

Both are scored on the same 600 fixed 5-way 1-shot 15-query episodes, drawn from the characters
that neither side trained on: learn2learn's benchmark splits all 1,623 characters at random
(seed 42: 1,100 train, 100 validation, 423 test), metafew uses Vinyals et al.'s split (1,028 / 172 /
423), so the episodes come from the characters in both test sets (all 4 rotations of each, as
metafew's test classes). learn2learn's models adapt as its script does (1 step of 0.5 on the support),
on images decoded as its benchmark decodes them (28x28 LANCZOS, strokes 1 on 0). Beside it, the
figure learn2learn's script itself prints: its meta-validation accuracy (32 tasks of its validation
classes a step, 1 query per class), averaged over its last 50 steps (its test evaluation runs only
after all 60,000 iterations).

    benchmarks/learn2learn/install.sh                     # learn2learn 0.2.0 into .venv
    git clone https://github.com/learnables/learn2learn /tmp/l2l   # its examples (not in the wheel)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/learn2learn/equal_time.py all \\
        --script /tmp/l2l/examples/vision/maml_omniglot.py --budget 600 --work /tmp/equal-time \\
        --out benchmarks/results/learn2learn-equal-time.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

L2L_SEED = 42  # maml_omniglot.py's default seed: it also fixes its random class split


class BudgetSpent(Exception):
    """Raised at the end of the first optimizer step past the wall-clock budget."""


def omniglot_folder() -> Path:
    from metafew.data.omniglot import locate_omniglot

    return Path(locate_omniglot(None, False))


def peer(args: argparse.Namespace) -> None:
    """learn2learn's example, unchanged but for data path, threads and device, snapshotted on the clock."""
    import runpy

    torchvision_omniglot = __import__("torchvision.datasets.omniglot", fromlist=["Omniglot"]).Omniglot
    import learn2learn as l2l

    home = args.work / "peer-home"
    (home / "data" / "omniglot-py").mkdir(parents=True, exist_ok=True)
    for part in ("images_background", "images_evaluation"):
        link = home / "data" / "omniglot-py" / part
        if not link.exists():
            link.symlink_to(omniglot_folder() / part)
    os.environ["HOME"] = str(home)  # the script reads root='~/data'
    torchvision_omniglot._check_integrity = lambda self: (Path(self.root) / self._get_target_folder()).is_dir()

    made: dict[str, list[Any]] = {"maml": [], "splits": []}
    maml_init = l2l.algorithms.MAML.__init__
    filtered_init = l2l.data.FilteredMetaDataset.__init__

    def record_maml(self: Any, *a: Any, **k: Any) -> None:
        maml_init(self, *a, **k)
        if not made["maml"]:  # the script's own wrapper; every maml.clone() builds another (not kept)
            made["maml"].append(self)

    def record_split(self: Any, dataset: Any, labels: Any, *a: Any, **k: Any) -> None:
        filtered_init(self, dataset, labels, *a, **k)
        made["splits"].append([int(c) for c in labels])

    l2l.algorithms.MAML.__init__ = record_maml
    l2l.data.FilteredMetaDataset.__init__ = record_split

    snapshots: list[dict[str, Any]] = []
    steps = 0
    adam_step = torch.optim.Adam.step
    start = time.perf_counter()

    def timed_step(self: Any, *a: Any, **k: Any) -> Any:
        nonlocal steps
        out = adam_step(self, *a, **k)
        steps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= args.every * (len(snapshots) + 1) or elapsed >= args.budget:
            model = made["maml"][0].module
            state = {name: t.detach().clone() for name, t in model.state_dict().items()}
            snapshots.append({"seconds": round(elapsed, 1), "steps": steps, "state": state})
            print(f"peer: {steps} steps, {elapsed:.0f} s", file=sys.stderr, flush=True)
        if elapsed >= args.budget:
            raise BudgetSpent
        return out

    torch.optim.Adam.step = timed_step  # type: ignore[method-assign]
    # the label of a character in learn2learn's FullOmniglot: its place in torchvision's listing
    # (background characters first), which follows os.listdir: recorded here, on this file system
    names = [c for bg in (True, False) for c in torchvision_omniglot(str(home / "data"), background=bg)._characters]
    module = runpy.run_path(str(args.script), run_name="l2l_example")
    log = open(args.work / "peer-stdout.txt", "w")
    stdout, sys.stdout = sys.stdout, log
    try:
        start = time.perf_counter()
        module["main"](cuda=False)
    except BudgetSpent:
        pass
    finally:
        sys.stdout = stdout
        log.close()
    doc = {"snapshots": snapshots, "splits": made["splits"], "names": names, "script": str(args.script)}
    torch.save(doc, args.work / "peer.pt")


def ours(args: argparse.Namespace) -> None:
    """The suite's [pretrain] recipe, timed from the start (data loading included), a snapshot per epoch."""
    import metafew
    from metafew.bench import load_suite

    recipe = load_suite("omniglot-pretrained").pretrain
    assert recipe is not None
    snapshots: list[dict[str, Any]] = []
    start = time.perf_counter()
    train = metafew.load_dataset(recipe.dataset, recipe.subset)
    val = metafew.load_dataset(recipe.dataset, recipe.val_subset)
    backbone = metafew.create_backbone(recipe.backbone, in_channels=train.channels, image_size=train.image_size)

    def snapshot(row: dict[str, Any]) -> None:
        state = {name: t.detach().clone() for name, t in backbone.state_dict().items()}
        snapshots.append({"seconds": round(time.perf_counter() - start, 1), "epoch": row.get("epoch"), "state": state})
        print(f"metafew: epoch {row.get('epoch')}, {snapshots[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)

    metafew.pretrain(
        backbone,
        train,
        **{**recipe.training_options(), "epochs": args.epochs or recipe.epochs},
        device="cpu",
        val=val,
        progress=False,
        log=snapshot,
    )
    torch.save({"snapshots": snapshots, "recipe": recipe.to_dict()}, args.work / "metafew.pt")


def common_classes(splits: list[list[int]], names: list[str]) -> tuple[Any, int]:
    """metafew's test classes whose character is in learn2learn's test split, and how many characters."""
    import metafew

    assert len(splits) == 3, f"expected learn2learn's train, validation and test splits, got {len(splits)}"
    l2l_test = {names[c] for c in splits[2]}  # the order omniglot_tasksets builds them in
    test = metafew.load_dataset("omniglot", "test")
    keep = [i for i, n in enumerate(test.classes) if n.rpartition("/")[0] in l2l_test]
    chars = {test.classes[i].rpartition("/")[0] for i in keep}
    return test.subset(keep, name="omniglot/vinyals-test-and-l2l-test"), len(chars)


def score(args: argparse.Namespace) -> dict[str, Any]:
    import learn2learn as l2l
    from torch import nn

    import metafew
    from metafew.engine.evaluate import mean_ci95

    peer_run = torch.load(args.work / "peer.pt", weights_only=False)
    our_run = torch.load(args.work / "metafew.pt", weights_only=False)
    data, characters = common_classes(peer_run["splits"], peer_run["names"])
    fixed = metafew.EpisodeSampler(data, 5, 1, 15, seed=0, device="cpu").fixed(args.episodes)
    raw = metafew.EpisodeSampler(data, 5, 1, 15, seed=0, device="cpu", normalize=False).fixed(args.episodes)

    def l2l_accuracy(state: dict[str, torch.Tensor]) -> tuple[float, float]:
        model = l2l.vision.models.OmniglotFC(28**2, 5)
        model.load_state_dict(state)
        maml = l2l.algorithms.MAML(model, lr=0.5, first_order=False)  # the script's fast_lr, 1 step
        loss = nn.CrossEntropyLoss()
        accs = []
        for i in range(len(raw)):
            ep = raw[i]
            learner = maml.clone()
            learner.adapt(loss(learner(ep.support_x), ep.support_y))
            with torch.no_grad():
                accs.append((learner(ep.query_x).argmax(1) == ep.query_y).float().mean().item())
        return mean_ci95(torch.tensor(accs))

    rows: dict[str, list[dict[str, Any]]] = {"learn2learn": [], "metafew": []}
    for snap in peer_run["snapshots"]:
        mean, ci = l2l_accuracy(snap["state"])
        rows["learn2learn"].append({"seconds": snap["seconds"], "steps": snap["steps"], "accuracy": mean, "ci95": ci})
        print("learn2learn", rows["learn2learn"][-1], flush=True)
    for snap in our_run["snapshots"]:
        backbone = metafew.create_backbone("conv4", in_channels=1, image_size=28)
        backbone.load_state_dict(snap["state"])
        result = metafew.evaluate(metafew.ProtoNet(backbone), fixed, progress=False)
        row = {"seconds": snap["seconds"], "epoch": snap["epoch"]}
        rows["metafew"].append({**row, "accuracy": result.accuracy_mean, "ci95": result.accuracy_ci95})
        print("metafew", rows["metafew"][-1], flush=True)
    printed = [float(line.split()[-1]) for line in (args.work / "peer-stdout.txt").read_text().splitlines()
               if line.startswith("Meta Valid Accuracy")]  # fmt: skip
    peer_final = rows["learn2learn"][-1]
    peer_final["own_validation_accuracy_last_50_steps"] = sum(printed[-50:]) / len(printed[-50:]) if printed else None
    reached = [r for r in rows["metafew"] if r["accuracy"] >= peer_final["accuracy"]]
    first = reached[0] if reached else None
    return {
        "benchmark": "learn2learn-equal-time",
        "rows": rows,
        "budget_seconds": args.budget,
        "episodes": f"{args.episodes} fixed 5-way 1-shot 15-query episodes, seed 0, over the {len(data.classes)} "
        f"metafew test classes ({characters} characters x 4 rotations) in both test splits",
        "learn2learn_at_budget": peer_final,
        "metafew_first_at_or_above": first,
        "speedup": None if first is None else round(peer_final["seconds"] / first["seconds"], 1),
        "peer_script": "learn2learn 0.2.0 examples/vision/maml_omniglot.py (defaults: 5-way 1-shot, OmniglotFC, "
        "meta-batch 32, 1 inner step of 0.5, Adam 0.003), main(cuda=False)",
        "machine": f"{platform.machine()}, 1 thread per run, torch {torch.__version__}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/learn2learn/equal_time.py " + " ".join(sys.argv[1:]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["peer", "metafew", "score", "all"])
    p.add_argument("--script", type=Path, help="learn2learn's examples/vision/maml_omniglot.py")
    p.add_argument("--budget", type=float, default=600.0, help="wall-clock seconds each side gets")
    p.add_argument("--every", type=float, default=60.0, help="seconds between learn2learn snapshots")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--epochs", type=int, help="metafew's pretraining epochs (default: the recipe's 5; fewer to try it)")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    random.seed(0)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.what == "all":
        for part in ("peer", "metafew"):
            cmd = [sys.executable, __file__, part, "--budget", str(args.budget), "--every", str(args.every)]
            cmd += ["--work", str(args.work)] + (["--script", str(args.script)] if args.script else [])
            cmd += ["--epochs", str(args.epochs)] if args.epochs else []
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        args.what = "score"
    if args.what == "peer":
        if args.script is None:
            p.error("peer needs --script (learn2learn's examples/vision/maml_omniglot.py)")
        peer(args)
    elif args.what == "metafew":
        ours(args)
    else:
        doc = score(args)
        if args.out:
            args.out.write_text(json.dumps(doc, indent=1) + "\n")
        print(json.dumps({k: doc[k] for k in ("learn2learn_at_budget", "metafew_first_at_or_above", "speedup")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
