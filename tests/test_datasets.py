"""Dataset loaders on the real data (Omniglot, Lake runs, MedMNIST, Caltech-101), user image
folders built in tmp_path, downloads from local file:// URLs, and the name registry."""

from __future__ import annotations

import glob
import hashlib
import io
import os
import shutil
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metafew.data import (
    DATASETS,
    Caltech101,
    DatasetSpec,
    EpisodeSampler,
    FewShotDataset,
    ImageFolder,
    MedMNIST,
    Normalize,
    Omniglot,
    available_datasets,
    dataset_info,
    download_and_extract,
    download_dataset,
    lake_runs,
    load_dataset,
    register_dataset,
)
from metafew.data import caltech101 as caltech_mod
from metafew.data import medmnist as medmnist_mod
from metafew.data import omniglot as omniglot_mod
from metafew.data.decode import IMAGE_EXTENSIONS, decode_drawing, is_image_file, load_image, probe_image
from metafew.data.download import check_md5_cached, dataset_not_found, md5sum
from metafew.data.normalize import channel_stats
from metafew.errors import ConfigError, DatasetError, DatasetNotFoundError, EpisodeError
from metafew.progress import progress

VINYALS = {"train": 4112, "val": 688, "test": 1692, "trainval": 4800}


def _character(class_name: str) -> str:
    return class_name.rpartition("/")[0]  # "Alphabet/characterNN/rotDDD" -> "Alphabet/characterNN"


# -- Omniglot ---------------------------------------------------------------------------


@pytest.mark.parametrize("subset", list(VINYALS))
def test_omniglot_vinyals_counts_without_decoding(data_root: Path, subset: str) -> None:
    ds = Omniglot(subset, root=data_root)
    assert ds.num_classes == VINYALS[subset]
    assert len(ds) == 20 * VINYALS[subset]
    assert ds.class_counts().tolist() == [20] * VINYALS[subset]
    assert not ds.is_loaded  # class names and labels come from the listing alone
    assert ds.channels == 1 and ds.image_size == (28, 28)
    assert all(name.rsplit("/", 1)[1] in {"rot000", "rot090", "rot180", "rot270"} for name in ds.classes)


def test_omniglot_vinyals_splits_disjoint(data_root: Path) -> None:
    splits = {s: Omniglot(s, root=data_root) for s in VINYALS}
    names = {s: set(d.classes) for s, d in splits.items()}
    chars = {s: {_character(c) for c in n} for s, n in names.items()}
    assert (len(chars["train"]), len(chars["val"]), len(chars["test"])) == (1028, 172, 423)
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not names[a] & names[b]
        assert not chars[a] & chars[b], f"{a} and {b} share characters"
    assert names["trainval"] == names["train"] | names["val"]


def test_omniglot_packaged_splits_match_the_shared_ones(data_root: Path) -> None:
    shared = data_root / "omniglot" / "splits" / "vinyals"
    if not shared.is_dir():
        pytest.skip("no shared copy of the split lists to compare with")
    for s in VINYALS:
        assert omniglot_mod.split_lines(s) == (shared / f"{s}.txt").read_text().split()


def test_omniglot_lake_subsets(data_root: Path) -> None:
    bg = Omniglot("background", split="lake", root=data_root)
    ev = Omniglot("evaluation", split="lake", root=data_root)
    assert (bg.num_classes, ev.num_classes) == (964, 659)
    assert bg.class_counts().tolist() == [20] * 964 and ev.class_counts().tolist() == [20] * 659
    alphabets = lambda d: {c.split("/")[0] for c in d.classes}  # noqa: E731
    assert (len(alphabets(bg)), len(alphabets(ev))) == (30, 20)
    assert not alphabets(bg) & alphabets(ev)


def test_omniglot_images_inverted_and_rotated(data_root: Path, omniglot_train) -> None:
    ds = omniglot_train
    x = ds.images
    assert x.shape == (82240, 1, 28, 28) and x.dtype == torch.uint8
    # strokes are 255 on a 0 background: most pixels are dark, the brightest are strokes
    assert x.float().mean() / 255 < 0.15 and int(x.max()) == 255 and (x == 0).float().mean() > 0.5
    c0 = ds.classes.index("Angelic/character01/rot000")
    base = x[ds.labels == c0]
    for k in (1, 2, 3):
        ck = ds.classes.index(f"Angelic/character01/rot{90 * k:03d}")
        assert torch.equal(x[ds.labels == ck], torch.rot90(base, k, dims=(2, 3)))
    # rot090 is counter-clockwise, like PIL's rotate(90) before resizing (Prototypical Networks)
    png = sorted(glob.glob(str(data_root / "omniglot" / "images_*" / "Angelic" / "character01" / "*.png")))[0]
    with Image.open(png) as im:
        g = im.convert("L")
    ref = 255 - np.asarray(g.rotate(90).resize((28, 28), Image.Resampling.LANCZOS), dtype=np.int64)
    rot = x[ds.labels == ds.classes.index("Angelic/character01/rot090")][0, 0].numpy().astype(np.int64)
    assert np.abs(rot - ref).mean() < 3  # same up to resampling rounding
    assert np.abs(np.rot90(rot, 2) - ref).mean() > 10  # the other direction is far off


