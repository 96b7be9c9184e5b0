"""Torch datasets into episodes, and a trained run's backbone into ``adapt`` and a backbone file.

* :meth:`FewShotDataset.from_torch` / ``EpisodeSampler(torch_dataset, ...)``: a user's own
  ``Dataset`` of PIL images, a ``TensorDataset`` of ``[0, 1]`` floats, torchvision's
  ``ImageFolder`` and ``CIFAR100`` (labels from ``targets``; each item read at most once),
  and the one-line error of a dataset that yields images without labels.
* ``metafew.adapt(backbone=<run>/last.safetensors)``, ``metafew adapt --backbone
  <run>/best.safetensors`` and ``metafew export-backbone``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

import metafew
from metafew.checkpoint import load_backbone, read_backbone_record
from metafew.cli.main import main
from metafew.config import RunConfig, load_run, train_run
from metafew.data import EpisodeSampler, FewShotDataset
from metafew.errors import CheckpointError, DatasetError

# -- torch datasets -----------------------------------------------------------------------


class RandomImages(Dataset):
    """``classes * per_class`` random RGB PIL images of ``size``, label ``i // per_class``."""

    def __init__(self, classes: int = 6, per_class: int = 5, size: tuple[int, int] = (20, 24), seed: int = 0):
        rng = np.random.default_rng(seed)
        self.arrays = rng.integers(0, 256, (classes * per_class, size[0], size[1], 3), dtype=np.uint8)
        self.per_class = per_class

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.arrays[i]), i // self.per_class


class ImagesOnly(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.rand(1, 8, 8)


def check_episode(sampler: EpisodeSampler, n_way: int, k_shot: int, n_query: int, shape: tuple[int, ...]) -> None:
    ep = sampler.sample()
    assert ep.support_x.shape == (n_way * k_shot, *shape)
    assert ep.query_x.shape == (n_way * n_query, *shape)
    assert ep.support_y.tolist() == [c for c in range(n_way) for _ in range(k_shot)]
    assert ep.query_y.tolist() == [c for c in range(n_way) for _ in range(n_query)]
    labels = sampler.dataset.labels
    chosen = ep.classes.tolist()
    assert len(set(chosen)) == n_way and all(0 <= c < sampler.dataset.num_classes for c in chosen)
    assert all(int((labels == c).sum()) >= k_shot + n_query for c in chosen)


def test_custom_dataset_of_pil_images_gives_episodes():
    ds = RandomImages()
    sampler = EpisodeSampler(ds, n_way=3, k_shot=2, n_query=3, device="cpu")
    check_episode(sampler, 3, 2, 3, (3, 20, 24))
    fs = sampler.dataset
    assert fs.num_classes == 6 and fs.classes == [str(c) for c in range(6)]
    assert torch.equal(fs.labels, torch.arange(30) // 5)
    assert torch.equal(fs.images[7], torch.from_numpy(ds.arrays[7]).permute(2, 0, 1))  # decoded exactly
    mean = ds.arrays.reshape(-1, 3).mean(0) / 255.0
    assert np.allclose(fs.mean, mean, atol=1e-6)  # normalisation measured on the images


def test_resize_and_gray_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("METAFEW_CACHE", str(tmp_path / "cache"))
    ds = RandomImages(classes=2, per_class=3)
    fs = FewShotDataset.from_torch(ds, name="random/rgb", image_size=16, channels=1)
    assert fs.images.shape == (6, 1, 16, 16) and fs.images.dtype == torch.uint8
    assert len(list((tmp_path / "cache" / "decoded").glob("torch-random_rgb-*.npy"))) == 2  # images and labels

    class Broken(RandomImages):
        def __getitem__(self, i: int) -> tuple[Image.Image, int]:
            raise AssertionError("a cached dataset is not read again")

    broken = Broken(classes=2, per_class=3)
    again = FewShotDataset.from_torch(broken, name="random/rgb", image_size=16, channels=1)
    assert torch.equal(again.images, fs.images) and torch.equal(again.labels, fs.labels)


def test_tensor_dataset_of_float_images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 12, 12, generator=g)
    y = torch.arange(40) % 4
    sampler = EpisodeSampler(TensorDataset(x, y), n_way=4, k_shot=1, n_query=5, device="cpu")
    check_episode(sampler, 4, 1, 5, (1, 12, 12))
    assert torch.equal(sampler.dataset.images, (x * 255).round().to(torch.uint8))
    assert torch.equal(sampler.dataset.labels, y)


def test_torchvision_image_folder_reads_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    torchvision = pytest.importorskip("torchvision")
    rng = np.random.default_rng(1)
    for c in ("cat", "dog", "owl"):
        (tmp_path / c).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (10, 14), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    folder = torchvision.datasets.ImageFolder(str(tmp_path))
    sampler = EpisodeSampler(folder, n_way=3, k_shot=1, n_query=2, device="cpu")
    check_episode(sampler, 3, 1, 2, (3, 10, 14))  # ImageFolder opens PNGs as RGB
    assert sampler.dataset.classes == ["cat", "dog", "owl"]
    assert sampler.dataset.labels.tolist() == folder.targets

    monkeypatch.setattr(type(folder), "__getitem__", lambda self, i: (folder.loader(folder.samples[i][0]), 0))
    with pytest.raises(DatasetError, match="targets attribute does not match"):
        FewShotDataset.from_torch(folder)  # the labels come from targets, checked against the items


def _fake_cifar100(root: Path, classes: int = 6, per_class: int = 4) -> np.ndarray:
    """``root/cifar-100-python/{train,test,meta}`` pickled as the official archive has them; returns the images."""
    import pickle

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    n = classes * per_class
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    fine = [i % classes for i in range(n)]  # interleaved, as the real file is not sorted by class
    for split in ("train", "test"):
        entry = {
            "filenames": [f"img_{i}.png" for i in range(n)],
            "batch_label": f"{split}ing batch 1 of 1",
            "fine_labels": fine,
            "coarse_labels": [c // 5 for c in fine],
            "data": images.reshape(n, 3 * 32 * 32),
        }
        (folder / split).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {
        "fine_label_names": [f"class{c:02d}" for c in range(100)],
        "coarse_label_names": list("abcdefghijklmnopqrst"),
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return images


def test_torchvision_cifar100_in_its_official_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """torchvision's own ``CIFAR100`` class on files of the official layout: its ``targets`` label the episodes."""
    torchvision = pytest.importorskip("torchvision")
    import hashlib

    from torchvision.datasets import CIFAR100

    images = _fake_cifar100(tmp_path)
    md5 = {
        f: hashlib.md5((tmp_path / "cifar-100-python" / f).read_bytes()).hexdigest() for f in ("train", "test", "meta")
    }
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5["train"]]])  # the md5s of these stand-in files
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5["meta"]})
    cifar = torchvision.datasets.CIFAR100(str(tmp_path), train=True)
    assert len(cifar) == 24 and len(cifar.classes) == 100

    sampler = EpisodeSampler(cifar, n_way=3, k_shot=1, n_query=2, device="cpu")
    check_episode(sampler, 3, 1, 2, (3, 32, 32))
    fs = sampler.dataset
    assert fs.classes == [f"class{c:02d}" for c in range(6)]  # the classes present, named by the meta file
    assert fs.labels.tolist() == cifar.targets
    assert torch.equal(fs.images, torch.from_numpy(images))  # the pixels as stored (HWC in torchvision, CHW here)


