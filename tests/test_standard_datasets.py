"""The standard few-shot benchmarks (mini-ImageNet, tieredImageNet, CIFAR-FS, FC100, CUB-200-2011)
on small fakes written in tmp_path in each one's exact distributed layout, with the real class
names of the packaged splits (so the split logic runs) but a few tiny images per class."""

from __future__ import annotations

import csv
import io
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli
from PIL import Image

import metafew.data.base as base
import metafew.data.decode as decode
from metafew.bench.suite import load_suite
from metafew.data import EpisodeSampler, dataset_info, download_dataset, load_dataset
from metafew.data import cifar100 as cifar_mod
from metafew.data import cub as cub_mod
from metafew.data.cub import chen_split
from metafew.data.download import md5sum
from metafew.data.packaged import split_classes, split_fields
from metafew.errors import DatasetError, DatasetNotFoundError

SUBSETS = ("train", "val", "test")
NAMES = ("mini-imagenet", "tiered-imagenet", "cifar-fs", "fc100", "cub")
SIZES = {
    "mini-imagenet": {"train": 64, "val": 16, "test": 20},
    "tiered-imagenet": {"train": 351, "val": 97, "test": 160},
    "cifar-fs": {"train": 64, "val": 16, "test": 20},
    "fc100": {"train": 60, "val": 20, "test": 20},
    "cub": {"train": 100, "val": 50, "test": 50},
}

# CIFAR-100's 20 superclasses and their fine classes (https://www.cs.toronto.edu/~kriz/cifar.html).
CIFAR100 = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh decode cache per test, and decoding in this process (the fakes are tiny)."""
    monkeypatch.setenv("METAFEW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("METAFEW_DECODE_WORKERS", "1")
    return tmp_path / "cache"


def _color(i: int) -> tuple[int, int, int]:
    """A distinct RGB colour per class index, so a test can tell which class an image came from."""
    return (i * 37 % 256, i * 91 % 256, (i * 53 + 100) % 256)


def _all_classes(dataset: str) -> list[str]:
    return [c for s in SUBSETS for c in split_classes(dataset, s)]


def _check_subsets(name: str, root: Path, per_class: int, shape: tuple[int, int, int], **options) -> dict:
    """Load every subset through the public API; check sizes, disjointness, dtype, shape and an episode."""
    loaded = {s: load_dataset(name, s, root=root, **options) for s in SUBSETS}
    for s, ds in loaded.items():
        assert ds.num_classes == SIZES[name][s], (s, ds.num_classes)
        assert ds.class_counts().tolist() == [per_class] * ds.num_classes
        assert ds.images.dtype == torch.uint8 and tuple(ds.images.shape) == (len(ds), *shape)
    train, val, test = (set(loaded[s].classes) for s in SUBSETS)
    assert not (train & val or train & test or val & test)
    episode = EpisodeSampler(loaded["test"], n_way=5, k_shot=1, n_query=1, device="cpu", seed=0).sample()
    assert tuple(episode.support_x.shape) == (5, *shape) and tuple(episode.query_x.shape) == (5, *shape)
    assert episode.support_x.dtype == torch.float32
    return loaded


def _assert_colors(ds, colors: dict[str, tuple[int, int, int]], tol: int = 0) -> None:
    """Every image's centre pixel is its class's colour: labels and images are in step."""
    h, w = ds.image_size
    centre = ds.images[:, :, h // 2, w // 2].to(torch.int64)
    expected = torch.tensor([colors[ds.classes[int(y)]] for y in ds.labels], dtype=torch.int64)
    assert int((centre - expected).abs().max()) <= tol


# -- mini-ImageNet ----------------------------------------------------------------------------


def make_mini_csv(root: Path, per_class: int = 2) -> dict[str, tuple[int, int, int]]:
    """Ravi & Larochelle's layout: {train,val,test}.csv (filename,label) + images/<file>.jpg."""
    folder = root / "mini-imagenet"
    (folder / "images").mkdir(parents=True)
    colors = {c: _color(i) for i, c in enumerate(_all_classes("mini-imagenet"))}
    for s in SUBSETS:
        with open(folder / f"{s}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filename", "label"])
            for c in split_classes("mini-imagenet", s):
                for k in range(per_class):
                    name = f"{c}{k + 1:08d}.jpg"
                    Image.new("RGB", (12, 10), colors[c]).save(folder / "images" / name, quality=95)
                    w.writerow([name, c])
    return colors


