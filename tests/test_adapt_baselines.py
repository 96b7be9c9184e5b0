"""The pixel baselines of ``metafew.adapt``'s estimate, and the channel-mismatch warning.

The end-to-end tests write image folders from real BreastMNIST images (0 malignant,
1 normal/benign) and adapt a seeded random Conv-4, as tests/test_adapt.py does.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metafew
from metafew.adaptation import AdaptationWarning
from metafew.adaptation.baselines import logistic_pixels, nearest_mean_pixels, pixel_features, standardise
from metafew.adaptation.estimate import AdaptationReport, baseline_lines
from metafew.backbones import create
from metafew.checkpoint import save_backbone

# -- the baselines on tiny tensors ---------------------------------------------------------


def test_nearest_mean_matches_hand_computation() -> None:
    # four 1x1x2 "images" (two features), two classes; values in 0..255
    support = torch.tensor([[0, 0], [0, 60], [120, 0], [120, 60]], dtype=torch.uint8).view(4, 1, 1, 2)
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[30, 30], [100, 10]], dtype=torch.uint8).view(2, 1, 1, 2)
    logits = nearest_mean_pixels(support, labels, query, 2)

    s = support.view(4, 2).double() / 255
    q = query.view(2, 2).double() / 255
    mean, std = s.mean(0), s.std(0, correction=0)  # per feature: (60, 30) and (60, 30) in 0..255 units
    zs, zq = (s - mean) / std, (q - mean) / std
    centres = torch.stack([zs[:2].mean(0), zs[2:].mean(0)])  # class 0: (-1, 0), class 1: (1, 0)
    assert torch.allclose(centres, torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64))
    expected = -((zq[:, None, :] - centres[None]) ** 2).sum(-1)
    assert torch.allclose(logits.double(), expected, atol=1e-5)
    assert logits.argmax(1).tolist() == [0, 1]


def test_standardise_uses_support_statistics_only() -> None:
    s = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    q = torch.tensor([[2.0, 7.0]])
    zs, zq = standardise(s, q)
    assert torch.allclose(zs, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    assert torch.allclose(zq, torch.tensor([[0.0, 2.0]]))  # a constant feature is only centred


def test_logistic_probe_separates_a_separable_toy_set() -> None:
    gen = torch.Generator().manual_seed(0)
    # 3 classes of 8x8 images, told apart by which third of the image is bright, plus noise
    images, labels = [], []
    for c in range(3):
        x = torch.randint(0, 60, (20, 1, 8, 8), generator=gen)
        x[:, :, :, c * 2 : c * 2 + 3] += 150
        images.append(x)
        labels.append(torch.full((20,), c))
    x_all, y_all = torch.cat(images).to(torch.uint8), torch.cat(labels)
    logits = logistic_pixels(x_all, y_all, x_all, 3)
    assert logits.shape == (60, 3)
    assert (logits.argmax(1) == y_all).all()
    again = logistic_pixels(x_all, y_all, x_all, 3)
    assert torch.equal(logits, again)  # deterministic


def test_pixel_features_pool_large_images() -> None:
    x = torch.full((3, 3, 100, 64), 255, dtype=torch.uint8)
    f = pixel_features(x)
    assert f.shape == (3, 3 * 32 * 32) and torch.allclose(f, torch.ones_like(f))
    assert pixel_features(torch.zeros(2, 1, 28, 28)).shape == (2, 784)


# -- end to end on BreastMNIST -----------------------------------------------------------


@pytest.fixture(scope="module")
def breast_npz(data_root: Path) -> dict[str, np.ndarray]:
    with np.load(data_root / "medmnist" / "breastmnist.npz") as f:
        return {k: f[k] for k in ("train_images", "train_labels")}


def write_breast_folder(root: Path, npz: dict[str, np.ndarray], per_class: int, colour: bool = False) -> Path:
    labels = npz["train_labels"].reshape(-1)
    for c, name in enumerate(["malignant", "benign"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, j in enumerate(np.flatnonzero(labels == c)[:per_class]):
            img = Image.fromarray(npz["train_images"][j])
            if colour:  # a tinted RGB image, as a photograph of a scan would be
                a = np.asarray(img, dtype=np.float32)
                rgb = np.stack([a, a * 0.8, a * 0.6], -1).clip(0, 255).astype(np.uint8)
                img = Image.fromarray(rgb, "RGB")
            img.save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def gray_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    bb = create("conv4", in_channels=1, image_size=28)
    return save_backbone(bb, tmp_path_factory.mktemp("bb") / "conv4-gray.safetensors", mean=[0.5], std=[0.25])


def test_adapt_reports_baselines(gray_backbone: Path, breast_npz: dict[str, np.ndarray], tmp_path: Path) -> None:
    folder = write_breast_folder(tmp_path / "breast", breast_npz, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdaptationWarning)  # gray folder, gray backbone: no channel warning
        model = metafew.adapt(folder, gray_backbone, shots=5, eval_draws=6, device="cpu")
    r = model.report
    assert r is not None and r.baselines is not None
    assert set(r.baselines) == {"nearest_mean_pixels", "logistic_pixels"}
    for b in r.baselines.values():
        assert len(b["per_draw"]) == 6
        for metric in ("accuracy", "balanced_accuracy"):
            assert 0 <= b[metric]["mean"] <= 1 and b[metric]["ci95"] >= 0
            model_mean = getattr(r, metric).mean
            assert b["difference"][metric]["mean"] == pytest.approx(model_mean - b[metric]["mean"], abs=1e-9)
    text = r.summary()
    assert "nearest_mean_pixels" in text and "logistic_pixels" in text and "model minus baseline" in text
    assert not r.warnings and "warning:" not in text

    # the report round-trips through JSON, and a report file from before the baselines still loads
    d = json.loads(json.dumps(r.to_dict()))
    again = AdaptationReport.from_dict(d)
    assert again.baselines == r.baselines and again.summary() == text
    old = {k: v for k, v in d.items() if k not in ("baselines", "warnings")}
    legacy = AdaptationReport.from_dict(old)
    assert legacy.baselines is None and "baselines" not in legacy.summary()


def test_summary_says_when_the_model_does_not_beat_a_baseline() -> None:
    entry = {
        "description": "x",
        "accuracy": {"mean": 0.8, "ci95": 0.02, "low": 0.7, "high": 0.9},
        "balanced_accuracy": {"mean": 0.8, "ci95": 0.02, "low": 0.7, "high": 0.9},
        "per_draw": [],
    }
    worse = {
        **entry,
        "difference": {"accuracy": {"mean": 0.1, "ci95": 0.05}, "balanced_accuracy": {"mean": 0.01, "ci95": 0.05}},
    }
    better = {
        **entry,
        "difference": {"accuracy": {"mean": 0.1, "ci95": 0.05}, "balanced_accuracy": {"mean": 0.1, "ci95": 0.05}},
    }
    text = "\n".join(baseline_lines({"logistic_pixels": worse, "nearest_mean_pixels": better}))
    assert "the model does not beat logistic_pixels on these images" in text
    assert "--method finetune" in text and "more shots" in text
    assert "does not beat nearest_mean_pixels" not in text


def test_colour_folder_into_grayscale_backbone_warns(
    gray_backbone: Path, breast_npz: dict[str, np.ndarray], tmp_path: Path
) -> None:
    folder = write_breast_folder(tmp_path / "breast-rgb", breast_npz, 8, colour=True)
    with pytest.warns(AdaptationWarning, match="colour images into a grayscale backbone"):
        model = metafew.adapt(folder, gray_backbone, shots=3, eval_draws=2, device="cpu")
    assert model.report is not None
    assert any("grayscale backbone" in w for w in model.report.warnings)
    assert "warning: colour images into a grayscale backbone" in model.report.summary()


def test_grayscale_data_into_colour_backbone_warns(tmp_path: Path) -> None:
    torch.manual_seed(0)
    bb = create("conv4", in_channels=3, image_size=28)
    images = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = metafew.FewShotDataset("toy", [0] * 6 + [1] * 6, ["a", "b"], images, channels=1, image_size=(28, 28))
    with pytest.warns(AdaptationWarning, match="grayscale images into a colour"):
        model = metafew.adapt(data, bb, mean=[0.5] * 3, std=[0.25] * 3, shots=2, eval_draws=2, device="cpu")
    assert model.report is not None and model.report.warnings
