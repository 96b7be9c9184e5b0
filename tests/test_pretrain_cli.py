"""``metafew pretrain --image-size/--in-channels``: a 28x28 backbone from the CLI, as the medical suite pretrains from Python."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, run_cli

from metafew.checkpoint import read_backbone_record
from metafew.cli.pretrain import image_format_options
from metafew.config import PretrainConfig
from metafew.errors import ConfigError

FAST = ["--device", "cpu", "--no-progress", "--epochs", "1", "--batch-size", "64", "--backbone-option", "hidden=8"]


def test_pretrain_28x28_grayscale_from_the_cli_then_adapt(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "conv4-breast"
    code, stdout, err = run_cli(
        capsys, "pretrain", "--dataset", "breastmnist", "--image-size", "28", "--in-channels", "1", *FAST,
        "--out", out,
    )  # fmt: skip
    assert code == 0, err
    path = out.with_suffix(".safetensors")
    assert f"saved {path}" in stdout
    rec = read_backbone_record(path)
    assert (rec.arch, rec.in_channels, rec.image_size, rec.dataset) == (
        "conv4",
        1,
        (28, 28),
        "medmnist/breastmnist-train",
    )
    assert rec.options == {"hidden": 8}

    # the backbone is what `metafew adapt --backbone` takes
    model = tmp_path / "breast-model.safetensors"
    code, stdout, err = run_cli(
        capsys, "adapt", "--data", "breastmnist", "--backbone", path, "--shots", "3", "--draws", "2",
        "--device", "cpu", "--no-progress", "--out", model,
    )  # fmt: skip
    assert code == 0, err
    assert model.is_file()
    report = json.loads(model.with_suffix(".report.json").read_text())
    assert report["classes"] == ["malignant", "normal, benign"] and 0.0 <= report["accuracy"]["mean"] <= 1.0


def test_image_size_goes_to_datasets_that_take_it_as_the_same_recipe() -> None:
    """`--image-size 28` on Caltech-101 is the recipe a `[pretrain]` table with dataset_options gives."""
    options = image_format_options("caltech101", {}, 28, None)
    assert options == {"image_size": 28}
    from_flags = PretrainConfig(dataset="caltech101", dataset_options=options)
    from_toml = PretrainConfig.from_dict({"dataset": "caltech101", "dataset_options": {"image_size": 28}})
    assert from_flags.key() == from_toml.key()
    assert image_format_options("omniglot", {}, 20, 1) == {"image_size": 20}  # Omniglot is grayscale anyway
    assert image_format_options("folder:/x", {"on_error": "skip"}, 64, 3) == {
        "on_error": "skip",
        "image_size": 64,
        "channels": 3,
    }
    # a fixed format that already matches passes nothing, so the recipe key is unchanged
    assert image_format_options("breastmnist", {}, 28, 1) == {}


def test_fixed_formats_and_contradictions_are_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dataset 'caltech101' has a fixed channel count \(3\)"):
        image_format_options("caltech101", {}, 28, 1)
    with pytest.raises(ConfigError, match=r"--image-size 28 contradicts --dataset-option image_size=32"):
        image_format_options("omniglot", {"image_size": 32}, 28, None)
    code, _, err = run_cli(
        capsys, "pretrain", "--dataset", "breastmnist", "--image-size", "64", *FAST, "--out", tmp_path / "x"
    )
    assert_one_line_error(code, err, "--image-size 64", "fixed size (28x28)", "no image_size option")
    assert not (tmp_path / "x.safetensors").exists()
    code, _, err = run_cli(capsys, "pretrain", "--dataset", "omniglot", "--in-channels", "2", "--out", tmp_path / "y")
    assert code == 2 and "invalid choice: 2" in err
