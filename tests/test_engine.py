"""The training loop (checkpoints, exact resume, Ctrl-C) and evaluation statistics (CI, AUC)."""

from __future__ import annotations

import json
import math
import signal

import numpy as np
import pytest
import torch

from metafew.backbones import create as create_backbone
from metafew.checkpoint import load_state
from metafew.data import EpisodeSampler
from metafew.engine import evaluate, paired_difference, plot_learning_curve, train
from metafew.engine.evaluate import macro_auc, mean_ci95
from metafew.engine.train import lr_schedule
from metafew.errors import ConfigError
from metafew.learners import create as create_learner


def tiny_protonet(seed: int = 0):
    torch.manual_seed(seed)
    return create_learner("protonet", create_backbone("conv4", in_channels=1, image_size=28, hidden=16))


class InterruptAt(EpisodeSampler):
    """A sampler that sends the process a Ctrl-C while drawing its ``n``-th meta-batch."""

    def __init__(self, *args, at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.at, self.calls = at, 0

    def sample_batch(self, batch_size: int, reuse=None):
        self.calls += 1
        if self.calls == self.at:
            signal.raise_signal(signal.SIGINT)
        return super().sample_batch(batch_size, reuse)


def run(out, sampler, steps, **kw):
    return train(
        tiny_protonet(),
        sampler,
        steps=steps,
        meta_batch_size=2,
        out_dir=out,
        log_every=1,
        checkpoint_every=2,
        schedule="step",
        step_size=2,
        gamma=0.5,
        progress=False,
        **kw,
    )


def test_resume_after_ctrl_c_continues_bit_identically(tmp_path, omniglot_train, omniglot_val):
    val = EpisodeSampler(omniglot_val, 5, 1, 5, seed=3, device="cpu").fixed(8)
    whole = run(
        tmp_path / "a", EpisodeSampler(omniglot_train, 5, 1, 5, seed=1, device="cpu"), 7, val_episodes=val, val_every=3
    )

    sampler = InterruptAt(omniglot_train, 5, 1, 5, seed=1, device="cpu", at=4)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", sampler, 7, val_episodes=val, val_every=3)
    _, record = load_state(tmp_path / "b" / "last.safetensors")
    assert record["step"] == 4  # the interrupted step finished, then the checkpoint was saved

    resumed = run(
        tmp_path / "b",
        EpisodeSampler(omniglot_train, 5, 1, 5, seed=1, device="cpu"),
        7,
        val_episodes=val,
        val_every=3,
        resume=True,
    )
    losses = lambda r: [(h["step"], h.get("loss"), h.get("acc"), h.get("lr"), h.get("val_acc")) for h in r.history]  # noqa: E731
    assert losses(resumed) == losses(whole)  # exact float equality, step by step
    assert resumed.best_val_acc == whole.best_val_acc and resumed.best_step == whole.best_step
    a, _ = load_state(tmp_path / "a" / "last.safetensors")
    b, _ = load_state(tmp_path / "b" / "last.safetensors")
    for k, v in a["learner"].items():
        assert torch.equal(v, b["learner"][k]), k
    assert torch.equal(a["sampler"]["generator"], b["sampler"]["generator"])

    rows = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(0, 8))  # the start's validation, no duplicated rows
    assert set(rows[0]) == {"step", "val_acc", "val_acc_ci95"}  # the starting weights, validated
    assert {"step", "loss", "acc", "lr", "seconds"} <= set(rows[1]) and "val_acc" in rows[3]
    assert (tmp_path / "b" / "best.safetensors").is_file()
    assert resumed.checkpoint == tmp_path / "b" / "best.safetensors"
    curve = tmp_path / "b" / "learning_curve.png"  # drawn at the end of the run, from the whole log
    assert (
        curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        and curve.stat().st_mtime >= (tmp_path / "b" / "log.jsonl").stat().st_mtime
    )
    redrawn = plot_learning_curve(tmp_path / "b" / "log.jsonl", tmp_path / "again.png", title="from log.jsonl")
    assert redrawn.stat().st_size > 10_000


def test_resume_of_a_finished_run_does_nothing(tmp_path, omniglot_train):
    sampler = EpisodeSampler(omniglot_train, 5, 1, 2, seed=0, device="cpu")
    first = run(tmp_path, sampler, 2)
    again = run(tmp_path, EpisodeSampler(omniglot_train, 5, 1, 2, seed=0, device="cpu"), 2, resume=True)
    assert again.steps == 2 and again.history == first.history
    assert again.checkpoint == tmp_path / "last.safetensors"


