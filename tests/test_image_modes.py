"""Every command that reads image folders (train, eval, pretrain, adapt, predict) takes every mode and format.

One folder tree (train/ and test/, 5 classes each) holds, in every class, grayscale PNG, RGB
JPEG, RGBA PNG, 16-bit PNG, palette GIF, CMYK JPEG, BMP and TIFF images of different sizes;
`train`, `eval`, `pretrain`, `adapt` and `predict` must all read it (converted to the dataset's channels
and size, as adapt does).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli
from PIL import Image

MODES = ("L.png", "RGB.jpg", "RGBA.png", "I;16.png", "P.gif", "CMYK.jpg", "RGB.bmp", "L.tif")


def _image(rng: np.random.Generator, cls: int, mode: str, side: int) -> Image.Image:
    base = (rng.random((side, side)) * 60 + cls * 40).astype(np.uint8)  # classes differ in brightness
    img = Image.fromarray(base)
    if mode == "I;16":
        return Image.fromarray(base.astype(np.uint16) * 257)
    return img.convert(mode)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for subset, n_classes in (("train", 5), ("test", 5)):
        for c in range(n_classes):
            folder = root / subset / f"{subset}-class{c}"
            folder.mkdir(parents=True)
            for i, spec in enumerate(MODES):
                mode, ext = spec.rsplit(".", 1)
                _image(rng, c, mode, 20 + 3 * i).save(folder / f"{i}.{ext}")
    return root


def test_train_eval_pretrain_and_adapt_read_every_mode(capsys, tmp_path: Path, mixed: Path) -> None:
    data = f"folder:{mixed}"
    common = ["--device", "cpu", "--no-progress"]
    code, _, err = run_cli(
        capsys, "train", *common, "--dataset", data, "--train-subset", "train", "--val-subset", "none",
        "--learner", "protonet", "--backbone-option", "hidden=8", "--n-way", "5",
        "--k-shot", "1", "--n-query", "2", "--steps", "2", "--log-every", "1", "--out", tmp_path / "run",
    )  # fmt: skip
    assert code == 0, err
    code, out, err = run_cli(
        capsys, "eval", *common, "--checkpoint", tmp_path / "run" / "last.safetensors", "--episodes", "3"
    )
    assert code == 0 and "%" in out, err
    code, _, err = run_cli(
        capsys, "pretrain", *common, "--dataset", data, "--subset", "train", "--val-subset", "none",
        "--backbone-option", "hidden=8", "--epochs", "1", "--batch-size", "8", "--out", tmp_path / "bb.safetensors",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(
        capsys, "adapt", "--device", "cpu", "--data", mixed / "test", "--backbone", tmp_path / "bb.safetensors",
        "--shots", "2", "--draws", "2", "--out", tmp_path / "model.safetensors",
    )  # fmt: skip
    assert code == 0, err
    code, out, err = run_cli(
        capsys, "predict", "--model", tmp_path / "model.safetensors", mixed / "train", "--format", "csv"
    )
    assert code == 0 and len(out.strip().splitlines()) == 1 + 5 * len(MODES), err  # a header and every image
