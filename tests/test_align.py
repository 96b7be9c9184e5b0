"""Cross-domain alignment (``metafew.adapt(..., unlabeled=, align=)``, ``metafew adapt --align``).

The losses are checked against what they must be (MMD of a sample with itself is 0, the
gradient reversal layer negates the gradient exactly, AdaBN's running statistics are the
target batch's), then the whole path on real BreastMNIST images written as PNG folders,
with a seeded random Conv-4 whose record names PneumoniaMNIST as its pretraining data.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metafew
from metafew.adaptation.align import (
    align_backbone,
    dann_lambda,
    gaussian_mmd,
    grad_reverse,
    reestimate_bn,
    source_dataset,
)
from metafew.adaptation.preprocess import Preprocessing
from metafew.backbones import create
from metafew.checkpoint import save_backbone
from metafew.errors import ConfigError, DatasetError, DatasetNotFoundError
from metafew.learners.bn import batch_stats_bn, batchnorms, input_statistics

PREP = Preprocessing(1, (28, 28), (0.5,), (0.25,))

# -- the pieces -----------------------------------------------------------------------------


def test_mmd_zero_for_identical_samples_positive_for_shifted() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g, dtype=torch.float64)
    assert float(gaussian_mmd(x, x.clone())) == pytest.approx(0.0, abs=1e-7)
    same_law = torch.randn(64, 16, generator=g, dtype=torch.float64)
    shifted = same_law + 1.0
    near, far = float(gaussian_mmd(x, same_law)), float(gaussian_mmd(x, shifted))
    assert far > 0.05 and far > 5 * near, (near, far)
    y = shifted.clone().requires_grad_(True)
    gaussian_mmd(x, y).backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    # moving y along the negative gradient brings it closer to x
    with torch.no_grad():
        assert float(gaussian_mmd(x, y - 0.5 * y.grad / y.grad.norm())) < far


def test_gradient_reversal_flips_the_gradient_exactly() -> None:
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64)
    out = grad_reverse(x, 0.7)
    assert torch.equal(out, x)
    (out * w).sum().backward()
    assert x.grad is not None and torch.equal(x.grad, -0.7 * w)
    # the reversed layer's gradient is the exact negative of autograd's through the identity
    x2 = x.detach().clone().requires_grad_(True)
    (grad_reverse(x2, 1.0) ** 2).sum().backward()
    assert x2.grad is not None and torch.equal(x2.grad, -2 * x2.detach())
    assert dann_lambda(0.0) == 0.0 and 0.99 < dann_lambda(1.0) < 1.0


def test_bn_alignment_sets_running_statistics_to_the_target_batch() -> None:
    torch.manual_seed(0)
    bb = create("conv4", in_channels=1, image_size=28)
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    target = torch.randint(0, 256, (48, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    aligned, info = align_backbone(bb, PREP, target, "bn", device="cpu")
    assert info["method"] == "bn" and info["bn_layers"] == 4 and info["target_images"] == 48
    assert all(torch.equal(v, bb.state_dict()[k]) for k, v in before.items()), "the caller's backbone changed"
    x = PREP(target)
    with torch.no_grad(), batch_stats_bn(bb):
        stats = input_statistics(bb, lambda: bb(x))
    for name, m in batchnorms(aligned).items():
        mean, var = stats[name]
        n = int(np.prod([x.shape[0], *_spatial(bb, name, x)]))
        assert m.running_mean is not None and m.running_var is not None
        torch.testing.assert_close(m.running_mean, mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.running_var, var * n / (n - 1), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(m.running_mean, before[f"{name}.running_mean"])


def _spatial(bb: torch.nn.Module, name: str, x: torch.Tensor) -> list[int]:
    """Spatial size of the input of BatchNorm ``name``."""
    shape: list[int] = []
    m = batchnorms(bb)[name]
    h = m.register_forward_pre_hook(lambda _m, args: shape.extend(args[0].shape[2:]))
    with torch.no_grad(), batch_stats_bn(bb):
        bb(x[:2])
    h.remove()
    return shape


def test_reestimate_bn_restores_modes_and_momentum() -> None:
    bb = create("conv4", in_channels=1, image_size=28).train()
    reestimate_bn(bb, torch.zeros(4, 1, 28, 28, dtype=torch.uint8), PREP, torch.device("cpu"))
    assert all(m.training for m in bb.modules())
    assert all(m.momentum == 0.1 for m in batchnorms(bb).values())


def test_source_dataset_names() -> None:
    assert source_dataset("caltech101/train") == ("caltech101", "train", {})
    assert source_dataset("caltech101/train-seed3") == ("caltech101", "train", {"seed": 3})
    assert source_dataset("omniglot/lake-background") == ("omniglot-lake", "background", {})
    assert source_dataset("omniglot/vinyals-train") == ("omniglot", "train", {})
    assert source_dataset("medmnist/pneumoniamnist-train") == ("pneumoniamnist", "train", {})
    assert source_dataset("pneumoniamnist") == ("pneumoniamnist", None, {})
    assert source_dataset("imagenet/train") is None and source_dataset(None) is None


def test_align_refuses_unknown_method_and_missing_source() -> None:
    bb = create("conv4", in_channels=1, image_size=28)
    target = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="unknown alignment method 'coral'"):
        align_backbone(bb, PREP, target, "coral")
    with pytest.raises(ConfigError, match="needs a source sample"):
        align_backbone(bb, PREP, target, "mmd")


# -- end to end on BreastMNIST ----------------------------------------------------------------


@pytest.fixture(scope="module")
def breast(data_root: Path) -> dict[str, np.ndarray]:
    with np.load(data_root / "medmnist" / "breastmnist.npz") as f:
        return {"x": f["train_images"], "y": f["train_labels"].reshape(-1)}


@pytest.fixture(scope="module")
def source_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random Conv-4 whose record says it was pretrained on PneumoniaMNIST's train split."""
    torch.manual_seed(0)
    bb = create("conv4", in_channels=1, image_size=28)
    path = tmp_path_factory.mktemp("bb") / "conv4-src.safetensors"
    return save_backbone(
        bb, path, mean=[0.5], std=[0.25], dataset="medmnist/pneumoniamnist-train", classes=["normal", "pneumonia"]
    )