def make_mini_pickles(root: Path, per_class: int = 2) -> dict[str, int]:
    """Ren et al.'s cache: mini-imagenet-cache-{split}.pkl with image_data N x 84 x 84 x 3 and class_dict."""
    folder = root / "mini-imagenet"
    folder.mkdir(parents=True)
    values = {}
    for s in SUBSETS:
        classes = split_classes("mini-imagenet", s)
        n = len(classes) * per_class
        data = np.zeros((n, 84, 84, 3), dtype=np.uint8)
        class_dict = {}
        for i, c in enumerate(classes):
            idx = list(range(i, n, len(classes)))  # interleaved: the pickle is not grouped by class
            class_dict[c] = idx
            values[c] = len(values) + 1
            data[idx] = values[c]
        with open(folder / f"mini-imagenet-cache-{s}.pkl", "wb") as f:
            pickle.dump({"image_data": data, "class_dict": class_dict}, f, protocol=2)
    return values


def test_mini_imagenet_csv_layout(tmp_path: Path, _own_cache: Path) -> None:
    colors = make_mini_csv(tmp_path)
    loaded = _check_subsets("mini-imagenet", tmp_path, 2, (3, 84, 84))
    assert loaded["val"].classes == split_classes("mini-imagenet", "val")
    assert loaded["val"].classes[0] == "n01855672"  # Ravi's first validation class
    _assert_colors(loaded["train"], colors, tol=6)  # JPEG
    assert list((_own_cache / "decoded").glob("mini-imagenet-train-84-*.npy"))  # decoded once, cached
    small = load_dataset("mini-imagenet", "test", root=tmp_path, image_size=32)
    assert tuple(small.images.shape[1:]) == (3, 32, 32)


def test_mini_imagenet_images_folder_without_csvs(tmp_path: Path) -> None:
    """images/<wnid>/<file> alone (as some mirrors ship it): the packaged split assigns the classes."""
    folder = tmp_path / "mini-imagenet" / "images"
    for i, c in enumerate(_all_classes("mini-imagenet")):
        (folder / c).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (9, 9), _color(i)).save(folder / c / f"{c}_{k}.jpg")
    _check_subsets("mini-imagenet", tmp_path, 2, (3, 84, 84))


def test_mini_imagenet_pickle_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    values = make_mini_pickles(tmp_path)
    code, out, _ = run_cli(capsys, "data", "info", "mini-imagenet", "--data-root", tmp_path)
    assert code == 0 and "layout: pickle" in out and "? (counted on first load)" in out
    loaded = _check_subsets("mini-imagenet", tmp_path, 2, (3, 84, 84))
    for ds in loaded.values():  # image i shows the value of its class: labels follow class_dict
        expected = torch.tensor([values[ds.classes[int(y)]] for y in ds.labels], dtype=torch.uint8)
        assert torch.equal(ds.images[:, 0, 0, 0], expected)
    again = load_dataset("mini-imagenet", "val", root=tmp_path)  # labels from the index cache
    assert torch.equal(again.labels, loaded["val"].labels) and torch.equal(again.images, loaded["val"].images)


def test_mini_imagenet_other_split_refused(tmp_path: Path) -> None:
    make_mini_csv(tmp_path, per_class=1)
    with open(tmp_path / "mini-imagenet" / "val.csv", "a", newline="") as f:
        f.write("n01440764000001.jpg,n01440764\n")  # tench: not a Ravi validation class
    with pytest.raises(DatasetError, match=r"val\.csv: class 'n01440764' is not in the Ravi & Larochelle val split"):
        load_dataset("mini-imagenet", "val", root=tmp_path)


