"""Meta-training throughput with 1 and 2 processes (torchrun): on this CPU (gloo), or on GPUs (NCCL).

For ProtoNet and MAML on Omniglot (conv4), the same meta-batches are trained

* in 1 process with 1 thread (the baseline of a core),
* in 1 process with 2 threads (what a single process makes of two cores),
* in 2 processes with 1 thread each (``torchrun --nproc-per-node 2``: each rank builds and
  backpropagates half of every meta-batch, gradients summed in one all-reduce),

and reported as episodes per second. Scaling efficiency is ``eps(2 x 1) / (2 * eps(1 x 1))``
(1.0: two processes are twice one); the 2-process figure over the 2-thread one says which
way of using two cores is faster.

    .venv/bin/python benchmarks/distributed.py --steps 20 --json benchmarks/results/distributed.json

With ``--device cuda`` the same meta-batches are trained in 1 process on one GPU and in 2
processes on two GPUs (one GPU per rank, ``LOCAL_RANK``; the NCCL backend for the gradient
all-reduce), with ``torch.cuda.synchronize()`` before the clock starts and before it stops, so
the figure is the GPUs' work, not the kernel launches'. Scaling efficiency is then
``eps(2 GPUs) / (2 * eps(1 GPU))``; with a single GPU only the 1-process row is measured::

    .venv/bin/python benchmarks/distributed.py --device cuda --steps 50 --json gpu_check/distributed_cuda.json

Timings depend on what else runs on the machine: the JSON records the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine  # noqa: E402

# What each learner trains: episodes and meta-batch (Snell et al.'s 5-shot ProtoNet episodes; Finn et al.'s MAML).
SETTINGS = {
    "protonet": {"way": 5, "shot": 5, "query": 15, "meta_batch": 4, "options": {}},
    "maml": {"way": 5, "shot": 1, "query": 15, "meta_batch": 8, "options": {"n_way": 5, "inner_steps": 1}},
}
LAYOUTS = [(1, 1), (1, 2), (2, 1)]  # (processes, threads per process)


def layouts(device: str) -> list[tuple[int, int]]:
    """The (processes, threads per process) runs: the CPU's three, or 1 and (with two GPUs) 2 processes on GPUs."""
    if device == "cpu":
        return LAYOUTS
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    return [(1, 1), (2, 1)] if torch.cuda.device_count() >= 2 else [(1, 1)]


def worker(args: argparse.Namespace) -> None:
    """One torchrun process: a warm-up run, then ``--steps`` timed meta-steps; rank 0 writes the figure."""
    import torch

    import metafew
    from metafew import distributed

    torch.set_num_threads(args.threads)
    distributed.init(args.device)  # gloo on the CPU; a CUDA device: GPU LOCAL_RANK and NCCL
    device = distributed.device_for(args.device)  # cuda -> cuda:<this rank's GPU>
    cuda = device.type == "cuda"
    s = SETTINGS[args.learner]
    data = metafew.load_dataset("omniglot", "train", root=args.data_root)

    def sync() -> None:  # the GPU's queued work is part of the time
        if cuda:
            torch.cuda.synchronize(device)

    def run(steps: int) -> float:
        torch.manual_seed(0)
        backbone = metafew.create_backbone("conv4", in_channels=1, image_size=28)
        learner = metafew.create_learner(args.learner, backbone, **s["options"])
        sampler = metafew.EpisodeSampler(data, s["way"], s["shot"], s["query"], seed=0, device=device)
        assert not sampler.is_mapped  # (reading it moves the dataset to the device before the clock starts)
        sync()
        distributed.barrier()
        start = time.perf_counter()
        metafew.train(learner, sampler, steps=steps, meta_batch_size=s["meta_batch"], log_every=steps, progress=False)
        sync()
        distributed.barrier()  # the slowest rank's time: the run is done when every rank is
        return time.perf_counter() - start

    run(args.warmup)
    seconds = run(args.steps)
    if distributed.is_main():
        Path(args.result).write_text(json.dumps({"seconds": seconds, "episodes": args.steps * s["meta_batch"]}))
    distributed.shutdown()


def launch(learner: str, procs: int, threads: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-addr",
               "127.0.0.1", "--master-port", str(port), str(Path(__file__).resolve()), "--worker", "--learner",
               learner, "--threads", str(threads), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--device", args.device, "--result", str(result)]  # fmt: skip
        if args.data_root:
            cmd += ["--data-root", args.data_root]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        figure = json.loads(result.read_text())
    return {"processes": procs, "threads": threads, **figure, "episodes_per_s": figure["episodes"] / figure["seconds"]}


def quiet_machine() -> dict:
    """:func:`common.machine` without the notice gym prints when learn2learn is imported."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--learners", default="protonet,maml", help="comma-separated (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="timed meta-steps per run (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="meta-steps run before timing (default: %(default)s)")
    p.add_argument("--data-root", help="holds omniglot/ (default: metafew's rule, metafew.paths.data_roots)")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--note", default="", help="a remark stored with the results (e.g. the machine was busy)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: gloo, threads split between processes; cuda: NCCL, one GPU per process "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--learner", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    for learner in args.learners.split(","):
        runs = [launch(learner, procs, threads, args) for procs, threads in layouts(args.device)]
        by = {(r["processes"], r["threads"]): r["episodes_per_s"] for r in runs}
        two = by.get((2, 1))
        row = {
            "learner": learner,
            **SETTINGS[learner],
            "device": args.device,
            "runs": runs,
            "scaling_efficiency": None if two is None else two / (2 * by[(1, 1)]),
        }
        if args.device == "cpu":
            row["two_processes_over_two_threads"] = by[(2, 1)] / by[(1, 2)]
        rows.append(row)
        if args.device == "cpu":
            print(
                f"{learner}: 1x1 {by[(1, 1)]:.1f} ep/s, 1 process x 2 threads {by[(1, 2)]:.1f} ep/s, "
                f"2 processes x 1 thread {by[(2, 1)]:.1f} ep/s; scaling efficiency {row['scaling_efficiency']:.2f}, "
                f"2 processes / 2 threads {row['two_processes_over_two_threads']:.2f}",
                flush=True,
            )
        else:
            scaling = "one GPU only" if two is None else f"2 GPUs {two:.1f} ep/s"
            if two is not None:
                scaling += f"; scaling efficiency {row['scaling_efficiency']:.2f}"
            print(f"{learner}: 1 GPU {by[(1, 1)]:.1f} ep/s, {scaling}", flush=True)
    if args.json:
        where = "gloo, CPU" if args.device == "cpu" else "NCCL, one GPU per process"
        doc = {
            "benchmark": f"distributed meta-training throughput (torchrun, {where})",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": quiet_machine(),
            "note": args.note,
            "results": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