@pytest.fixture(scope="module")
def no_source_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    bb = create("conv4", in_channels=1, image_size=28)
    return save_backbone(bb, tmp_path_factory.mktemp("bb") / "conv4-nosrc.safetensors", mean=[0.5], std=[0.25])


@pytest.fixture()
def folders(tmp_path: Path, breast: dict[str, np.ndarray]) -> tuple[Path, Path]:
    """``root/labelled/<class>/*.png`` (8 per class) and ``root/pool``: 40 other train images, two copies of
    labelled files, one RGB image of another size and one grayscale+alpha image. ``root`` as the
    unlabeled folder holds the labelled folder too."""
    x, y = breast["x"], breast["y"]
    lab = tmp_path / "root" / "labelled"
    used: list[int] = []
    for c, name in enumerate(["malignant", "normal"]):
        (lab / name).mkdir(parents=True)
        for i, j in enumerate(np.flatnonzero(y == c)[:8]):
            Image.fromarray(x[j]).save(lab / name / f"{i:03d}.png")
            used.append(int(j))
    pool = tmp_path / "root" / "pool"
    pool.mkdir()
    others = [j for j in range(len(x)) if j not in used][:40]
    for j in others:
        Image.fromarray(x[j]).save(pool / f"{j:04d}.png")
    shutil.copy(lab / "normal" / "000.png", pool / "copy-a.png")
    shutil.copy(lab / "malignant" / "003.png", pool / "copy-b.png")
    Image.fromarray(np.repeat(np.asarray(Image.fromarray(x[others[0]]).resize((56, 56)))[..., None], 3, 2)).save(
        pool / "rgb-56.png"
    )
    Image.fromarray(x[others[1]]).convert("LA").save(pool / "gray-alpha.png")
    return lab, pool


