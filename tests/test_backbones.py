"""Backbones (registry, ResNet-12, torchvision ResNets), checkpoints and supervised pretraining."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import metafew
from metafew.backbones import available, create
from metafew.checkpoint import (
    BackboneRecord,
    load_backbone,
    load_state,
    read_backbone_record,
    save_backbone,
    save_state,
)
from metafew.data.base import FewShotDataset
from metafew.errors import CheckpointError, MetafewError

SIZES = [(1, 28), (3, 84)]
FEATURES = {"conv4": {28: 64, 84: 1600}, "resnet12": 640, "resnet18": 512, "resnet34": 512, "resnet50": 2048}


def features(name: str, size: int) -> int:
    f = FEATURES[name]
    return f[size] if isinstance(f, dict) else f


def small(name: str) -> dict:
    """Options that keep a backbone cheap in tests where only the mechanics matter."""
    return {"widths": (8, 16, 24, 32)} if name == "resnet12" else {}


# -- registry ---------------------------------------------------------------------


@pytest.mark.parametrize("name", available())  # every registered backbone, plug-ins included
@pytest.mark.parametrize(("channels", "size"), SIZES)
def test_create_shapes(name: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = create(name, in_channels=channels, image_size=size).eval()
    if name in FEATURES:  # the published feature sizes of the built-in architectures
        assert model.out_features == features(name, size)
    assert (model.name, model.in_channels, model.image_size) == (name, channels, (size, size))
    with torch.no_grad():
        y = model(torch.randn(2, channels, size, size))
    assert y.shape == (2, model.out_features)
    assert torch.isfinite(y).all()


def test_registry_lists_new_backbones_and_rejects_unknown() -> None:
    assert {"conv4", "resnet12", "resnet18", "resnet34", "resnet50"} <= set(available())
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet13'.*resnet12"):
        create("resnet13")


def test_resnet12_structure_and_widths() -> None:
    model = create("resnet12", in_channels=3, image_size=84)
    blocks = list(model.layers)
    assert len(blocks) == 4
    assert [b.conv1.out_channels for b in blocks] == [64, 160, 320, 640]
    b = blocks[0]
    assert [m.kernel_size for m in (b.conv1, b.conv2, b.conv3)] == [(3, 3)] * 3
    assert b.shortcut[0].kernel_size == (1, 1) and isinstance(b.shortcut[1], nn.BatchNorm2d)
    assert isinstance(b.act, nn.LeakyReLU) and b.act.negative_slope == 0.1
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(12.4e6, rel=0.02)
    narrow = create("resnet12", in_channels=1, image_size=28, widths=(8, 16, 32, 48)).eval()
    assert narrow.out_features == 48 and narrow(torch.randn(3, 1, 28, 28)).shape == (3, 48)
    with pytest.raises(ValueError, match="4 positive widths"):
        create("resnet12", widths=(8, 16))


def test_resnet18_small_input_and_channels() -> None:
    small_model = create("resnet18", in_channels=1, image_size=28)
    assert small_model.conv1.kernel_size == (3, 3) and small_model.conv1.stride == (1, 1)
    assert isinstance(small_model.maxpool, nn.Identity) and small_model.options == {"small_input": True}
    big = create("resnet18", in_channels=1, image_size=84)
    assert big.conv1.kernel_size == (7, 7) and big.conv1.in_channels == 1
    assert isinstance(big.maxpool, nn.MaxPool2d) and isinstance(big.fc, nn.Identity)
    forced = create("resnet18", in_channels=3, image_size=28, small_input=False)
    assert forced.conv1.kernel_size == (7, 7)


def test_weight_file_names_match_torchvision() -> None:
    from torchvision import models

    from metafew.backbones.resnet18 import WEIGHT_FILES

    for arch, enum in (
        ("resnet18", models.ResNet18_Weights),
        ("resnet34", models.ResNet34_Weights),
        ("resnet50", models.ResNet50_Weights),
    ):
        assert enum.IMAGENET1K_V1.url.rsplit("/", 1)[1] == WEIGHT_FILES[arch]


# -- torchvision weights (from local files only) ---------------------------------


def _offline(*args: object, **kwargs: object) -> None:
    import urllib.error

    raise urllib.error.URLError("offline")


def test_resnet18_imagenet_weights_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("METAFEW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.hub, "urlopen", _offline)  # never the real network (see test_imagenet_weights.py)
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(CheckpointError) as err:
        create("resnet18", in_channels=3, image_size=84, weights="imagenet")
    msg = str(err.value)
    assert str(expected) in msg and "download.pytorch.org/models/resnet18-f37072fd.pth" in msg and "\n" not in msg
    with pytest.raises(CheckpointError, match=r"weights file not found: .*nope\.pth"):
        create("resnet18", weights=tmp_path / "nope.pth")


def test_resnet18_imagenet_weights_from_hub_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torchvision-format file in $TORCH_HOME/hub/checkpoints is found; conv1 is adapted to 1 channel."""
    from torchvision.models import resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(1)
    reference = resnet18()  # stands in for the ImageNet weights: same names and shapes
    ckpt = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    ckpt.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), ckpt)

    rgb = create("resnet18", in_channels=3, image_size=84, weights="imagenet").eval()
    assert torch.equal(rgb.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert torch.equal(rgb.conv1.weight, reference.conv1.weight)
    grey = create("resnet18", in_channels=1, image_size=84, weights="imagenet").eval()
    assert torch.allclose(grey.conv1.weight, reference.conv1.weight.sum(1, keepdim=True), atol=1e-6)
    # a grey image gives the same features through the 1-channel and the RGB network
    x = torch.rand(2, 1, 84, 84)
    with torch.no_grad():
        assert torch.allclose(grey(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-4)
    # small inputs: everything but the (3x3) conv1 is loaded
    tiny = create("resnet18", in_channels=1, image_size=28, weights=ckpt)
    assert torch.equal(tiny.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    assert tiny.conv1.weight.shape == (64, 1, 3, 3)
    # a wrong file is a CheckpointError, not a crash
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, bad)
    with pytest.raises(CheckpointError, match=r"conv1\.weight"):
        create("resnet18", weights=bad)


# -- checkpoints ------------------------------------------------------------------


def _trained_like(model: nn.Module) -> nn.Module:
    """Give BatchNorm non-trivial running stats so a round trip checks buffers too."""
    model.train()
    with torch.no_grad():
        model(torch.randn(8, model.in_channels, *model.image_size))
    return model.eval()


@pytest.mark.parametrize(("name", "channels", "size"), [("conv4", 1, 28), ("resnet12", 3, 84), ("resnet18", 1, 28)])
def test_checkpoint_round_trip(tmp_path: Path, name: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = _trained_like(create(name, in_channels=channels, image_size=size, **small(name)))
    mean, std = [0.4] * channels, [0.3] * channels
    path = save_backbone(
        model, tmp_path / "bb", mean=mean, std=std, dataset="toy", classes=["a", "b"], extra={"note": 1}
    )
    assert path == tmp_path / "bb.safetensors" and path.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    loaded, rec = load_backbone(tmp_path / "bb", in_channels=channels, image_size=size, arch=name)
    assert isinstance(rec, BackboneRecord)
    assert (rec.arch, rec.in_channels, rec.image_size) == (name, channels, (size, size))
    assert rec.mean == tuple(mean) and rec.std == tuple(std) and rec.dataset == "toy" and rec.classes == ["a", "b"]
    assert rec.metafew_version == metafew.__version__ and rec.format_version == 1 and rec.extra == {"note": 1}
    assert rec.out_features == model.out_features and not loaded.training
    x = torch.randn(3, channels, size, size)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=1e-6)
    assert read_backbone_record(path) == rec

    # the record is plain JSON in the safetensors header: nothing else is needed
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        doc = json.loads(f.metadata()["metafew"])
    assert doc["kind"] == "backbone" and doc["record"]["arch"] == name


def test_checkpoint_keeps_options(tmp_path: Path) -> None:
    model = create("resnet12", in_channels=1, image_size=28, widths=(8, 16, 32, 48), drop_rate=0.1)
    save_backbone(model, tmp_path / "r12.safetensors", mean=[0.5], std=[0.5])
    loaded, rec = load_backbone(tmp_path / "r12.safetensors")
    assert rec.options == {"widths": [8, 16, 32, 48], "drop_rate": 0.1} and loaded.out_features == 48


def test_resnet18_checkpoint_does_not_need_imagenet_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.models import resnet18

    ckpt = tmp_path / "w.pth"
    torch.save(resnet18().state_dict(), ckpt)
    model = create("resnet18", in_channels=3, image_size=84, weights=ckpt)
    save_backbone(model, tmp_path / "r18.safetensors", mean=[0.5] * 3, std=[0.5] * 3)
    ckpt.unlink()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    loaded, rec = load_backbone(tmp_path / "r18.safetensors")
    assert rec.options == {"small_input": False}
    assert torch.equal(loaded.layer3[0].conv1.weight, model.layer3[0].conv1.weight)


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = create("conv4", in_channels=1, image_size=28)
    return save_backbone(model, tmp_path / "conv4.safetensors", mean=[0.9], std=[0.2], dataset="omniglot")


def _rewrite(path: Path, edit) -> None:
    """Rewrite a checkpoint with its tensors and/or header document changed by ``edit(tensors, doc)``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        doc = json.loads(f.metadata()["metafew"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors, doc = edit(tensors, doc)
    save_file(tensors, str(path), metadata={"metafew": json.dumps(doc)})


def test_checkpoint_errors(saved: Path, tmp_path: Path) -> None:
    def one_line(excinfo: pytest.ExceptionInfo) -> str:
        msg = str(excinfo.value)
        assert "\n" not in msg and isinstance(excinfo.value, MetafewError)
        return msg

    with pytest.raises(CheckpointError) as e:
        load_backbone(tmp_path / "missing.safetensors")
    assert f"checkpoint not found: {tmp_path / 'missing.safetensors'}" in one_line(e)

    with pytest.raises(CheckpointError) as e:
        load_backbone(saved, arch="resnet12")
    assert "holds a conv4 backbone, not resnet12" in one_line(e)

    with pytest.raises(CheckpointError) as e:
        load_backbone(saved, in_channels=3)
    assert "1-channel images, the data has 3 channels" in one_line(e)

    with pytest.raises(CheckpointError) as e:
        load_backbone(saved, image_size=84)
    assert "trained on 28x28 images, the data is 84x84" in one_line(e)

    # not a metafew checkpoint: a torch pickle, text, a bare safetensors file, a directory
    pth = tmp_path / "model.pth"
    torch.save({"a": torch.zeros(2)}, pth)
    txt = tmp_path / "notes.safetensors"
    txt.write_text("hello")
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({"a": torch.zeros(2)}, str(bare))
    for p in (pth, txt, bare):
        with pytest.raises(CheckpointError) as e:
            load_backbone(p)
        assert "is not a metafew checkpoint" in one_line(e)
    with pytest.raises(CheckpointError, match="is a directory"):
        load_backbone(tmp_path)

    # a training-state file is not a backbone
    state = save_state({"w": torch.zeros(1)}, tmp_path / "state.safetensors", {"step": 1})
    with pytest.raises(CheckpointError, match="'state' checkpoint, not a backbone checkpoint"):
        load_backbone(state)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t, d: (t, {**d, "format_version": 2}),
            r"format version 2, this metafew reads version 1 \(a newer metafew",
        ),
        (lambda t, d: (t, {**d, "format": "other"}), "is not a metafew checkpoint"),
        (lambda t, d: ({k: v for k, v in t.items() if k != "0.1.weight"}, d), "tensor '0.1.weight' is missing"),
        (lambda t, d: ({**t, "head.weight": torch.zeros(2)}, d), "unexpected tensor 'head.weight'"),
        (
            lambda t, d: ({**t, "1.0.weight": torch.zeros(64, 64, 5, 5)}, d),
            r"tensor '1.0.weight' has shape \(64, 64, 5, 5\), the model needs \(64, 64, 3, 3\)",
        ),
        (lambda t, d: (t, {**d, "record": {**d["record"], "arch": "vit_h"}}), "unknown architecture 'vit_h'"),
        (
            lambda t, d: (t, {**d, "record": {k: v for k, v in d["record"].items() if k != "mean"}}),
            "incomplete backbone record",
        ),
    ],
    ids=["version", "format", "missing", "unexpected", "shape", "arch", "record"],
)
def test_checkpoint_corruption(saved: Path, edit, message: str) -> None:
    _rewrite(saved, edit)
    with pytest.raises(CheckpointError, match=message) as e:
        load_backbone(saved)
    assert "\n" not in str(e.value) and str(saved) in str(e.value)


def test_save_backbone_needs_registry_model(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"not made by metafew\.backbones\.create"):
        save_backbone(nn.Linear(2, 2), tmp_path / "x", mean=[0.5], std=[0.5])
    with pytest.raises(CheckpointError, match="1 mean / 1 std values for a 3-channel backbone"):
        save_backbone(create("conv4"), tmp_path / "x", mean=[0.5], std=[0.5])


def test_save_state_round_trip(tmp_path: Path) -> None:
    """Learner/training checkpoints: a module plus optimizer, scheduler and RNG states."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)
    gen = torch.Generator().manual_seed(3)
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "generator": gen.get_state(),
        "numpy": np.random.default_rng(0).bit_generator.state,
        "python": random.getstate(),
        "shape": (3, 4),
        "step": 7,
    }
    path = save_state(state, tmp_path / "run" / "last", {"epoch": 2, "path": tmp_path})
    assert path == tmp_path / "run" / "last.safetensors"
    back, record = load_state(path)
    assert record["epoch"] == 2 and record["path"] == str(tmp_path) and record["metafew_version"] == metafew.__version__
    assert back["step"] == 7 and back["shape"] == (3, 4)
    assert set(back["optimizer"]["state"]) == {0, 1, 2, 3}  # integer parameter ids survive
    opt2 = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(back["generator"], gen.get_state())
    random.setstate(back["python"])
    assert back["numpy"] == np.random.default_rng(0).bit_generator.state
    for k, v in model.state_dict().items():
        assert torch.equal(back["model"][k], v)

    # a module saves its flat state dict, under its own names
    path = save_state(model, tmp_path / "m.safetensors", {"kind": "protonet"})
    flat, record = load_state(path)
    assert set(flat) == set(model.state_dict()) and record["kind"] == "protonet"

    # tied (shared-storage) tensors are saved too
    tied = {"a": torch.arange(4.0), "b": None}
    tied["b"] = tied["a"]
    back, _ = load_state(save_state(tied, tmp_path / "tied"))
    assert torch.equal(back["a"], back["b"])

    with pytest.raises(CheckpointError, match="cannot save object"):
        save_state({"x": object()}, tmp_path / "bad")
    with pytest.raises(CheckpointError, match="not found"):
        load_state(tmp_path / "nothing")


def test_atomic_write_leaves_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_state({"w": torch.ones(2)}, tmp_path / "ck.safetensors", {"v": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_state({"w": torch.zeros(2)}, path, {"v": 2})
    monkeypatch.undo()
    state, record = load_state(path)
    assert record["v"] == 1 and torch.equal(state["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"]


# -- pretraining ------------------------------------------------------------------


def _split_images(ds: FewShotDataset, held_out: int) -> tuple[FewShotDataset, FewShotDataset]:
    """Same classes, disjoint images: the last ``held_out`` images of every class go to the second set."""
    rank = torch.zeros(len(ds), dtype=torch.long)
    for c in range(ds.num_classes):
        idx = (ds.labels == c).nonzero().squeeze(1)
        rank[idx] = torch.arange(len(idx))
    counts = ds.class_counts()[ds.labels]
    val = rank >= counts - held_out

    def part(mask: torch.Tensor, name: str) -> FewShotDataset:
        return FewShotDataset(
            name,
            ds.labels[mask],
            ds.classes,
            ds.images[mask],
            channels=ds.channels,
            image_size=ds.image_size,
            mean=ds.mean,
            std=ds.std,
        )

    return part(~val, ds.name + "-train"), part(val, ds.name + "-val")


def test_pretrain_omniglot_beats_chance(tmp_path: Path, omniglot_train: FewShotDataset) -> None:
    """25 real Omniglot characters, 16 training / 4 held-out drawings each: a few seconds on one CPU thread."""
    from metafew.data import FlipCrop

    # every 4th class: 25 different characters, unrotated
    train, val = _split_images(omniglot_train.subset(range(0, 100, 4)), held_out=4)
    entries: list[dict] = []
    backbone = metafew.pretrain(
        "conv4",
        train,
        epochs=4,
        batch_size=32,
        lr=0.05,
        device="cpu",
        val=val,
        seed=0,
        augment=FlipCrop(padding=2, flip=False),
        out=tmp_path / "conv4-omni",
        progress=False,
        log=entries.append,
    )
    assert [e["epoch"] for e in entries] == list(range(1, 5))
    assert entries[-1]["loss"] < 0.7 * entries[0]["loss"]
    assert entries[-1]["val_acc"] > 0.3  # chance is 0.04 on held-out drawings of the same characters
    assert not backbone.training

    loaded, rec = load_backbone(tmp_path / "conv4-omni.safetensors", in_channels=1, image_size=28)
    assert rec.dataset == train.name and rec.classes == train.classes and rec.mean == train.mean
    assert rec.extra["pretrain"]["epochs"] == 4 and rec.extra["final"]["epoch"] == 4
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(backbone(x), loaded(x), atol=1e-5)


def test_pretrain_few_shot_validation_and_jsonl_log(
    tmp_path: Path, omniglot_train: FewShotDataset, omniglot_val: FewShotDataset
) -> None:
    """Validation on other classes (the val split) reports few-shot accuracy; the log can be a JSON-lines file."""
    train, val = omniglot_train.subset(range(0, 80, 4)), omniglot_val.subset(range(0, 40, 4))
    log = tmp_path / "log.jsonl"
    backbone = metafew.pretrain(
        "resnet12",
        train,
        epochs=2,
        batch_size=50,
        device="cpu",
        val=val,
        backbone_options={"widths": (8, 16, 24, 32)},
        progress=False,
        log=log,
    )
    lines = [json.loads(s) for s in log.read_text().splitlines()]
    assert [e["epoch"] for e in lines] == [1, 2]
    assert 0.3 < lines[-1]["val_fewshot_acc"] <= 1.0  # 5-way 5-shot: chance is 0.2
    assert backbone.out_features == 32


def test_pretrain_is_seeded(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8, generator=g)
    ds = FewShotDataset("toy", torch.arange(40) % 4, list("abcd"), images, channels=1, image_size=(28, 28))
    runs = []
    for _ in range(2):
        entries: list[dict] = []
        metafew.pretrain("conv4", ds, epochs=2, batch_size=16, device="cpu", seed=5, progress=False, log=entries.append)
        runs.append([e["loss"] for e in entries])
    assert runs[0] == runs[1]


def test_pretrain_rejects_bad_input() -> None:
    images = torch.zeros(8, 3, 28, 28, dtype=torch.uint8)
    ds = FewShotDataset("toy", torch.arange(8) % 2, ["a", "b"], images, channels=3, image_size=(28, 28))
    with pytest.raises(MetafewError, match="takes 1-channel images but toy has 3"):
        metafew.pretrain(create("conv4", in_channels=1, image_size=28), ds, epochs=1, device="cpu", progress=False)
    with pytest.raises(MetafewError, match="built for 84x84 images but toy is 28x28"):
        metafew.pretrain(create("resnet12", in_channels=3, image_size=84), ds, epochs=1, device="cpu", progress=False)
    with pytest.raises(MetafewError, match=r"out= needs a backbone made by metafew\.backbones\.create"):
        metafew.pretrain(
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()),
            ds,
            epochs=1,
            device="cpu",
            progress=False,
            out="never-written",
        )
    with pytest.raises(MetafewError, match="amp must be"):
        metafew.pretrain("conv4", ds, epochs=1, device="cpu", amp="fp8", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pretrain_cuda_amp(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    ds = FewShotDataset("toy", torch.arange(64) % 4, list("abcd"), images, channels=3, image_size=(32, 32))
    for amp in ("bf16", "fp16"):
        model = metafew.pretrain(
            "resnet12",
            ds,
            epochs=1,
            batch_size=32,
            device="cuda",
            amp=amp,
            progress=False,
            backbone_options={"widths": (8, 16, 24, 32)},
            out=tmp_path / amp,
        )
        assert next(model.parameters()).device.type == "cuda"
        loaded, _ = load_backbone(tmp_path / f"{amp}.safetensors", device="cuda")
        assert next(loaded.parameters()).device.type == "cuda"