def test_omniglot_mean_std_constants(data_root: Path, omniglot_train) -> None:
    _ = omniglot_train.images  # the full decode is cached by now
    full = omniglot_mod.omniglot_images(data_root)
    n_background = 19280
    mean, std = channel_stats(full[:n_background])
    assert mean[0] == pytest.approx(omniglot_mod.OMNIGLOT_MEAN[0], abs=1e-3)
    assert std[0] == pytest.approx(omniglot_mod.OMNIGLOT_STD[0], abs=1e-3)


def test_omniglot_warm_load_is_fast(data_root: Path, omniglot_train) -> None:
    _ = omniglot_train.images  # make sure the cache is warm
    start = time.perf_counter()
    ds = Omniglot("train", root=data_root)
    x = ds.images
    elapsed = time.perf_counter() - start
    assert x.shape[0] == 82240
    assert elapsed < 3.0, f"warm load of vinyals train took {elapsed:.2f}s"


def test_omniglot_bad_arguments(data_root: Path) -> None:
    with pytest.raises(DatasetError, match="background"):
        Omniglot("background", root=data_root)  # a lake subset under the vinyals split
    with pytest.raises(DatasetError, match="split"):
        Omniglot("train", split="nope", root=data_root)


def test_omniglot_missing_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as e:
        Omniglot("train", root=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "omniglot" / "images_background") in msg
    assert "download=True" in msg and "metafew data download omniglot" in msg and "METAFEW_DATA" in msg
    assert omniglot_mod.OMNIGLOT_URLS["images_background"] in msg


def test_omniglot_download_from_local_zips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """download=True fetches both zips (here from file:// URLs), checks md5s and extracts them."""
    src = tmp_path / "src"
    urls, md5s = {}, {}
    for s, alphabet in (("images_background", "Alpha"), ("images_evaluation", "Beta")):
        z = src / f"{s}.zip"
        z.parent.mkdir(exist_ok=True)
        with zipfile.ZipFile(z, "w") as zf:
            for c in (1, 2):
                for i in (1, 2, 3):
                    img = Image.new("1", (105, 105), 1)
                    img.paste(0, (10 * c, 10 * i, 10 * c + 30, 10 * i + 30))
                    buf = io.BytesIO()
                    img.save(buf, "PNG")
                    zf.writestr(f"{s}/{alphabet}/character{c:02d}/{c:04d}_{i:02d}.png", buf.getvalue())
        urls[s], md5s[s] = z.as_uri(), md5sum(z)
    monkeypatch.setattr(omniglot_mod, "OMNIGLOT_URLS", urls)
    monkeypatch.setattr(omniglot_mod, "OMNIGLOT_MD5", md5s)
    root = tmp_path / "data"
    ds = Omniglot("evaluation", split="lake", root=root, download=True)
    assert (root / "omniglot" / "images_background").is_dir()
    assert ds.classes == ["Beta/character01", "Beta/character02"] and len(ds) == 6
    x = ds.images
    assert x.shape == (6, 1, 28, 28) and int(x.max()) == 255  # the black square became bright strokes
    assert not [p for p in (root / "omniglot").iterdir() if p.name.startswith(".")]  # no temp files left


# -- Lake's one-shot runs -----------------------------------------------------------------


def test_lake_runs(data_root: Path) -> None:
    runs = lake_runs(root=data_root)
    assert len(runs) == 20
    first = runs[0]
    # run01/class_labels.txt: "run01/test/item01.png run01/training/class08.png"
    assert int(first.query_y[0]) == 7
    accuracy = []
    for ep in runs:
        assert (ep.n_way, ep.k_shot, ep.n_query) == (20, 1, 1)
        assert ep.support_x.shape == (20, 1, 28, 28) and ep.query_x.shape == (20, 1, 28, 28)
        assert torch.equal(ep.support_y, torch.arange(20)) and torch.equal(ep.classes, torch.arange(20))
        assert sorted(ep.query_y.tolist()) == list(range(20))  # each character queried once
        d = torch.cdist(ep.query_x.flatten(1), ep.support_x.flatten(1))
        accuracy.append(float((d.argmin(1) == ep.query_y).float().mean()))
    # Raw-pixel nearest neighbour scores ~22% (Lake et al.); misaligned answers would give ~5%.
    assert 0.12 < float(np.mean(accuracy)) < 0.4


def test_lake_runs_preprocessed_like_omniglot(data_root: Path) -> None:
    ep = lake_runs(root=data_root)[0]
    path = data_root / "omniglot" / "one-shot-classification" / "all_runs.zip"
    with zipfile.ZipFile(path) as z, Image.open(io.BytesIO(z.read("run01/test/item01.png"))) as im:
        g = im.convert("L").resize((28, 28), Image.Resampling.LANCZOS)
    expected = (255 - np.asarray(g, dtype=np.float32)) / 255
    got = ep.query_x[0, 0].numpy() * omniglot_mod.OMNIGLOT_STD[0] + omniglot_mod.OMNIGLOT_MEAN[0]
    assert np.abs(got - expected).max() < 1e-5


