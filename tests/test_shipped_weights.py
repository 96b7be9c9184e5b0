"""The pretrained backbones that ship inside metafew: they load by name and still score what they recorded."""

from __future__ import annotations

import pytest

import metafew
from metafew.backbones import WEIGHTS, list_weights
from metafew.backbones.weights import evaluate_check
from metafew.checkpoint import read_backbone_record
from metafew.errors import CheckpointError, ConfigError


def test_every_declared_backbone_ships():
    assert {"omniglot-conv4", "omniglot-background-conv4", "caltech101-conv4"} <= set(list_weights())
    for name, entry in WEIGHTS.items():
        assert entry.available, f"{name}: {entry.path} is missing"
        assert entry.command.startswith("metafew pretrain"), name
        assert entry.path.stat().st_size < 1_000_000, f"{name} is not small"


@pytest.mark.parametrize("name", sorted(WEIGHTS.names()))
def test_a_shipped_backbone_reproduces_its_recorded_figure(name):
    entry = WEIGHTS.get(name)
    measured = evaluate_check(entry)
    assert measured == pytest.approx(entry.check["accuracy"], abs=0.005), f"{name}: {measured} vs {entry.check}"


def test_shipped_backbones_work_by_name_everywhere():
    backbone = metafew.create_backbone("conv4", weights="caltech101")
    assert backbone.in_channels == 3 and backbone.image_size == (28, 28)
    record = read_backbone_record("omniglot-background-conv4")  # a name wherever a backbone file goes
    assert record.arch == "conv4" and record.in_channels == 1 and len(record.classes or []) == 964
    learner = metafew.build(metafew.RunConfig(backbone_checkpoint="omniglot-background-conv4", steps=0), device="cpu")
    assert learner.backbone.image_size == (28, 28)
    assert type(metafew.load("caltech101-conv4", device="cpu")).__name__ == "Conv4"


def test_shipped_weights_refuse_what_does_not_fit():
    with pytest.raises(CheckpointError, match="1-channel images, the data has 3"):
        metafew.create_backbone("conv4", weights="omniglot-background", in_channels=3)
    with pytest.raises(ConfigError, match="do not apply to shipped weights"):
        metafew.create_backbone("conv4", weights="caltech101", hidden=32)
