"""torchvision ResNet-18/34/50 as feature extractors (fc layer removed).

``create("resnet18", in_channels=1, image_size=28)`` gives torchvision's ResNet-18
with ``fc`` replaced by an identity: 512 features (2048 for ResNet-50). The module
*is* a ``torchvision.models.ResNet``, so its parameter names are torchvision's.

Adaptations:

* ``in_channels`` other than 3: ``conv1`` takes that many channels. Pretrained
  ``conv1`` weights are averaged over RGB and spread over the new channels so that
  the response to a grey image is unchanged (for 1 channel: the sum over RGB).
* ``small_input`` (default: ``True`` when both sides are <= 32 px, as for 28x28
  MedMNIST/Omniglot): ``conv1`` becomes a 3x3 stride-1 convolution and the max-pool
  is dropped (the CIFAR-style ResNet used by the MedMNIST v2 baselines), so a 28x28
  image keeps a 4x4 map before pooling instead of 1x1. The pretrained 7x7 ``conv1``
  cannot fill a 3x3 kernel, so in that case ``conv1`` stays randomly initialised and
  only the rest is loaded from the ImageNet weights.

``weights="imagenet"`` loads torchvision's ImageNet-1k (``IMAGENET1K_V1``) weights, as
``torchvision.models.resnet18(weights="IMAGENET1K_V1")`` does: from
``<torch hub dir>/checkpoints/<file>`` (``$TORCH_HOME/hub/checkpoints``, default
``~/.cache/torch/hub/checkpoints``, torchvision's own cache, so a file torchvision
downloaded is reused and the other way round) or ``<metafew cache>/weights/<file>``;
when neither holds the file it is downloaded from ``download.pytorch.org`` into the torch
hub dir with a progress bar and torchvision's hash check (the SHA-256 of the download must
start with the hash in the file name; a mismatching download is deleted, never kept). A
cached file is used as it is, as torch hub does. Offline, a
:class:`~metafew.errors.CheckpointError` says where it looked, which URL failed and how to
get the file. ``weights=<path>`` loads that file and never downloads.
"""

from __future__ import annotations

import os
import re
import urllib.error
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..paths import cache_dir
from .inputs import check_images
from .registry import register

#: torchvision's ImageNet-1k V1 weight files (``torchvision.models.ResNet*_Weights.IMAGENET1K_V1``).
WEIGHT_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
}
WEIGHTS_URL = "https://download.pytorch.org/models/"

#: block type and layer counts; torchvision is imported only when a ResNet is built (it costs seconds).
_ARCHS = {
    "resnet18": ("BasicBlock", [2, 2, 2, 2]),
    "resnet34": ("BasicBlock", [3, 4, 6, 3]),
    "resnet50": ("Bottleneck", [3, 4, 6, 3]),
}


def weight_search_paths(arch: str) -> list[Path]:
    """Where ``weights="imagenet"`` looks for ``arch``'s torchvision weight file, in order."""
    name = WEIGHT_FILES[arch]
    return [Path(torch.hub.get_dir()) / "checkpoints" / name, cache_dir() / "weights" / name]


def weights_url(arch: str) -> str:
    """The URL torchvision downloads ``arch``'s ImageNet-1k V1 weights from."""
    return WEIGHTS_URL + WEIGHT_FILES[arch]


def download_weights(arch: str, dest: Path, progress: bool = True) -> Path:
    """Download ``arch``'s torchvision weights to ``dest``, checking the SHA-256 prefix in the file name.

    Uses torch hub's downloader (a ``.partial`` file renamed into place only once the hash
    matches), as ``torchvision.models.ResNet18_Weights.IMAGENET1K_V1.get_state_dict(check_hash=True)``
    does. Raises a one-line CheckpointError when offline or when the hash does not match.
    """
    url = weights_url(arch)
    match = re.search(r"-([a-f0-9]*)\.", WEIGHT_FILES[arch])  # torch.hub.HASH_REGEX
    prefix = match.group(1) if match else None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=prefix, progress=progress)
    except (urllib.error.URLError, OSError) as e:  # URLError (no network, HTTP error) is an OSError
        raise CheckpointError(
            f"{arch} ImageNet weights: downloading {url} to {dest} failed ({_first_line(getattr(e, 'reason', e))})"
        ) from e
    except RuntimeError as e:
        if "invalid hash value" not in str(e):
            raise
        raise CheckpointError(
            f"{arch} ImageNet weights: the download of {url} failed torch hub's hash check ({_first_line(e)}); "
            "the file was not kept, try again"
        ) from e
    return dest


def _first_line(e: object) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else repr(e)