def test_lake_runs_missing(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "omniglot" / "one-shot-classification")):
        lake_runs(root=tmp_path)


# -- MedMNIST ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,sizes,labels",
    [
        ("pneumoniamnist", (4708, 524, 624), ["normal", "pneumonia"]),
        ("breastmnist", (546, 78, 156), ["malignant", "normal, benign"]),
    ],
)
def test_medmnist(data_root: Path, name: str, sizes: tuple[int, int, int], labels: list[str]) -> None:
    train = None
    for split, n in zip(("train", "val", "test"), sizes):
        ds = MedMNIST(name, split, root=data_root)
        assert len(ds) == n and ds.classes == labels
        assert ds.class_counts().min() > 0
        x = ds.images
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.uint8
        train = train if train is not None else ds
    mean, std = channel_stats(train.images.numpy())
    assert train.mean[0] == pytest.approx(mean[0], abs=1e-3) and train.std[0] == pytest.approx(std[0], abs=1e-3)


def test_medmnist_other_layout_and_errors(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="multi-label"):
        MedMNIST("chestmnist", root=data_root)
    with pytest.raises(DatasetError, match="unknown MedMNIST"):
        MedMNIST("cifarmnist", root=data_root)
    with pytest.raises(DatasetError, match="split"):
        MedMNIST("breastmnist", "training", root=data_root)
    with pytest.raises(DatasetNotFoundError) as e:
        MedMNIST("breastmnist", root=tmp_path)
    assert str(tmp_path / "medmnist" / "breastmnist.npz") in str(e.value)
    assert "zenodo.org" in str(e.value)
    shutil.copy(data_root / "medmnist" / "breastmnist.npz", tmp_path / "breastmnist.npz")  # <root>/<name>.npz
    assert len(MedMNIST("breastmnist", "val", root=tmp_path)) == 78


def test_medmnist_rgb_layout_stats_and_bad_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An RGB file (N x 28 x 28 x 3) becomes [N, 3, 28, 28]; stats come from its train split."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 40), ("val", 8), ("test", 8)):
        x = np.zeros((n, 28, 28, 3), np.uint8)
        x[..., 0] = 200  # red channel bright, green mid, blue dark
        x[..., 1] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_images"] = x
        arrays[f"{split}_labels"] = (np.arange(n) % 8).reshape(n, 1).astype(np.uint8)
    path = tmp_path / "medmnist" / "bloodmnist.npz"
    path.parent.mkdir()
    np.savez_compressed(path, **arrays)
    info = medmnist_mod.MEDMNIST_INFO["bloodmnist"]
    monkeypatch.setitem(medmnist_mod.MEDMNIST_INFO, "bloodmnist", info._replace(md5=md5sum(path)))
    ds = MedMNIST("bloodmnist", "val", root=tmp_path)
    assert ds.images.shape == (8, 3, 28, 28) and ds.num_classes == 8 and ds.classes[0] == "basophil"
    assert torch.all(ds.images[:, 0] == 200) and torch.all(ds.images[:, 2] == 0)
    assert ds.mean[0] == pytest.approx(200 / 255) and ds.std[0] == 1.0  # constant channel: std 1, not 0
    assert 0.4 < ds.mean[1] < 0.6
    arrays["test_labels"] = np.zeros((8, 3), np.uint8)  # multi-label rows
    np.savez_compressed(path, **arrays)
    monkeypatch.setitem(medmnist_mod.MEDMNIST_INFO, "bloodmnist", info._replace(md5=md5sum(path)))
    with pytest.raises(DatasetError, match="multi-label"):
        MedMNIST("bloodmnist", "test", root=tmp_path)
    monkeypatch.setitem(medmnist_mod.MEDMNIST_INFO, "bloodmnist", info)  # the real md5: this file fails it
    with pytest.raises(DatasetError, match=info.md5):
        MedMNIST("bloodmnist", "test", root=tmp_path)


def test_md5_checked_once_and_again_when_the_file_changes(tmp_path: Path) -> None:
    f = tmp_path / "blob.npz"
    f.write_bytes(b"x" * 1000)
    good = hashlib.md5(b"x" * 1000).hexdigest()
    check_md5_cached(f, good)
    markers = list((Path(os.environ["METAFEW_CACHE"]) / "checksums").glob("*.json"))
    assert markers
    f.write_bytes(b"y" * 1001)  # size changes: hashed again, and now it fails
    with pytest.raises(DatasetError) as e:
        check_md5_cached(f, good)
    assert "blob.npz" in str(e.value) and good in str(e.value)
    assert hashlib.md5(b"y" * 1001).hexdigest() in str(e.value)


