"""benchmarks/medical.py's backbone cache: reused only while the recipe, versions, code and data that made it hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from bench_scripts import load_benchmark

from metafew.cache_keys import dataset_fingerprint, library_versions
from metafew.data.medmnist import find_medmnist

pytestmark = pytest.mark.skipif(find_medmnist("breastmnist") is None, reason="BreastMNIST not in the data root")

RECIPE = {
    "dataset": "breastmnist",
    "subset": "train",
    "arch": "conv4",
    "image_size": 28,
    "epochs": 1,
    "lr": 0.05,
    "seed": 0,
}


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("medical", "medical_bench_cache")


@pytest.fixture
def pretrainings(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Stand in for metafew.pretrain (seconds of real training each): record each call and write a file."""
    import metafew

    made: list[Path] = []

    def fake(arch, dataset, *, out, **kwargs):
        assert arch == RECIPE["arch"] and kwargs["seed"] == RECIPE["seed"]
        Path(out).write_bytes(b"weights %d" % len(made))
        made.append(Path(out))

    monkeypatch.setattr(metafew, "pretrain", fake)
    return made


def _ensure(bench, folder: Path, data_root: Path, lines: list[str], recipe: dict | None = None) -> Path:
    return bench.ensure_backbone(dict(recipe or RECIPE), folder, torch.device("cpu"), str(data_root), lines.append)


def test_a_cached_backbone_records_what_made_it_and_is_reused(bench, tmp_path, data_root, pretrainings) -> None:
    lines: list[str] = []
    first = _ensure(bench, tmp_path, data_root, lines)
    assert first.name.startswith(f"conv4-breastmnist-{bench.recipe_key(RECIPE)}-") and pretrainings == [first]
    record = json.loads(first.with_name(first.stem + ".provenance.json").read_text())
    assert record["versions"] == library_versions() and record["recipe_key"] == bench.recipe_key(RECIPE)
    assert {"metafew.engine.pretrain", "metafew.backbones.conv4", "metafew.data.medmnist"} <= set(record["code"])
    assert record["data"] == dataset_fingerprint("breastmnist", data_root, mtimes=False)

    assert _ensure(bench, tmp_path, data_root, lines) == first and len(pretrainings) == 1
    longer = _ensure(bench, tmp_path, data_root, lines, {**RECIPE, "epochs": 2})  # another recipe: another file
    assert longer != first and len(pretrainings) == 2


def test_another_torch_or_changed_code_pretrains_anew(bench, tmp_path, data_root, pretrainings, monkeypatch) -> None:
    lines: list[str] = []
    first = _ensure(bench, tmp_path, data_root, lines)
    running, version = library_versions()["torch"], torch.__version__

    monkeypatch.setattr(torch, "__version__", "9.9.0+cu999")
    second = _ensure(bench, tmp_path, data_root, lines)
    assert second != first and pretrainings == [first, second]
    assert any(f"torch {running} -> 9.9.0" in line for line in lines), lines
    monkeypatch.setattr(torch, "__version__", version)

    import metafew.cache_keys as cache_keys

    real = cache_keys.code_checksum
    monkeypatch.setattr(cache_keys, "code_checksum", lambda mods: {**real(mods), "metafew.engine.pretrain": "edited"})
    third = _ensure(bench, tmp_path, data_root, lines)
    assert third not in (first, second) and len(pretrainings) == 3
    assert any("stale" in line and "metafew.engine.pretrain code" in line for line in lines), lines


def test_a_backbone_cached_before_its_provenance_is_not_reused(bench, tmp_path, data_root, pretrainings) -> None:
    legacy = tmp_path / f"conv4-breastmnist-{bench.recipe_key(RECIPE)}.safetensors"  # the name earlier versions used
    legacy.write_bytes(b"weights of an unknown torch and code")
    lines: list[str] = []
    path = _ensure(bench, tmp_path, data_root, lines)
    assert path != legacy and pretrainings == [path] and legacy.read_bytes().startswith(b"weights of")
    assert any("not reusing" in line and "torch version and code" in line for line in lines)


def test_a_lost_record_is_written_again_from_the_name(bench, tmp_path, data_root, pretrainings) -> None:
    lines: list[str] = []
    first = _ensure(bench, tmp_path, data_root, lines)
    sidecar = first.with_name(first.stem + ".provenance.json")
    sidecar.unlink()
    assert _ensure(bench, tmp_path, data_root, lines) == first and len(pretrainings) == 1 and sidecar.is_file()
