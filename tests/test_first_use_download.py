"""A fresh machine: datasets fetched on first use from a file server on the loopback address.

A ``ThreadingHTTPServer`` on 127.0.0.1 stands in for the official hosts (through
``METAFEW_MIRROR``), serving small archives in the official layouts: Omniglot's
``images_background.zip``/``images_evaluation.zip`` (every character of the Vinyals
split, two tiny drawings each), a MedMNIST ``.npz`` and Caltech-101's zip nesting
``101_ObjectCategories.tar.gz``. It answers ``Range`` requests (the standard library's
handler does not) and can drop a connection halfway. The data root and the cache start
empty; nothing here touches the internet.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import threading
import time
import urllib.parse
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run_cli
from PIL import Image

import metafew
import metafew.paths as paths
from metafew.data import Omniglot, caltech101, download, lake, medmnist, omniglot
from metafew.data.omniglot import split_lines
from metafew.errors import DatasetError, DatasetNotFoundError


class FileServer(ThreadingHTTPServer):
    """Serves ``files`` by name; answers ``Range: bytes=N-``; drops the next ``drops[name]`` answers halfway."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.files: dict[str, bytes] = {}
        self.drops: dict[str, int] = {}
        self.ranges = True  # False: answer every request with the whole file, like a server without Range
        self.delay = 0.0  # seconds before each answer (a slow host)
        self.requests: list[tuple[str, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/mirror"

    def served(self, name: str) -> list[str | None]:
        """The Range header of each request for ``name`` (None: the whole file)."""
        return [r for n, r in self.requests if n == name]


class RangeHandler(BaseHTTPRequestHandler):
    server: FileServer

    def do_GET(self) -> None:
        name = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).removeprefix("/mirror/")
        wanted = self.headers.get("Range")
        self.server.requests.append((name, wanted))
        time.sleep(self.server.delay)
        data = self.server.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if wanted and self.server.ranges:
            m = re.fullmatch(r"bytes=(\d+)-", wanted)
            assert m, wanted
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.server.drops.get(name, 0) > 0:  # send half, then hang up
            self.server.drops[name] -= 1
            body = body[: len(body) // 2]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _png(seed: int, side: int = 105) -> bytes:
    im = Image.new("1", (side, side), 1)  # the official drawings: 105x105 1-bit, black strokes on white
    x, y = seed % (side - 15), (7 * seed) % (side - 15)
    im.paste(0, (x, y, x + 15, y + 15))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _omniglot_zips(chars: list[str], background: set[str], drawings: int = 2, side: int = 105) -> dict[str, bytes]:
    """Both official zips: ``images_<set>/<Alphabet>/characterNN/<id>_NN.png``, ``drawings`` per character."""
    zips = {s: io.BytesIO() for s in omniglot.SETS}
    opened = {s: zipfile.ZipFile(b, "w") for s, b in zips.items()}
    pngs = [_png(seed, side) for seed in range(97)]  # a few distinct drawings, reused: quick to make
    for i, c in enumerate(chars):
        s = "images_background" if c.split("/")[0] in background else "images_evaluation"
        for k in range(1, drawings + 1):
            opened[s].writestr(f"{s}/{c}/{i:04d}_{k:02d}.png", pngs[(2 * i + k) % len(pngs)])
    for z in opened.values():
        z.close()
    return {f"{s}.zip": b.getvalue() for s, b in zips.items()}


def _vinyals_zips(drawings: int, side: int = 105) -> dict[str, bytes]:
    """Every character of the Vinyals split (1,623); the alphabets shared 30/20 between the sets."""
    chars = sorted({line.rpartition("/")[0] for s in ("train", "val", "test") for line in split_lines(s)})
    alphabets = sorted({c.split("/")[0] for c in chars})
    return _omniglot_zips(chars, set(alphabets[:30]), drawings=drawings, side=side)


@pytest.fixture(scope="module")
def vinyals_zips() -> dict[str, bytes]:
    """Every character of the Vinyals split, one drawing each."""
    return _vinyals_zips(1)


@pytest.fixture(scope="module")
def small_zips() -> dict[str, bytes]:
    """Two alphabets of six characters in each set: enough for Lake's split and 5-way episodes."""
    chars = [f"{a}/character{k:02d}" for a in ("Alpha", "Beta", "Gamma", "Delta") for k in range(1, 7)]
    return _omniglot_zips(chars, {"Alpha", "Beta"})


@pytest.fixture
def server() -> Iterator[FileServer]:
    srv = FileServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: FileServer) -> Path:
    """An empty data root and cache, the mirror pointed at the loopback server; returns the data root."""
    root = tmp_path / "data"
    monkeypatch.setenv("METAFEW_DATA", str(root))
    monkeypatch.setenv("METAFEW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("METAFEW_MIRROR", server.url)
    monkeypatch.delenv("METAFEW_OFFLINE", raising=False)
    monkeypatch.setattr(download, "_RETRY_WAIT", 0.0)
    return root


def _serve(server: FileServer, zips: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    server.files.update(zips)
    for s in omniglot.SETS:
        monkeypatch.setitem(omniglot.OMNIGLOT_MD5, s, _md5(zips[f"{s}.zip"]))


@pytest.fixture
def with_vinyals(server: FileServer, vinyals_zips: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    _serve(server, vinyals_zips, monkeypatch)


@pytest.fixture
def with_omniglot(server: FileServer, small_zips: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    _serve(server, small_zips, monkeypatch)


def _serve_medmnist(server: FileServer, monkeypatch: pytest.MonkeyPatch, name: str, seed: int = 0) -> bytes:
    """``<name>.npz`` as MedMNIST ships it (``{split}_images`` uint8 [n, 28, 28], ``{split}_labels`` [n, 1]), two classes."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", 40), ("val", 10), ("test", 12)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    data = buf.getvalue()
    server.files[f"{name}.npz"] = data
    info = medmnist.MEDMNIST_INFO[name]
    monkeypatch.setitem(medmnist.MEDMNIST_INFO, name, info._replace(md5=_md5(data)))
    return data


@pytest.fixture
def with_pneumonia(server: FileServer, monkeypatch: pytest.MonkeyPatch) -> bytes:
    return _serve_medmnist(server, monkeypatch, "pneumoniamnist")


def _lake_runs_zip() -> bytes:
    """``all_runs.zip``: ``runNN/training/classKK.png``, ``runNN/test/itemMM.png`` and ``runNN/class_labels.txt``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for r in range(1, 21):
            lines = []
            for k in range(1, 21):
                z.writestr(f"run{r:02d}/training/class{k:02d}.png", _png(r * 40 + k))
                answer = (k + r) % 20 + 1
                z.writestr(f"run{r:02d}/test/item{k:02d}.png", _png(r * 40 + answer))
                lines.append(f"run{r:02d}/test/item{k:02d}.png run{r:02d}/training/class{answer:02d}.png")
            z.writestr(f"run{r:02d}/class_labels.txt", "\n".join(lines) + "\n")
    return buf.getvalue()


@pytest.fixture
def with_lake_runs(server: FileServer, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _lake_runs_zip()
    server.files["all_runs.zip"] = data
    monkeypatch.setattr(lake, "LAKE_RUNS_MD5", _md5(data))


def _leftovers(root: Path) -> list[Path]:
    return sorted(root.rglob("*")) if root.exists() else []


def test_first_use_downloads_checks_and_loads(fresh: Path, server: FileServer, with_vinyals: None, capsys) -> None:
    train = metafew.load_dataset("omniglot", "train", download=True)  # the README example, as printed
    assert (train.num_classes, len(train), train.channels, train.image_size) == (4112, 4112, 1, (28, 28))
    err = capsys.readouterr().err
    for s in omniglot.SETS:
        size = len(server.files[f"{s}.zip"]) / 1e3
        line = f"downloading {s}.zip from {server.url}/{s}.zip ({size:.1f} kB) to {fresh / 'omniglot'}"
        assert line in err, err
        assert (fresh / "omniglot" / s).is_dir()
    assert not list((fresh / "omniglot").glob(".*")), "no staging folder or archive is left in the data root"
    assert not list((Path(paths.cache_dir()) / "downloads").rglob("*.*")), "nor a partial file in the cache"


def test_second_use_does_not_download_again(fresh: Path, server: FileServer, with_omniglot: None, capsys) -> None:
    evaluation = Omniglot("evaluation", split="lake", download=True)  # the other README example
    assert (evaluation.num_classes, len(evaluation)) == (12, 24)
    assert len(server.requests) == 2
    images = evaluation.images  # decoded and inverted: the black square becomes 255
    assert tuple(images.shape[1:]) == (1, 28, 28) and int(images.max()) == 255
    capsys.readouterr()
    background = metafew.load_dataset("omniglot-lake", "background", download=True)
    assert background.num_classes == 12
    assert len(server.requests) == 2 and "downloading" not in capsys.readouterr().err


def test_dropped_connection_resumes_from_the_partial_file(
    fresh: Path, server: FileServer, with_omniglot: None, capsys
) -> None:
    server.drops["images_background.zip"] = 1
    metafew.load_dataset("omniglot-lake", "background", download=True)
    size = len(server.files["images_background.zip"])
    body = size // 2
    assert server.served("images_background.zip") == [None, f"bytes={body}-"]
    err = capsys.readouterr().err
    assert "retrying" in err and f"resuming images_background.zip from {server.url}/images_background.zip" in err


def test_interrupted_download_resumes_on_the_next_call(
    fresh: Path, server: FileServer, with_pneumonia: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(download, "_RETRIES", 0)  # no retry within the call: the next call resumes
    server.drops["pneumoniamnist.npz"] = 1
    with pytest.raises(DatasetError, match="the partial download is kept and resumes next time"):
        metafew.load_dataset("pneumoniamnist", "train", download=True)
    assert _leftovers(fresh) == [], "a failed download leaves no folder in the data root"
    ds = metafew.load_dataset("pneumoniamnist", "train", download=True)
    assert (ds.num_classes, len(ds)) == (2, 40)
    assert server.served("pneumoniamnist.npz") == [None, f"bytes={len(with_pneumonia) // 2}-"]
    assert (fresh / "medmnist" / "pneumoniamnist.npz").read_bytes() == with_pneumonia


def test_whole_partial_file_is_checked_not_fetched_again(
    fresh: Path, server: FileServer, with_pneumonia: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(download, "_RETRIES", 0)
    server.drops["pneumoniamnist.npz"] = 1
    with pytest.raises(DatasetError):
        metafew.load_dataset("pneumoniamnist", "train", download=True)
    (partial,) = (Path(paths.cache_dir()) / "downloads").glob("*.partial")
    partial.write_bytes(with_pneumonia)  # as if the rest had arrived before a crash
    assert len(metafew.load_dataset("pneumoniamnist", "train", download=True)) == 40
    assert server.served("pneumoniamnist.npz") == [None, f"bytes={len(with_pneumonia)}-"]  # answered 416


def test_server_without_range_support_starts_again(
    fresh: Path, server: FileServer, with_pneumonia: bytes, capsys
) -> None:
    server.ranges = False
    server.drops["pneumoniamnist.npz"] = 1
    assert len(metafew.load_dataset("pneumoniamnist", "val", download=True)) == 10
    assert server.served("pneumoniamnist.npz") == [None, f"bytes={len(with_pneumonia) // 2}-"]  # asked, got all
    assert (fresh / "medmnist" / "pneumoniamnist.npz").read_bytes() == with_pneumonia
    assert capsys.readouterr().err.count("downloading pneumoniamnist.npz") == 2


def test_checksum_mismatch_leaves_nothing_behind(
    fresh: Path, server: FileServer, with_omniglot: None, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setitem(omniglot.OMNIGLOT_MD5, "images_evaluation", "0" * 32)  # the second of the two zips
    code, _, err = run_cli(capsys, "data", "download", "omniglot")
    line = assert_one_line_error(code, err, "checksum mismatch for images_evaluation.zip", "0" * 32)
    assert f"{server.url}/images_evaluation.zip" in line
    assert _leftovers(fresh) == [] and not fresh.exists(), "neither a dataset folder nor an empty one is left"
    assert not list((Path(paths.cache_dir()) / "downloads").rglob("*.zip*")), "the bad download is discarded"


def test_offline_says_where_it_looked(fresh: Path, server: FileServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAFEW_OFFLINE", "1")
    with pytest.raises(DatasetNotFoundError) as e:
        metafew.load_dataset("omniglot", "train", download=True)
    assert f"looked for {fresh / 'omniglot' / 'images_background'}" in str(e.value)
    assert "METAFEW_OFFLINE" in str(e.value) and "\n" not in str(e.value)
    assert server.requests == [] and not fresh.exists()


def test_no_server_gives_one_line_error(fresh: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("METAFEW_MIRROR", "http://127.0.0.1:9/nothing-listens-here")
    monkeypatch.setattr(download, "_RETRIES", 1)
    code, _, err = run_cli(capsys, "data", "download", "pneumoniamnist")
    assert_one_line_error(code, err, "could not download http://127.0.0.1:9/nothing-listens-here/pneumoniamnist.npz")
    assert not fresh.exists()


def _tiny_suite(tmp_path: Path) -> Path:
    suite = tmp_path / "tiny.toml"
    suite.write_text(
        'name = "tiny"\ndescription = "Lake background -> evaluation, one step"\n\n[defaults]\n'
        'dataset = "omniglot-lake"\ntrain_subset = "background"\nval_subset = "none"\n'
        'test_subset = "evaluation"\nbackbone = "conv4"\nbackbone_options = { hidden = 8 }\n'
        "n_way = 5\nk_shot = 1\nn_query = 1\neval_episodes = 4\n\n"
        '[[rows]]\nname = "protonet-5w1s"\nlearner = "protonet"\nsteps = 1\n'
    )
    return suite


def test_bench_downloads_on_first_use(
    fresh: Path, server: FileServer, with_omniglot: None, tmp_path: Path, capsys
) -> None:
    suite, out = _tiny_suite(tmp_path), tmp_path / "results" / "tiny.json"
    code, stdout, err = run_cli(capsys, "bench", "--suite", suite, "--out", out, "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert "downloading it from its official source on first use" in stdout and "--no-download" in stdout
    size = len(server.files["images_background.zip"]) / 1e3
    assert f"downloading images_background.zip from {server.url}/images_background.zip ({size:.1f} kB)" in err
    assert f"to {fresh / 'omniglot'}" in err and out.is_file()


def test_bench_no_download_names_where_it_looked(
    fresh: Path, server: FileServer, with_omniglot: None, tmp_path: Path, capsys
) -> None:
    suite, out = _tiny_suite(tmp_path), tmp_path / "results" / "tiny.json"
    code, _, err = run_cli(capsys, "bench", "--suite", suite, "--out", out, "--no-download", "--no-progress")
    assert_one_line_error(code, err, f"looked for {fresh / 'omniglot'}", "not downloaded: --no-download")
    assert server.requests == [] and not fresh.exists()


def test_caltech101_official_archive_layout(
    fresh: Path, server: FileServer, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    jpeg = io.BytesIO()
    Image.new("RGB", (12, 9), (200, 30, 30)).save(jpeg, format="JPEG")
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as t:  # 101_ObjectCategories/<class>/image_0001.jpg
        for c in [f"class{i:03d}" for i in range(101)] + [caltech101.BACKGROUND]:
            info = tarfile.TarInfo(f"101_ObjectCategories/{c}/image_0001.jpg")
            info.size = len(jpeg.getvalue())
            t.addfile(info, io.BytesIO(jpeg.getvalue()))
    outer = io.BytesIO()
    with zipfile.ZipFile(outer, "w") as z:  # the official zip nests the tarball in caltech-101/
        z.writestr("caltech-101/101_ObjectCategories.tar.gz", inner.getvalue())
        z.writestr("caltech-101/Annotations.tar", b"")
    server.files["caltech-101.zip"] = outer.getvalue()
    monkeypatch.setattr(caltech101, "CALTECH101_MD5", _md5(outer.getvalue()))
    monkeypatch.setattr(caltech101, "CALTECH101_INNER_MD5", _md5(inner.getvalue()))
    ds = metafew.load_dataset("caltech101", "test", download=True, image_size=8)
    assert ds.num_classes == 21 and ds.images.shape == (21, 3, 8, 8)
    assert sorted(p.name for p in (fresh / "caltech101").iterdir()) == ["101_ObjectCategories"]
    assert "downloading caltech-101.zip" in capsys.readouterr().err


def test_local_folder_as_mirror(tmp_path: Path, fresh: Path, with_pneumonia: bytes, monkeypatch) -> None:
    folder = tmp_path / "copies"
    folder.mkdir()
    (folder / "pneumoniamnist.npz").write_bytes(with_pneumonia)
    monkeypatch.setenv("METAFEW_MIRROR", str(folder))
    assert len(metafew.load_dataset("pneumoniamnist", "test", download=True)) == 12


def test_data_root_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    dev = tmp_path / "shared" / "data"
    (dev / "medmnist").mkdir(parents=True)
    (dev / "medmnist" / "breastmnist.npz").write_bytes(b"")
    monkeypatch.setattr(paths, "dev_data_dir", lambda: dev)
    monkeypatch.setattr(paths, "_noted", set())
    monkeypatch.setenv("METAFEW_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("METAFEW_DATA")
    user = tmp_path / "cache" / "data"
    assert paths.data_root() == user and paths.data_roots() == [user, dev]
    assert medmnist.find_medmnist("breastmnist") == dev / "medmnist" / "breastmnist.npz"
    medmnist.find_medmnist("breastmnist")
    note = f"metafew: note: using development data in {dev} (set METAFEW_DATA to override)\n"
    assert capsys.readouterr().err == note  # said once, the first time
    monkeypatch.setenv("METAFEW_DATA", str(tmp_path / "mine"))
    assert paths.data_roots() == [tmp_path / "mine"] and medmnist.find_medmnist("breastmnist") is None
    assert paths.data_roots(tmp_path / "arg") == [tmp_path / "arg"]


def test_the_tests_and_benchmarks_take_their_data_root_from_the_same_rule(tmp_path: Path, monkeypatch) -> None:
    """Plain ``pytest`` after ``make data`` (no ``../shared``, no ``METAFEW_DATA``) reads the user data dir."""
    import importlib

    from conftest import default_data

    monkeypatch.delenv("METAFEW_DATA")
    monkeypatch.setenv("METAFEW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(paths, "dev_data_dir", lambda: None)  # a user's clone: nothing beside it
    assert default_data() == tmp_path / "cache" / "data" == paths.user_data_dir()
    monkeypatch.setattr(paths, "dev_data_dir", lambda: tmp_path / "shared")  # this project's checkout
    assert default_data() == tmp_path / "shared"
    monkeypatch.setenv("METAFEW_DATA", str(tmp_path / "ci"))  # CI's setting wins
    assert default_data() == tmp_path / "ci"

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    common = importlib.import_module("common")
    assert common.side_by_side_parser("doc").parse_args([]).data_root == str(tmp_path / "ci")
    monkeypatch.delenv("METAFEW_DATA")
    assert common.side_by_side_parser("doc").parse_args([]).data_root == str(tmp_path / "shared")


# -- every command that reads a named dataset fetches it on first use, as bench does --------------

TINY = ["--device", "cpu", "--no-progress", "--backbone-option", "hidden=8"]
LAKE_ROW = ["--dataset", "omniglot-lake", "--train-subset", "background", "--val-subset", "none"]


def _first_use_lines(err: str, server: FileServer, name: str, root: Path) -> None:
    """The two lines a first use prints: that it downloads, and what, from where, how big and where to."""
    assert "is not in" in err and "downloading it from its official source on first use" in err, err
    size = len(server.files[name]) / 1e3
    line = f"downloading {name} from {server.url}/{name} ({size:.1f} kB) to {root}"
    assert line in err, err


def _small_backbone(folder: Path) -> Path:
    """A fresh 1x28x28 Conv-4 saved as ``metafew pretrain`` would (no data needed to make it)."""
    from metafew.checkpoint import save_backbone

    conv4 = metafew.create_backbone("conv4", in_channels=1, image_size=28, hidden=8)
    return save_backbone(conv4, folder / "conv4.safetensors", mean=[0.5], std=[0.5])


def test_train_and_eval_download_on_first_use(
    fresh: Path, server: FileServer, with_omniglot: None, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    argv = ["train", *TINY, *LAKE_ROW, "--learner", "protonet", "--n-way", "5", "--n-query", "1", "--steps", "1"]
    code, out, err = run_cli(capsys, *argv, "--out", run)
    assert code == 0, err
    _first_use_lines(err, server, "images_background.zip", fresh / "omniglot")
    assert (fresh / "omniglot" / "images_evaluation").is_dir() and (run / "last.safetensors").is_file()
    other = tmp_path / "elsewhere"  # a second, empty data root: eval fetches into it
    evaluate = ["eval", "--checkpoint", run / "last.safetensors", "--subset", "evaluation", "--episodes", "3"]
    code, out, err = run_cli(capsys, *evaluate, "--device", "cpu", "--no-progress", "--data-root", other)
    assert code == 0, err
    _first_use_lines(err, server, "images_evaluation.zip", other / "omniglot")
    assert "omniglot/lake-evaluation" in out and len(server.served("images_evaluation.zip")) == 2
    code, _, err = run_cli(capsys, *evaluate, "--device", "cpu", "--no-progress", "--data-root", other)
    assert code == 0 and "downloading" not in err and len(server.served("images_evaluation.zip")) == 2


def test_eval_lake_runs_download_on_first_use(
    fresh: Path, server: FileServer, with_omniglot: None, with_lake_runs: None, tmp_path: Path, capsys
) -> None:
    backbone = _small_backbone(tmp_path)
    code, out, err = run_cli(capsys, "eval", "--checkpoint", backbone, "--lake", "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert "Lake's one-shot runs is not in" in err and f"downloading all_runs.zip from {server.url}" in err
    assert "error rate" in out and server.served("images_background.zip") == []  # the runs hold their own images


def test_pretrain_downloads_on_first_use(
    fresh: Path, server: FileServer, with_pneumonia: bytes, tmp_path: Path, capsys
):
    out = tmp_path / "backbone.safetensors"
    argv = ["pretrain", "--dataset", "pneumoniamnist", "--epochs", "1", "--batch-size", "16", *TINY, "--out", out]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    _first_use_lines(err, server, "pneumoniamnist.npz", fresh / "medmnist")
    assert out.is_file() and f"saved {out}" in stdout


def test_adapt_and_predict_download_named_data_on_first_use(
    fresh: Path, server: FileServer, with_pneumonia: bytes, with_omniglot: None, tmp_path: Path, capsys
) -> None:
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    for i in range(6):
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(unlabeled / f"{i}.png")
    model = tmp_path / "model.safetensors"
    argv = ["adapt", "--data", "pneumoniamnist", "--backbone", "omniglot-conv4", "--shots", "2", "--draws", "1"]
    align = [
        "--unlabeled",
        unlabeled,
        "--align",
        "mmd",
        "--align-steps",
        "1",
        "--align-source",
        "omniglot-lake:background",
    ]
    code, out, err = run_cli(capsys, *argv, *align, "--device", "cpu", "--no-progress", "--out", model)
    assert code == 0, err
    _first_use_lines(err, server, "pneumoniamnist.npz", fresh / "medmnist")  # --data NAME
    _first_use_lines(err, server, "images_background.zip", fresh / "omniglot")  # mmd's source images
    assert model.is_file()
    (fresh / "medmnist" / "pneumoniamnist.npz").unlink()
    code, out, err = run_cli(capsys, "predict", "--model", model, "--evaluate", "pneumoniamnist", "--device", "cpu")
    assert code == 0, err
    _first_use_lines(err, server, "pneumoniamnist.npz", fresh / "medmnist")
    assert "accuracy" in out and len(server.served("pneumoniamnist.npz")) == 2


@pytest.mark.parametrize("refuse", ["--no-download", "METAFEW_OFFLINE=1"])
@pytest.mark.parametrize("command", ["train", "eval", "pretrain", "adapt", "predict"])
def test_no_download_and_offline_refuse_with_where_it_looked(
    command: str,
    refuse: str,
    fresh: Path,
    server: FileServer,
    with_pneumonia: bytes,
    tmp_path: Path,
    monkeypatch,
    capsys,
) -> None:
    backbone = _small_backbone(tmp_path)
    model = tmp_path / "model.safetensors"
    if command == "predict":  # a model adapted to a folder of images: no dataset needed to make it
        for c in ("a", "b"):
            (tmp_path / "imgs" / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((28, 28), 80 * i, np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
        adapt = ["adapt", "--data", tmp_path / "imgs", "--backbone", backbone, "--shots", "1", "--draws", "0"]
        assert run_cli(capsys, *adapt, "--device", "cpu", "--no-progress", "--out", model)[0] == 0
    argv = {
        "train": [
            "train",
            *TINY,
            "--dataset",
            "pneumoniamnist",
            "--n-way",
            "2",
            "--steps",
            "1",
            "--out",
            tmp_path / "r",
        ],
        "eval": ["eval", "--checkpoint", backbone, "--dataset", "pneumoniamnist", "--n-way", "2", "--device", "cpu"],
        "pretrain": ["pretrain", "--dataset", "pneumoniamnist", *TINY, "--out", tmp_path / "b"],
        "adapt": ["adapt", "--data", "pneumoniamnist", "--backbone", backbone, "--device", "cpu", "--out", model],
        "predict": ["predict", "--model", model, "--evaluate", "pneumoniamnist", "--device", "cpu"],
    }[command]
    if refuse == "--no-download":
        argv.append(refuse)
        why = "not downloaded: --no-download"
    else:
        monkeypatch.setenv("METAFEW_OFFLINE", "1")
        why = "not downloaded: METAFEW_OFFLINE is set"
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, f"looked for {fresh / 'medmnist' / 'pneumoniamnist.npz'}", why)
    assert server.requests == [] and not fresh.exists()


def test_a_failed_first_use_download_says_what_is_missing_and_why(fresh: Path, monkeypatch, tmp_path: Path, capsys):
    monkeypatch.setenv("METAFEW_MIRROR", "http://127.0.0.1:9/nothing-listens-here")
    monkeypatch.setattr(download, "_RETRIES", 0)
    argv = ["pretrain", "--dataset", "pneumoniamnist", *TINY, "--out", tmp_path / "b"]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(
        code, err, f"pneumoniamnist not found in {fresh}, and downloading it failed: could not download "
        "http://127.0.0.1:9/nothing-listens-here/pneumoniamnist.npz", "set METAFEW_MIRROR"
    )  # fmt: skip
    assert not fresh.exists()


def test_processes_that_miss_a_dataset_together_download_it_once(
    fresh: Path, server: FileServer, with_pneumonia: bytes, capsys
) -> None:
    """The ranks of a torchrun job (here two threads) find the dataset missing at once: one fetches, one waits."""
    server.delay = 0.5
    sizes: list[int] = []

    def load() -> None:
        sizes.append(len(download.load_on_first_use("pneumoniamnist", "train", download=True)))

    first = threading.Thread(target=load)
    first.start()
    time.sleep(0.2)  # the first one is downloading
    load()
    first.join()
    assert sizes == [40, 40] and server.served("pneumoniamnist.npz") == [None]
    err = capsys.readouterr().err
    assert err.count("downloading pneumoniamnist.npz") == 1 and "waiting for another metafew process" in err


def test_export_backbone_downloads_the_runs_training_data_on_first_use(
    fresh: Path, server: FileServer, with_pneumonia: bytes, tmp_path: Path, capsys
) -> None:
    """The run's normalisation comes from its training dataset: fetched into --data-root unless --no-download."""
    config = metafew.RunConfig(
        dataset="pneumoniamnist", n_way=2, k_shot=1, n_query=2, steps=1, val_subset="none", eval_episodes=2,
        backbone_options={"hidden": 8},
    )  # fmt: skip
    metafew.train_run(config, tmp_path / "run", device="cpu", progress=False, download=True)
    checkpoint = tmp_path / "run" / "last.safetensors"
    offline = tmp_path / "offline"
    argv = ["export-backbone", "--checkpoint", checkpoint, "--data-root", offline, "--no-download"]
    code, _, err = run_cli(capsys, *argv, "--out", tmp_path / "a.safetensors")
    assert_one_line_error(code, err, "not found", str(offline / "medmnist"))
    assert not (tmp_path / "a.safetensors").exists() and len(server.served("pneumoniamnist.npz")) == 1
    other = tmp_path / "elsewhere"  # an empty data root: export-backbone fetches into it
    argv = ["export-backbone", "--checkpoint", checkpoint, "--data-root", other, "--out", tmp_path / "b.safetensors"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    _first_use_lines(err, server, "pneumoniamnist.npz", other / "medmnist")
    from metafew.checkpoint import read_backbone_record

    record = read_backbone_record(tmp_path / "b.safetensors")
    assert record.classes == ["normal", "pneumonia"] and record.dataset == "medmnist/pneumoniamnist-train"


def test_python_api_downloads_only_when_asked(fresh: Path, server: FileServer, with_pneumonia: bytes, tmp_path: Path):
    """As torchvision: ``download=False`` by default (a "not found" naming where it looked), ``download=True`` fetches."""
    config = metafew.RunConfig(
        dataset="pneumoniamnist", n_way=2, k_shot=1, n_query=2, steps=1, val_subset="none", eval_episodes=2,
        backbone_options={"hidden": 8},
    )  # fmt: skip
    with pytest.raises(DatasetNotFoundError, match="pass download=True") as e:
        metafew.train_run(config, tmp_path / "run", device="cpu", progress=False)
    assert f"looked for {fresh / 'medmnist' / 'pneumoniamnist.npz'}" in str(e.value) and server.requests == []
    _, result = metafew.train_run(config, tmp_path / "run", device="cpu", progress=False, download=True)
    assert result.steps == 1 and len(server.served("pneumoniamnist.npz")) == 1
    (fresh / "medmnist" / "pneumoniamnist.npz").unlink()
    episodes = metafew.config.test_episodes(config, device="cpu", download=True)
    assert len(episodes) == 2 and len(server.served("pneumoniamnist.npz")) == 2


# -- the README on a fresh machine ---------------------------------------------------------------


@pytest.fixture(scope="module")
def full_omniglot_zips() -> dict[str, bytes]:
    """The Vinyals characters with 16 drawings each (enough for 15-query episodes), at 28x28 to decode quickly."""
    return _vinyals_zips(16, side=28)


@pytest.fixture
def official_sources(server: FileServer, full_omniglot_zips: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything the README reads, served as the official files: Omniglot, Breast- and PneumoniaMNIST."""
    _serve(server, full_omniglot_zips, monkeypatch)
    _serve_medmnist(server, monkeypatch, "pneumoniamnist")
    _serve_medmnist(server, monkeypatch, "breastmnist", seed=1)


def _user_folders(work: Path) -> None:
    """The folders the README calls the user's own: ``my_xrays/<class>/``, ``more_xrays/``, ``new_images/``."""
    rng = np.random.default_rng(3)

    def image(c: int) -> Image.Image:  # two kinds of image: a dark and a bright disc, with noise
        yy, xx = np.mgrid[:28, :28]
        disc = ((yy - 14) ** 2 + (xx - 14) ** 2 < 64) * (60 + 120 * c)
        return Image.fromarray(np.clip(disc + rng.normal(40, 20, (28, 28)), 0, 255).astype(np.uint8))

    for c, name in enumerate(("normal", "pneumonia")):
        (work / "my_xrays" / name).mkdir(parents=True)
        for i in range(20):
            image(c).save(work / "my_xrays" / name / f"{i:03d}.png")
    for folder, n in (("more_xrays", 30), ("new_images", 4)):
        (work / folder).mkdir()
        for i in range(2 * n):
            image(i % 2).save(work / folder / f"{i:03d}.png")


def _readme_blocks() -> list[Any]:
    """The README blocks tests/test_readme.py runs (Python, and the ``metafew`` command blocks), in README order."""
    from test_readme import BASH, PYTHON

    return sorted([*PYTHON, *BASH], key=lambda b: b.line)


README_BLOCKS = _readme_blocks()


def _readme_gap(code: str) -> str | None:
    """Why a README block cannot run on an empty data root as printed (None: it can)."""
    for call in re.findall(r"train_run\([^)]*\)", code):
        if "download=True" not in call:
            return f"README: {call} needs download=True to fetch its dataset on a fresh machine (see the report)"
    return None


def test_readme_python_blocks_fetch_on_first_use() -> None:
    """Every README ``train_run(...)`` passes ``download=True``: a fresh machine fails, not xfails, without it."""
    gaps = [f"line {b.line}: {gap}" for b in README_BLOCKS if (gap := _readme_gap(b.code))]
    assert not gaps, gaps
    assert _readme_gap('train_run(config, "runs/x")') is not None  # the check itself bites


@pytest.mark.slow
@pytest.mark.parametrize("block", README_BLOCKS, ids=[b.id for b in README_BLOCKS])
def test_readme_block_runs_as_printed_on_an_empty_data_root(
    block: Any, fresh: Path, server: FileServer, official_sources: None, tmp_path: Path, monkeypatch, capsys
) -> None:
    """A README block, as printed, on a machine with nothing downloaded: first use fetches what it needs.

    In-process (the fixtures' md5s stand in for the official ones), ``METAFEW_DATA`` an empty
    folder and ``METAFEW_MIRROR`` the loopback server: ``download=True`` in Python, and the
    commands themselves (``metafew pretrain --dataset breastmnist``, ``predict --evaluate
    pneumoniamnist``, ``train``/``eval`` after a ``data download``), fetch each file once.
    """
    import shlex

    from test_readme import commands

    gap = _readme_gap(block.code)
    assert gap is None, gap
    work = tmp_path / "work"
    work.mkdir()
    _user_folders(work)
    monkeypatch.chdir(work)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    if block.language == "python":
        exec(compile(block.code, f"README.md line {block.line}", "exec"), {"__name__": "__main__"})
    else:
        for command in commands(block.code):
            argv = shlex.split(command, comments=True)[1:]
            code, _, err = run_cli(capsys, *argv)
            if argv[:2] == ["data", "info"] and not server.requests:  # before anything was downloaded:
                assert_one_line_error(code, err, "not found: looked for", f"`metafew data download {argv[2]}`")
                continue  # it says where it looked and how to get the dataset (exit 2, as for any missing one)
            assert code == 0, f"README line {block.line}: `{command}` exited {code}:\n{err[-3000:]}"
    fetched = [name for name, _ in server.requests]
    assert fetched and len(fetched) == len(set(fetched)), f"each file fetched once: {fetched}"
    assert all(name in server.files for name in fetched), fetched


class _StopBeforeTraining(Exception):
    pass


def test_make_bench_fetches_omniglot_on_first_use(
    fresh: Path, server: FileServer, with_vinyals: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """``make bench``'s command on an empty data root, up to its first training step (the whole suite takes minutes)."""
    import re as regex

    from metafew.bench import runner

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    command = regex.search(r"^bench:.*\n\t\$\(BIN\)/metafew (.*)$", makefile, regex.M)
    assert command, "the Makefile's bench target runs `metafew ...`"

    def stop(*args: object, **kwargs: object) -> None:
        raise _StopBeforeTraining

    monkeypatch.setattr(runner, "train_run", stop)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(_StopBeforeTraining):
        run_cli(capsys, *command.group(1).split())
    out, err = capsys.readouterr()
    assert "omniglot is not in" in out and "downloading it from its official source on first use" in out
    for s in omniglot.SETS:
        size = len(server.files[f"{s}.zip"]) / 1e3
        assert f"downloading {s}.zip from {server.url}/{s}.zip ({size:.1f} kB) to {fresh / 'omniglot'}" in err, err
        assert (fresh / "omniglot" / s).is_dir()