# -- Caltech-101 ------------------------------------------------------------------------


def test_caltech101_classes_and_split(data_root: Path) -> None:
    folder = data_root / "caltech101" / "101_ObjectCategories"
    n_background = len(list((folder / "BACKGROUND_Google").glob("*.jpg")))
    total = sum(len(list(d.glob("*.jpg"))) for d in folder.iterdir() if d.is_dir())
    assert total == 9144
    all_ = Caltech101("all", root=data_root)
    assert all_.num_classes == 101 and "BACKGROUND_Google" not in all_.classes
    assert len(all_) == total - n_background
    subsets = {s: Caltech101(s, root=data_root) for s in ("train", "val", "test")}
    names = {s: set(d.classes) for s, d in subsets.items()}
    assert [len(names[s]) for s in ("train", "val", "test")] == [65, 15, 21]
    assert not names["train"] & names["val"] and not names["train"] & names["test"] and not names["val"] & names["test"]
    assert names["train"] | names["val"] | names["test"] == set(all_.classes)
    assert sum(len(d) for d in subsets.values()) == len(all_)
    assert set(Caltech101("test", root=data_root, seed=1).classes) != names["test"]  # the seed matters
    assert set(Caltech101("test", root=data_root, seed=0).classes) == names["test"]  # and is deterministic
    bg = Caltech101("all", root=data_root, include_background=True)
    assert bg.num_classes == 102 and len(bg) == total


def test_caltech101_images(data_root: Path) -> None:
    ds = Caltech101("val", root=data_root)
    x = ds.images
    assert x.shape == (len(ds), 3, 84, 84) and x.dtype == torch.uint8
    assert ds.mean == (0.485, 0.456, 0.406)
    # a grayscale JPEG comes out as RGB with three equal channels
    folder = data_root / "caltech101" / "101_ObjectCategories"
    for c in ds.classes:
        files = sorted((folder / c).glob("*.jpg"))
        gray = [i for i, f in enumerate(files) if _mode(f) == "L"]
        if gray:
            img = x[ds.labels == ds.classes.index(c)][gray[0]]
            assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
            break
    else:
        pytest.fail("expected a grayscale JPEG among the val classes")


def _mode(path: Path) -> str:
    with Image.open(path) as im:
        return im.mode


def test_caltech101_missing(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "caltech101" / "101_ObjectCategories")):
        Caltech101(root=tmp_path)


def test_caltech101_download_nested_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """download=True unpacks the official layout: caltech-101.zip > caltech-101/101_ObjectCategories.tar.gz."""
    src = tmp_path / "src" / "101_ObjectCategories"
    for c in [f"class{i:03d}" for i in range(101)] + ["BACKGROUND_Google"]:
        _save(src / c / "image_0001.jpg", _rgb(12, 16, seed=len(c)))
    inner = Path(shutil.make_archive(str(tmp_path / "pack" / "caltech-101" / "101_ObjectCategories"), "gztar",
                                     tmp_path / "src"))  # fmt: skip
    outer = Path(shutil.make_archive(str(tmp_path / "caltech-101"), "zip", tmp_path / "pack"))
    monkeypatch.setattr(caltech_mod, "CALTECH101_URL", outer.as_uri())
    monkeypatch.setattr(caltech_mod, "CALTECH101_MD5", md5sum(outer))
    monkeypatch.setattr(caltech_mod, "CALTECH101_INNER_MD5", md5sum(inner))
    ds = Caltech101("all", root=tmp_path / "data", download=True, image_size=8)
    assert ds.num_classes == 101 and ds.images.shape == (101, 3, 8, 8)
    assert (tmp_path / "data" / "caltech101" / "101_ObjectCategories" / "BACKGROUND_Google").is_dir()
    assert sorted(p.name for p in (tmp_path / "data" / "caltech101").iterdir()) == ["101_ObjectCategories"]


# -- ImageFolder ------------------------------------------------------------------------


