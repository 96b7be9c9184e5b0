"""How close each training step runs to this machine's arithmetic limit.

For every learner's meta-training step (and for a pretraining step) it counts the FLOPs
of one step with ``torch.utils.flop_counter.FlopCounterMode`` (forward + backward, the
inner loop included), times the step, and divides by the throughput this same process
measures for a large matmul and for a Conv-4-shaped convolution (forward + backward):
the share of the limit the step reaches. ``--profile NAME`` prints where one step's time
goes (torch.profiler, by operator), and ``--variant`` compares float32, bf16 autocast and
channels-last memory format.

    python benchmarks/roofline.py --threads 1 --out benchmarks/results/roofline.json
    python benchmarks/roofline.py --threads 1 --profile protonet-60w1s

Run it on an idle machine: a second job on the same cores halves every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import metafew
from metafew.data import EpisodeSampler, load_dataset


def seconds_per_call(fn: Callable[[], Any], *, min_time: float = 3.0, warmup: int = 2) -> float:
    """Median-free, simple mean seconds per call over at least ``min_time`` seconds (after warm-up)."""
    for _ in range(warmup):
        fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time and calls >= 3:
            return elapsed / calls


def flops_of(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def peak_matmul(n: int = 2048) -> float:
    """GFLOP/s of an n x n float32 matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / seconds_per_call(lambda: a @ b, min_time=2.0) / 1e9


def peak_conv(batch: int = 256, channels: int = 64, size: int = 14, bf16: bool = False) -> float:
    """GFLOP/s of a Conv-4 block's 3x3 convolution, forward + backward, at a size where it is compute-bound."""
    x = torch.randn(batch, channels, size, size, requires_grad=True)
    w = torch.randn(channels, channels, 3, 3, requires_grad=True)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = F.conv2d(x, w, padding=1)
        y.float().sum().backward()

    return flops_of(step) / seconds_per_call(step, min_time=2.0) / 1e9


def learner_step(name: str, n_way: int, k_shot: int, n_query: int, batch: int, options: dict[str, Any], variant: str):
    """A closure running one meta-training step (loss, backward, optimizer step) of ``name``."""
    data = load_dataset("omniglot", "train")
    sampler = EpisodeSampler(data, n_way, k_shot, n_query, seed=0, device="cpu")
    backbone = metafew.create_backbone("conv4", in_channels=1, image_size=28)
    amp = "bf16" if variant == "bf16" else None
    learner = metafew.create_learner(name, backbone, **options, **({"amp": amp} if amp else {}))
    if variant == "channels_last":
        learner = learner.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    episodes = sampler.sample_batch(batch)  # channels_last: the weights' format carries through the convolutions

    def step() -> None:
        loss, _ = learner.meta_loss(episodes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def pretrain_step(variant: str, batch: int = 128):
    data = load_dataset("omniglot", "train")
    backbone = metafew.create_backbone("conv4", in_channels=1, image_size=28)
    head = torch.nn.Linear(backbone.out_features, data.num_classes)
    opt = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.05, momentum=0.9)
    x = data.normalizer(data.images[:batch])
    y = data.labels[:batch]
    if variant == "channels_last":
        backbone = backbone.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with metafew.device.autocast(torch.device("cpu"), "bf16" if variant == "bf16" else None):
            loss = F.cross_entropy(head(backbone(x)).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


# (row name, learner, N, K, Q, meta-batch, options): the papers' training settings, meta-batches cut to
# keep one step short where they are large (FLOPs and time scale together, so the share is the same).
STEPS = [
    ("protonet-60w1s", "protonet", 60, 1, 5, 1, {}),
    ("protonet-5w1s", "protonet", 5, 1, 15, 1, {}),
    ("maml-5w1s", "maml", 5, 1, 1, 8, {"n_way": 5, "inner_lr": 0.4, "inner_steps": 1}),
    ("fomaml-5w1s", "fomaml", 5, 1, 1, 8, {"n_way": 5, "inner_lr": 0.4, "inner_steps": 1}),
    ("reptile-5w1s", "reptile", 5, 10, 1, 5, {"n_way": 5, "inner_steps": 5, "inner_batch_size": 10}),
    ("matchingnet-5w1s", "matchingnet", 5, 1, 15, 1, {}),
    ("r2d2-5w1s", "r2d2", 5, 1, 15, 1, {}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default="fp32,bf16,channels_last")
    p.add_argument("--only", help="comma-separated row names")
    p.add_argument("--profile", metavar="ROW", help="print the operator profile of one step of ROW and exit")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = [s for s in STEPS if not args.only or s[0] in args.only.split(",")]
    if args.profile:
        spec = next(s for s in STEPS if s[0] == args.profile)
        step = learner_step(*spec[1:], variant="fp32")
        step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
        return
    matmul, conv32, conv16 = peak_matmul(), peak_conv(), peak_conv(bf16=True)
    limits = {"fp32": conv32, "channels_last": conv32, "bf16": conv16}
    print(
        f"limit on this process ({args.threads} thread(s)): matmul {matmul:.1f} GFLOP/s, conv 3x3 fwd+bwd "
        f"{conv32:.1f} GFLOP/s (float32), {conv16:.1f} GFLOP/s (bf16 autocast)"
    )
    results: list[dict[str, Any]] = []
    for variant in args.variants.split(","):
        conv = limits[variant]
        for name, learner, n, k, q, b, opts in rows:
            step = learner_step(learner, n, k, q, b, opts, variant)
            flops = flops_of(step)
            sec = seconds_per_call(step)
            gflops = flops / sec / 1e9
            results.append(
                {
                    "row": name,
                    "variant": variant,
                    "gflop_per_step": round(flops / 1e9, 3),
                    "seconds_per_step": round(sec, 4),
                    "gflops": round(gflops, 2),
                    "share_of_conv_limit": round(gflops / conv, 3),
                }
            )
            print(
                f"{variant:>13} {name:>17}: {flops / 1e9:7.2f} GFLOP/step, {sec * 1e3:8.1f} ms/step, "
                f"{gflops:6.1f} GFLOP/s = {100 * gflops / conv:5.1f}% of the conv limit"
            )
        step = pretrain_step(variant)
        flops, sec = flops_of(step), seconds_per_call(step)
        results.append(
            {
                "row": "pretrain-b128",
                "variant": variant,
                "gflop_per_step": round(flops / 1e9, 3),
                "seconds_per_step": round(sec, 4),
                "gflops": round(flops / sec / 1e9, 2),
                "share_of_conv_limit": round(flops / sec / 1e9 / conv, 3),
            }
        )
        print(
            f"{variant:>13} {'pretrain-b128':>17}: {flops / 1e9:7.2f} GFLOP/step, {sec * 1e3:8.1f} ms/step, "
            f"{flops / sec / 1e9:6.1f} GFLOP/s = {100 * flops / sec / 1e9 / conv:5.1f}% of the conv limit"
        )
    if args.out:
        doc = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
            "limit_gflops": {
                "matmul": round(matmul, 2),
                "conv3x3_fp32": round(conv32, 2),
                "conv3x3_bf16": round(conv16, 2),
            },
            "rows": results,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
