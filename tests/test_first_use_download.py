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
import urllib.parse
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run_cli
from PIL import Image

import metafew
import metafew.paths as paths
from metafew.data import Omniglot, caltech101, download, medmnist, omniglot
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


def _png(seed: int) -> bytes:
    im = Image.new("1", (105, 105), 1)  # the official drawings: 105x105 1-bit, black strokes on white
    x, y = seed % 90, (7 * seed) % 90
    im.paste(0, (x, y, x + 15, y + 15))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _omniglot_zips(chars: list[str], background: set[str], drawings: int = 2) -> dict[str, bytes]:
    """Both official zips: ``images_<set>/<Alphabet>/characterNN/<id>_NN.png``, ``drawings`` per character."""
    zips = {s: io.BytesIO() for s in omniglot.SETS}
    opened = {s: zipfile.ZipFile(b, "w") for s, b in zips.items()}
    for i, c in enumerate(chars):
        s = "images_background" if c.split("/")[0] in background else "images_evaluation"
        for k in range(1, drawings + 1):
            opened[s].writestr(f"{s}/{c}/{i:04d}_{k:02d}.png", _png(2 * i + k))
    for z in opened.values():
        z.close()
    return {f"{s}.zip": b.getvalue() for s, b in zips.items()}


@pytest.fixture(scope="module")
def vinyals_zips() -> dict[str, bytes]:
    """Every character of the Vinyals split (1,623), one drawing each; the alphabets shared 30/20 between the sets."""
    chars = sorted({line.rpartition("/")[0] for s in ("train", "val", "test") for line in split_lines(s)})
    alphabets = sorted({c.split("/")[0] for c in chars})
    return _omniglot_zips(chars, set(alphabets[:30]), drawings=1)


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


@pytest.fixture
def with_pneumonia(server: FileServer, monkeypatch: pytest.MonkeyPatch) -> bytes:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 40), ("val", 10), ("test", 12)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    data = buf.getvalue()
    server.files["pneumoniamnist.npz"] = data
    info = medmnist.MEDMNIST_INFO["pneumoniamnist"]
    monkeypatch.setitem(medmnist.MEDMNIST_INFO, "pneumoniamnist", info._replace(md5=_md5(data)))
    return data


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