def _save(path: Path, array: np.ndarray, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, fmt)
    return path


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _gray(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def test_image_folder_mixed_sizes_and_modes(tmp_path: Path) -> None:
    _save(tmp_path / "a" / "1.png", _gray(40, 50))
    _save(tmp_path / "a" / "2.jpg", _rgb(60, 30))
    _save(tmp_path / "b" / "3.bmp", _rgb(20, 20))
    _save(tmp_path / "b" / "4.gif", _gray(20, 20))
    _save(tmp_path / "b" / "5.webp", np.dstack([_rgb(30, 30), np.full((30, 30), 128, np.uint8)]))  # RGBA
    _save(tmp_path / "b" / "6.tiff", _gray(25, 25))
    ds = ImageFolder(tmp_path)
    assert ds.classes == ["a", "b"] and ds.labels.tolist() == [0, 0, 1, 1, 1, 1]
    assert ds.channels == 3 and ds.image_size == (84, 84)  # some RGB, mixed sizes
    assert ds.images.shape == (6, 3, 84, 84)
    gray_only = ImageFolder(tmp_path, image_size=32, channels=1)
    assert gray_only.images.shape == (6, 1, 32, 32)


def test_image_folder_keeps_a_common_size_and_grayscale(tmp_path: Path) -> None:
    for c in ("x", "y"):
        for i in range(3):
            _save(tmp_path / c / f"{i}.png", _gray(24, 32, seed=i))
    ds = ImageFolder(tmp_path)
    assert ds.channels == 1 and ds.image_size == (24, 32)
    assert torch.equal(ds.images[0, 0], torch.from_numpy(_gray(24, 32, seed=0)))  # no resizing


def test_image_folder_content_and_cache(tmp_path: Path) -> None:
    red = np.zeros((50, 70, 3), np.uint8)
    red[..., 0] = 255
    _save(tmp_path / "red" / "r.png", red)
    _save(tmp_path / "blue" / "b.png", red[..., ::-1].copy())
    ds = ImageFolder(tmp_path, image_size=16)
    x = ds.images.float()
    blue, redc = ds.classes.index("blue"), ds.classes.index("red")
    assert x[ds.labels == redc][0, 0].mean() == 255 and x[ds.labels == redc][0, 2].mean() == 0
    assert x[ds.labels == blue][0, 2].mean() == 255
    again = ImageFolder(tmp_path, image_size=16)
    assert not again.is_loaded and torch.equal(again.images, ds.images)  # warm: from the cache, lazily
    time.sleep(0.01)
    _save(tmp_path / "red" / "r.png", red[..., ::-1].copy())  # new content: re-decoded
    changed = ImageFolder(tmp_path, image_size=16)
    assert changed.images[changed.labels == redc][0, 2].float().mean() == 255


def test_image_folder_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "nope")):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        ImageFolder(tmp_path / "empty")
    flat = tmp_path / "flat"
    _save(flat / "1.png", _gray(8, 8))
    with pytest.warns(UserWarning, match="top level"), pytest.raises(DatasetError, match="no class folders"):
        ImageFolder(flat)


def test_image_folder_class_without_images(tmp_path: Path) -> None:
    _save(tmp_path / "cat" / "1.png", _gray(8, 8))
    (tmp_path / "dog").mkdir()
    with pytest.raises(DatasetError, match=str(tmp_path / "dog")):
        ImageFolder(tmp_path)
    with pytest.warns(UserWarning, match="dog"):
        ds = ImageFolder(tmp_path, on_error="skip")
    assert ds.classes == ["cat"]


def test_image_folder_stray_top_level_file_is_ignored(tmp_path: Path) -> None:
    _save(tmp_path / "cat" / "1.png", _gray(8, 8))
    (tmp_path / "labels.csv").write_text("a,b\n")
    with pytest.warns(UserWarning, match="labels.csv"):
        ds = ImageFolder(tmp_path)
    assert ds.classes == ["cat"] and len(ds) == 1


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "not-an-image"])
def test_image_folder_bad_file(tmp_path: Path, kind: str) -> None:
    for i in range(3):
        _save(tmp_path / "cat" / f"{i}.png", _gray(16, 16, seed=i))
        _save(tmp_path / "dog" / f"{i}.png", _gray(16, 16, seed=10 + i))
    if kind == "corrupt":
        bad = tmp_path / "dog" / "bad.jpg"
        bad.write_bytes(b"this is not a jpeg at all" * 10)
    elif kind == "truncated":
        bad = tmp_path / "dog" / "cut.png"
        _save(bad, _rgb(64, 64))
        bad.write_bytes(bad.read_bytes()[:200])
    else:
        bad = tmp_path / "dog" / "notes.txt"
        bad.write_text("shot on a sunny day")
    with pytest.raises(DatasetError, match=bad.name) as e:
        ImageFolder(tmp_path)
    assert str(bad) in str(e.value)
    with pytest.raises(DatasetError, match=bad.name):  # explicit size/channels take another code path
        ImageFolder(tmp_path, image_size=8, channels=1)
    with pytest.warns(UserWarning, match=bad.name):
        ds = ImageFolder(tmp_path, on_error="skip")
    assert len(ds) == 6 and ds.class_counts().tolist() == [3, 3]
    assert ds.images.shape == (6, 1, 16, 16)
    with pytest.warns(UserWarning, match=bad.name):  # warm load warns again
        ImageFolder(tmp_path, on_error="skip")


def test_image_folder_class_too_small_for_sampler(tmp_path: Path) -> None:
    for c in ("ant", "bee", "cow"):
        for i in range(5):
            _save(tmp_path / c / f"{i}.png", _gray(8, 8, seed=i))
    _save(tmp_path / "lonely_yak" / "0.png", _gray(8, 8))
    ds = ImageFolder(tmp_path)
    with pytest.raises(EpisodeError, match="lonely_yak"):
        EpisodeSampler(ds, n_way=3, k_shot=1, n_query=2, device="cpu")


# -- download helpers -------------------------------------------------------------------