def test_adapt_bn_alignment_report_counts_and_saved_model(
    folders: tuple[Path, Path], source_backbone: Path, tmp_path: Path
) -> None:
    lab, pool = folders
    model = metafew.adapt(lab, source_backbone, shots=3, eval_draws=3, device="cpu", unlabeled=pool, align="bn")
    a = model.report.alignment if model.report else None
    assert a is not None and a["method"] == "bn"
    assert a["pool"] == {"found": 44, "labelled_overlap": 2, "used": 42, "transductive": False, "skipped": 0}
    assert model.support["bn_stats"] == "backbone"  # the aligned statistics are used, not the support's
    assert "aligned to 42 unlabeled images by bn" in model.report.summary()
    assert "inductive" in model.report.summary()
    # the folder holding the labelled folder: its 16 labelled files are left out by path
    whole = metafew.adapt(
        lab, source_backbone, shots=3, eval_draws=0, device="cpu", unlabeled=lab.parent, align="bn", calibrate=False
    )
    assert whole.report is not None and whole.report.alignment is not None
    assert whole.report.alignment["pool"]["found"] == 60 and whole.report.alignment["pool"]["used"] == 42
    trans = metafew.adapt(
        lab, source_backbone, shots=3, eval_draws=0, device="cpu", unlabeled=lab.parent, align="bn",
        transductive=True, calibrate=False,
    )  # fmt: skip
    assert trans.report is not None and trans.report.alignment is not None
    assert trans.report.alignment["pool"] == {
        "found": 60, "labelled_overlap": 18, "used": 60, "transductive": True, "skipped": 0,
    }  # fmt: skip
    assert "transductive" in trans.report.summary()

    path = model.save(tmp_path / "bn-model")
    loaded = metafew.load(path, device="cpu")
    assert loaded.backbone_info["aligned"]["method"] == "bn"
    assert loaded.report is not None and loaded.report.alignment == a
    preds = loaded.predict(pool)
    assert len(preds) == 44 and {p.label for p in preds} <= {"malignant", "normal"}
    torch.testing.assert_close(loaded.predict_proba(lab), model.predict_proba(lab))
    # the aligned statistics are in the saved file, not the pretrained ones
    means = [v for k, v in loaded.classifier.state_dict().items() if k.endswith("0.1.running_mean")]
    assert means and not torch.allclose(means[0], torch.zeros_like(means[0]))


def test_adapt_mmd_alignment_trains_saves_and_predicts(
    folders: tuple[Path, Path], source_backbone: Path, tmp_path: Path
) -> None:
    lab, pool = folders
    model = metafew.adapt(
        lab, source_backbone, shots=3, eval_draws=3, device="cpu", unlabeled=pool, align="mmd", align_steps=4
    )
    a = model.report.alignment if model.report else None
    assert a is not None and a["method"] == "mmd" and a["steps"] == 4
    assert a["source"] == "medmnist/pneumoniamnist-train" and a["source_images"] == 2000
    assert a["pool"]["used"] == 42 and a["pool"]["labelled_overlap"] == 2
    assert np.isfinite([a["mmd_unaligned"], a["mmd_bn_only"], a["mmd_after"]]).all()
    assert "by mmd, 4 steps, source: 2000 images of medmnist/pneumoniamnist-train" in model.report.summary()
    original = metafew.checkpoint.load_backbone(source_backbone)[0].state_dict()
    tuned = model.learner.backbone.state_dict()
    assert not torch.allclose(tuned["0.0.weight"], original["0.0.weight"]), "the backbone was not fine-tuned"
    loaded = metafew.load(model.save(tmp_path / "mmd-model"), device="cpu")
    torch.testing.assert_close(loaded.learner.backbone.state_dict()["0.0.weight"], tuned["0.0.weight"])
    torch.testing.assert_close(loaded.predict_proba(pool), model.predict_proba(pool))
    # seeded: the same call gives the same aligned backbone
    again = metafew.adapt(
        lab, source_backbone, shots=3, eval_draws=0, device="cpu", unlabeled=pool, align="mmd", align_steps=4,
        calibrate=False,
    )  # fmt: skip
    torch.testing.assert_close(again.learner.backbone.state_dict()["0.0.weight"], tuned["0.0.weight"])


