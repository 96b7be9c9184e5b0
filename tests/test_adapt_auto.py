"""``metafew.adapt(..., backbone="auto")``, what the estimate's figures cover, the evaluate
warning on a model's own support images, and progress lines when output is not a terminal.

The image folders are real Omniglot drawings (Gurmukhi characters of the evaluation
alphabets, 105x105 PNG). The two candidates are the shipped ``omniglot-conv4`` (ProtoNet
features pretrained on Omniglot) and a seeded random Conv-4 saved to a file: on these
glyphs the pretrained one is clearly better, so a working choice must prefer it.
"""

from __future__ import annotations

import importlib
import io
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli

import metafew
from metafew.adaptation import AdaptationWarning, select
from metafew.adaptation.metrics import bootstrap_draws_interval, bootstrap_interval
from metafew.backbones import create, list_weights
from metafew.checkpoint import save_backbone
from metafew.errors import ConfigError
from metafew.progress import ProgressLines, progress, tqdm

estimate_module = importlib.import_module("metafew.adaptation.estimate")  # the package exports the function

CLASSES = 5
PER_CLASS = 8


def glyph_folder(root: Path, data_root: Path, first: int) -> Path:
    """``root/<character>/<drawing>.png``: 5 Gurmukhi characters, drawings ``first..first+7`` of each."""
    src = data_root / "omniglot" / "images_evaluation" / "Gurmukhi"
    for ch in sorted(src.iterdir())[:CLASSES]:
        (root / ch.name).mkdir(parents=True)
        for f in sorted(ch.iterdir())[first : first + PER_CLASS]:
            shutil.copy(f, root / ch.name / f.name)
    return root


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    return glyph_folder(tmp_path_factory.mktemp("auto") / "glyphs", data_root, first=0)


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    bb = create("conv4", in_channels=1, image_size=28)
    return save_backbone(bb, tmp_path_factory.mktemp("bb") / "random-conv4.safetensors", mean=[0.5], std=[0.25])