def test_mini_imagenet_corrupt_image_names_the_file(tmp_path: Path) -> None:
    make_mini_csv(tmp_path, per_class=1)
    bad = tmp_path / "mini-imagenet" / "images" / f"{split_classes('mini-imagenet', 'test')[0]}00000001.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=rf"{bad.name}: could not be decoded"):
        load_dataset("mini-imagenet", "test", root=tmp_path).images  # noqa: B018


# -- tieredImageNet ---------------------------------------------------------------------------


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (84, 84), color).save(buf, format="PNG")
    return buf.getvalue()


def make_tiered(root: Path, per_class: int = 2) -> dict[str, tuple[int, int, int]]:
    """Ren et al.'s release: {split}_labels.pkl + {split}_images_png.pkl; train as the decompressed
    {split}_images.npz instead (OpenCV's BGR order), as many code bases keep it."""
    folder = root / "tiered-imagenet"
    folder.mkdir(parents=True)
    colors = {}
    for s in SUBSETS:
        table = [f for f in split_fields("tiered-imagenet", s)]
        names = [c for c, _ in table][::-1]  # label order differs from the split file's
        generals = sorted({g for _, g in table})
        specific = np.tile(np.arange(len(names)), per_class)
        general = np.asarray([generals.index(dict(table)[names[i]]) for i in specific])
        for c in names:
            colors[c] = _color(len(colors))
        labels = {
            "label_specific": specific,
            "label_general": general,
            "label_specific_str": names,
            "label_general_str": generals,
        }
        with open(folder / f"{s}_labels.pkl", "wb") as f:
            pickle.dump(labels, f, protocol=2)
        if s == "train":
            rgb = np.stack([np.full((84, 84, 3), colors[names[i]], dtype=np.uint8) for i in specific])
            np.savez(folder / f"{s}_images.npz", images=rgb[..., ::-1])
        else:
            with open(folder / f"{s}_images_png.pkl", "wb") as f:
                pickle.dump([np.frombuffer(_png(colors[names[i]]), np.uint8) for i in specific], f, protocol=2)
    return colors


def test_tiered_imagenet_png_and_npz_layouts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    colors = make_tiered(tmp_path)
    loaded = _check_subsets("tiered-imagenet", tmp_path, 2, (3, 84, 84))
    for ds in loaded.values():  # PNG (val/test) and BGR npz (train) both come out RGB, in class order
        _assert_colors(ds, colors)
        assert ds.classes == [f[0] for f in split_fields("tiered-imagenet", ds.name.split("/")[1])]
    info = dataset_info("tiered-imagenet", tmp_path)
    assert [info["subsets"][s]["super_categories"] for s in SUBSETS] == [20, 6, 8]
    assert info["files"]["train"].startswith("train_images.npz")
    code, out, _ = run_cli(capsys, "data", "info", "tiered-imagenet", "--data-root", tmp_path)
    assert code == 0 and "val: 97 classes, 194 images" in out and "_images_png.pkl" in out
    assert "memory: the first load of a subset from its PNG pickle (val, test) reads the pickle whole" in out


def test_tiered_imagenet_missing_subset_and_bad_png(tmp_path: Path) -> None:
    make_tiered(tmp_path, per_class=1)
    folder = tmp_path / "tiered-imagenet"
    (folder / "test_images_png.pkl").unlink()
    with pytest.raises(DatasetNotFoundError, match="tieredImageNet test"):
        load_dataset("tiered-imagenet", "test", root=tmp_path)
    with open(folder / "val_images_png.pkl", "rb") as f:
        pngs = pickle.load(f)
    pngs[3] = b"\x89PNG broken"
    with open(folder / "val_images_png.pkl", "wb") as f:
        pickle.dump(pngs, f)
    with pytest.raises(DatasetError, match=r"val_images_png\.pkl: image 3 could not be decoded"):
        load_dataset("tiered-imagenet", "val", root=tmp_path).images  # noqa: B018


