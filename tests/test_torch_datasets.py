"""Torch datasets into episodes, and a trained run's backbone into ``adapt`` and a backbone file.

* :meth:`FewShotDataset.from_torch` / ``EpisodeSampler(torch_dataset, ...)``: a user's own
  ``Dataset`` of PIL images, a ``TensorDataset`` of ``[0, 1]`` floats, torchvision's
  ``ImageFolder`` (labels from ``targets``), and the one-line error of a dataset that
  yields images without labels.
* ``metafew.adapt(backbone=<run>/last.safetensors)`` and ``metafew export-backbone``.
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