def test_a_run_that_never_beats_its_start_keeps_the_start(tmp_path, omniglot_train, omniglot_val):
    """Meta-training from a pretrained backbone can only lose: best.safetensors then holds the start."""
    learner = create_learner("protonet", create_backbone("conv4", weights="omniglot"))
    start = {k: v.clone() for k, v in learner.state_dict().items()}
    val = EpisodeSampler(omniglot_val, 20, 1, 5, seed=3, device="cpu").fixed(8)
    sampler = EpisodeSampler(omniglot_train, 20, 1, 5, seed=1, device="cpu")  # 5-way: loss 0, nothing moves
    wrecking = {"name": "adam", "lr": 0.5}  # Adam steps of 0.5 per weight ruin the pretrained features
    result = train(learner, sampler, steps=2, optimizer=wrecking, val_episodes=val, val_every=1, out_dir=tmp_path,
                   progress=False)  # fmt: skip
    assert result.best_step == 0 and result.history[0]["step"] == 0
    assert result.history[0]["val_acc"] > max(r["val_acc"] for r in result.history[1:])
    best, record = load_state(tmp_path / "best.safetensors")
    assert record["step"] == 0 and all(torch.equal(best[k], v) for k, v in start.items())

    unchecked = train(create_learner("protonet", create_backbone("conv4", weights="omniglot")), sampler, steps=2,
                      optimizer=wrecking, val_episodes=val, val_every=1, validate_start=False, progress=False)  # fmt: skip
    assert unchecked.best_step == 1 and unchecked.history[0]["step"] == 1


def test_lr_schedules():
    assert [lr_schedule("step", 10, 2, 0.5)(s) for s in range(5)] == [1, 1, 0.5, 0.5, 0.25]
    assert lr_schedule("linear", 10)(0) == 1 and lr_schedule("linear", 10)(5) == 0.5
    assert lr_schedule("cosine", 10)(0) == 1 and abs(lr_schedule("cosine", 10)(10)) < 1e-12
    assert lr_schedule("constant", 10)(7) == 1
    with pytest.raises(ConfigError):
        lr_schedule("exponential", 10)
    with pytest.raises(ConfigError):
        lr_schedule("step", 10)


def test_evaluate_mean_and_ci_match_numpy(omniglot_test):
    learner = tiny_protonet()
    episodes = EpisodeSampler(omniglot_test, 5, 1, 3, seed=0, device="cpu").fixed(24)
    res = evaluate(learner, episodes, batch_size=7, progress=False)
    acc = res.accuracies.numpy()
    assert res.episodes == 24 and acc.shape == (24,)
    assert res.accuracy_mean == pytest.approx(float(np.mean(acc)), abs=1e-12)
    assert res.accuracy_ci95 == pytest.approx(1.96 * float(np.std(acc)) / math.sqrt(24), abs=1e-12)
    assert res.auc_mean is None  # 5-way: no AUC unless asked
    # The one-episode-at-a-time path (used for AUC) gives the same accuracies, and evaluate is repeatable.
    res_auc = evaluate(learner, episodes, auc=True, progress=False)
    assert torch.allclose(res_auc.accuracies, res.accuracies)
    assert res_auc.aucs is not None and res_auc.aucs.shape == (24,) and 0 <= res_auc.auc_mean <= 1
    assert learner.training  # mode restored


def brute_force_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Macro one-vs-rest AUC by comparing every positive with every negative."""
    aucs = []
    for c in range(scores.shape[1]):
        pos, neg = scores[labels == c, c], scores[labels != c, c]
        if len(pos) and len(neg):
            wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
            aucs.append(wins / (len(pos) * len(neg)))
    return float(np.mean(aucs))


@pytest.mark.parametrize("n_way", [2, 3, 5])
def test_macro_auc_matches_brute_force(n_way):
    gen = torch.Generator().manual_seed(n_way)
    for trial in range(20):
        m = n_way + 2 + trial
        labels = torch.cat([torch.arange(n_way), torch.randint(0, n_way, (m - n_way,), generator=gen)])
        scores = torch.randn(m, n_way, generator=gen)
        if trial % 2:
            scores = scores.round()  # many ties
        assert macro_auc(scores, labels).item() == pytest.approx(
            brute_force_auc(scores.numpy(), labels.numpy()), abs=1e-12
        )
    # batched over episodes: the same as one at a time
    s, y = torch.randn(6, 10, n_way, generator=gen), torch.randint(0, n_way, (6, 10), generator=gen)
    assert torch.allclose(macro_auc(s, y), torch.stack([macro_auc(s[i], y[i]) for i in range(6)]), equal_nan=True)


def test_binary_evaluation_reports_auc(omniglot_test):
    episodes = EpisodeSampler(omniglot_test, 2, 1, 4, seed=0, device="cpu").fixed(10)
    res = evaluate(tiny_protonet(), episodes, progress=False)
    assert res.aucs is not None and res.auc_ci95 is not None
    assert res.auc_mean == pytest.approx(float(res.aucs.mean()))


def test_paired_difference():
    a, b = torch.tensor([1.0, 0.8, 0.6, 1.0]), torch.tensor([0.8, 0.8, 0.4, 0.6])
    d = paired_difference(a, b)
    diff = (a - b).numpy()
    assert d.mean == pytest.approx(diff.mean()) and d.episodes == 4
    assert d.ci95 == pytest.approx(1.96 * diff.std() / 2)
    assert mean_ci95(a)[0] == pytest.approx(0.85)
    with pytest.raises(Exception, match="same episodes"):
        paired_difference(a, b[:3])
