"""Conv-4 in channels-last layout against NCHW: one CPU thread, the same weights, in one process.

metafew's Conv-4 computes its convolutions (and so the BatchNorm, ReLU and max-pool after them)
in channels-last layout (:class:`metafew.backbones.conv4.ChannelsLastConv2d`); this measures what
that buys against plain ``nn.Conv2d`` (NCHW) for a training step (forward + backward, BatchNorm
in training mode) and for inference, in float32 and under bf16 autocast.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/channels_last.py --out benchmarks/results/channels-last.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


def nchw_copy(backbone: nn.Sequential) -> nn.Sequential:
    """The same backbone with plain ``nn.Conv2d`` (NCHW) convolutions and the same weights."""
    plain = copy.deepcopy(backbone)
    for block in plain:
        if isinstance(block, nn.Sequential) and isinstance(block[0], nn.Conv2d):
            conv = block[0]
            block[0] = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1)
            block[0].load_state_dict(conv.state_dict())
    return plain


def seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls, after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="80,320", help="images per call (5-way 1-shot 15-query: 80)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import metafew

    torch.manual_seed(0)
    conv4 = metafew.create_backbone("conv4", in_channels=1, image_size=28)
    assert isinstance(conv4, nn.Sequential)
    layouts = {"channels-last": conv4, "nchw": nchw_copy(conv4)}
    rows = []
    for n in (int(b) for b in args.batches.split(",")):
        x = torch.rand(n, 1, 28, 28)
        for amp in ("fp32", "bf16"):
            for mode in ("train step", "inference"):
                row: dict[str, Any] = {"images": n, "precision": amp, "mode": mode}
                for name, net in layouts.items():

                    def call(net: nn.Module = net, x: torch.Tensor = x, amp: str = amp, mode: str = mode) -> None:
                        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
                            if mode == "inference":
                                with torch.inference_mode():
                                    net.eval()(x)
                                return
                            net.train().zero_grad()
                            out = net(x)
                        out.float().square().mean().backward()

                    row[f"{name}_ms"] = round(1000 * seconds(call, args.repeats), 2)
                row["speedup"] = round(row["nchw_ms"] / row["channels-last_ms"], 2)
                rows.append(row)
                print(row, flush=True)
    meta = {
        "command": "python benchmarks/channels_last.py "
        + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "machine": f"{platform.machine()} {platform.processor()}, {torch.get_num_threads()} thread(s)",
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if args.out:
        args.out.write_text(json.dumps({"benchmark": "channels-last", "meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