@pytest.fixture()
def two_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only ``omniglot-conv4`` ships (besides the listed random one): a two-candidate choice, and fast."""
    monkeypatch.setattr(select, "list_weights", lambda: ["omniglot-conv4"])


@pytest.fixture(scope="module")
def auto_model(glyphs: Path, random_ckpt: Path) -> metafew.AdaptedModel:
    mp = pytest.MonkeyPatch()
    mp.setattr(select, "list_weights", lambda: ["omniglot-conv4"])
    try:
        return metafew.adapt(glyphs, "auto", candidates=[random_ckpt], shots=3, eval_draws=6, device="cpu")
    finally:
        mp.undo()


# -- backbone="auto" --------------------------------------------------------------------


def test_auto_prefers_the_pretrained_backbone(auto_model: metafew.AdaptedModel) -> None:
    sel = auto_model.report.selection
    by_name = {c["name"]: c for c in sel["candidates"]}
    assert set(by_name) == {"omniglot-conv4/protonet", "random-conv4.safetensors/protonet"}
    good, bad = by_name["omniglot-conv4/protonet"], by_name["random-conv4.safetensors/protonet"]
    assert sel["chosen"] == "omniglot-conv4/protonet"
    assert auto_model.backbone_info["checkpoint"] == "omniglot-conv4"
    assert good["inner_score"] > bad["inner_score"] + 0.1
    assert good["inner_score_draws"] > bad["inner_score_draws"]
    assert good["chosen_in_draws"] + bad["chosen_in_draws"] == 6 and good["chosen_in_draws"] >= 5
    assert [d["chosen"] for d in auto_model.report.per_draw].count("omniglot-conv4/protonet") == good["chosen_in_draws"]
    assert auto_model.report.balanced_accuracy.mean > 0.6  # chance: 0.2


def test_auto_report_lists_candidates_in_json_and_summary(auto_model: metafew.AdaptedModel, tmp_path: Path) -> None:
    path = auto_model.report.save_json(tmp_path / "r.report.json")
    doc = json.loads(path.read_text())
    assert [c["name"] for c in doc["selection"]["candidates"]] == [
        "omniglot-conv4/protonet",
        "random-conv4.safetensors/protonet",
    ]
    assert all(isinstance(c["inner_score"], float) for c in doc["selection"]["candidates"])
    text = auto_model.report.summary()
    assert "backbone chosen automatically among 2 candidates" in text
    assert "random-conv4.safetensors/protonet: inner score" in text
    assert "omniglot-conv4/protonet: inner score" in text and "<- chosen for the model" in text
    assert "the estimate is nested" in text
    # the loaded model keeps the report with its selection
    loaded = metafew.load(auto_model.save(tmp_path / "m.safetensors"), device="cpu")
    assert loaded.report.selection == doc["selection"]
    assert loaded.report.accuracy.test_bootstrap == auto_model.report.accuracy.test_bootstrap


def test_the_choice_never_sees_the_images_a_draw_is_scored_on(
    glyphs: Path, random_ckpt: Path, two_candidates: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, set[int], set[int]]] = []
    real_draw, real_inner = estimate_module.draw_support, select.inner_score

    def draw_support(labels, sizes, gen):
        support, held = real_draw(labels, sizes, gen)
        events.append(("draw", set(support.tolist()), set(held.tolist())))
        return support, held

    def inner_score(selection, c, index, seed):
        events.append(("inner", set(index.tolist()), set()))
        return real_inner(selection, c, index, seed)

    monkeypatch.setattr(estimate_module, "draw_support", draw_support)
    monkeypatch.setattr(select, "inner_score", inner_score)
    model = metafew.adapt(glyphs, "auto", candidates=[random_ckpt], shots=3, eval_draws=3, device="cpu")
    assert model.report.draws == 3
    draws = [e for e in events if e[0] == "draw"]
    assert len(draws) == 3
    support: set[int] | None = None
    held: set[int] = set()
    checked = 0
    for kind, seen, h in events:
        if kind == "draw":
            support, held = seen, h
            assert held and not (support & held)
        elif support is not None:  # an inner choice inside a draw (before the first: the model's own choice)
            assert seen <= support and not (seen & held)
            checked += 1
    assert checked == 3 * 2  # each draw scores both candidates


def test_protonet_features_are_computed_once_when_batchnorm_allows(
    glyphs: Path, random_ckpt: Path, two_candidates: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = select.Selection._embed

    def embed(self, c, images, stats):
        calls.append(len(images))
        return real(self, c, images, stats)

    monkeypatch.setattr(select.Selection, "_embed", embed)
    model = metafew.adapt(
        glyphs, "auto", candidates=[random_ckpt], shots=3, eval_draws=3, bn_stats="backbone", device="cpu"
    )
    assert calls == [CLASSES * PER_CLASS] * 2  # every image once per candidate, reused by every draw
    assert model.report.selection["chosen"] == "omniglot-conv4/protonet"


def test_auto_with_two_methods_and_options(glyphs: Path, two_candidates: None) -> None:
    model = metafew.adapt(glyphs, "auto", method=["protonet", "finetune"], shots=2, eval_draws=1, device="cpu", steps=3)
    names = [c["name"] for c in model.report.selection["candidates"]]
    assert names == ["omniglot-conv4/protonet", "omniglot-conv4/finetune"]
    assert model.method in ("protonet", "finetune") and model.report.method == model.method
    with pytest.raises(ConfigError, match="fit none of the methods"):
        metafew.adapt(glyphs, "auto", shots=2, eval_draws=0, device="cpu", steps=3)


def test_auto_refusals(glyphs: Path, random_ckpt: Path) -> None:
    with pytest.raises(ConfigError, match="backbone='auto'"):
        metafew.adapt(glyphs, random_ckpt, candidates=[random_ckpt], eval_draws=0, device="cpu")
    with pytest.raises(ConfigError, match="only with backbone='auto'"):
        metafew.adapt(glyphs, random_ckpt, method=["protonet", "finetune"], eval_draws=0, device="cpu")
    assert select.candidate_backbones([random_ckpt])[: len(list_weights())] == list_weights()


def test_inner_folds_are_stratified_and_keep_every_class() -> None:
    labels = torch.tensor([0] * 7 + [1] * 3 + [2])
    fold, k = select.inner_folds(labels, 5, torch.Generator().manual_seed(0))
    assert k == 3  # lowered to the smallest class that can be split
    assert fold[10] == -1  # a single image is never held out
    for f in range(k):
        train = labels[fold != f]
        assert set(train.tolist()) == {0, 1, 2}
    assert sorted(fold[labels == 1].tolist()) == [0, 1, 2]


def test_cli_backbone_auto_end_to_end(
    glyphs: Path, random_ckpt: Path, two_candidates: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "glyph-model.safetensors"
    code, stdout, err = run_cli(
        capsys, "adapt", "--data", glyphs, "--backbone", "auto", "--candidate", random_ckpt, "--shots", "3",
        "--draws", "3", "--out", out, "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert "backbone chosen automatically among 2 candidates" in stdout
    assert "random-conv4.safetensors/protonet: inner score" in stdout
    assert "± is the 95% CI of the mean over the 3 support draws only" in stdout
    assert "not the variation between pretraining runs" in stdout and "only test set" in stdout
    assert "test-set bootstrap" in stdout and "2.5-97.5% of single draws" in stdout
    doc = json.loads((tmp_path / "glyph-model.report.json").read_text())
    assert doc["selection"]["chosen"] == "omniglot-conv4/protonet"

    code, _, err = run_cli(
        capsys, "adapt", "--data", glyphs, "--backbone", random_ckpt, "--candidate", random_ckpt,
        "--out", tmp_path / "x", "--device", "cpu",
    )  # fmt: skip
    assert_one_line_error(code, err, "--backbone auto")


# -- what the figures cover -------------------------------------------------------------


def test_summary_says_what_the_interval_covers(glyphs: Path, random_ckpt: Path) -> None:
    model = metafew.adapt(glyphs, random_ckpt, shots=3, eval_draws=4, device="cpu")
    r = model.report
    text = r.summary()
    assert "± is the 95% CI of the mean over the 4 support draws only" in text
    assert "with this one backbone (not the variation between pretraining runs of a backbone)" in text
    assert "these images as the only test set (not a fresh test set's sampling error)" in text
    lo, hi = r.accuracy.test_bootstrap
    assert f"test-set bootstrap {lo:.3f}-{hi:.3f}" in text
    assert f"2.5-97.5% of single draws {r.accuracy.low:.3f}-{r.accuracy.high:.3f}" in text
    assert lo <= r.accuracy.mean <= hi


def test_bootstrap_interval_matches_the_normal_reference_and_shrinks() -> None:
    rng = np.random.default_rng(0)
    widths = []
    for n in (400, 1600):
        correct = np.zeros(n)
        correct[: int(0.8 * n)] = 1  # accuracy exactly 0.8
        rng.shuffle(correct)
        lo, hi = bootstrap_interval(correct, resamples=1000, seed=1)
        half = 1.96 * np.sqrt(0.8 * 0.2 / n)  # the normal approximation of the binomial
        assert lo == pytest.approx(0.8 - half, abs=0.25 * half)
        assert hi == pytest.approx(0.8 + half, abs=0.25 * half)
        widths.append(hi - lo)
    assert widths[1] < 0.6 * widths[0]  # 4x the images: about half the width
    assert bootstrap_interval([]) is None


def test_draws_bootstrap_of_one_draw_is_the_plain_bootstrap() -> None:
    rng = np.random.default_rng(0)
    correct = (rng.random(300) < 0.7).astype(float)
    labels = np.zeros(300, dtype=np.int64)
    got = bootstrap_draws_interval([(np.arange(300), labels, correct)], 300, 2, seed=3)
    assert got["accuracy"] == pytest.approx(bootstrap_interval(correct, seed=3))
    # balanced accuracy: two classes of very different accuracy, each weighted equally
    labels = np.array([0] * 200 + [1] * 100)
    correct = np.concatenate([np.ones(200), np.zeros(50), np.ones(50)])
    b = bootstrap_draws_interval([(np.arange(300), labels, correct)], 300, 2, seed=0)["balanced_accuracy"]
    assert b[0] < 0.75 < b[1] and b[1] - b[0] < 0.15  # (1.0 + 0.5) / 2


# -- evaluate on the model's own support images -----------------------------------------


def test_evaluate_warns_on_the_models_own_support_images(
    auto_model: metafew.AdaptedModel, glyphs: Path, tmp_path: Path, data_root: Path
) -> None:
    with pytest.warns(UserWarning, match=r"15 of the 40 images .* this model was adapted on"):
        m = auto_model.evaluate(glyphs)
    assert any("adapted on" in n for n in m.notes)
    fresh = glyph_folder(tmp_path / "fresh", data_root, first=PER_CLASS)  # other drawings of the same characters
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdaptationWarning)
        assert auto_model.evaluate(fresh).n == CLASSES * PER_CLASS
    loaded = metafew.load(auto_model.save(tmp_path / "m.safetensors"), device="cpu")
    with pytest.warns(UserWarning, match="adapted on"):
        loaded.evaluate(glyphs)
    loaded.support.pop("sha1")  # a model saved before the hashes were kept
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdaptationWarning)
        loaded.evaluate(glyphs)


def test_cli_predict_evaluate_prints_the_warning(
    auto_model: metafew.AdaptedModel, glyphs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = auto_model.save(tmp_path / "m.safetensors")
    code, out, err = run_cli(capsys, "predict", "--model", path, "--evaluate", glyphs, "--device", "cpu")
    assert code == 0, err
    assert "40 images, 5 classes" in out and "accuracy" in out
    assert "metafew: warning: 15 of the 40 images" in err and "adapted on" in err
    code, _, err = run_cli(capsys, "predict", "--model", path, "--device", "cpu")
    assert_one_line_error(code, err, "--evaluate")


# -- progress when output is not a terminal ---------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_lines_every_tenth_with_elapsed_and_eta() -> None:
    clock, out = Clock(), io.StringIO()
    bar = ProgressLines(total=100, desc="estimate", unit="draws", file=out, clock=clock, delay=2.0)
    for _ in range(100):
        clock.t += 0.3
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "estimate: 10/100 draws, 3 s elapsed, ~27 s left"
    assert "estimate: 40/100 draws, 12 s elapsed, ~18 s left" in lines
    assert lines[-1] == "estimate: 100/100 draws, 30 s elapsed"
    assert len(lines) == 10 and not any("\r" in line for line in lines)


def test_progress_lines_quiet_for_short_work_and_every_30_s_for_slow_work() -> None:
    clock, out = Clock(), io.StringIO()
    with ProgressLines(total=1000, desc="decoding", unit="img", file=out, clock=clock) as bar:
        for _ in range(1000):
            clock.t += 0.001  # one second in all: under the 2 s delay
            bar.update(1)
    assert out.getvalue() == ""
    clock, out = Clock(), io.StringIO()
    bar = ProgressLines(total=None, desc="train", unit="step", file=out, clock=clock)
    for _ in range(90):
        clock.t += 1.0
        bar.update(1)
    bar.set_postfix({"loss": "0.51"})
    bar.close()
    assert out.getvalue().splitlines() == [
        "train: 30 step, 30 s elapsed",
        "train: 60 step, 60 s elapsed",
        "train: 90 step, 90 s elapsed",
    ]


def test_progress_lines_scale_byte_counts() -> None:
    clock, out = Clock(), io.StringIO()
    bar = ProgressLines(
        total=8 * 1024**2, desc="downloading x", unit="B", file=out, clock=clock, unit_scale=True, unit_divisor=1024
    )
    clock.t = 5.0
    bar.update(4 * 1024**2)
    assert out.getvalue() == "downloading x: 4.0M/8.0M B, 5 s elapsed, ~5 s left\n"


def test_progress_helper_chooses_lines_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    # under pytest's capture stderr is not a terminal: plain lines, tqdm's keywords accepted
    bar = tqdm(total=10, desc="train", unit="step", disable=False, dynamic_ncols=True, leave=False)
    assert isinstance(bar, ProgressLines)
    off = tqdm(total=10, disable=True)
    off.update(10)
    off.close()
    assert isinstance(progress(range(3), enable=False), ProgressLines)
    assert sum(progress(range(4), desc="adding")) == 6
    tqdm.write("a message")
    assert capsys.readouterr().err == "a message\n"