class CountingImages(RandomImages):
    """RandomImages counting the reads of each item; with ``targets`` (as torchvision's datasets have)."""

    def __init__(self, *args: object, targets: bool = True, **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.reads = [0] * len(self.arrays)
        if targets:
            self.targets = [i // self.per_class for i in range(len(self.arrays))]

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        self.reads[i] += 1
        return super().__getitem__(i)


@pytest.mark.parametrize("targets", [True, False], ids=["targets", "labels-from-items"])
def test_each_item_is_read_at_most_once(targets: bool):
    ds = CountingImages(classes=4, per_class=3, targets=targets)
    sampler = EpisodeSampler(ds, n_way=2, k_shot=1, n_query=1, device="cpu")
    for _ in range(5):
        sampler.sample()
    assert max(ds.reads) == 1 and sum(ds.reads) == len(ds), ds.reads  # the size probe reuses item 0
    assert sampler.dataset.labels.tolist() == [i // 3 for i in range(12)]


def test_targets_label_the_items_without_reading_them_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """With ``targets`` the labels are read once from the attribute: a cached dataset reads no item at all."""
    monkeypatch.setenv("METAFEW_CACHE", str(tmp_path / "cache"))
    ds = CountingImages(classes=3, per_class=2)
    first = FewShotDataset.from_torch(ds, name="counting/targets")
    assert ds.reads == [1] * 6
    again = CountingImages(classes=3, per_class=2)
    again.targets = [2 - t for t in again.targets]  # labels come from targets, not from a cache or the items
    second = FewShotDataset.from_torch(again, name="counting/targets", image_size=(20, 24), channels=3)
    assert again.reads == [0] * 6  # images from the cache, labels from targets
    assert torch.equal(second.images, first.images)
    assert second.labels.tolist() == [2, 2, 1, 1, 0, 0]


def test_dataset_without_labels_is_one_line_error():
    with pytest.raises(DatasetError) as e:
        EpisodeSampler(ImagesOnly(), n_way=2, k_shot=1, n_query=1, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "item 0" in msg and "(image, label)" in msg


def test_float_label_is_one_line_error():
    ds = TensorDataset(torch.rand(4, 1, 8, 8), torch.tensor([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(DatasetError, match="label must be an int") as e:
        FewShotDataset.from_torch(ds)
    assert "\n" not in str(e.value)


def test_normalised_floats_are_refused():
    ds = TensorDataset(torch.randn(4, 1, 8, 8) * 3, torch.tensor([0, 1, 0, 1]))
    with pytest.raises(DatasetError, match=r"not \[0, 1\]"):
        FewShotDataset.from_torch(ds)


# -- a trained run's backbone ----------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train_run(RunConfig(train_way=5, steps=3, val_episodes=0), out, device="cpu", progress=False)
    return out


def test_adapt_takes_a_run_checkpoint(run_dir: Path):
    data = metafew.load_dataset("omniglot", "val").subset([0, 1, 2])
    model = metafew.adapt(data, run_dir / "last.safetensors", shots=5, eval_draws=2, device="cpu")
    assert model.report is not None and model.report.accuracy is not None
    assert model.backbone_info["arch"] == "conv4"
    assert model.backbone_info["pretrained_on"] == metafew.load_dataset("omniglot", "train").name


def test_export_backbone(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "bb.safetensors"
    assert main(["export-backbone", "--checkpoint", str(run_dir / "last.safetensors"), "--out", str(out)]) == 0
    assert "saved" in capsys.readouterr().out
    backbone, rec = load_backbone(out)
    _, learner, _ = load_run(run_dir / "last.safetensors")
    own = learner.backbone.state_dict()
    state = backbone.state_dict()
    assert state.keys() == own.keys() and all(torch.equal(state[k], own[k]) for k in own)
    train = metafew.load_dataset("omniglot", "train")
    assert rec.mean == train.mean and rec.std == train.std and rec.classes == train.classes
    assert rec.extra["config"]["learner"] == "protonet"

    # refuses to replace without --overwrite (one-line error), replaces with it
    assert main(["export-backbone", "--checkpoint", str(run_dir / "last.safetensors"), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    argv = ["export-backbone", "--checkpoint", str(run_dir / "last.safetensors"), "--out", str(out), "--overwrite"]
    assert main(argv) == 0
    assert read_backbone_record(out).arch == "conv4"


def test_export_backbone_refuses_a_backbone_file(run_dir: Path, tmp_path: Path):
    first = metafew.config.export_backbone(run_dir / "last.safetensors", tmp_path / "a")
    with pytest.raises(CheckpointError, match="not a run checkpoint"):
        metafew.config.export_backbone(first, tmp_path / "b")


def test_cli_adapt_takes_best_safetensors_of_a_train_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """`metafew adapt --backbone RUN/best.safetensors`: the best weights of a `metafew train` run with validation."""
    run = tmp_path / "run"
    train = ["train", "--device", "cpu", "--no-progress", "--learner", "protonet", "--backbone-option", "hidden=8"]
    train += ["--train-way", "5", "--n-query", "2", "--steps", "2", "--val-every", "2", "--val-episodes", "2"]
    assert main([*train, "--out", str(run)]) == 0, capsys.readouterr().err
    assert (run / "best.safetensors").is_file()
    rng = np.random.default_rng(4)
    for c in ("left", "right"):
        (tmp_path / "pool" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / "pool" / c / f"{i}.png")
    capsys.readouterr()
    out = tmp_path / "model.safetensors"
    argv = ["adapt", "--data", str(tmp_path / "pool"), "--backbone", str(run / "best.safetensors"), "--shots", "2"]
    argv += ["--draws", "2", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    model = metafew.load(out, device="cpu")
    assert model.classes == ["left", "right"] and model.backbone_info["arch"] == "conv4"
    _, learner, _ = load_run(run / "best.safetensors")
    own = learner.backbone.state_dict()
    conv = next(k for k in own if k.endswith("weight") and own[k].dim() == 4)  # a conv weight: not re-estimated
    assert any(v.shape == own[conv].shape and torch.equal(v, own[conv]) for v in model.classifier.state_dict().values())
