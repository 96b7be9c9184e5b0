"""benchmarks/medical.py at toy scale: seed intervals, the test-set bootstrap, baseline rows, a missing dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from bench_scripts import load_benchmark

from metafew.data.medmnist import find_medmnist

pytestmark = pytest.mark.skipif(
    find_medmnist("pneumoniamnist") is None or find_medmnist("breastmnist") is None,
    reason="PneumoniaMNIST / BreastMNIST not in the data root",
)


def load_runner():
    return load_benchmark("medical", "medical_bench")


TOY_SUITE = """
name = "medical-toy"
description = "toy"
datasets = ["pneumoniamnist", "dermamnist-absent"]
methods = ["protonet"]
shots = [3]
draws = 3
seed = 0
pretrain_seeds = [0, 1]
backbones = ["medmnist-other"]
bn_stats = "support"

[options.protonet]

[pretrain.medmnist-other]
dataset = "medmnist-other"
subset = "train"
arch = "conv4"
image_size = 28
epochs = 1
lr = 0.05
"""


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    bench = load_runner()
    tmp = tmp_path_factory.mktemp("medical")
    suite = tmp / "toy.toml"
    suite.write_text(TOY_SUITE)
    # a dataset the data root lacks: use a real MedMNIST name that is not there
    absent = next((n for n in ("dermamnist", "bloodmnist", "pathmnist") if find_medmnist(n) is None), None)
    if absent is None:
        pytest.skip("every candidate MedMNIST set is present; cannot exercise the missing-dataset path")
    suite.write_text(TOY_SUITE.replace("dermamnist-absent", absent))
    argv = ["--suite", str(suite), "--out", str(tmp / "out"), "--name", "medical-toy", "--backbone-dir",
            str(tmp / "bb"), "--bootstrap", "100", "--device", "cpu", "--no-plots"]  # fmt: skip
    assert bench.main(argv) == 0
    results = json.loads((tmp / "out" / "medical-toy.json").read_text())
    return bench, results, absent, tmp


@pytest.mark.slow
def test_model_cell_has_draw_seed_pooled_and_bootstrap_intervals(toy_run):
    _, results, _, _ = toy_run
    (model,) = [c for c in results["cells"].values() if c["kind"] == "model"]
    assert model["pretrain_seeds"] == [0, 1] and len(set(model["backbone_checkpoints"])) == 2
    acc = model["metrics"]["accuracy"]
    per_seed = np.asarray(model["per_draw"]["accuracy"])
    assert per_seed.shape == (2, 3)
    assert acc["seeds"]["per_seed"] == pytest.approx(per_seed.mean(1).tolist())
    assert acc["pooled"]["mean"] == pytest.approx(per_seed.mean())
    assert acc["draws"]["mean"] == pytest.approx(per_seed[0].mean())
    lo, hi = acc["test_bootstrap"]
    assert 0.0 <= lo <= acc["pooled"]["mean"] <= hi <= 1.0
    assert hi - lo > 0.01  # 624 test images: the bootstrap interval cannot be degenerate
    for metric in ("balanced_accuracy", "auc"):
        assert model["metrics"][metric]["test_bootstrap"] is not None
        assert model["metrics"][metric]["seeds"]["ci95"] is not None
    assert set(results["meta"]["intervals"]) >= {"draws", "seeds", "pooled", "test_bootstrap", "difference"}


@pytest.mark.slow
def test_baseline_rows_and_paired_differences(toy_run):
    _, results, _, tmp = toy_run
    baselines = {c["method"]: c for c in results["cells"].values() if c["kind"] == "baseline"}
    assert set(baselines) == {"pixels-nearest-mean", "pixels-logistic"}
    assert all(c["backbone"] is None and c["shots"] == 3 for c in baselines.values())
    (row,) = results["comparison"]
    assert row["dataset"] == "pneumoniamnist" and row["shots"] == 3
    model = next(c for c in results["cells"].values() if c["kind"] == "model")
    for name, b in baselines.items():
        d = row["baselines"][name]["balanced_accuracy"]
        expected = np.mean(
            np.asarray(model["per_draw"]["balanced_accuracy"]).mean(0) - b["per_draw"]["balanced_accuracy"][0]
        )
        assert d["mean"] == pytest.approx(expected)
        assert d["ci95"] > 0 and len(d["per_seed"]) == 2
        assert "auc" in row["baselines"][name]
    md = (tmp / "out" / "medical-toy.md").read_text()
    assert "pixels-logistic" in md and "test bootstrap" in md


@pytest.mark.slow
def test_missing_dataset_is_skipped_with_the_download_command(toy_run):
    _, results, absent, _ = toy_run
    (skipped,) = results["skipped"]
    assert skipped.startswith(f"{absent}: not in the data root")
    assert f"metafew data download {absent}" in skipped
    assert not any(c["dataset"] == absent for c in results["cells"].values())


@pytest.mark.slow
def test_draws_match_metafew_estimate(toy_run):
    """The runner's own draw loop scores exactly the draws (and accuracies) that metafew.adaptation.estimate does."""
    _, results, _, tmp = toy_run
    from metafew.adaptation import DEFAULT_OPTIONS, estimate, resolve_backbone
    from metafew.data.medmnist import MedMNIST
    from metafew.learners import create

    model = next(c for c in results["cells"].values() if c["kind"] == "model")
    path = tmp / "bb" / model["backbone_checkpoints"][1]
    pool, test = MedMNIST("pneumoniamnist", "train"), MedMNIST("pneumoniamnist", "test")
    module, prep, _ = resolve_backbone(str(path), device=torch.device("cpu"))
    learner = create("protonet", module, **DEFAULT_OPTIONS["protonet"]).eval()
    report = estimate(
        learner, pool.images, pool.labels, pool.classes, prep, method="protonet", shots=3, draws=3, seed=0,
        device=torch.device("cpu"), test=(test.images, test.labels, test.name), warn=False, baselines=False,
        bootstrap=0,
    )  # fmt: skip
    assert [d["accuracy"] for d in report.per_draw] == pytest.approx(model["per_draw"]["accuracy"][1])


