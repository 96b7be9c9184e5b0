"""Backbones fed images of another size or channel count than they were built for.

A Conv-4 built for the default 84x84 and fed 28x28 Omniglot used to fail inside a learner
with torch's "mat1 and mat2 shapes cannot be multiplied (5x64 and 1600x5)".
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metafew.backbones import create
from metafew.checkpoint import load_backbone, save_backbone
from metafew.errors import ConfigError, InputShapeError
from metafew.learners import create as create_learner


def test_conv4_default_is_84_and_says_what_it_expects_and_what_it_got() -> None:
    backbone = create("conv4", in_channels=1)
    assert backbone.image_size == (84, 84) and backbone.out_features == 1600
    with pytest.raises(InputShapeError) as err:
        backbone(torch.zeros(5, 1, 28, 28))
    msg = str(err.value)
    assert "\n" not in msg
    assert "built for 84x84 images (1600 features)" in msg and "got [N, 1, 28, 28] images (64 features)" in msg
    assert "image_size=28" in msg and "pool='avg'" in msg


def test_conv4_size_error_comes_before_the_learner_head() -> None:
    """The FineTune/MAML head sized for 1600 features is never reached with 64."""
    learner = create_learner("maml", create("conv4", in_channels=1), n_way=5)
    with pytest.raises(InputShapeError, match="built for 84x84"):
        learner.backbone(torch.zeros(5, 1, 28, 28))


def test_conv4_sizes_with_the_same_final_map_still_work() -> None:
    """30x30 into a Conv-4 built for 28x28 gives the same 1x1 map: the same 64 features, no error."""
    backbone = create("conv4", in_channels=1, image_size=28)
    assert backbone(torch.zeros(2, 1, 30, 30)).shape == (2, 64)


def test_conv4_wrong_channels_and_too_small() -> None:
    backbone = create("conv4", in_channels=3, image_size=28)
    with pytest.raises(InputShapeError, match=r"expects 3-channel images, 28x28, got \[N, 1, 28, 28\]"):
        backbone(torch.zeros(2, 1, 28, 28))
    with pytest.raises(InputShapeError, match="at least 16x16, got 8x8"):
        create("conv4", pool="avg")(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ConfigError, match="at least 16x16"):
        create("conv4", image_size=12)
    with pytest.raises(ConfigError, match="pool must be one of 'flatten', 'avg'"):
        create("conv4", pool="max")


def test_conv4_avg_pool_takes_any_size_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = create("conv4", in_channels=1, image_size=28, pool="avg").eval()
    assert backbone.out_features == 64
    for size in (28, 84, 37):
        assert backbone(torch.rand(3, 1, size, size)).shape == (3, 64)
    path = save_backbone(backbone, tmp_path / "avg", mean=[0.5], std=[0.5])
    loaded, rec = load_backbone(path)
    assert rec.options == {"pool": "avg"}
    x = torch.rand(2, 1, 84, 84)
    with torch.no_grad():
        assert torch.allclose(loaded(x), backbone(x))


def test_default_conv4_checkpoints_keep_their_options(tmp_path: Path) -> None:
    """The default pool is not recorded: files saved before the option existed still match."""
    path = save_backbone(create("conv4", in_channels=1, image_size=28), tmp_path / "c4", mean=[0.5], std=[0.5])
    loaded, rec = load_backbone(path)
    assert rec.options == {} and loaded.out_features == 64


def test_resnet12_any_size_from_16_and_checks_channels() -> None:
    backbone = create("resnet12", in_channels=1, image_size=28, widths=(8, 8, 8, 8)).eval()
    assert backbone(torch.zeros(2, 1, 84, 84)).shape == (2, 8)  # global average pooling
    with pytest.raises(InputShapeError, match="at least 16x16, got 12x12"):
        backbone(torch.zeros(2, 1, 12, 12))
    with pytest.raises(InputShapeError, match=r"expects 1-channel images, got \[N, 3, 28, 28\]"):
        backbone(torch.zeros(2, 3, 28, 28))


def test_resnet18_any_size_and_checks_channels() -> None:
    backbone = create("resnet18", in_channels=1, image_size=28).eval()
    assert backbone(torch.zeros(2, 1, 64, 64)).shape == (2, 512)
    with pytest.raises(InputShapeError, match=r"resnet18 backbone expects 1-channel images, got \[N, 3, 28, 28\]"):
        backbone(torch.zeros(2, 3, 28, 28))