def test_adapt_dann_runs(folders: tuple[Path, Path], source_backbone: Path) -> None:
    lab, pool = folders
    model = metafew.adapt(
        lab, source_backbone, shots=3, eval_draws=2, device="cpu", unlabeled=pool, align="dann", align_steps=3
    )
    assert model.report is not None and model.report.alignment is not None
    assert model.report.alignment["method"] == "dann" and np.isfinite(model.report.alignment["final_align_loss"])


def test_adapt_alignment_errors(folders: tuple[Path, Path], source_backbone: Path, no_source_backbone: Path) -> None:
    lab, pool = folders
    with pytest.raises(ConfigError, match="needs unlabeled images"):
        metafew.adapt(lab, source_backbone, align="bn", device="cpu")
    with pytest.raises(ConfigError, match="give align="):
        metafew.adapt(lab, source_backbone, unlabeled=pool, device="cpu")
    with pytest.raises(ConfigError, match="unknown alignment method 'coral'"):
        metafew.adapt(lab, source_backbone, unlabeled=pool, align="coral", device="cpu")
    with pytest.raises(DatasetNotFoundError, match=r"cannot find the source data.*--align bn"):
        metafew.adapt(lab, no_source_backbone, unlabeled=pool, align="mmd", device="cpu")
    with pytest.raises(DatasetError, match="every image is also a labelled one"):
        metafew.adapt(lab, source_backbone, unlabeled=lab, align="bn", device="cpu")


# -- the command line -------------------------------------------------------------------------


def cli(argv: list[str | Path], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from metafew.cli.main import main

    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_align_end_to_end(
    folders: tuple[Path, Path], source_backbone: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lab, pool = folders
    out = tmp_path / "out" / "aligned.safetensors"
    out.parent.mkdir()
    rc, stdout, err = cli(
        ["adapt", "--data", lab, "--backbone", source_backbone, "--shots", "3", "--draws", "2", "--out", out,
         "--unlabeled", pool, "--align", "mmd", "--align-steps", "2", "--device", "cpu"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    assert "aligned to 42 unlabeled images by mmd" in stdout
    report = json.loads((tmp_path / "out" / "aligned.report.json").read_text())
    assert report["alignment"]["method"] == "mmd" and report["alignment"]["pool"]["transductive"] is False
    assert metafew.load(out, device="cpu").backbone_info["aligned"]["steps"] == 2


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--align", "bn"], ["--align bn needs --unlabeled"]),
        (["--unlabeled", "POOL"], ["--unlabeled is used only to align", "--align"]),
        (["--unlabeled", "MISSING", "--align", "bn"], ["--unlabeled folder not found", "missing"]),
        (["--unlabeled", "EMPTY", "--align", "bn"], ["has no image files"]),
        (["--unlabeled", "BAD", "--align", "bn"], ["notes.png", "not an image"]),
        (["--unlabeled", "POOL", "--align", "coral"], ["invalid choice: 'coral'"]),
        (["--unlabeled", "POOL", "--align", "mmd", "--backbone", "NOSRC"], ["cannot find the source", "--align bn"]),
    ],
)
def test_cli_align_errors(
    extra: list[str], needles: list[str], folders: tuple[Path, Path], source_backbone: Path,
    no_source_backbone: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    lab, pool = folders
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here\n")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.png").write_text("not a png\n")
    names = {"POOL": pool, "MISSING": tmp_path / "missing", "EMPTY": empty, "BAD": bad, "NOSRC": no_source_backbone}
    args: list[str | Path] = [names.get(a, a) for a in extra]
    base: list[str | Path] = ["adapt", "--data", lab, "--out", tmp_path / "m.safetensors", "--device", "cpu"]
    if "--backbone" not in extra:
        base += ["--backbone", source_backbone]
    rc, _, err = cli([*base, *args], capsys)
    one_line_error(rc, err, *needles)
    assert not (tmp_path / "m.safetensors").exists()
