"""Device and precision helpers shared by samplers, learners and the engine."""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator

import torch

from .errors import ConfigError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` picks CUDA when available, else CPU; anything else is passed to torch."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but no CUDA GPU is available here (use --device cpu or auto)")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {device!r} is not supported by metafew: use auto, cpu, cuda or cuda:N")
    return dev


def describe_device(device: torch.device) -> str:
    """A readable name of the device results were measured on, e.g. ``cpu (x86_64, 1 thread)``."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    n = torch.get_num_threads()
    return f"cpu ({platform.processor() or platform.machine()}, {n} thread{'s' if n > 1 else ''})"


def resolve_amp(amp: str | torch.dtype | None, device: torch.device | str = "cpu") -> torch.dtype | None:
    """The one reading of a precision setting: None/``"none"`` (float32), ``"bf16"``, ``"fp16"``, a dtype,
    or ``"auto"`` (bf16, else fp16, on CUDA; float32 on CPU).

    >>> resolve_amp("bf16"), resolve_amp(None), resolve_amp("auto", "cpu")
    (torch.bfloat16, None, None)
    """
    if amp is None or amp is False or amp == "none":
        return None
    if isinstance(amp, torch.dtype):
        return amp
    if amp == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if amp not in table:
        raise ConfigError(f"amp must be none, 'auto', 'bf16' or 'fp16', got {amp!r}")
    return table[amp]


def autocast(device: torch.device, dtype: torch.dtype | str | None) -> contextlib.AbstractContextManager[None]:
    """Mixed-precision context (``"bf16"``/``"fp16"``/dtype), or a no-op when ``dtype`` is None."""
    resolved = resolve_amp(dtype, device)
    if resolved is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=resolved)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Temporarily put a module in eval mode, restoring its previous mode."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
