"""The pixel baselines of ``metafew.adapt``'s estimate, and the channel-mismatch warning.

The end-to-end tests write image folders from real BreastMNIST images (0 malignant,
1 normal/benign) and adapt a seeded random Conv-4, as tests/test_adapt.py does.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import metafew
from metafew.adaptation import AdaptationWarning
from metafew.adaptation.baselines import (
    FUNCTIONS,
    log_probabilities,
    logistic_pixels,
    nearest_mean_pixels,
    pixel_features,
    standardise,
)
from metafew.adaptation.estimate import AdaptationReport, baseline_advice, baseline_lines
from metafew.adaptation.metrics import macro_auc, mean_ci95
from metafew.backbones import create
from metafew.checkpoint import save_backbone

estimate_module = importlib.import_module("metafew.adaptation.estimate")  # the package's `estimate` is the function

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
        for metric in ("accuracy", "balanced_accuracy", "auc"):
            assert 0 <= b[metric]["mean"] <= 1 and b[metric]["ci95"] >= 0
            model_mean = getattr(r, metric).mean
            assert b["difference"][metric]["mean"] == pytest.approx(model_mean - b[metric]["mean"], abs=1e-9)
            assert b["difference"][metric]["draws"] == 6
    text = r.summary()
    assert "nearest_mean_pixels" in text and "logistic_pixels" in text and "model minus baseline" in text
    assert text.count("AUC") >= 5  # the model's, and each baseline's score and paired difference
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


# -- the baselines' AUC, the pairing, the advice --------------------------------------------


def test_baseline_log_probabilities_and_auc() -> None:
    gen = torch.Generator().manual_seed(1)
    support = torch.randint(0, 256, (10, 1, 6, 6), dtype=torch.uint8, generator=gen)
    labels = torch.tensor([0] * 5 + [1] * 5)
    query = torch.randint(0, 256, (30, 1, 6, 6), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 2, (30,), generator=gen)
    for name, fn in FUNCTIONS.items():
        lp = log_probabilities(name, support, labels, query, 2)
        assert lp.dtype == torch.float64 and lp.shape == (30, 2)
        assert torch.allclose(lp.exp().sum(1), torch.ones(30, dtype=torch.float64))
        logits = fn(support, labels, query, 2)
        assert torch.equal(lp.argmax(1), logits.argmax(1))  # the same predictions as the logits
        # binary AUC: the ranking of the logit difference, i.e. of the probability of class 1
        diff = (logits[:, 1] - logits[:, 0]).double()
        assert macro_auc(lp, y, 2) == pytest.approx(macro_auc(torch.stack([-diff, diff], 1), y, 2))


def _indexed_pool(per_class: int) -> metafew.FewShotDataset:
    """Random 28x28 images whose first two pixels spell their own index (so a baseline's input names its images)."""
    n = 2 * per_class
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    images[per_class:, :, 14:] = (images[per_class:, :, 14:] * 0.85).to(torch.uint8)  # class 1: a darker lower half
    idx = torch.arange(n)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = (idx // 256).to(torch.uint8), (idx % 256).to(torch.uint8)
    return metafew.FewShotDataset("indexed", [0] * per_class + [1] * per_class, ["a", "b"], images,
                                  channels=1, image_size=(28, 28))  # fmt: skip


def _indices(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0].long() * 256 + images[:, 0, 0, 1].long()).tolist()


def test_baselines_see_the_models_draws_and_differences_are_paired(monkeypatch: pytest.MonkeyPatch) -> None:
    draws: list[tuple[list[int], list[int]]] = []  # draw_support's output, per draw
    adapted: list[list[int]] = []  # the model's support, per adaptation
    scored: list[list[int]] = []  # the images the model scored, per draw
    seen: dict[str, list[tuple[list[int], list[int]]]] = {name: [] for name in FUNCTIONS}

    real_draw, real_adapt, real_predict = (
        estimate_module.draw_support, estimate_module.adapt_on, estimate_module.predict_logits
    )  # fmt: skip

    def draw_support(*a: Any, **k: Any) -> tuple[torch.Tensor, torch.Tensor]:
        support, held = real_draw(*a, **k)
        draws.append((support.tolist(), held.tolist()))
        return support, held

    def adapt_on(learner: Any, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, *a: Any) -> Any:
        adapted.append(index.tolist())
        return real_adapt(learner, images, labels, index, *a)

    def predict_logits(logits: Any, images: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
        scored.append(_indices(images))
        return real_predict(logits, images, *a, **k)

    def recording(name: str) -> Any:
        fn = FUNCTIONS[name]

        def wrapped(support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n: int) -> torch.Tensor:
            seen[name].append((_indices(support), _indices(query)))
            return fn(support, labels, query, n)

        return wrapped

    monkeypatch.setattr(estimate_module, "draw_support", draw_support)
    monkeypatch.setattr(estimate_module, "adapt_on", adapt_on)
    monkeypatch.setattr(estimate_module, "predict_logits", predict_logits)
    for name in list(FUNCTIONS):
        monkeypatch.setitem(FUNCTIONS, name, recording(name))

    torch.manual_seed(0)
    bb = create("conv4", in_channels=1, image_size=28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AdaptationWarning)
        model = metafew.adapt(_indexed_pool(15), bb, mean=[0.5], std=[0.25], shots=4, eval_draws=5,
                              max_eval=12, device="cpu")  # fmt: skip
    r = model.report
    assert r is not None and r.baselines is not None
    assert len(draws) == 5 and len(scored) == 5 and adapted[:5] == [d[0] for d in draws]
    for i, (support, held) in enumerate(draws):
        assert len(scored[i]) == 12 and set(scored[i]) <= set(held)  # max_eval: a subset of the held-out images
        for name in FUNCTIONS:
            assert seen[name][i] == (support, scored[i]), name  # the same support, the same scored images

    for b in r.baselines.values():
        for metric in ("accuracy", "balanced_accuracy", "auc"):
            per_draw = [m[metric] - d[metric] for m, d in zip(r.per_draw, b["per_draw"])]
            mean, ci = mean_ci95(per_draw)
            d = b["difference"][metric]
            assert d["mean"] == pytest.approx(mean) and d["ci95"] == pytest.approx(ci)
            unpaired = float(np.hypot(getattr(r, metric).ci95, b[metric]["ci95"]))
            assert d["ci95"] != pytest.approx(unpaired, rel=1e-3), metric  # not the interval of unpaired means


def _report(baselines: dict[str, Any], **changes: Any) -> AdaptationReport:
    s = estimate_module.Summary(0.6, 0.02, 0.5, 0.7)
    r = AdaptationReport(
        method="protonet", shots=5, draws=20, seed=0, classes=["a", "b"], images_per_class={"a": 9, "b": 9},
        support_per_class={"a": 5, "b": 5}, draw_support_per_class={"a": 5, "b": 5}, scored_per_draw=8,
        evaluated_on="held-out images", accuracy=s, balanced_accuracy=s, auc=s, recall={"a": 0.6, "b": 0.6},
        confusion=[[3, 2], [2, 3]], baselines=baselines,
    )  # fmt: skip
    return dataclasses.replace(r, **changes)


def _entry(**differences: tuple[float, float | None, int]) -> dict[str, Any]:
    summary = {"mean": 0.6, "ci95": 0.02, "low": 0.5, "high": 0.7}
    return {
        "description": "x", "accuracy": summary, "balanced_accuracy": summary, "auc": summary, "per_draw": [],
        "difference": {m: {"mean": a, "ci95": c, "draws": n} for m, (a, c, n) in differences.items()},
    }  # fmt: skip


def test_summary_compares_on_auc_too() -> None:
    lose_auc = _entry(balanced_accuracy=(0.1, 0.05, 20), auc=(0.01, 0.05, 20))
    win = _entry(balanced_accuracy=(0.1, 0.05, 20), auc=(0.1, 0.05, 20))
    text = _report({"logistic_pixels": lose_auc, "nearest_mean_pixels": win}).summary()
    assert "model minus baseline, paired over draws: balanced accuracy +0.100 ± 0.050, AUC +0.010 ± 0.050" in text
    assert "the model does not beat logistic_pixels on these images (AUC)" in text
    assert "does not beat nearest_mean_pixels" not in text


def test_advice_fits_the_method_and_the_backbone_choice() -> None:
    lose = {"logistic_pixels": _entry(balanced_accuracy=(-0.1, 0.05, 20), auc=(-0.1, 0.05, 20))}
    text = _report(lose).summary()
    assert "does not beat logistic_pixels on these images (balanced accuracy and AUC); try another backbone" in text
    assert "--method finetune" in text and "more shots" in text

    finetune = _report(lose, method="finetune")
    assert "finetune" not in baseline_advice(finetune) and "another backbone" in baseline_advice(finetune)
    assert "more labelled images" in baseline_advice(_report(lose, shots="all"))

    def auto(*methods: str) -> dict[str, Any]:
        cands = [{"name": f"{b}/{m}", "method": m} for b in ("x", "y") for m in methods]
        return {"candidates": cands, "chosen": cands[0]["name"]}

    tried_protonet = baseline_advice(_report(lose, selection=auto("protonet")))
    assert "another backbone" not in tried_protonet and "--candidate" in tried_protonet
    assert "--method protonet,finetune" in tried_protonet
    tried_both = baseline_advice(_report(lose, selection=auto("protonet", "finetune")))
    assert "--method" not in tried_both and "another backbone" not in tried_both


def test_one_draw_says_it_gives_no_interval() -> None:
    one = {"logistic_pixels": _entry(balanced_accuracy=(0.2, None, 1), auc=(0.2, None, 1))}
    text = _report(one, draws=1).summary()
    assert "one support draw gives no interval" in text and "does not beat" not in text
    assert "balanced accuracy +0.200 (no interval)" in text


def test_cli_summary_says_a_random_backbone_does_not_beat_the_baselines(
    gray_backbone: Path, breast_npz: dict[str, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli_helpers import run_cli

    folder = write_breast_folder(tmp_path / "breast", breast_npz, 12)
    code, out, err = run_cli(
        capsys, "adapt", "--data", folder, "--backbone", gray_backbone, "--shots", 5, "--draws", 5,
        "--out", tmp_path / "model.safetensors", "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert "baselines without a backbone, on the same draws and held-out images:" in out
    assert "model minus baseline, paired over draws: balanced accuracy" in out and ", AUC " in out
    assert "the model does not beat " in out and "; try another backbone" in out and "--method finetune" in out
    report = json.loads((tmp_path / "model.report.json").read_text())
    assert {"accuracy", "balanced_accuracy", "auc"} <= set(report["baselines"]["logistic_pixels"]["difference"])