def test_unsafe_pickle_is_refused(tmp_path: Path) -> None:
    make_tiered(tmp_path, per_class=1)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "tiered-imagenet" / "val_labels.pkl", "wb") as f:
        pickle.dump({"label_specific": Evil()}, f)
    with pytest.raises(DatasetError, match=r"refusing to load global builtins\.print"):
        load_dataset("tiered-imagenet", "val", root=tmp_path)


# -- CIFAR-FS and FC100 -------------------------------------------------------------------------


def make_cifar100(folder: Path, per_class_train: int = 3, per_class_test: int = 1) -> list[str]:
    """The python version of CIFAR-100 (Python 2 pickles: bytes keys), images coloured by fine class."""
    fine_names = sorted(f for fs in CIFAR100.values() for f in fs)
    coarse_names = sorted(CIFAR100)
    coarse_of = {f: coarse_names.index(c) for c, fs in CIFAR100.items() for f in fs}
    folder.mkdir(parents=True)
    for name, per in (("train", per_class_train), ("test", per_class_test)):
        fine = [i for _ in range(per) for i in range(100)]
        hwc = np.stack([np.full((32, 32, 3), _color(i), dtype=np.uint8) for i in fine])
        data = hwc.transpose(0, 3, 1, 2).reshape(len(fine), -1)  # CIFAR's rows: 1024 R, 1024 G, 1024 B
        d = {b"data": data, b"fine_labels": fine, b"coarse_labels": [coarse_of[fine_names[i]] for i in fine],
             b"filenames": [f"{i}.png".encode() for i in range(len(fine))]}  # fmt: skip
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        meta = {b"fine_label_names": [n.encode() for n in fine_names], b"coarse_label_names": coarse_names}
        pickle.dump(meta, f, protocol=2)
    return fine_names


def make_cifar_archive(where: Path) -> Path:
    src = where / "src"
    make_cifar100(src / "cifar-100-python")
    archive = where / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(src / "cifar-100-python", arcname="cifar-100-python")
    return archive


def test_cifar_fs_and_fc100_from_the_official_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = make_cifar_archive(tmp_path / "build")
    (tmp_path / "root" / "cifar100").mkdir(parents=True)
    archive.rename(tmp_path / "root" / "cifar100" / archive.name)
    monkeypatch.setattr(cifar_mod, "CIFAR100_MD5", md5sum(tmp_path / "root" / "cifar100" / archive.name))
    fine_names = sorted(f for fs in CIFAR100.values() for f in fs)
    colors = {n: _color(i) for i, n in enumerate(fine_names)}
    fs = _check_subsets("cifar-fs", tmp_path / "root", 4, (3, 32, 32))  # extracted next to the archive
    assert (tmp_path / "root" / "cifar100" / "cifar-100-python" / "meta").is_file()
    assert fs["test"].classes == split_classes("cifar-fs", "test") and fs["test"].mean[0] == pytest.approx(0.5071)
    _assert_colors(fs["train"], colors)
    fc = _check_subsets("fc100", tmp_path / "root", 4, (3, 32, 32))
    for s in SUBSETS:  # FC100 subsets are whole superclasses
        supers = split_classes("fc100", s)
        assert set(fc[s].classes) == {f for c in supers for f in CIFAR100[c]}
    _assert_colors(fc["val"], colors)
    assert tuple(load_dataset("cifar-fs", "val", root=tmp_path / "root", image_size=84).images.shape[1:]) == (3, 84, 84)


def test_cifar_download_checks_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = make_cifar_archive(tmp_path / "server")
    monkeypatch.setattr(cifar_mod, "CIFAR100_URL", archive.as_uri())
    monkeypatch.setattr(cifar_mod, "CIFAR100_MD5", "0" * 32)
    with pytest.raises(DatasetError, match=r"checksum mismatch for cifar-100-python\.tar\.gz"):
        load_dataset("cifar-fs", "train", root=tmp_path / "root", download=True)
    assert not (tmp_path / "root" / "cifar100" / "cifar-100-python.tar.gz").exists()  # nothing half-written
    monkeypatch.setattr(cifar_mod, "CIFAR100_MD5", md5sum(archive))
    ds = load_dataset("fc100", "test", root=tmp_path / "root", download=True)
    assert ds.num_classes == 20 and (tmp_path / "root" / "cifar100" / "cifar-100-python" / "train").is_file()


