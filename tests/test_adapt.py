"""``metafew.adapt`` / ``metafew.load`` and ``metafew adapt`` / ``metafew predict`` on real PneumoniaMNIST.

The backbone is a seeded, randomly initialised Conv-4 saved as a checkpoint: on
PneumoniaMNIST its features already put prototypes well above chance (balanced
accuracy ~0.73, AUC ~0.83 at 10 shots), which is enough to test the whole path in
seconds. Image folders are written from real PneumoniaMNIST images.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metafew
from metafew.adaptation import AdaptationWarning, OutputError
from metafew.backbones import create
from metafew.checkpoint import save_backbone
from metafew.errors import CheckpointError, DatasetError

# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backbone_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random Conv-4 for 1x28x28 images, as a checkpoint."""
    torch.manual_seed(0)
    bb = create("conv4", in_channels=1, image_size=28)
    return save_backbone(bb, tmp_path_factory.mktemp("bb") / "conv4-gray.safetensors", mean=[0.5], std=[0.25])


@pytest.fixture(scope="module")
def rgb_backbone_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random Conv-4 for 3x32x32 images: another channel count and size than the data."""
    torch.manual_seed(0)
    bb = create("conv4", in_channels=3, image_size=32)
    return save_backbone(bb, tmp_path_factory.mktemp("bb") / "conv4-rgb.safetensors", mean=[0.5] * 3, std=[0.25] * 3)


@pytest.fixture(scope="module")
def pneumonia_npz(data_root: Path) -> dict[str, np.ndarray]:
    with np.load(data_root / "medmnist" / "pneumoniamnist.npz") as f:
        return {k: f[k] for k in ("train_images", "train_labels", "test_images", "test_labels")}


def write_folder(root: Path, npz: dict[str, np.ndarray], per_class: dict[str, int], start: int = 0) -> Path:
    """``root/<class>/<n>.png`` from PneumoniaMNIST train images (0 normal, 1 pneumonia)."""
    labels = npz["train_labels"].reshape(-1)
    for c, name in enumerate(["normal", "pneumonia"]):
        if name not in per_class:
            continue
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, j in enumerate(np.flatnonzero(labels == c)[start : start + per_class[name]]):
            Image.fromarray(npz["train_images"][j]).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture()
def folder(tmp_path: Path, pneumonia_npz: dict[str, np.ndarray]) -> Path:
    return write_folder(tmp_path / "xrays", pneumonia_npz, {"normal": 12, "pneumonia": 12})


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from metafew.cli.main import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("metafew: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


# -- the library ------------------------------------------------------------------------


def test_adapt_pneumoniamnist_end_to_end(backbone_ckpt: Path, tmp_path: Path) -> None:
    model = metafew.adapt(
        "pneumoniamnist", backbone_ckpt, method="protonet", shots=10, eval_draws=5, max_eval=400, device="cpu"
    )
    r = model.report
    assert model.classes == ["normal", "pneumonia"] and r is not None
    assert r.draws == 5 and len(r.per_draw) == 5 and r.scored_per_draw == 400
    assert r.support_per_class == {"normal": 10, "pneumonia": 10}
    assert r.accuracy is not None and r.auc is not None
    for s in (r.accuracy, r.balanced_accuracy, r.auc):
        assert 0 <= s.low <= s.mean <= s.high <= 1 and s.ci95 >= 0
    assert np.asarray(r.confusion).sum() == 5 * 400
    assert set(r.recall) == {"normal", "pneumonia"} and all(0 <= v <= 1 for v in r.recall.values())
    assert r.balanced_accuracy.mean > 0.6 and r.auc.mean > 0.7
    assert "accuracy" in r.summary() and "AUC" in r.summary()
    assert r.temperature is not None and model.temperature == r.temperature

    test = model.evaluate("pneumoniamnist")  # the official test split
    assert test.n == 624 and sum(map(sum, test.confusion)) == 624
    assert test.balanced_accuracy > 0.6 and test.auc > 0.7  # chance: 0.5 / 0.5
    assert test.accuracy_ci95[0] < test.accuracy < test.accuracy_ci95[1]

    from metafew.data.medmnist import MedMNIST

    images = MedMNIST("pneumoniamnist", "test").images[:40]
    p = model.predict_proba(images)
    assert p.shape == (40, 2) and torch.allclose(p.sum(1), torch.ones(40))
    single = torch.cat([model.predict_proba(images[i]) for i in range(3)])
    assert torch.allclose(single, p[:3], atol=1e-5)  # batch independent (up to float rounding)

    path = model.save(tmp_path / "model")
    assert path.name == "model.safetensors"
    loaded = metafew.load(path, device="cpu")
    assert loaded.classes == model.classes and loaded.method == "protonet"
    assert torch.equal(loaded.predict_proba(images), p)
    assert loaded.report is not None and loaded.report.accuracy.mean == r.accuracy.mean

    preds = model.predict(images[:2])
    assert [q.label for q in preds] == [model.classes[int(i)] for i in p[:2].argmax(1)]
    assert set(preds[0].probabilities) == {"normal", "pneumonia"}


def test_calibration_and_batchnorm_statistics(backbone_ckpt: Path, folder: Path) -> None:
    files = sorted((folder / "pneumonia").glob("*.png"))
    calibrated = metafew.adapt(folder, backbone_ckpt, shots=5, eval_draws=4, device="cpu")
    raw = metafew.adapt(folder, backbone_ckpt, shots=5, eval_draws=4, device="cpu", calibrate=False)
    t = calibrated.report.temperature
    assert t is not None and t > 0 and calibrated.temperature == t
    assert raw.report.temperature is None and raw.temperature == 1.0
    assert "temperature" in calibrated.report.summary()
    p, q = calibrated.predict_proba(files), raw.predict_proba(files)
    assert torch.equal(p.argmax(1), q.argmax(1))  # a temperature never changes the predicted class
    assert torch.allclose(p, (q.log() / t).softmax(1), atol=1e-5)
    frozen = metafew.adapt(folder, backbone_ckpt, shots=5, eval_draws=0, device="cpu", bn_stats="backbone")
    assert frozen.support["bn_stats"] == "backbone" and calibrated.support["bn_stats"] == "support"
    assert not torch.allclose(frozen.predict_proba(files), q)  # AdaBN statistics change the features


def test_same_seed_same_model(backbone_ckpt: Path, folder: Path) -> None:
    a = metafew.adapt(folder, backbone_ckpt, shots=3, eval_draws=3, device="cpu")
    b = metafew.adapt(folder, backbone_ckpt, shots=3, eval_draws=3, device="cpu")
    c = metafew.adapt(folder, backbone_ckpt, shots=3, eval_draws=3, device="cpu", seed=1)
    assert a.report.per_draw == b.report.per_draw
    assert a.support["indices"] == b.support["indices"] != c.support["indices"]


@pytest.mark.parametrize("method", ["finetune", "maml"])
def test_methods_round_trip(method: str, backbone_ckpt: Path, folder: Path, tmp_path: Path) -> None:
    model = metafew.adapt(folder, backbone_ckpt, method=method, shots=5, eval_draws=2, device="cpu")
    assert model.report.accuracy is not None
    files = sorted((folder / "normal").glob("*.png"))[:6]
    p = model.predict_proba(files)
    # Transductive BatchNorm (MAML) uses the support statistics: one image at a time gives the same answer.
    single = torch.cat([model.predict_proba(f) for f in files])
    assert torch.allclose(single, p, atol=1e-4)  # batched convolutions round differently
    loaded = metafew.load(model.save(tmp_path / f"{method}.safetensors"), device="cpu")
    assert torch.equal(loaded.predict_proba(files), p)


def test_shots_all_and_small_classes(backbone_ckpt: Path, tmp_path: Path, pneumonia_npz: dict[str, np.ndarray]) -> None:
    root = write_folder(tmp_path / "few", pneumonia_npz, {"normal": 3, "pneumonia": 10})
    with pytest.warns(AdaptationWarning) as caught:
        model = metafew.adapt(root, backbone_ckpt, shots=5, eval_draws=4, device="cpu")
    messages = [str(w.message) for w in caught]
    assert any("only 3 images" in m for m in messages) and any("scoring the one left out" in m for m in messages)
    r = model.report
    assert r.support_per_class == {"normal": 3, "pneumonia": 5}
    assert r.draw_support_per_class == {"normal": 2, "pneumonia": 5}  # one normal image held out per draw
    model = metafew.adapt(root, backbone_ckpt, shots="all", eval_draws=4, device="cpu")
    assert model.report.support_per_class == {"normal": 3, "pneumonia": 10}
    assert model.report.draw_support_per_class == {"normal": 2, "pneumonia": 8}


def test_class_with_one_image_is_used_but_not_scored(
    backbone_ckpt: Path, tmp_path: Path, pneumonia_npz: dict[str, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_folder(tmp_path / "one", pneumonia_npz, {"normal": 1, "pneumonia": 8})
    with pytest.warns(AdaptationWarning) as caught:
        model = metafew.adapt(root, backbone_ckpt, shots=5, eval_draws=3, device="cpu")
    assert any("single image" in str(w.message) for w in caught)
    assert model.report.recall["normal"] is None and model.report.recall["pneumonia"] is not None
    assert model.report.support_per_class["normal"] == 1
    assert any("cannot be evaluated" in n for n in model.report.notes)
    assert len(model.predict(root / "normal")) == 1

    rc, out, err = cli(
        ["adapt", "--data", root, "--backbone", backbone_ckpt, "--draws", "2", "--out", tmp_path / "m.safetensors"],
        capsys,
    )
    assert rc == 0, err
    assert "metafew: warning:" in err and "single image" in err and "Traceback" not in err
    assert "normal n/a" in out


def test_mixed_sizes_and_modes_work(backbone_ckpt: Path, rgb_backbone_ckpt: Path, folder: Path, tmp_path: Path) -> None:
    img = np.asarray(Image.open(folder / "normal" / "000.png"))
    Image.fromarray(np.stack([img] * 3, -1)).resize((90, 60)).save(folder / "normal" / "rgb.jpg")
    Image.fromarray(np.stack([img] * 3 + [np.full_like(img, 255)], -1), "RGBA").resize((50, 50)).save(
        folder / "normal" / "rgba.png"
    )
    Image.fromarray(img.astype(np.uint16) * 257).save(folder / "pneumonia" / "sixteen.png")
    Image.fromarray(img).convert("P").save(folder / "pneumonia" / "palette.gif")
    model = metafew.adapt(folder, backbone_ckpt, shots=5, eval_draws=2, device="cpu")
    assert model.report.images_per_class == {"normal": 14, "pneumonia": 14}
    preds = model.predict([folder / "normal" / "rgb.jpg", folder / "pneumonia" / "sixteen.png", Image.fromarray(img)])
    assert len(preds) == 3
    # A backbone for 3-channel 32x32 images on 1-channel 28x28 data: converted (gray repeated, resized).
    rgb = metafew.adapt(folder, rgb_backbone_ckpt, shots=5, eval_draws=2, device="cpu")
    assert rgb.preprocessing.channels == 3 and rgb.preprocessing.image_size == (32, 32)
    assert len(rgb.predict(folder / "normal")) == 14
    assert rgb.predict_proba(torch.rand(2, 1, 28, 28)).shape == (2, 2)  # float tensors of another size and channels


def test_backbone_module_needs_its_normalisation(folder: Path) -> None:
    from metafew.errors import ConfigError

    torch.manual_seed(0)
    module = create("conv4", in_channels=1, image_size=28)
    with pytest.raises(ConfigError, match="mean= and std="):
        metafew.adapt(folder, module, shots=2, eval_draws=0, device="cpu")
    model = metafew.adapt(folder, module, mean=[0.5], std=[0.25], shots=2, eval_draws=1, device="cpu")
    assert model.preprocessing.mean == (0.5,) and model.backbone_info["arch"] == "conv4"
    assert next(module.parameters()).device.type == "cpu" and module.training  # the caller's module is untouched


def test_impossible_channel_conversion(backbone_ckpt: Path) -> None:
    ds = metafew.FewShotDataset(
        "five", [0, 0, 1, 1], ["a", "b"], torch.zeros(4, 5, 8, 8, dtype=torch.uint8), channels=5, image_size=(8, 8)
    )
    with pytest.raises(DatasetError, match="5-channel"):
        metafew.adapt(ds, backbone_ckpt, shots=1, eval_draws=1, device="cpu")


# -- the command line ---------------------------------------------------------------------


def test_cli_adapt_and_predict(
    backbone_ckpt: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out" / "xray.safetensors"
    rc, stdout, err = cli(
        ["adapt", "--data", folder, "--backbone", backbone_ckpt, "--shots", "5", "--draws", "3", "--out", out], capsys
    )
    assert rc == 0, err
    assert "accuracy" in stdout and "AUC" in stdout and "recall" in stdout
    report = json.loads((tmp_path / "out" / "xray.report.json").read_text())
    assert report["format"] == "metafew-adaptation-report" and report["draws"] == 3
    assert 0 <= report["accuracy"]["mean"] <= 1
    png = tmp_path / "out" / "xray.confusion.png"
    assert Image.open(png).format == "PNG"

    csv_path = tmp_path / "pred.csv"
    rc, _, err = cli(
        ["predict", "--model", out, folder / "normal", folder / "pneumonia" / "000.png", "--out", csv_path], capsys
    )
    assert rc == 0, err
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "path,class,p_normal,p_pneumonia" and len(rows) == 1 + 13
    rc, stdout, err = cli(["predict", "--model", out, folder / "pneumonia", "--format", "json"], capsys)
    assert rc == 0, err
    doc = json.loads(stdout)
    assert doc["classes"] == ["normal", "pneumonia"] and len(doc["predictions"]) == 12
    # Running again replaces its own outputs only with --overwrite.
    rc, _, err = cli(["adapt", "--data", folder, "--backbone", backbone_ckpt, "--draws", "1", "--out", out], capsys)
    assert_one_line_error(rc, err, "--overwrite")
    adapt_again = ["adapt", "--data", folder, "--backbone", backbone_ckpt, "--draws", "1", "--out", out]
    rc, _, err = cli([*adapt_again, "--overwrite"], capsys)
    assert rc == 0, err
    rc, _, err = cli(["predict", "--model", out, folder / "normal", "--out", csv_path], capsys)
    assert_one_line_error(rc, err, "--overwrite")
    rc, _, err = cli(["predict", "--model", out, folder / "normal", "--out", csv_path, "--overwrite"], capsys)
    assert rc == 0, err


@pytest.mark.parametrize("bad", ["corrupt", "not_image"])
def test_cli_bad_file_named_or_skipped(
    bad: str, backbone_ckpt: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = folder / "normal" / ("broken.png" if bad == "corrupt" else "notes.txt")
    target.write_bytes(b"\x89PNG\r\n\x1a\n garbage" if bad == "corrupt" else b"patient notes\n")
    out = tmp_path / "m.safetensors"
    rc, _, err = cli(["adapt", "--data", folder, "--backbone", backbone_ckpt, "--draws", "1", "--out", out], capsys)
    assert_one_line_error(rc, err, target.name, "--skip-bad")
    assert not out.exists() and not (tmp_path / "m.report.json").exists()
    rc, _, err = cli(
        ["adapt", "--data", folder, "--backbone", backbone_ckpt, "--draws", "1", "--out", out, "--skip-bad"], capsys
    )
    assert rc == 0, err
    assert target.name in err  # the warning names it
    assert target.exists()  # the user's file is left alone
    if bad == "corrupt":
        rc, _, err = cli(["predict", "--model", out, target], capsys)
        assert_one_line_error(rc, err, target.name)
        rc, stdout, err = cli(["predict", "--model", out, folder / "normal", "--skip-bad"], capsys)
        assert rc == 0 and len(stdout.splitlines()) == 1 + 12 and target.name in err


def test_cli_refuses_to_overwrite(
    backbone_ckpt: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    precious = tmp_path / "notes.safetensors"
    precious.write_bytes(b"not a model, but the user's data")
    rc, _, err = cli(
        ["adapt", "--data", folder, "--backbone", backbone_ckpt, "--draws", "1", "--out", precious], capsys
    )
    assert_one_line_error(rc, err, "refusing to overwrite", str(precious.name))
    assert precious.read_bytes() == b"not a model, but the user's data"
    assert not (tmp_path / "notes.report.json").exists()

    backbone_copy = tmp_path / "backbone.safetensors"  # a metafew checkpoint, but not a model: refused too
    shutil.copy(backbone_ckpt, backbone_copy)
    before = backbone_copy.read_bytes()
    rc, _, err = cli(
        ["adapt", "--data", folder, "--backbone", backbone_copy, "--draws", "1", "--out", backbone_copy], capsys
    )
    assert_one_line_error(rc, err, "refusing to overwrite")
    assert backbone_copy.read_bytes() == before

    report = tmp_path / "m.report.json"
    report.write_text("{}")
    rc, _, err = cli(
        ["adapt", "--data", folder, "--backbone", backbone_ckpt, "--draws", "1", "--out", tmp_path / "m"], capsys
    )
    assert_one_line_error(rc, err, "m.report.json")
    assert report.read_text() == "{}" and not (tmp_path / "m.safetensors").exists()

    rc, _, err = cli(
        ["adapt", "--data", folder, "--backbone", backbone_ckpt, "--draws", "1", "--out", folder / "m.safetensors"],
        capsys,
    )
    assert_one_line_error(rc, err, "inside the image folder")
    assert not (folder / "m.safetensors").exists()

    rc, _, err = cli(
        ["adapt", "--data", folder, "--backbone", backbone_ckpt, "--draws", "1", "--out", tmp_path / "ok"], capsys
    )
    assert rc == 0, err
    sheet = tmp_path / "results.csv"
    sheet.write_text("id,diagnosis\n1,normal\n")
    rc, _, err = cli(["predict", "--model", tmp_path / "ok.safetensors", folder / "normal", "--out", sheet], capsys)
    assert_one_line_error(rc, err, "refusing to overwrite")
    assert sheet.read_text() == "id,diagnosis\n1,normal\n"


def test_model_from_another_version(
    backbone_ckpt: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = metafew.adapt(folder, backbone_ckpt, shots=2, eval_draws=0, device="cpu")
    path = model.save(tmp_path / "m.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    doc = json.loads(meta["metafew"])
    doc["record"]["model_format_version"] = 99
    doc["record"]["metafew_version"] = "9.0.0"
    future = tmp_path / "future.safetensors"
    save_file(tensors, str(future), metadata={"metafew": json.dumps(doc)})
    with pytest.raises(CheckpointError, match="format version 99"):
        metafew.load(future)
    rc, _, err = cli(["predict", "--model", future, folder / "normal"], capsys)
    assert_one_line_error(rc, err, "format version 99", "upgrade metafew")
    rc, _, err = cli(["predict", "--model", backbone_ckpt, folder / "normal"], capsys)
    assert_one_line_error(rc, err, "not an adapted model")
    # A later save over the future-version file is allowed (it is a metafew model file).
    model.save(future)
    assert metafew.load(future).classes == ["normal", "pneumonia"]


def test_save_refuses_foreign_file(backbone_ckpt: Path, folder: Path, tmp_path: Path) -> None:
    model = metafew.adapt(folder, backbone_ckpt, shots=2, eval_draws=0, device="cpu")
    assert model.report.draws == 0 and model.report.accuracy is None
    photo = tmp_path / "photo.png"
    shutil.copy(folder / "normal" / "000.png", photo)
    before = photo.read_bytes()
    with pytest.raises(OutputError):
        model.save(photo)
    with pytest.raises(OutputError):
        model.save(tmp_path)  # a folder
    assert photo.read_bytes() == before


def write_version_1(model: metafew.AdaptedModel, path: Path, classifier_class: str | None = None) -> Path:
    """``model`` in the layout metafew 0.1.0 wrote (model format version 1): nested learner state,
    classifier attributes and ``backbone.``-named support BatchNorm statistics."""
    from metafew.checkpoint import save_state

    clf = model.classifier
    state = {"learner": dict(model.learner.state_dict()), "classifier": {}}
    for name in clf.saved:
        value = getattr(clf, name)
        state["classifier"][name] = value if isinstance(value, torch.Tensor) or value is None else value.as_dict()
    record = {
        "model_format": "metafew-adapted-model", "model_format_version": 1, "method": model.method,
        "options": model.options, "classes": model.classes, "preprocessing": model.preprocessing.to_dict(),
        "backbone": model.backbone_info, "support": model.support, "report": None, "temperature": model.temperature,
        "classifier_class": classifier_class or f"{type(clf).__module__}:{type(clf).__qualname__}",
        "query_bn": "support" if clf.bn_stats is not None else "batch",
    }  # fmt: skip
    if clf.bn_stats is not None:
        state["bn_stats"] = {f"backbone.{k}": {"mean": m, "var": v} for k, (m, v) in clf.support_stats().items()}
    return save_state(state, path, record)


@pytest.mark.parametrize("method", ["protonet", "maml"])
def test_version_1_model_files_load_or_fail_naming_versions(
    method: str, backbone_ckpt: Path, folder: Path, tmp_path: Path
) -> None:
    model = metafew.adapt(folder, backbone_ckpt, method=method, shots=3, eval_draws=2, device="cpu")
    files = sorted((folder / "pneumonia").glob("*.png"))[:4]
    old = metafew.load(write_version_1(model, tmp_path / "v1.safetensors"), device="cpu")
    assert old.temperature == model.temperature and type(old.classifier) is type(model.classifier)
    assert torch.equal(old.predict_proba(files), model.predict_proba(files))
    bad = write_version_1(model, tmp_path / "odd.safetensors", classifier_class="metafew.learners.gone:GoneClassifier")
    with pytest.raises(CheckpointError) as e:
        metafew.load(bad)
    message = str(e.value)
    assert "\n" not in message and str(bad) in message and "format version 1" in message
    assert f"this metafew {metafew.__version__} reads versions 1, 2" in message


def test_adapted_model_is_classifier_plus_preprocessing(backbone_ckpt: Path, folder: Path) -> None:
    model = metafew.adapt(folder, backbone_ckpt, method="maml", shots=3, eval_draws=0, device="cpu")
    assert isinstance(model.classifier, torch.nn.Module) and model.classifier.bn.name == "transductive"
    assert model.classifier.bn_stats is not None  # support statistics: one image at a time
    x = model.preprocessing(torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8))
    assert torch.equal(model.logits(x), model.classifier(x).detach() / model.temperature)