def _tree(dest: Path) -> None:
    (dest / "pkg" / "sub").mkdir(parents=True)
    (dest / "pkg" / "a.txt").write_text("alpha")
    (dest / "pkg" / "sub" / "b.txt").write_text("beta")


@pytest.mark.parametrize("fmt", ["zip", "gztar"])
def test_download_and_extract(tmp_path: Path, fmt: str) -> None:
    _tree(tmp_path / "src")
    archive = Path(shutil.make_archive(str(tmp_path / "pkg"), fmt, tmp_path / "src"))
    dest = tmp_path / "dest"
    out = download_and_extract(archive.as_uri(), md5sum(archive), dest)
    assert out == [dest / "pkg"]
    assert (dest / "pkg" / "sub" / "b.txt").read_text() == "beta"
    assert sorted(p.name for p in dest.iterdir()) == ["pkg"]  # no archive or temp folder left


def test_download_checksum_mismatch(tmp_path: Path) -> None:
    _tree(tmp_path / "src")
    archive = Path(shutil.make_archive(str(tmp_path / "pkg"), "zip", tmp_path / "src"))
    dest = tmp_path / "dest"
    wrong = "0" * 32
    with pytest.raises(DatasetError) as e:
        download_and_extract(archive.as_uri(), wrong, dest)
    msg = str(e.value)
    assert "pkg.zip" in msg and wrong in msg and md5sum(archive) in msg
    assert not dest.exists()  # nothing half-written, and no empty folder left behind


def test_download_unreachable(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="could not download"):
        download_and_extract((tmp_path / "missing.zip").as_uri(), None, tmp_path / "dest")


