#!/usr/bin/env python
"""Meta-training speed: metafew's learners against learn2learn's MAML, side by side.

Iterations per second of one meta-training step (``zero_grad``, meta-loss over a
meta-batch, ``backward``, optimizer step) of metafew's ProtoNet, MAML, FO-MAML and
Reptile, and of learn2learn's ``l2l.algorithms.MAML`` (second and first order)
driven the way learn2learn's own examples drive it (``maml.clone()``, ``adapt()``
per inner step, ``backward()`` per task, gradients scaled by 1/meta-batch).

Everything but the algorithm is the same on both sides:

* the tasks: one pool of episode batches drawn once by metafew's ``EpisodeSampler``
  and cycled in the same order by every method (sampling is not timed);
* the model: metafew's Conv-4 plus a linear head; learn2learn gets a deep copy of
  the very same initial weights (``nn.Sequential(backbone, head)``), with
  BatchNorm set to batch statistics and no running-statistics update
  (``track_running_stats=False``, what metafew's "transductive" MAML does), so the
  two compute the same function: ``--check`` (on by default) asserts that their
  meta-losses and meta-gradients agree on the first batch;
* the outer optimizer: Adam, lr 1e-3 (metafew's MAML default); the machine, the
  process and the torch thread count.

Settings: Omniglot 5-way 1-shot 15-query, meta-batch 32, Conv-4 28x28, MAML with
1 inner step at lr 0.4 (Finn et al.); Caltech-101 5-way 5-shot 15-query,
meta-batch 4, Conv-4 84x84, MAML with 5 inner steps at lr 0.01 (Finn et al.'s
miniImageNet setting). Reptile: metafew's defaults (5 Adam steps, lr 1e-3, outer
SGD lr 1). Warm-up iterations are excluded; methods alternate for ``--repeats``
rounds and the median of each is reported.

    python benchmarks/speed.py --data-root ../shared/data --json results/speed.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import run_datasets, set_threads, side_by_side_parser  # benchmarks/common.py
from torch import nn

SETTINGS = {
    "omniglot": {
        "title": "Omniglot vinyals/train",
        "n_way": 5,
        "k_shot": 1,
        "n_query": 15,
        "meta_batch": 32,
        "image_size": 28,
        "channels": 1,
        "maml_inner_steps": 1,
        "maml_inner_lr": 0.4,
    },
    "caltech101": {
        "title": "Caltech-101 train",
        "n_way": 5,
        "k_shot": 5,
        "n_query": 15,
        "meta_batch": 4,
        "image_size": 84,
        "channels": 3,
        "maml_inner_steps": 5,
        "maml_inner_lr": 0.01,
    },
}
METHODS = ("protonet", "maml", "l2l_maml", "fomaml", "l2l_fomaml", "reptile")
PAIRS = {"maml": "l2l_maml", "fomaml": "l2l_fomaml"}


def load_dataset(name: str, root: str):
    if name == "omniglot":
        try:
            from metafew.data import Omniglot
        except ImportError:
            from metafew.data.omniglot import Omniglot
        return Omniglot("train", split="vinyals", root=root)
    try:
        from metafew.data import Caltech101
    except ImportError:
        from metafew.data.caltech101 import Caltech101
    return Caltech101("train", root=root)


# -- one meta-training step of each side -------------------------------------------------


class MetafewStep:
    """``zero_grad; loss = learner.meta_loss(batch); backward; step`` for a metafew learner."""

    def __init__(self, learner: nn.Module) -> None:
        from metafew.engine.train import build_optimizer

        self.learner = learner.train()
        self.opt = build_optimizer([p for p in learner.parameters() if p.requires_grad], learner.default_optimizer)

    def __call__(self, batch) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss, _acc = self.learner.meta_loss(batch)
        loss.backward()
        self.opt.step()
        return loss


class L2LMAMLStep:
    """learn2learn's MAML as its examples run it (examples/vision/maml_omniglot.py)."""

    def __init__(self, model: nn.Module, lr: float, steps: int, first_order: bool, amp: str | None = None) -> None:
        import learn2learn as l2l

        self.amp = amp

        self.maml = l2l.algorithms.MAML(model.train(), lr=lr, first_order=first_order)
        self.steps = steps
        self.opt = torch.optim.Adam(self.maml.parameters(), lr=1e-3)

    def meta_loss_backward(self, batch) -> torch.Tensor:
        b = batch.support_x.shape[0]
        total = 0.0
        for i in range(b):
            learner = self.maml.clone()
            for _ in range(self.steps):
                learner.adapt(F.cross_entropy(learner(batch.support_x[i]), batch.support_y[i]))
            loss = F.cross_entropy(learner(batch.query_x[i]), batch.query_y[i])
            loss.backward()
            total += loss.detach()
        for p in self.maml.parameters():
            if p.grad is not None:
                p.grad.mul_(1.0 / b)
        return total / b

    def __call__(self, batch) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(batch.query_x.device.type, dtype=torch.bfloat16, enabled=self.amp == "bf16"):
            loss = self.meta_loss_backward(batch)
        self.opt.step()
        return loss