def find_weights(arch: str, weights: str | os.PathLike[str], download: bool = True) -> Path:
    """Resolve ``weights`` ("imagenet" or a file path) to a local file, downloading "imagenet" when not cached.

    Raises CheckpointError (one line: where it looked, the URL, how to get the file) when the
    file is neither cached nor downloadable.
    """
    if isinstance(weights, str) and weights.lower() == "imagenet":
        candidates = weight_search_paths(arch)
        for p in candidates:
            if p.is_file():
                return p
        name = WEIGHT_FILES[arch]
        hint = (
            f"download {weights_url(arch)} into {candidates[0].parent} (torchvision's cache, "
            f"set by $TORCH_HOME) or pass weights='/path/to/{name}'"
        )
        looked = " and ".join(str(p) for p in candidates)
        if not download:
            raise CheckpointError(f"{arch} ImageNet weights not found: looked for {looked}; {hint}")
        try:
            return download_weights(arch, candidates[0])
        except CheckpointError as e:
            raise CheckpointError(f"{e}; looked for {looked}; {hint}") from e
    path = Path(weights).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{arch} weights file not found: {path}")
    return path


def _adapt_conv1(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Map an RGB ``conv1`` kernel to ``in_channels`` inputs, preserving the response to grey images."""
    if in_channels == weight.shape[1]:
        return weight
    mean = weight.mean(dim=1, keepdim=True)  # [O, 1, k, k]
    return mean.repeat(1, in_channels, 1, 1) * (weight.shape[1] / in_channels)


def load_torchvision_weights(model: nn.Module, arch: str, path: Path, in_channels: int, small_input: bool) -> None:
    """Copy a torchvision state dict into the adapted ``model`` (``fc`` dropped, ``conv1`` adapted or skipped)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {arch} weights {path}: {str(e).splitlines()[0] if str(e) else e!r}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a {arch} state dict")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    conv1 = state.get("conv1.weight")
    if conv1 is not None and tuple(conv1.shape) != (64, 3, 7, 7):
        raise CheckpointError(
            f"{path}: tensor 'conv1.weight' has shape {tuple(conv1.shape)}, {arch} needs (64, 3, 7, 7)"
        )
    if small_input:
        state.pop("conv1.weight", None)
    elif conv1 is not None:
        state["conv1.weight"] = _adapt_conv1(conv1, in_channels)
    own = model.state_dict()
    for k, v in state.items():
        if k not in own:
            raise CheckpointError(f"{path} is not a torchvision {arch} state dict: unexpected tensor {k!r}")
        if tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{path}: tensor {k!r} has shape {tuple(v.shape)}, {arch} needs {tuple(own[k].shape)}"
            )
    missing = [k for k in own if k not in state and not (small_input and k == "conv1.weight")]
    if missing:
        raise CheckpointError(f"{path} is not a torchvision {arch} state dict: tensor {missing[0]!r} is missing")
    model.load_state_dict(state, strict=False)


def _check_input(model: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    """Forward pre-hook of the ResNets: images must be ``[N, in_channels, H, W]`` (checks shapes only)."""
    if args and isinstance(args[0], torch.Tensor):
        conv1 = model.conv1
        assert isinstance(conv1, nn.Conv2d)
        check_images(getattr(model, "name", "resnet"), args[0], conv1.in_channels)


def build_resnet(
    arch: str,
    in_channels: int = 3,
    image_size: tuple[int, int] = (224, 224),
    weights: str | os.PathLike[str] | None = None,
    small_input: bool | None = None,
) -> nn.Module:
    """A torchvision ResNet without ``fc``, adapted to ``in_channels`` and small inputs (see module doc)."""
    if small_input is None:
        small_input = max(image_size) <= 32
    from torchvision.models import resnet as tv_resnet

    block, layers = _ARCHS[arch]
    path = find_weights(arch, weights) if weights is not None else None  # fail before building
    model = tv_resnet.ResNet(getattr(tv_resnet, block), layers)
    if small_input:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.out_features = model.fc.in_features
    model.fc = nn.Identity()
    # global average pooling: any size works; a wrong channel count is one line, not a conv error
    model.register_forward_pre_hook(_check_input)
    if path is not None:
        load_torchvision_weights(model, arch, path, in_channels, small_input)
    # Rebuilding from a metafew checkpoint must not need the ImageNet file again: weights stay out.
    model.options = {"small_input": bool(small_input)}
    model.weights_source = str(path) if path is not None else None
    return model


@register("resnet18")
def resnet18(
    in_channels: int = 3,
    image_size: tuple[int, int] = (224, 224),
    weights: str | os.PathLike[str] | None = None,
    small_input: bool | None = None,
) -> nn.Module:
    """torchvision ResNet-18 without fc: 512 features."""
    return build_resnet("resnet18", in_channels, image_size, weights, small_input)


@register("resnet34")
def resnet34(
    in_channels: int = 3,
    image_size: tuple[int, int] = (224, 224),
    weights: str | os.PathLike[str] | None = None,
    small_input: bool | None = None,
) -> nn.Module:
    """torchvision ResNet-34 without fc: 512 features."""
    return build_resnet("resnet34", in_channels, image_size, weights, small_input)


@register("resnet50")
def resnet50(
    in_channels: int = 3,
    image_size: tuple[int, int] = (224, 224),
    weights: str | os.PathLike[str] | None = None,
    small_input: bool | None = None,
) -> nn.Module:
    """torchvision ResNet-50 without fc: 2048 features."""
    return build_resnet("resnet50", in_channels, image_size, weights, small_input)
