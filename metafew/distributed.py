"""Scale-out on ``torch.distributed``: one process per device, launched by ``torchrun``.

metafew never invents its own launcher or transport: processes are started by
``torchrun`` (``python -m torch.distributed.run``), which sets ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; this module joins its process group
(gloo on CPU, NCCL for CUDA tensors with one GPU per local rank) and offers the few
collectives the engine needs::

    torchrun --nproc-per-node 2 -m metafew train --learner protonet --meta-batch-size 8 --out runs/p
    torchrun --nproc-per-node 2 -m metafew eval --checkpoint runs/p/best.safetensors

Two nodes (4 GPUs each), started once on every node with the same rendezvous address::

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint node0.example:29500 \\
        --rdzv-id my-run -m metafew train --device cuda --meta-batch-size 32 --out /shared/runs/maml

(the run folder must be on storage every node sees: rank 0 writes it, every rank reads
``last.safetensors`` on ``--resume``).

From Python, :func:`metafew.train` and :func:`metafew.evaluate` detect a process group
that is already initialised (by :func:`init` or by your own ``init_process_group``) and
split their work over it; without one they run as a single process, unchanged.

What each piece does across ranks:

* meta-training: every rank draws the same meta-batch from the seeded sampler, keeps
  its contiguous slice of the tasks, and the meta-gradients are summed with weights
  ``slice / B``: the step is that of one process with the whole meta-batch;
* evaluation: episode batch ``j`` is scored on rank ``j % N`` and the per-episode values
  are gathered back in their order: the mean and CI are exactly one process's;
* pretraining: ``DistributedDataParallel`` on disjoint parts of each global batch.

A process that dies or stops answering makes the others stop with a one-line
:class:`DistributedError` within the timeout (``$METAFEW_DIST_TIMEOUT`` seconds, default
300; gloo raises it in the collective, NCCL's watchdog aborts the process). Under
``torchrun`` the launcher also ends the other processes as soon as one exits with an error.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import ConfigError, MetafewError

DEFAULT_TIMEOUT = 300.0
_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
_initialised_here = False


class DistributedError(MetafewError, RuntimeError):
    """Another process of a distributed run died, or did not answer within the timeout."""


# -- the process group -----------------------------------------------------------------------------


def launched() -> bool:
    """True when this process was started by ``torchrun`` (or with its environment variables)."""
    return all(k in os.environ for k in _ENV)


def timeout_seconds() -> float:
    """How long a collective waits for the other processes: ``$METAFEW_DIST_TIMEOUT``, default 300 s."""
    text = os.environ.get("METAFEW_DIST_TIMEOUT", "")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"METAFEW_DIST_TIMEOUT must be a number of seconds > 0, got {text!r}")
    return value


def init(device: str | torch.device | None = "auto", *, timeout: float | None = None) -> bool:
    """Join the ``torchrun`` process group once; returns whether this process is part of one.

    Does nothing (returns False) outside ``torchrun``, and nothing more when a process group
    exists already. ``device``: where the run computes; a CUDA device (or ``"auto"`` with a
    GPU) selects GPU ``LOCAL_RANK`` and NCCL for CUDA tensors (gloo stays for CPU ones),
    otherwise gloo. ``timeout``: seconds before a collective gives up (default
    :func:`timeout_seconds`).
    """
    global _initialised_here
    if dist.is_available() and dist.is_initialized():
        return True
    if not launched():
        return False
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run without torchrun")
    seconds = timeout_seconds() if timeout is None else timeout
    local = int(os.environ["LOCAL_RANK"])
    wants_cuda = torch.cuda.is_available() and (
        device is None or device == "auto" or torch.device(device).type == "cuda"
    )
    if wants_cuda:
        if local >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK {local} needs GPU {local} but this node has {torch.cuda.device_count()}; "
                "start at most one process per GPU (--nproc-per-node)"
            )
        torch.cuda.set_device(local)
    backend = "cpu:gloo,cuda:nccl" if wants_cuda else "gloo"
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"could not join the process group ({_first_line(e)})") from e
    _initialised_here = True
    return True


def shutdown() -> None:
    """Leave the process group if :func:`init` created it (a group made by the caller is left alone)."""
    global _initialised_here
    if _initialised_here and dist.is_initialized():
        with contextlib.suppress(RuntimeError):
            dist.destroy_process_group()
    _initialised_here = False


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank, ``0..world()-1`` (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    """This process's rank on its node (``$LOCAL_RANK``; 0 without ``torchrun``)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on the one process that prints, writes files and draws progress bars (rank 0)."""
    return rank() == 0