def l2l_model(backbone: nn.Module, head: nn.Linear) -> nn.Module:
    """The same weights as metafew's backbone + head, BatchNorm on batch statistics only."""
    model = nn.Sequential(copy.deepcopy(backbone), copy.deepcopy(head))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
    return model


def build(name: str, method: str, s: dict, seed: int, amp: str | None = None) -> Callable:
    """A fresh step function for ``method``, with the seed-``seed`` initial weights.

    ``amp="bf16"``: metafew's learners get ``amp="bf16"``; learn2learn, which has no
    such option, runs its whole step under ``torch.autocast(dtype=bfloat16)``."""
    from metafew import backbones, learners

    torch.manual_seed(seed)
    backbone = backbones.create("conv4", in_channels=s["channels"], image_size=s["image_size"])
    maml_opts = {"n_way": s["n_way"], "inner_lr": s["maml_inner_lr"], "inner_steps": s["maml_inner_steps"]}
    if method == "protonet":
        return MetafewStep(learners.ProtoNet(backbone, amp=amp))
    if method in ("maml", "fomaml"):
        return MetafewStep(learners.MAML(backbone, first_order=method == "fomaml", amp=amp, **maml_opts))
    if method == "reptile":
        return MetafewStep(learners.Reptile(backbone, n_way=s["n_way"], amp=amp))
    # learn2learn: the same initial weights as metafew's MAML built from this seed
    ref = learners.MAML(backbone, **maml_opts)
    return L2LMAMLStep(
        l2l_model(ref.backbone, ref.head), s["maml_inner_lr"], s["maml_inner_steps"], method == "l2l_fomaml", amp
    )


def check_same(s: dict, batch, seed: int) -> dict:
    """metafew's MAML and learn2learn's MAML give the same meta-loss and meta-gradient (both orders)."""
    from metafew import backbones, learners

    out = {}
    for first_order in (False, True):
        torch.manual_seed(seed)
        backbone = backbones.create("conv4", in_channels=s["channels"], image_size=s["image_size"])
        mf = learners.MAML(
            backbone,
            n_way=s["n_way"],
            inner_lr=s["maml_inner_lr"],
            inner_steps=s["maml_inner_steps"],
            first_order=first_order,
        ).train()
        l2 = L2LMAMLStep(l2l_model(mf.backbone, mf.head), s["maml_inner_lr"], s["maml_inner_steps"], first_order)
        loss_mf, _ = mf.meta_loss(batch)
        loss_mf.backward()
        loss_l2 = l2.meta_loss_backward(batch)
        g_mf = torch.cat([p.grad.flatten() for p in list(mf.backbone.parameters()) + list(mf.head.parameters())])
        g_l2 = torch.cat([p.grad.flatten() for p in l2.maml.parameters()])
        rel = float((g_mf - g_l2).norm() / g_mf.norm())
        key = "fomaml" if first_order else "maml"
        out[key] = {"loss_metafew": loss_mf.detach().item(), "loss_l2l": float(loss_l2), "grad_rel_diff": rel}
        if (
            abs(out[key]["loss_metafew"] - out[key]["loss_l2l"]) > 1e-4 * max(1.0, abs(out[key]["loss_l2l"]))
            or rel > 1e-3
        ):
            raise AssertionError(f"metafew and learn2learn {key} disagree: {out[key]}")
    return out


# -- measuring --------------------------------------------------------------------------------


def iters_per_s(step: Callable, pool: list, start: int, iters: int) -> tuple[float, int]:
    """Iterations/second over ``iters`` steps on the pool's batches from ``start`` (cycled)."""
    t0 = time.perf_counter()
    for i in range(iters):
        step(pool[(start + i) % len(pool)])
    return iters / (time.perf_counter() - t0), start + iters


