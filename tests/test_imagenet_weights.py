"""``weights="imagenet"``: cached files, torch hub downloads with their hash check, and offline use.

The network is never reached: torch hub's ``urlopen`` is replaced by a fake server (or by
one that fails as an offline machine does).
"""

from __future__ import annotations

import email.message
import hashlib
import io
import urllib.error
from pathlib import Path

import pytest
import torch

from metafew.backbones import create
from metafew.backbones import resnet18 as tv
from metafew.errors import CheckpointError


class _Response(io.BytesIO):
    """What ``urlopen`` returns: a readable body with HTTP headers."""

    def info(self) -> email.message.Message:
        headers = email.message.Message()
        headers["Content-Length"] = str(len(self.getvalue()))
        return headers


def _serve(monkeypatch: pytest.MonkeyPatch, body: bytes) -> list[str]:
    """Make torch hub download ``body`` from any URL; returns the URLs asked for."""
    asked: list[str] = []

    def fake_urlopen(request, *args, **kwargs):
        asked.append(request.full_url)
        return _Response(body)

    monkeypatch.setattr(torch.hub, "urlopen", fake_urlopen)
    return asked


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)


@pytest.fixture()
def homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub dir and metafew cache; returns where torch hub keeps checkpoints."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("METAFEW_CACHE", str(tmp_path / "cache"))
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, torch.Tensor], bytes]:
    """A torchvision ResNet-18 state dict standing in for the ImageNet weights, and its saved bytes."""
    from torchvision.models import resnet18

    torch.manual_seed(3)
    state = resnet18().state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    return state, buf.getvalue()


def test_offline_gives_one_line_naming_the_url_and_where_it_looked(
    homes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _offline(monkeypatch)
    with pytest.raises(CheckpointError) as err:
        create("resnet18", weights="imagenet")
    msg = str(err.value)
    assert "\n" not in msg
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    assert str(homes / "resnet18-f37072fd.pth") in msg  # torch hub's cache
    assert str(homes.parents[2] / "cache" / "weights" / "resnet18-f37072fd.pth") in msg  # metafew's
    assert "name resolution" in msg  # the reason, not a traceback
    assert not homes.exists() or not list(homes.iterdir())  # no partial file left behind


def test_download_is_hash_checked_saved_where_torchvision_looks_and_then_reused(
    homes: Path, monkeypatch: pytest.MonkeyPatch, reference: tuple[dict[str, torch.Tensor], bytes]
) -> None:
    state, body = reference
    digest = hashlib.sha256(body).hexdigest()
    name = f"resnet18-{digest[:8]}.pth"  # named as torch hub names files: <arch>-<sha256 prefix>.pth
    monkeypatch.setitem(tv.WEIGHT_FILES, "resnet18", name)
    asked = _serve(monkeypatch, body)

    model = create("resnet18", weights="imagenet")
    assert asked == [f"https://download.pytorch.org/models/{name}"]
    assert (homes / name).read_bytes() == body
    assert torch.equal(model.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])
    assert model.weights_source == str(homes / name)

    _offline(monkeypatch)  # the cached file is used without any network
    again = create("resnet18", in_channels=1, image_size=84, weights="imagenet")
    assert torch.equal(again.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    # torchvision itself finds the file metafew downloaded (same cache, same name)
    loaded = torch.hub.load_state_dict_from_url(tv.weights_url("resnet18"), check_hash=True, progress=False)
    assert torch.equal(loaded["conv1.weight"], state["conv1.weight"])


def test_cached_file_in_metafew_cache_needs_no_network(homes: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _offline(monkeypatch)
    cached = homes.parents[2] / "cache" / "weights" / "resnet34-b627a593.pth"
    cached.parent.mkdir(parents=True)
    from torchvision.models import resnet34

    torch.save(resnet34().state_dict(), cached)
    model = create("resnet34", in_channels=3, image_size=64, weights="imagenet")
    assert model.weights_source == str(cached) and model.out_features == 512


def test_hash_mismatch_is_one_line_and_keeps_nothing(
    homes: Path, monkeypatch: pytest.MonkeyPatch, reference: tuple[dict[str, torch.Tensor], bytes]
) -> None:
    _, body = reference
    _serve(monkeypatch, body[:-100] + b"\0" * 100)  # a corrupted (or tampered with) download
    with pytest.raises(CheckpointError) as err:
        create("resnet18", weights="imagenet")
    msg = str(err.value)
    assert "\n" not in msg and "hash check" in msg and 'expected "f37072fd"' in msg
    assert "resnet18-f37072fd.pth" in msg
    assert list(homes.iterdir()) == []  # neither the bad file nor a .partial is left


def test_explicit_path_never_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _serve(monkeypatch, b"")
    with pytest.raises(CheckpointError, match=r"weights file not found: .*resnet18-f37072fd\.pth"):
        create("resnet18", weights=tmp_path / "resnet18-f37072fd.pth")
    assert asked == []


def test_find_weights_without_download_says_where_it_looked(homes: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _serve(monkeypatch, b"")
    with pytest.raises(CheckpointError, match=r"ImageNet weights not found: looked for .*resnet50-0676ba61\.pth"):
        tv.find_weights("resnet50", "imagenet", download=False)
    assert asked == []