def device_for(device: str | torch.device) -> torch.device:
    """``device`` with this process's GPU index when it is a bare ``cuda`` (one GPU per local rank)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and active():
        return torch.device("cuda", torch.cuda.current_device())
    return dev


def shard(n: int, ranks: int | None = None, index: int | None = None) -> tuple[int, int]:
    """The contiguous part ``[lo, hi)`` of ``n`` items for rank ``index`` of ``ranks`` (the first ``n % ranks`` get one more)."""
    ranks = world() if ranks is None else ranks
    index = rank() if index is None else index
    base, extra = divmod(n, ranks)
    lo = index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)


# -- collectives (each one raises DistributedError instead of hanging or tracing back) ----------------


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Run collectives in the block; a failure or timeout becomes a one-line :class:`DistributedError`."""
    try:
        yield
    except (RuntimeError, ValueError) as e:  # DistBackendError, a closed connection, a timeout
        if isinstance(e, MetafewError):
            raise
        raise DistributedError(
            f"rank {rank()}: {what} failed: another process of the run stopped or did not answer within "
            f"{timeout_seconds():g} s (its own error says why) [{_first_line(e)}]"
        ) from None


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def barrier(what: str = "waiting for the other processes") -> None:
    """Wait until every process gets here (a no-op for one process)."""
    if active():
        with collective(what):
            dist.barrier()


def all_reduce_(tensor: Tensor, what: str = "summing across processes", op: str = "sum") -> Tensor:
    """Reduce ``tensor`` over all processes in place (``op``: ``"sum"``, ``"min"`` or ``"max"``); returns it."""
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    if active():
        with collective(what):
            if tensor.device.type == "cpu" and dist.get_backend() == "nccl":  # a group of the caller's, GPU only
                moved = tensor.to(torch.device("cuda", torch.cuda.current_device()))
                dist.all_reduce(moved, op=ops[op])
                tensor.copy_(moved)
            else:
                dist.all_reduce(tensor, op=ops[op])
    return tensor


def all_reduce_grads(params: Sequence[nn.Parameter], weight: float, extra: Tensor | None = None) -> Tensor | None:
    """Replace each gradient by ``sum over ranks of weight_r * grad_r`` in one all-reduce.

    A gradient that is None on every rank stays None (an optimizer then skips that
    parameter, as it would in one process); None on some ranks counts as zero there.
    ``extra``: a small float tensor summed in the same call (returned reduced).
    """
    grads = [p.grad for p in params]
    ref = next((p for p in params), None)
    if ref is None or not active():
        return extra
    device = ref.device
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    parts = [g.detach().reshape(-1).to(dtype) * weight if g is not None else ref.new_zeros(p.numel(), dtype=dtype)
             for g, p in zip(grads, params)]  # fmt: skip
    has = constant(tuple(float(g is not None) for g in grads), device, dtype)
    tail = [has] + ([extra.to(device, dtype).reshape(-1)] if extra is not None else [])
    flat = torch.cat(parts + tail)
    with collective("averaging the meta-gradients"):
        dist.all_reduce(flat)
    sizes = [p.numel() for p in params] + [len(params)] + ([extra.numel()] if extra is not None else [])
    pieces = flat.split(sizes)
    # Which gradients some rank has: read on the host only where this rank lacks one (rare).
    present = pieces[len(params)].tolist() if any(g is None for g in grads) else None
    for i, (p, g, piece) in enumerate(zip(params, grads, pieces[: len(params)])):
        value = piece.view_as(p).to(p.dtype)
        if g is not None:
            g.copy_(value)
        elif present is not None and present[i] > 0:
            p.grad = value.clone()
    if extra is None:
        return None
    return pieces[-1].view_as(extra).to(extra.dtype)


_CONSTANTS: dict[tuple[tuple[float, ...], str, torch.dtype], Tensor] = {}


def constant(values: tuple[float, ...], device: torch.device | str, dtype: torch.dtype = torch.float32) -> Tensor:
    """A small 1-D tensor of ``values`` on ``device``, made once and reused (read-only).

    ``torch.tensor(..., device="cuda")`` copies from pageable memory, which waits for the GPU;
    a training step uses these instead, so it never waits.
    """
    key = (values, str(device), dtype)
    if key not in _CONSTANTS:
        if len(_CONSTANTS) > 64:
            _CONSTANTS.clear()
        _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return _CONSTANTS[key]


