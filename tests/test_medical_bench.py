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
