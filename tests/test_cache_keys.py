"""Cache keys follow what produced a cache: data fingerprints, code checksums, and the bench's pretrained backbones."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from metafew.bench import load_suite, provenance
from metafew.bench.runner import pretrained_backbone
from metafew.cache_keys import (
    code_checksum,
    dataset_fingerprint,
    decoded_cache_key,
    library_versions,
    source_fingerprint,
)


def _tree(root: Path) -> Path:
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"{i}.png").write_bytes(b"x" * (10 + i))
    return root


# -- data fingerprints ------------------------------------------------------------------------------------------
def test_source_fingerprint_follows_the_files(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data")
    first = source_fingerprint(root)
    assert source_fingerprint(root) == first and len(first) == 16
    (root / ".DS_Store").write_bytes(b"finder")  # hidden files are not data
    assert source_fingerprint(root) == first

    (root / "cat" / "3.png").write_bytes(b"new")  # an added file
    added = source_fingerprint(root)
    assert added != first
    (root / "cat" / "3.png").unlink()
    assert source_fingerprint(root) == first  # back as it was

    (root / "dog" / "0.png").rename(root / "dog" / "9.png")  # renamed
    assert source_fingerprint(root) != first
    (root / "dog" / "9.png").rename(root / "dog" / "0.png")
    (root / "dog" / "0.png").write_bytes(b"y" * 11)  # rewritten with another size
    assert source_fingerprint(root) != first


def test_mtimes_count_unless_told_not_to(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data")
    with_times, without = source_fingerprint(root), source_fingerprint(root, mtimes=False)
    st = (root / "cat" / "0.png").stat()
    os.utime(root / "cat" / "0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes
    assert source_fingerprint(root) != with_times
    assert source_fingerprint(root, mtimes=False) == without


def test_known_md5_is_the_fingerprint(tmp_path: Path) -> None:
    a, b = tmp_path / "a.npz", tmp_path / "b" / "a.npz"
    a.write_bytes(b"one")
    b.parent.mkdir()
    b.write_bytes(b"one, copied elsewhere later")
    md5 = "750601b1f35ba3300ea97c75c52ff8f6"
    assert source_fingerprint(a, md5=md5) == source_fingerprint(b, md5=md5.upper())
    assert source_fingerprint(a) != source_fingerprint(b)
    with pytest.raises(FileNotFoundError):
        source_fingerprint(tmp_path / "missing.npz")


def test_dataset_fingerprints_of_the_real_data(data_root: Path) -> None:
    breast = dataset_fingerprint("breastmnist", data_root)
    assert breast == source_fingerprint(
        data_root / "medmnist" / "breastmnist.npz", md5="750601b1f35ba3300ea97c75c52ff8f6"
    )
    omniglot = dataset_fingerprint("omniglot", data_root, mtimes=False)
    assert omniglot == dataset_fingerprint("omniglot-lake", data_root, mtimes=False)  # the same files
    assert dataset_fingerprint("mini-imagenet", data_root) is None  # not there: no fingerprint, no error


def test_decoded_cache_key_changes_with_parts_sources_and_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _tree(tmp_path / "data")
    key = decoded_cache_key("omniglot-v1", 28, sources=root)
    assert key == decoded_cache_key("omniglot-v1", 28, sources=root) and len(key) == 16
    assert decoded_cache_key("omniglot-v1", 84, sources=root) != key
    (root / "dog" / "5.png").write_bytes(b"more")
    assert decoded_cache_key("omniglot-v1", 28, sources=root) != key
    before = decoded_cache_key("x", md5="0" * 32)
    monkeypatch.setattr("metafew.__version__", "9.9.9")
    assert decoded_cache_key("x", md5="0" * 32) != before
    assert set(library_versions("numpy", "pillow")) == {"metafew", "torch", "numpy", "pillow"}
    assert "+" not in library_versions()["torch"]


# -- code checksums ---------------------------------------------------------------------------------------------
def test_code_checksum_ignores_docs_and_comments_but_not_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = tmp_path / "mf_cache_key_probe.py"

    def checksum(source: str) -> str:
        mod.write_text(textwrap.dedent(source))
        sys.modules.pop("mf_cache_key_probe", None)
        return code_checksum(["mf_cache_key_probe"])["mf_cache_key_probe"]

    base = checksum('"""Doc."""\ndef f(x):\n    """Twice x."""\n    return 2 * x\n')
    assert checksum('"""Other doc."""\n\n\ndef f(x):  # a comment\n    """Doubled."""\n    return 2*x\n') == base
    assert checksum('"""Doc."""\ndef f(x):\n    """Twice x."""\n    return 3 * x\n') != base
    real = code_checksum(["metafew.engine.pretrain", "metafew.backbones.conv4"])
    assert sorted(real) == ["metafew.backbones.conv4", "metafew.engine.pretrain"]


# -- the bench's pretrained backbones ---------------------------------------------------------------------------
@pytest.fixture()
def suite(tmp_path: Path):
    path = tmp_path / "tiny.toml"
    path.write_text(
        'name = "tiny"\n[pretrain]\ndataset = "breastmnist"\nepochs = 1\n'
        '[defaults]\ndataset = "breastmnist"\nn_way = 2\nk_shot = 1\n[[rows]]\nlearner = "protonet"\nsteps = 0\n'
    )
    return load_suite(path)


@pytest.fixture()
def pretrainings(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the (tested elsewhere) pretraining by a recorder that writes a stand-in file."""
    made: list[Path] = []

    def fake_run_pretrain(recipe, out, **kwargs):
        Path(out).write_bytes(b"weights")
        made.append(Path(out))
        return Path(out)

    monkeypatch.setattr("metafew.config.run_pretrain", fake_run_pretrain)
    return made