# -- CUB-200-2011 -------------------------------------------------------------------------------


def make_cub(parent: Path, per_class: int = 2) -> dict[str, tuple[int, int, int]]:
    """The official archive's tree: CUB_200_2011/{classes.txt, images.txt, images/NNN.Name/*.jpg}."""
    folder = parent / "CUB_200_2011"
    classes = sorted(_all_classes("cub"))
    colors = {c: _color(i) for i, c in enumerate(classes)}
    lines = []
    for c in classes:
        (folder / "images" / c).mkdir(parents=True)
        for k in range(per_class):
            rel = f"{c}/{c.split('.', 1)[1]}_{k:04d}.jpg"
            size = (14, 10) if k % 2 else (10, 14)
            Image.new("L" if c == classes[0] else "RGB", size, colors[c][0] if c == classes[0] else colors[c]).save(
                folder / "images" / rel, quality=95
            )
            lines.append(rel)
    (folder / "classes.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(classes, 1)))
    (folder / "images.txt").write_text("".join(f"{i} {r}\n" for i, r in enumerate(lines, 1)))
    return colors


def test_cub_chen_split(tmp_path: Path, _own_cache: Path) -> None:
    colors = make_cub(tmp_path / "cub")
    loaded = _check_subsets("cub", tmp_path, 2, (3, 84, 84))
    assert chen_split(_all_classes("cub")) == {s: split_classes("cub", s) for s in SUBSETS}  # the rule = the files
    assert loaded["train"].classes[:2] == ["001.Black_footed_Albatross", "003.Sooty_Albatross"]
    assert loaded["val"].classes[0] == "002.Laysan_Albatross" and loaded["test"].classes[0] == "004.Groove_billed_Ani"
    gray = loaded["train"].images[:2]  # class 001 is grayscale: converted to 3 equal channels
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    colors["001.Black_footed_Albatross"] = (colors["001.Black_footed_Albatross"][0],) * 3  # type: ignore[assignment]
    _assert_colors(loaded["val"], colors, tol=6)
    assert list((_own_cache / "decoded").glob("cub-val-84-*.npy"))


def test_cub_download_and_corrupt_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cub(tmp_path / "server", per_class=1)
    archive = tmp_path / "server" / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(tmp_path / "server" / "CUB_200_2011", arcname="CUB_200_2011")
    monkeypatch.setattr(cub_mod, "CUB_URL", archive.as_uri())
    monkeypatch.setattr(cub_mod, "CUB_MD5", md5sum(archive))
    (found,) = download_dataset("cub", tmp_path / "root")
    assert found == tmp_path / "root" / "cub" / "CUB_200_2011"
    bad = next((found / "images" / "004.Groove_billed_Ani").iterdir())
    bad.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DatasetError, match=rf"{bad.name}: could not be decoded"):
        load_dataset("cub", "test", root=tmp_path / "root").images  # noqa: B018


# -- memory-mapped copies that persist ----------------------------------------------------------

MAKE = {
    "mini-imagenet": make_mini_csv,
    "mini-imagenet-pickles": make_mini_pickles,
    "tiered-imagenet": make_tiered,
    "cifar-fs": lambda root: make_cifar100(root / "cifar-100-python"),
    "fc100": lambda root: make_cifar100(root / "cifar-100-python"),
    "cub": lambda root: make_cub(root / "cub"),
}


