"""Rule 5: write errors are one line naming the path, checked before the work where possible."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
from cli_helpers import TRAIN, assert_one_line_error, run_cli

from metafew.data import ImageFolder, dataset_info, load_dataset
from metafew.data.download import check_md5_cached
from metafew.errors import DatasetError
from metafew.outputs import OutputError, guard_output, write_error

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "code, words",
    [
        (errno.ENOSPC, "disk is full"),
        (errno.EROFS, "read-only"),
        (errno.EACCES, "permission"),
        (errno.EISDIR, "folder"),
    ],
)
def test_os_errors_become_one_line(code, words, tmp_path):
    e = write_error(tmp_path / "x.json", OSError(code, "boom"))
    assert isinstance(e, OutputError) and words in str(e) and "x.json" in str(e) and "\n" not in str(e)


def test_output_under_a_file_is_refused_before_the_work(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for argv in (
        ["eval", "--checkpoint", "omniglot-conv4", "--json", blocker / "r.json"],
        ["pretrain", "--dataset", "breastmnist", "--out", blocker / "b.safetensors"],
        [*TRAIN, "--steps", "2", "--out", blocker / "run"],
        ["bench", "--suite", "quick", "--out", blocker / "r.json"],
        ["adapt", "--data", "breastmnist", "--backbone", "omniglot-conv4", "--out", blocker / "m"],
    ):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, str(blocker))
    with pytest.raises(OutputError, match="is a file"):
        guard_output(blocker / "x.json", "evaluation")


def test_a_full_disk_while_saving_is_one_line(capsys, tmp_path, monkeypatch):
    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, _, err = run_cli(capsys, *TRAIN, "--steps", "2", "--out", tmp_path / "run")
    assert_one_line_error(code, err, "disk is full", "last.safetensors")
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_interrupted_says_where_the_checkpoint_is(capsys, tmp_path, monkeypatch):
    from metafew.data import EpisodeSampler

    real = EpisodeSampler.sample_batch
    calls = {"n": 0}

    def interrupt(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            import signal

            signal.raise_signal(signal.SIGINT)
        return real(self, *a, **k)

    monkeypatch.setattr(EpisodeSampler, "sample_batch", interrupt)
    code, _, err = run_cli(capsys, *TRAIN, "--steps", "5", "--out", tmp_path / "run")
    assert code == 130
    assert "interrupted" in err and str(tmp_path / "run") in err and "Traceback" not in err


def test_data_info_on_an_empty_folder_fails(capsys, tmp_path):
    code, _, err = run_cli(capsys, "data", "info", f"folder:{tmp_path}")
    assert_one_line_error(code, err, "no images")


# -- corrupt or oversized dataset files: one line naming the file ---------------------------

MEDMNIST = Path(os.environ.get("METAFEW_DATA") or REPO.parent / "shared" / "data") / "medmnist"
OMNIGLOT = MEDMNIST.parent / "omniglot"


def _medmnist_copy(tmp_path: Path, keep: int | None = None) -> Path:
    """``tmp_path/medmnist/breastmnist.npz``: a writable copy of the real file, or of its first ``keep`` bytes."""
    dest = tmp_path / "medmnist" / "breastmnist.npz"
    dest.parent.mkdir(parents=True)
    data = (MEDMNIST / "breastmnist.npz").read_bytes()
    dest.write_bytes(data if keep is None else data[:keep])
    return dest


def test_data_info_on_a_truncated_npz_is_one_line(capsys, tmp_path):
    npz = _medmnist_copy(tmp_path, keep=200_000)
    code, _, err = run_cli(capsys, "data", "info", "breastmnist", "--data-root", tmp_path)
    assert_one_line_error(code, err, str(npz), "corrupt", "metafew data download breastmnist")
    with pytest.raises(DatasetError, match="corrupt"):
        dataset_info("breastmnist", tmp_path)


def test_a_byte_flip_under_a_cached_md5_verdict_is_one_line_and_forgets_the_verdict(capsys, tmp_path):
    from metafew.data.medmnist import MEDMNIST_INFO

    npz = _medmnist_copy(tmp_path)
    md5 = MEDMNIST_INFO["breastmnist"].md5
    check_md5_cached(npz, md5)  # a passing verdict, cached by path, size and mtime
    st = npz.stat()
    with open(npz, "r+b") as f:  # flip one byte inside train_images' deflated data
        f.seek(200_000)
        b = f.read(1)
        f.seek(200_000)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(npz, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert npz.stat().st_size == st.st_size and npz.stat().st_mtime_ns == st.st_mtime_ns
    check_md5_cached(npz, md5)  # the stale verdict still vouches for it
    ds = load_dataset("breastmnist", "train", root=tmp_path)
    with pytest.raises(DatasetError) as info:
        ds.images  # noqa: B018
    msg = str(info.value)
    assert str(npz) in msg and "corrupt" in msg and "metafew data download breastmnist" in msg and "\n" not in msg
    with pytest.raises(DatasetError, match="checksum mismatch"):  # the verdict was forgotten: hashed again
        check_md5_cached(npz, md5)
    code, _, err = run_cli(capsys, "data", "download", "breastmnist", "--subset", "train", "--data-root", tmp_path)
    assert_one_line_error(code, err, str(npz), "corrupt")


def _omniglot_copy(tmp_path: Path) -> Path:
    """A tiny Omniglot tree (one character per set) under ``tmp_path/omniglot``, one PNG overwritten by garbage."""
    for s, alphabet in (
        ("images_background", "Blackfoot_(Canadian_Aboriginal_Syllabics)"),
        ("images_evaluation", "Angelic"),
    ):
        shutil.copytree(OMNIGLOT / s / alphabet / "character01", tmp_path / "omniglot" / s / alphabet / "character01")
    bad = sorted((tmp_path / "omniglot" / "images_background").rglob("*.png"))[3]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    return bad


def test_a_corrupt_omniglot_png_is_one_line_naming_it(capsys, tmp_path):
    bad = _omniglot_copy(tmp_path)
    ds = load_dataset("omniglot-lake", "background", root=tmp_path)
    with pytest.raises(DatasetError) as info:
        ds.images  # noqa: B018
    msg = str(info.value)
    assert str(bad) in msg and "could not be decoded" in msg and "\n" not in msg
    code, _, err = run_cli(
        capsys, "data", "download", "omniglot-lake", "--subset", "background", "--data-root", tmp_path
    )
    assert_one_line_error(code, err, str(bad), "could not be decoded")


def test_an_oversized_image_says_it_is_too_large_and_how_to_allow_it(tmp_path, monkeypatch):
    from PIL import Image

    from metafew.data.decode import PIXEL_LIMIT_ENV, apply_pixel_limit

    for cls, side in (("a", 100), ("b", 20)):
        (tmp_path / cls).mkdir()
        Image.new("L", (side, side), 128).save(tmp_path / cls / "x.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # refused above 2,000 pixels: 100x100 is a "bomb"
    for options in ({}, {"image_size": 8, "channels": 1}):  # found by the header probe, or by the decode
        with pytest.raises(DatasetError) as info:
            ImageFolder(tmp_path, **options)
        msg = str(info.value)
        assert str(tmp_path / "a" / "x.png") in msg and "too large" in msg and "10,000 pixels" in msg, msg
        assert f"{PIXEL_LIMIT_ENV}=10000" in msg and "not a readable image" not in msg and "\n" not in msg
    monkeypatch.setenv(PIXEL_LIMIT_ENV, "10000")
    apply_pixel_limit()
    assert Image.MAX_IMAGE_PIXELS == 10000
    assert len(ImageFolder(tmp_path)) == 2 and len(ImageFolder(tmp_path, image_size=8, channels=1)) == 2


# -- --skip-bad: every command that reads image folders ---------------------------------------


def _bad_folder(tmp_path: Path) -> tuple[Path, Path]:
    """``tmp_path/imgs/{train,test}``: 6 classes of 4 images and one of 1, one corrupt file in each subset."""
    from PIL import Image

    root = tmp_path / "imgs"
    bad = Path()
    for subset in ("train", "test"):
        for c in range(7):
            d = root / subset / f"c{c}"
            d.mkdir(parents=True)
            for i in range(1 if c == 6 else 4):
                Image.new("RGB", (28, 28), (30 * c, 20 * i, 90)).save(d / f"{i}.png")
        bad = root / subset / "c0" / "broken.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    return root, bad


def test_skip_bad_for_train_eval_and_pretrain(capsys, tmp_path):
    root, _ = _bad_folder(tmp_path)
    data = f"folder:{root}"
    train = [*TRAIN, "--dataset", data, "--k-shot", "1", "--steps", "1", "--val-subset", "none"]
    code, _, err = run_cli(capsys, *train, "--out", tmp_path / "run")
    line = assert_one_line_error(code, err, "broken.png", "use --skip-bad")
    assert "on_error=" not in line
    with pytest.warns(UserWarning):
        code, _, err = run_cli(capsys, *train, "--out", tmp_path / "run", "--skip-bad")
    assert code == 0, err
    ckpt = tmp_path / "run" / "last.safetensors"
    assert ckpt.is_file()

    evaluate = ["eval", "--checkpoint", ckpt, "--device", "cpu", "--no-progress", "--episodes", "2"]
    code, _, err = run_cli(capsys, *evaluate)  # --skip-bad is not inherited from the training run
    line = assert_one_line_error(code, err, "broken.png", "use --skip-bad")
    assert "on_error=" not in line
    with pytest.warns(UserWarning):
        code, out, err = run_cli(capsys, *evaluate, "--skip-bad")
    assert code == 0, err
    assert "accuracy" in out or "%" in out

    pretrain = ["pretrain", "--dataset", data, "--epochs", "1", "--device", "cpu", "--no-progress"]
    code, _, err = run_cli(capsys, *pretrain, "--out", tmp_path / "b")
    line = assert_one_line_error(code, err, "broken.png", "use --skip-bad")
    assert "on_error=" not in line
    with pytest.warns(UserWarning):
        code, _, err = run_cli(capsys, *pretrain, "--out", tmp_path / "b", "--skip-bad")
    assert code == 0, err


def test_too_few_images_says_skip_bad(capsys, tmp_path):
    root, _ = _bad_folder(tmp_path)
    for subset in ("train", "test"):
        (root / subset / "c0" / "broken.png").unlink()
    train = [*TRAIN, "--dataset", f"folder:{root}", "--k-shot", "1", "--steps", "1", "--val-subset", "none"]
    code, _, err = run_cli(capsys, *train, "--out", tmp_path / "run")
    line = assert_one_line_error(code, err, "'c6'", "use --skip-bad")
    assert "too_few=" not in line
    with pytest.warns(UserWarning, match="left out"):
        code, _, err = run_cli(capsys, *train, "--out", tmp_path / "run", "--skip-bad")
    assert code == 0, err


def test_skip_bad_keeps_existing_run_hashes():
    from metafew.config import RunConfig

    # computed before RunConfig had skip_bad: run folders written then still match
    assert RunConfig().train_key() == "0ab5b876"
    assert RunConfig(dataset="folder:/tmp/x", learner="maml", steps=5, amp="bf16").train_key() == "324f79cc"
    assert RunConfig(skip_bad=True).train_key() != "0ab5b876"  # it changes which images train
    assert RunConfig(dataset="folder:/x", skip_bad=True).dataset_options() == {"on_error": "skip"}
    assert RunConfig(dataset="breastmnist", skip_bad=True).dataset_options() == {}


def test_a_corrupt_png_inside_lakes_runs_zip_is_one_line_naming_the_archive(tmp_path):
    import zipfile

    from metafew.data import lake

    official = lake.find_lake_runs(OMNIGLOT.parent)
    if official is None:
        pytest.skip("Lake's all_runs.zip is not in the shared data")
    broken = tmp_path / "omniglot" / "one-shot-classification" / "all_runs.zip"
    broken.parent.mkdir(parents=True)
    member = "run03/test/item07.png"
    with zipfile.ZipFile(official) as src, zipfile.ZipFile(broken, "w") as dst:
        for info in src.infolist():
            data = b"\x89PNG\r\n\x1a\n" + b"garbage" * 20 if info.filename == member else src.read(info)
            dst.writestr(info, data)
    with pytest.raises(DatasetError) as info:  # the user's path: the archive's md5 is checked first
        lake.lake_runs(tmp_path)
    assert str(broken) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DatasetError) as info:  # the decode itself names the member
        lake._read_images(broken, 28)
    msg = str(info.value)
    assert str(broken) in msg and member in msg and "not a readable image" in msg and "\n" not in msg


def test_ctrl_c_while_the_command_starts_up_exits_quietly():
    """SIGINT while `metafew` is still importing torch: exit 130, one line, no traceback."""
    import signal
    import subprocess
    import sys
    import time

    script = Path(sys.executable).with_name("metafew")
    assert script.is_file(), script
    import_started = "import sys, time\nclass Slow:\n    def find_spec(self, name, *a):\n        if name == 'torch': time.sleep(60)\n"
    sitecustom = Path(os.environ.get("TMPDIR", "/tmp")) / f"metafew-slow-import-{os.getpid()}"
    sitecustom.mkdir(exist_ok=True)
    (sitecustom / "sitecustomize.py").write_text(
        import_started + "        return None\nsys.meta_path.insert(0, Slow())\nprint('ready', flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(sitecustom)}
    proc = subprocess.Popen(  # SIGINT back to its default: pytest-xdist workers ignore it, and children inherit that
        [str(script), "--help"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(1.0)  # the console script is now importing metafew.cli.main, stuck on torch
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, (proc.returncode, err)
    assert err.strip() == "metafew: interrupted" and "Traceback" not in err
    shutil.rmtree(sitecustom, ignore_errors=True)
