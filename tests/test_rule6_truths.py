"""Rule 6: smaller truths (a loadable dataset name, version messages, exit statuses)."""

from __future__ import annotations

import json

import pytest
from cli_helpers import run_cli

from metafew.checkpoint import read_header
from metafew.errors import CheckpointError


@pytest.mark.parametrize("version", ['"1"', "true", "null", "1.0", "0", "[1]"])
def test_a_bad_format_version_is_named_as_such(version, tmp_path):
    import torch
    from safetensors.torch import save_file

    p = tmp_path / "v.safetensors"
    doc = f'{{"format": "metafew", "format_version": {version}, "kind": "state", "record": {{}}}}'
    save_file({"w": torch.ones(1)}, str(p), metadata={"metafew": doc})
    with pytest.raises(CheckpointError) as e:
        read_header(p)
    msg = str(e.value)
    assert f"version {json.loads(version)!r}" in msg or version in msg
    assert "this metafew reads version 1" in msg and "upgrade" not in msg


def test_eval_of_a_backbone_without_dataset_uses_its_own_dataset(capsys, tmp_path):
    import metafew

    b = tmp_path / "pm.safetensors"
    metafew.pretrain(
        "conv4", metafew.load_dataset("breastmnist", "train"), epochs=1, device="cpu", progress=False, out=b,
        backbone_options={"hidden": 8},
    )  # fmt: skip
    code, out, err = run_cli(
        capsys, "eval", "--checkpoint", b, "--n-way", "2", "--episodes", "2", "--device", "cpu", "--no-progress"
    )
    assert code == 0, err
    assert "unknown dataset" not in err and "breastmnist" in out