def bench(name: str, args: argparse.Namespace) -> dict:
    from metafew.data import EpisodeSampler

    s = SETTINGS[name]
    print(
        f"\n== {s['title']}: {s['n_way']}-way {s['k_shot']}-shot {s['n_query']}-query, meta-batch {s['meta_batch']}, "
        f"MAML {s['maml_inner_steps']} inner step(s) at lr {s['maml_inner_lr']}",
        flush=True,
    )
    ds = load_dataset(name, args.data_root)
    sampler = EpisodeSampler(ds, s["n_way"], s["k_shot"], s["n_query"], seed=args.seed, device="cpu")
    pool = [sampler.sample_batch(s["meta_batch"]) for _ in range(args.pool)]
    res: dict = {
        "setting": dict(s, iters=args.iters, warmup=args.warmup, repeats=args.repeats, pool=args.pool, amp=args.amp)
    }
    if args.check:
        res["check"] = check_same(s, pool[0], args.seed)
        print(
            "   check: "
            + ", ".join(
                f"{k} loss {v['loss_metafew']:.5f} vs {v['loss_l2l']:.5f}, grad rel diff {v['grad_rel_diff']:.1e}"
                for k, v in res["check"].items()
            ),
            flush=True,
        )
    methods = [m for m in METHODS if m in args.methods]
    steps = {m: build(name, m, s, args.seed, args.amp) for m in methods}
    cursor = {m: 0 for m in methods}
    for m in methods:  # warm-up, not timed
        _, cursor[m] = iters_per_s(steps[m], pool, cursor[m], args.warmup)
    runs: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.repeats):
        for m in methods:
            v, cursor[m] = iters_per_s(steps[m], pool, cursor[m], args.iters)
            runs[m].append(v)
        print(f"   round {r + 1}: " + ", ".join(f"{m} {v[-1]:.3f} it/s" for m, v in runs.items()), flush=True)
    res["iters_per_s"] = {m: statistics.median(v) for m, v in runs.items()}
    res["iters_per_s_rounds"] = runs
    res["ratio"] = {
        f"{a}/{b}": res["iters_per_s"][a] / res["iters_per_s"][b] for a, b in PAIRS.items() if a in runs and b in runs
    }
    # ratio per round too: the two sides of a round ran back to back under the same load
    res["ratio_rounds"] = {
        f"{a}/{b}": [x / y for x, y in zip(runs[a], runs[b])] for a, b in PAIRS.items() if a in runs and b in runs
    }
    return res


def markdown(results: dict) -> str:
    lines = [
        "| dataset, task | meta-batch | MAML inner steps | metafew ProtoNet | metafew MAML | l2l MAML | ratio MAML "
        "| metafew FO-MAML | l2l FO-MAML | ratio FO-MAML | metafew Reptile |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(d: dict, k: str, fmt: str = "{:.3g}") -> str:
        return fmt.format(d[k]) if k in d else "-"

    for r in results["datasets"].values():
        s, e, x = r["setting"], r["iters_per_s"], r["ratio"]
        lines.append(
            f"| {s['title']}, {s['n_way']}-way {s['k_shot']}-shot {s['n_query']}-query, Conv-4 {s['image_size']}x{s['image_size']} "
            f"| {s['meta_batch']} | {s['maml_inner_steps']} (lr {s['maml_inner_lr']}) | {f(e, 'protonet')} | {f(e, 'maml')} "
            f"| {f(e, 'l2l_maml')} | {f(x, 'maml/l2l_maml', '{:.2f}x')} | {f(e, 'fomaml')} | {f(e, 'l2l_fomaml')} "
            f"| {f(x, 'fomaml/l2l_fomaml', '{:.2f}x')} | {f(e, 'reptile')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = side_by_side_parser(__doc__)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of %(default)s")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per method per round (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per method first (default: %(default)s)")
    p.add_argument("--pool", type=int, default=4, help="episode batches drawn once and cycled (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the metafew == l2l MAML check")
    p.add_argument("--amp", choices=["bf16"], help="both sides under bf16 autocast (default: float32)")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    set_threads(args.threads)
    return run_datasets(
        p, args, SETTINGS, bench, markdown, "meta-training iterations per second (higher is better)\n\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