def _backbone(suite, work: Path, data_root: Path, lines: list[str]) -> Path:
    return pretrained_backbone(suite, work, data_root=data_root, device="cpu", progress=False, log=lines.append)


def test_backbone_is_reused_until_its_code_or_data_changes(
    suite, tmp_path: Path, data_root: Path, pretrainings: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    work, lines = tmp_path / "work", []
    work.mkdir()
    first = _backbone(suite, work, data_root, lines)
    key = suite.pretrain.key()
    assert first.name.startswith(f"pretrain-conv4-breastmnist-{key}-") and pretrainings == [first]
    record = json.loads(provenance.sidecar(first).read_text())
    assert record["recipe_key"] == key and "metafew.engine.pretrain" in record["code"]
    assert "metafew.backbones.conv4" in record["code"] and "metafew.data.medmnist" in record["code"]
    assert record["data"] == dataset_fingerprint("breastmnist", data_root)
    assert record["versions"] == library_versions()

    assert _backbone(suite, work, data_root, lines) == first and len(pretrainings) == 1
    assert lines[-1].endswith("(reused)")

    # the pretraining loop's code changes: a new file, so the rows starting from it are retrained too
    real = provenance.code_checksum
    monkeypatch.setattr(
        provenance,
        "code_checksum",
        lambda mods: {**real(mods), "metafew.engine.pretrain": "edited"},
    )
    second = _backbone(suite, work, data_root, lines)
    assert second != first and pretrainings == [first, second]
    assert any("stale (metafew.engine.pretrain code changed)" in line for line in lines)


def test_backbones_cached_before_provenance_stay_reusable(
    suite, tmp_path: Path, data_root: Path, pretrainings: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    work, lines = tmp_path / "work", []
    work.mkdir()
    legacy = work / f"pretrain-conv4-breastmnist-{suite.pretrain.key()}.safetensors"  # the 0.1.0 name
    legacy.write_bytes(b"old weights")
    assert _backbone(suite, work, data_root, lines) == legacy and pretrainings == []
    assert "recorded now" in lines[-1]
    assert json.loads(provenance.sidecar(legacy).read_text())["adopted"] is True
    assert _backbone(suite, work, data_root, lines) == legacy and lines[-1].endswith("(reused)")

    # from now on it is keyed like any other: changed data re-pretrains
    monkeypatch.setattr(provenance, "dataset_fingerprint", lambda *a, **k: "other-data")
    new = _backbone(suite, work, data_root, lines)
    assert new != legacy and pretrainings == [new]
    assert any("training data changed" in line for line in lines)


def test_a_decoded_cache_is_rebuilt_when_its_source_files_or_versions_change(tmp_path, monkeypatch) -> None:
    import numpy as np

    from metafew.cache_keys import _release
    from metafew.data.base import cached_array

    monkeypatch.setenv("METAFEW_CACHE", str(tmp_path / "cache"))
    root = _tree(tmp_path / "data")
    builds: list[int] = []

    def build() -> np.ndarray:
        builds.append(1)
        return np.arange(len(builds) * 3, dtype=np.uint8)

    first = cached_array("toy", "k", build, sources=root)
    assert np.array_equal(cached_array("toy", "k", build, sources=root), first) and len(builds) == 1  # reused
    (root / "dog" / "0.png").write_bytes(b"a changed image")  # same name, other content and size
    cached_array("toy", "k", build, sources=root)
    assert len(builds) == 2
    monkeypatch.setattr("metafew.__version__", "9.9.9")  # another metafew decodes anew
    cached_array("toy", "k", build, sources=root)
    assert len(builds) == 3
    assert _release("2.14.1+cu130") == "2.14.1"