def broadcast_module(module: nn.Module, src: int = 0, *, buffers_only: bool = False) -> None:
    """Copy ``module``'s parameters (and buffers) from rank ``src`` to every rank, in place."""
    if not active():
        return
    tensors = [] if buffers_only else [p.data for p in module.parameters()]
    tensors += [b for b in module.buffers()]
    with collective("sharing the weights of rank 0"), torch.no_grad():
        for t in tensors:
            dist.broadcast(t, src)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled)."""
    if not active():
        return obj
    box = [obj]
    with collective("sharing a value of rank 0"):
        dist.broadcast_object_list(box, src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (pickled; keep ``obj`` small and on the CPU)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world()
    with collective("gathering results"):
        dist.all_gather_object(out, obj)
    return out


def any_flag(flags: Iterable[bool]) -> bool:
    """True on every rank when any rank passes a true flag (one small host-side all-reduce)."""
    t = torch.tensor([float(any(flags))])
    if active():
        all_reduce_(t, "agreeing on when to stop")
    return bool(t.item() > 0)


class LaggedFlag:
    """A flag all ranks agree on one step late, with no host sync in the step that raises it.

    Each step, :meth:`pop` returns (on every rank alike) whether the value pushed the step
    before was > 0, then :meth:`push` hands in this step's device tensor, summed over ranks
    (e.g. an element of the gradient all-reduce). On CUDA the value is copied to pinned host
    memory asynchronously and :meth:`pop` waits only for that copy, which was queued a whole
    step earlier.
    """

    def __init__(self) -> None:
        self._pending: tuple[Tensor, Any] | None = None

    def push(self, value: Tensor) -> None:
        if value.device.type == "cuda":
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            host.copy_(value, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (host, event)
        else:
            self._pending = (value.detach().clone(), None)

    def pop(self) -> bool:
        if self._pending is None:
            return False
        host, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        return bool(host.reshape(-1)[0] > 0)


# -- BatchNorm over the whole meta-batch ------------------------------------------------------------


@contextlib.contextmanager
def synced_batchnorm(module: nn.Module) -> Iterator[None]:
    """While the block runs, BatchNorm layers of ``module`` in training mode normalise with the
    statistics of the images of *all* ranks, as one process holding the whole batch would.

    Mean and variance are summed over ranks with the differentiable all-reduce of
    ``torch.distributed.nn`` (so the backward pass is exact too), and the running statistics
    are updated with the global ones: they stay equal on every rank. Works with gloo (CPU)
    and NCCL, unlike ``nn.SyncBatchNorm`` which needs a GPU. Every rank must run the same
    layers in the same order (the same model on its part of the batch).
    """
    if not active():
        yield
        return
    patched = []
    for m in module.modules():
        if isinstance(m, _BatchNorm) and (m.training or m.running_mean is None) and "forward" not in m.__dict__:
            m.forward = _synced_forward(m)  # type: ignore[method-assign]  # instance attribute shadows the class method
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


class _SumOverRanks(torch.autograd.Function):
    """``all_reduce(SUM)`` with its gradient (the sum over ranks of the incoming gradients)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        g = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g)
        return g


def differentiable_all_reduce(x: Tensor) -> Tensor:
    """The sum of ``x`` over ranks, differentiable (backward sums the gradients over ranks too)."""
    return _SumOverRanks.apply(x) if active() else x


def _synced_forward(m: _BatchNorm) -> Any:
    def forward(x: Tensor) -> Tensor:
        if not m.training and m.running_mean is not None:  # switched to eval inside the block
            return type(m).forward(m, x)
        dims = [d for d in range(x.dim()) if d != 1]
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        count = xf.new_full((1,), float(x.numel() // x.shape[1]))
        with collective("synchronising BatchNorm statistics"):
            first = differentiable_all_reduce(torch.cat([xf.sum(dims), count]))
            n = first[-1]
            mean = first[:-1] / n
            shape = [1, -1] + [1] * (x.dim() - 2)
            centred = xf - mean.view(shape)
            var = differentiable_all_reduce(centred.pow(2).sum(dims)) / n
        if m.track_running_stats and m.running_mean is not None and m.running_var is not None:
            with torch.no_grad():
                assert m.num_batches_tracked is not None
                m.num_batches_tracked.add_(1)
                factor = (1.0 / float(m.num_batches_tracked)) if m.momentum is None else m.momentum
                unbiased = var.detach() * n / (n - 1).clamp(min=1)
                m.running_mean.mul_(1 - factor).add_(mean.detach().to(m.running_mean.dtype), alpha=factor)
                m.running_var.mul_(1 - factor).add_(unbiased.to(m.running_var.dtype), alpha=factor)
        y = centred * torch.rsqrt(var + m.eps).view(shape)
        if m.affine:
            y = y * m.weight.view(shape) + m.bias.view(shape)
        return y.to(x.dtype)

    return forward


__all__ = [
    "DEFAULT_TIMEOUT",
    "DistributedError",
    "LaggedFlag",
    "active",
    "all_reduce_",
    "all_reduce_grads",
    "any_flag",
    "barrier",
    "broadcast_module",
    "broadcast_object",
    "collective",
    "constant",
    "device_for",
    "differentiable_all_reduce",
    "gather_objects",
    "init",
    "is_main",
    "launched",
    "local_rank",
    "rank",
    "shard",
    "shutdown",
    "synced_batchnorm",
    "timeout_seconds",
    "world",
]