@pytest.mark.parametrize(
    "layout, subset",
    [("mini-imagenet", "train"), ("mini-imagenet-pickles", "val"), ("tiered-imagenet", "train"),
     ("tiered-imagenet", "val"), ("cifar-fs", "test"), ("fc100", "train"), ("cub", "val")],
    ids=["mini-csv", "mini-pickle", "tiered-npz", "tiered-png", "cifar-fs", "fc100", "cub"],
)  # fmt: skip
def test_a_mapped_copy_is_kept_and_reused(
    layout: str, subset: str, tmp_path: Path, _own_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoded into a map a few images at a time, the same bits as the in-memory decode; a second load
    (a later process) maps the same file, never rewriting it."""
    name = layout.removesuffix("-pickles")
    made = MAKE[layout](tmp_path)
    monkeypatch.setattr(decode, "CHUNK_BYTES", 5 * 3 * 84 * 84)  # blocks of 5 images: many per subset
    monkeypatch.setattr(decode, "FILE_CHUNK", 3)
    writes: list[Path] = []
    real_fill = base._fill_npy
    monkeypatch.setattr(base, "_fill_npy", lambda path, array: writes.append(path) or real_fill(path, array))
    first = load_dataset(name, subset, root=tmp_path, storage="mmap")
    images = first.images
    path = first.mapped_path
    assert first.is_mapped and path is not None and path.is_file() and path.is_relative_to(_own_cache)
    before, n_writes = path.stat(), len(writes)
    assert n_writes >= 1
    if name == "tiered-imagenet":  # the npz read 5 rows at a time, BGR to RGB; the PNGs decoded 3 per task
        _assert_colors(first, made)  # type: ignore[arg-type]
    second = load_dataset(name, subset, root=tmp_path, storage="mmap")
    assert torch.equal(second.images, images) and second.mapped_path == path
    assert len(writes) == n_writes  # mapped, not written again
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    monkeypatch.setenv("METAFEW_CACHE", str(tmp_path / "another-cache"))  # decoded afresh, into memory
    memory = load_dataset(name, subset, root=tmp_path, storage="memory")
    assert not memory.is_mapped and torch.equal(memory.images, images)


def test_another_process_maps_the_same_copy(tmp_path: Path, _own_cache: Path) -> None:
    make_cifar100(tmp_path / "cifar-100-python")
    first = load_dataset("fc100", "val", root=tmp_path, storage="mmap")
    first.images  # noqa: B018 - writes the map
    assert first.mapped_path is not None and first.mapped_path.parent.name == "mapped"
    mtime = first.mapped_path.stat().st_mtime_ns
    code = (
        "import sys, metafew.data.base as base\n"
        "from metafew.data import load_dataset\n"
        "base._fill_npy = lambda *a: sys.exit('rewrote the map')\n"
        f"ds = load_dataset('fc100', 'val', root={str(tmp_path)!r}, storage='mmap')\n"
        "total = int(ds.images.sum())\n"
        "print(ds.mapped_path, total)\n"
    )
    env = {**os.environ, "METAFEW_CACHE": str(_own_cache)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(first.mapped_path), str(int(first.images.sum()))]
    assert first.mapped_path.stat().st_mtime_ns == mtime


def test_a_bad_image_leaves_no_map_behind(tmp_path: Path, _own_cache: Path) -> None:
    make_mini_csv(tmp_path, per_class=1)
    bad = tmp_path / "mini-imagenet" / "images" / f"{split_classes('mini-imagenet', 'test')[0]}00000001.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=rf"{bad.name}: could not be decoded"):
        load_dataset("mini-imagenet", "test", root=tmp_path, storage="mmap").images  # noqa: B018
    left = [p.name for p in _own_cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert left == []  # the decode ran to the end, then nothing was kept


# -- absent data, `metafew data info`, suites ----------------------------------------------------

LAYOUT_WORDS = {
    "mini-imagenet": "train,val,test}.csv",
    "tiered-imagenet": "_labels.pkl",
    "cifar-fs": "cifar-100-python",
    "fc100": "cifar-100-python",
    "cub": "CUB_200_2011/images",
}


@pytest.mark.parametrize("name", NAMES)
def test_absent_dataset_names_the_layout(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset(name, "train", root=empty)
    assert LAYOUT_WORDS[name] in str(e.value) and str(empty) in str(e.value) and "\n" not in str(e.value)
    can_download = name in ("cifar-fs", "fc100", "cub")
    assert (f"metafew data download {name}" in str(e.value)) == can_download
    code, out, err = run_cli(capsys, "data", "info", name, "--data-root", empty)
    assert "found: False" in out and "data_root: " + str(empty) in out
    assert_one_line_error(code, err, "not found", LAYOUT_WORDS[name])


def test_data_info_says_what_is_where(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_cifar100(tmp_path / "cifar-100-python")  # torchvision's layout: <root>/cifar-100-python
    make_cub(tmp_path)  # <root>/CUB_200_2011
    code, out, _ = run_cli(capsys, "data", "info", "fc100", "--data-root", tmp_path)
    assert code == 0
    assert f"path: {tmp_path / 'cifar-100-python'}" in out and "layout: cifar-100-python/" in out
    assert "train: 60 classes, 240 images" in out and "size_mb:" in out
    code, out, _ = run_cli(capsys, "data", "info", "cub", "--data-root", tmp_path)
    assert code == 0 and "test: 50 classes, 100 images" in out and "found: True" in out


@pytest.mark.parametrize("suite", ["mini-imagenet", "tiered-imagenet", "cifar-fs", "fc100", "cub"])
def test_suites_list_and_cite(suite: str, capsys: pytest.CaptureFixture[str]) -> None:
    s = load_suite(suite)
    assert s.rows and all(r.published is not None and r.source for r in s.rows)
    assert {r.config.dataset for r in s.rows} == {suite}
    code, out, _ = run_cli(capsys, "bench", "--suite", suite, "--list")
    assert code == 0 and all(r.name in out for r in s.rows)


def test_published_figures_of_the_main_suites() -> None:
    mini = {r.name: r.published for r in load_suite("mini-imagenet").rows}
    assert mini["protonet-conv4-5w1s"] == 49.42 and mini["protonet-conv4-5w5s"] == 68.20
    assert mini["maml-conv4-5w1s"] == 48.70 and mini["maml-conv4-5w5s"] == 63.11
    assert mini["metaoptnet-resnet12-5w1s"] == 62.64 and mini["metaoptnet-resnet12-5w5s"] == 78.63
    assert mini["protonet-resnet12-5w1s"] == 60.37 and mini["protonet-resnet12-5w5s"] == 78.02
    fs = {r.name: r.published for r in load_suite("cifar-fs").rows}
    assert fs["metaoptnet-resnet12-5w1s"] == 72.0 and fs["metaoptnet-resnet12-5w5s"] == 84.2
    assert fs["protonet-resnet12-5w1s"] == 72.2 and fs["protonet-resnet12-5w5s"] == 83.5
    assert (fs["protonet-conv4-5w1s"], fs["protonet-conv4-5w5s"], fs["maml-conv4-5w1s"]) == (55.5, 72.0, 58.9)
    tiered = {r.name: r.published for r in load_suite("tiered-imagenet").rows}
    assert tiered == {"metaoptnet-resnet12-5w1s": 65.99, "metaoptnet-resnet12-5w5s": 81.56}
    fc = {r.name: r.published for r in load_suite("fc100").rows}
    assert fc == {"metaoptnet-resnet12-5w1s": 41.1, "metaoptnet-resnet12-5w5s": 55.5}
    for suite in NAMES:  # a source names its paper's table, and a figure not checked there says so
        for r in load_suite(suite).rows:
            unconfirmed = "unconfirmed" in r.source
            assert unconfirmed == r.notes.startswith("unverified") and ("Table" in r.source or unconfirmed), r
            assert "verify" not in r.notes.replace("unverified", ""), r


def test_bench_without_the_data_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(
        capsys, "bench", "--suite", "mini-imagenet", "--row", "protonet-conv4-5w1s", "--data-root", empty,
        "--device", "cpu", "--no-progress", "--out", tmp_path / "out" / "mini.json",
    )  # fmt: skip
    assert_one_line_error(code, err, "mini-ImageNet", "not found", str(empty / "mini-imagenet"))