def test_tar_refuses_paths_outside(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as t:
        data = b"x"
        info = tarfile.TarInfo("../escaped.txt")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    with pytest.raises((DatasetError, tarfile.TarError)):
        download_and_extract(evil.as_uri(), md5sum(evil), tmp_path / "dest")
    assert not (tmp_path / "escaped.txt").exists()


def test_not_found_message(tmp_path: Path) -> None:
    err = dataset_not_found("Thing", [tmp_path / "a", tmp_path / "b"], "thing", "https://example.org/thing.zip")
    msg = str(err)
    assert isinstance(err, DatasetNotFoundError) and isinstance(err, FileNotFoundError)
    for part in (str(tmp_path / "a"), str(tmp_path / "b"), "download=True", "metafew data download thing",
                 "METAFEW_DATA", "--data-root", "https://example.org/thing.zip"):  # fmt: skip
        assert part in msg
    assert "\n" not in msg


# -- registry ---------------------------------------------------------------------------


def test_registry_lists_what_the_modules_register() -> None:
    names = available_datasets()
    assert list(names) == sorted(names)
    expected_medmnist = set(medmnist_mod.MEDMNIST_INFO) - set(medmnist_mod.UNSUPPORTED)
    assert expected_medmnist <= set(names) and "chestmnist" not in names
    assert {"omniglot", "omniglot-lake", "caltech101", "folder:PATH"} <= set(names)
    for usage, spec in names.items():
        assert isinstance(spec, DatasetSpec) and spec.usage == usage and spec.name in DATASETS
        assert spec.default_subset in spec.subsets and callable(spec.load)
        assert spec.image_shape is None or len(spec.image_shape) == 3
    assert names["omniglot"].subsets == tuple(VINYALS)
    assert names["pneumoniamnist"].image_shape == (1, 28, 28) and names["pathmnist"].image_shape == (3, 28, 28)
    assert names["caltech101"].options == ("image_size", "include_background", "seed")


def test_registry_names_and_loading(data_root: Path, tmp_path: Path) -> None:
    assert load_dataset("omniglot", "val", root=data_root).num_classes == 688
    assert load_dataset("omniglot-lake", "evaluation", root=data_root).num_classes == 659
    assert load_dataset("OMNIGLOT", "val", root=data_root).num_classes == 688  # names are case-insensitive
    assert len(load_dataset("breastmnist", "test", root=data_root)) == 156
    assert load_dataset("caltech101", "test", root=data_root).num_classes == 21
    assert load_dataset("omniglot-lake", root=data_root).name == "omniglot/lake-background"  # default subset
    for c in ("p", "q"):
        _save(tmp_path / "imgs" / "train" / c / "0.png", _gray(8, 8))
    train = load_dataset(f"folder:{tmp_path / 'imgs'}", "train")
    assert train.classes == ["p", "q"] and train.name == f"folder:{tmp_path / 'imgs'}/train"
    assert load_dataset(f"folder:{tmp_path / 'imgs' / 'train'}").classes == ["p", "q"]
    assert load_dataset(f"folder:{tmp_path / 'imgs' / 'train'}", "all", image_size=4).images.shape == (2, 1, 4, 4)
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("imagenet", "train")
    with pytest.raises(DatasetError, match="subset"):
        load_dataset("omniglot", "background", root=data_root)
    with pytest.raises(DatasetError, match="option"):
        load_dataset("breastmnist", "train", root=data_root, image_size=64)
    with pytest.raises(DatasetError, match="option"):
        load_dataset(f"folder:{tmp_path / 'imgs'}", "train", seed=1)
    with pytest.raises(DatasetNotFoundError):
        load_dataset(f"folder:{tmp_path / 'imgs'}", "test")
    with pytest.raises(DatasetError, match="needs a path"):
        load_dataset("folder:")
    with pytest.raises(DatasetError, match="folder:PATH"):
        load_dataset("folder")  # the parametric spec needs its argument
    with pytest.raises(DatasetError, match="multi-label"):
        load_dataset("chestmnist", "train", root=data_root)  # known, unsupported: its reason, not "unknown"


def test_unknown_name_suggests_the_close_one() -> None:
    with pytest.raises(DatasetError, match="did you mean 'omniglot'") as e:
        load_dataset("omniglott", "train")
    assert "\n" not in str(e.value) and "available: " in str(e.value)
    with pytest.raises(DatasetError, match="did you mean 'pneumoniamnist'"):
        dataset_info("pneumoniamnst")
    with pytest.raises(DatasetError, match="did you mean 'folder:PATH'"):
        load_dataset("foldr:/somewhere")
    with pytest.raises(DatasetError, match="unknown dataset 'omniglot:train'"):
        load_dataset("omniglot:train")  # only a parametric spec takes name:ARG


def test_registering_a_duplicate_name_fails() -> None:
    spec = available_datasets()["omniglot"]
    assert register_dataset(spec) is spec  # the very same spec again is harmless
    clash = DatasetSpec("Omniglot", "another omniglot", ("train",), "train", "", None, load=spec.load)
    with pytest.raises(ConfigError, match="registered twice"):
        register_dataset(clash)
    assert available_datasets()["omniglot"] is spec
    with pytest.raises(ConfigError, match="DatasetSpec"):
        register_dataset("omniglot")  # type: ignore[arg-type]


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made in a test are dropped afterwards (the registry has no public removal)."""
    monkeypatch.setattr(DATASETS, "_entries", dict(DATASETS._entries))


def test_third_party_dataset_is_loadable_by_name(scratch_registry: None, tmp_path: Path) -> None:
    calls = []

    def load(subset: str, root, download: bool, *, width: int = 3) -> FewShotDataset:
        calls.append((subset, root, download, width))
        images = torch.full((4, 1, 2, width), 7, dtype=torch.uint8)
        return FewShotDataset(f"squares/{subset}", [0, 0, 1, 1], ["a", "b"], images, channels=1, image_size=(2, width))

    def info(root) -> dict:
        return {"path": str(tmp_path), "looked_in": [str(tmp_path)], "subsets": {"train": {"classes": 2, "images": 4}}}

    register_dataset(
        DatasetSpec(
            "squares",
            "tiny squares",
            ("train", "test"),
            "train",
            "https://example.org/squares",
            (1, 2, 3),
            load=load,
            info=info,
            options=("width",),
        )
    )
    assert "squares" in available_datasets() and available_datasets()["squares"].description == "tiny squares"
    ds = load_dataset("squares", "test", root=tmp_path, width=5)
    assert ds.name == "squares/test" and ds.images.shape == (4, 1, 2, 5)
    assert calls == [("test", tmp_path, False, 5)]
    assert load_dataset("squares").name == "squares/train"
    with pytest.raises(DatasetError, match="option"):
        load_dataset("squares", height=2)
    with pytest.raises(DatasetError, match="subset"):
        load_dataset("squares", "val")
    facts = dataset_info("squares", root=tmp_path)
    assert facts["found"] and facts["subsets"]["train"] == {"classes": 2, "images": 4}
    assert facts["url"] == "https://example.org/squares" and facts["image_shape"] == (1, 2, 3)
    with pytest.raises(DatasetError, match="cannot be downloaded"):
        download_dataset("squares")


def test_third_party_dataset_is_gone_afterwards() -> None:
    assert "squares" not in available_datasets()


def test_dataset_info_never_raises_for_a_missing_dataset(tmp_path: Path) -> None:
    for usage in available_datasets():
        name = usage.replace("PATH", str(tmp_path / "nope"))
        info = dataset_info(name, root=tmp_path)
        assert info["found"] is False and info["message"] and info["path"] is None, name


def test_download_dataset_keeps_what_is_there(data_root: Path) -> None:
    paths = download_dataset("omniglot", root=data_root)  # all present: no network needed
    assert paths == [data_root / "omniglot", data_root / "omniglot" / "one-shot-classification" / "all_runs.zip"]
    assert download_dataset("breastmnist", root=data_root) == [data_root / "medmnist" / "breastmnist.npz"]
    with pytest.raises(DatasetError, match="multi-label"):
        download_dataset("chestmnist", root=data_root)


def test_dataset_info(data_root: Path, tmp_path: Path) -> None:
    start = time.perf_counter()
    info = dataset_info("omniglot", root=data_root)
    assert info["found"] and Path(info["path"]) == data_root / "omniglot"
    assert {s: v["classes"] for s, v in info["subsets"].items()} == VINYALS
    assert info["subsets"]["train"]["images"] == 82240 and info["image_shape"] == (1, 28, 28)
    med = dataset_info("pneumoniamnist", root=data_root)
    assert [med["subsets"][s]["images"] for s in ("train", "val", "test")] == [4708, 524, 624]
    cal = dataset_info("caltech101", root=data_root)
    assert cal["subsets"]["all"] == {"classes": 101, "images": 8677}
    assert time.perf_counter() - start < 2.0  # nothing is decoded
    missing = dataset_info("caltech101", root=tmp_path)
    assert not missing["found"] and str(tmp_path / "caltech101" / "101_ObjectCategories") in missing["message"]


def test_folder_info_counts_by_name(tmp_path: Path) -> None:
    for c, n in (("cat", 2), ("dog", 3)):
        for i in range(n):
            _save(tmp_path / c / f"{i}.png", _gray(8, 8))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    info = dataset_info(f"folder:{tmp_path}")
    assert info["found"] and info["path"] == str(tmp_path.absolute()) and info["name"] == f"folder:{tmp_path}"
    assert info["subsets"] == {"all": {"classes": 2, "images": 5}} and "data_root" not in info
    with pytest.raises(DatasetError, match="nothing to download"):
        download_dataset(f"folder:{tmp_path}")


# -- decoding, normalisation, progress --------------------------------------------------------


def test_decode_primitives(data_root: Path, tmp_path: Path) -> None:
    assert is_image_file("a/B.JPEG") and is_image_file(Path("x.webp")) and not is_image_file("notes.txt")
    assert ".png" in IMAGE_EXTENSIONS
    png = sorted(glob.glob(str(data_root / "omniglot" / "images_*" / "Angelic" / "character01" / "*.png")))[0]
    by_path = decode_drawing(png, 28)
    assert by_path.shape == (28, 28) and by_path.dtype == np.uint8
    assert np.array_equal(by_path, decode_drawing(Path(png).read_bytes(), 28))  # bytes, as Lake's zip gives them
    assert np.array_equal(by_path, decode_drawing(io.BytesIO(Path(png).read_bytes()), 28))
    rgb = _save(tmp_path / "x.png", _rgb(30, 60))
    assert load_image(rgb, None, 3).shape == (3, 30, 60)
    assert load_image(rgb, (10, 10), 1).shape == (1, 10, 10)
    assert probe_image(rgb) == (3, 60, 30)
    (tmp_path / "bad.png").write_bytes(b"nope")
    assert probe_image(tmp_path / "bad.png") is None


def test_image_folder_reads_palette_pngs(tmp_path: Path) -> None:
    """Palette PNGs are probed (channels from the palette) and verified without tripping PIL's verify()."""
    for c, image in (("gray", _gray), ("color", _rgb)):
        for i in range(2):
            (tmp_path / "mixed" / c).mkdir(parents=True, exist_ok=True)
            pal = Image.fromarray(image(12, 12, seed=i)).convert("P", palette=Image.Palette.ADAPTIVE)
            pal.save(tmp_path / "mixed" / c / f"{i}.png")
            if c == "gray":
                (tmp_path / "grays" / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(image(12, 12, seed=i)).convert("P").save(tmp_path / "grays" / c / f"{i}.png")
    ds = ImageFolder(tmp_path / "mixed")
    assert ds.channels == 3 and ds.images.shape == (4, 3, 12, 12)
    assert ImageFolder(tmp_path / "grays").channels == 1  # a palette of grays is grayscale


def test_normalize_is_the_reference_formula() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (5, 3, 7, 9), dtype=torch.uint8, generator=g)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    norm = Normalize(mean, std)
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.equal(norm(x), ref)
    assert torch.equal(norm(x[0]), ref[0])  # [C, H, W] as well as [M, C, H, W]
    unit = x.float() / 255
    before = unit.clone()
    assert torch.equal(norm(unit), ref) and torch.equal(unit, before)  # float input is [0, 1] and left alone
    out = torch.empty(5, 3, 7, 9)
    assert norm.into_(out, x) is out and torch.allclose(out, ref, atol=1e-6)
    assert torch.equal(Normalize.identity(3)(x), x.float() / 255)
    with pytest.raises(DatasetError, match="one mean and one std"):
        Normalize((0.5, 0.5), (0.5,))
    ds = FewShotDataset("n", [0] * 5, ["a"], x, channels=3, image_size=(7, 9), mean=mean, std=std)
    assert torch.equal(ds[2][0], ref[2])


def test_a_disabled_progress_bar_is_silent_but_counts(capsys) -> None:
    assert list(progress(range(3), desc="quiet", enable=False)) == [0, 1, 2]
    with progress(total=10, desc="manual", enable=False, unit="img") as bar:
        bar.update(4)  # a disabled bar still takes updates
        assert bar.n == 4
    assert capsys.readouterr() == ("", "")