def test_pooled_interval_is_wider_than_the_draw_interval_when_seeds_differ():
    bench = load_runner()
    rng = np.random.default_rng(0)
    table = rng.normal(0.0, 0.01, (3, 100)) + np.array([[0.0], [0.05], [-0.05]])  # seeds shift the mean
    pooled = bench.pooled_interval(table)
    seeds = bench.seed_interval(table)
    draws = bench.mean_ci(table[0])
    assert pooled["ci95"] > 5 * draws["ci95"]
    assert seeds["ci95"] > pooled["ci95"]  # t with 2 df is wider than the normal interval
    assert pooled["variance_components"]["seed"] == pytest.approx(0.0025, rel=0.2)


AUTO_SUITE = """
name = "medical-auto-toy"
description = "toy"
datasets = ["breastmnist"]
methods = ["protonet"]
shots = [3]
draws = 3
seed = 0
backbones = []
bn_stats = "support"
"""


def test_auto_mode_is_metafew_adapts_nested_choice_paired_with_the_baselines(tmp_path):
    """``--auto``: each draw chooses on its support images as ``estimate(choose=Selection.choose)`` does, and is
    compared with the baseline rows on the same draws (their AUC as the estimate computes it)."""
    from metafew.adaptation.core import default_options
    from metafew.adaptation.estimate import estimate
    from metafew.adaptation.select import Selection, candidate_backbones
    from metafew.data.medmnist import MedMNIST

    bench = load_runner()
    suite = tmp_path / "auto.toml"
    suite.write_text(AUTO_SUITE)
    argv = ["--suite", str(suite), "--out", str(tmp_path / "out"), "--name", "auto", "--auto", "--bootstrap", "50",
            "--device", "cpu", "--no-plots", "--backbone-dir", str(tmp_path / "bb")]  # fmt: skip
    assert bench.main(argv) == 0
    results = json.loads((tmp_path / "out" / "auto.json").read_text())
    (auto,) = [c for c in results["cells"].values() if c["kind"] == "auto"]
    baselines = {c["method"]: c for c in results["cells"].values() if c["kind"] == "baseline"}
    assert set(baselines) == set(bench.BASELINE_ROWS) and auto["methods"] == ["protonet"]
    assert len(auto["chosen_per_draw"]) == 3 and sum(auto["chosen_counts"].values()) == 3

    dev = torch.device("cpu")
    pool, test = MedMNIST("breastmnist", "train"), MedMNIST("breastmnist", "test")
    sel = Selection(
        pool, candidate_backbones(), ["protonet"], default_options={"protonet": default_options("protonet")},
        options={}, device=dev, data_root=None, skip_bad=False, bn_stats="support", query_bn="support", seed=0,
    )  # fmt: skip
    first = sel.candidates[0]
    report = estimate(
        first.learner, pool.images, pool.labels, pool.classes, first.prep, method="protonet", shots=3, draws=3,
        seed=0, device=dev, test=(test.images, test.labels, test.name), warn=False, calibrate=False,
        choose=sel.choose, bootstrap=0,
    )  # fmt: skip
    assert [d["chosen"] for d in report.per_draw] == auto["chosen_per_draw"]
    for metric in ("accuracy", "balanced_accuracy", "auc"):
        assert [d[metric] for d in report.per_draw] == pytest.approx(auto["per_draw"][metric][0])
    assert report.baselines is not None
    for row, name in bench.BASELINE_ROWS.items():
        for metric in ("accuracy", "balanced_accuracy", "auc"):
            ours = [d[metric] for d in report.baselines[name]["per_draw"]]
            assert ours == pytest.approx(baselines[row]["per_draw"][metric][0]), (row, metric)

    (row,) = results["auto_comparison"]
    for name, b in baselines.items():
        d = row["baselines"][name]
        diff = np.asarray(auto["per_draw"]["auc"][0]) - np.asarray(b["per_draw"]["auc"][0])
        assert d["auc"]["mean"] == pytest.approx(diff.mean())
        assert d["auc"]["ci95"] == pytest.approx(1.96 * diff.std(ddof=1) / np.sqrt(3))  # paired over the draws
        assert d["beats"] == (d["balanced_accuracy"]["above_zero"] and d["auc"]["above_zero"])
    md = (tmp_path / "out" / "auto.md").read_text()
    assert "chosen per draw on its support images" in md and "pixels-logistic" in md
