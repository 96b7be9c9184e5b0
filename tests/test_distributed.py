"""Distributed training and evaluation on torch.distributed: 2 CPU processes (gloo) against one.

Each multi-process check is launched with torchrun (``python -m torch.distributed.run``)
on a free port of 127.0.0.1, as a user would, and compared with the same work done in
this (single) process:

* the meta-gradient of 2 ranks sharing a meta-batch of B equals one process's with B
  (ProtoNet with BatchNorm statistics over the whole meta-batch, MAML second order,
  FO-MAML, Reptile), and so do the weights after a few optimizer steps;
* ``torchrun -m metafew train`` trains, checkpoints, resumes with another number of
  processes and evaluates, matching the one-process run;
* sharded evaluation gives exactly the one-process per-episode accuracies, mean and CI;
* a rank that stops answering makes the others stop with a one-line error within the timeout.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import metafew
from metafew import distributed
from metafew.cli.main import main as cli
from metafew.engine.train import sample_slice

# Learner options of the gradient checks: small enough for a CPU, second order for MAML;
# Reptile with full-batch inner steps (its minibatch order comes from each rank's own RNG).
LEARNERS = {
    "protonet": {},
    "maml": {"n_way": 5, "inner_steps": 1},
    "fomaml": {"n_way": 5},
    "reptile": {"n_way": 5, "inner_steps": 2, "inner_batch_size": None},
}
META_BATCH = 5  # not a multiple of 2: the ranks hold 3 and 2 tasks
SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.9}

WORKER = r'''
import json, sys, time
from pathlib import Path
import torch
import metafew
from metafew import distributed
from metafew.engine.train import meta_backward, sample_slice

torch.set_num_threads(1)
mode, out = sys.argv[1], Path(sys.argv[2])
distributed.init("cpu")
LEARNERS = json.loads(sys.argv[3])
META_BATCH = int(sys.argv[4])
SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.9}
data = metafew.load_dataset("omniglot", "train")


def double(batch):
    return type(batch)(*(t.double() if t.is_floating_point() else t for t in vars(batch).values()))


class Float64Episodes:
    """A sampler handing out float64 meta-batches (and, having no slice builder, sliced whole by every rank)."""

    def __init__(self, sampler):
        self.sampler, self.device = sampler, sampler.device
        self.n_way, self.k_shot, self.n_query = sampler.n_way, sampler.k_shot, sampler.n_query

    def sample_batch(self, size, reuse=None):
        return double(self.sampler.sample_batch(size))

    def state_dict(self):
        return self.sampler.state_dict()

    def load_state_dict(self, state):
        self.sampler.load_state_dict(state)


def make(name):
    torch.manual_seed(0)
    backbone = metafew.create_backbone("conv4", in_channels=1, image_size=28, hidden=8)
    return metafew.create_learner(name, backbone, **LEARNERS[name])


if mode == "math":
    results = {}
    for name in LEARNERS:
        learner = make(name).double().train()
        sampler = metafew.EpisodeSampler(data, 5, 1, 3, seed=1, device="cpu")
        meta_backward(learner, double(sample_slice(sampler, META_BATCH)), META_BATCH)
        grads = {k: p.grad for k, p in learner.named_parameters() if p.grad is not None}
        buffers = {k: b.clone() for k, b in learner.named_buffers()}
        trained = make(name).double()
        sampler = Float64Episodes(metafew.EpisodeSampler(data, 5, 1, 3, seed=1, device="cpu"))
        metafew.train(trained, sampler, steps=3, meta_batch_size=META_BATCH, optimizer=SGD, progress=False)
        results[name] = {"grads": grads, "buffers": buffers, "trained": trained.state_dict()}
    learner = make("protonet")
    episodes = metafew.EpisodeSampler(data, 5, 1, 3, seed=2, device="cpu").fixed(11)
    for auc in (False, True):
        r = metafew.evaluate(learner, episodes, batch_size=3, auc=auc, progress=False)
        results[f"eval-auc{auc}"] = {"acc": r.accuracies, "mean": r.accuracy_mean, "ci": r.accuracy_ci95,
                                     "aucs": r.aucs}
    # pretraining under DDP: rank 0 writes; every rank ends with the same weights
    small = metafew.load_dataset("breastmnist", "train")
    backbone = metafew.pretrain("conv4", small, epochs=1, batch_size=63, device="cpu", progress=False,
                                backbone_options={"hidden": 8}, out=out / "backbone.safetensors", val=small)
    weights = torch.cat([p.detach().flatten() for p in backbone.parameters()])
    results["pretrain"] = {"same": all(torch.equal(w, weights) for w in distributed.gather_objects(weights)),
                           "history": backbone.pretrain_history}
    if distributed.is_main():
        torch.save(results, out / "math.pt")
elif mode == "hang":  # rank 1 stops answering at its third meta-batch
    class Stuck(type(make("protonet"))):
        calls = 0

        def meta_loss(self, batch):
            Stuck.calls += 1
            if distributed.rank() == 1 and Stuck.calls == 3:
                time.sleep(120)
            return super().meta_loss(batch)

    torch.manual_seed(0)
    learner = Stuck(metafew.create_backbone("conv4", in_channels=1, image_size=28, hidden=8))
    sampler = metafew.EpisodeSampler(data, 5, 1, 3, seed=1, device="cpu")
    start = time.perf_counter()
    try:
        metafew.train(learner, sampler, steps=50, meta_batch_size=2, progress=False)
    except metafew.MetafewError as e:
        print(f"stopped after {time.perf_counter() - start:.1f} s: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("PYTEST_XDIST_WORKER", None)
    return {**env, **extra}


def _torchrun(nproc: int, args: list[str], timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(**env))


@pytest.fixture(scope="module")
def omniglot() -> metafew.FewShotDataset:
    return metafew.load_dataset("omniglot", "train")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """What 2 torchrun processes computed: gradients, trained weights, evaluations."""
    out = tmp_path_factory.mktemp("dist")
    script = out / "worker.py"
    script.write_text(WORKER)
    done = _torchrun(2, [str(script), "math", str(out), json.dumps(LEARNERS), str(META_BATCH)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "backbone.safetensors").is_file()
    return torch.load(out / "math.pt")


def _make(name: str) -> metafew.ProtoNet:
    torch.manual_seed(0)
    backbone = metafew.create_backbone("conv4", in_channels=1, image_size=28, hidden=8)
    return metafew.create_learner(name, backbone, **LEARNERS[name])


def _double(batch: metafew.EpisodeBatch) -> metafew.EpisodeBatch:
    return type(batch)(*(t.double() if t.is_floating_point() else t for t in vars(batch).values()))


def _relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """``||a - b|| / ||b||`` over all tensors together (a conv bias before BatchNorm has a gradient of ~0)."""
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a])
    return float(diff.norm() / torch.cat([b[k].flatten() for k in a]).norm())


@pytest.mark.parametrize("name", list(LEARNERS))
def test_meta_gradient_of_two_ranks_is_that_of_one_process(two_ranks: dict, omniglot, name: str) -> None:
    # in float64, so that the comparison measures the method, not float32 rounding (~1e-4 here)
    learner = _make(name).double().train()
    sampler = metafew.EpisodeSampler(omniglot, 5, 1, 3, seed=1, device="cpu")
    loss, _ = learner.meta_loss(_double(sampler.sample_batch(META_BATCH)))
    loss.backward()
    grads = {k: p.grad for k, p in learner.named_parameters() if p.grad is not None}
    assert _relative(two_ranks[name]["grads"], grads) < 1e-9
    # ProtoNet's BatchNorm saw all 5 tasks on both ranks: the same running statistics
    buffers = dict(learner.named_buffers())
    for k, b in two_ranks[name]["buffers"].items():
        torch.testing.assert_close(b, buffers[k], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["protonet", "maml"])
def test_weights_after_steps_equal_one_process(two_ranks: dict, omniglot, name: str) -> None:
    # float64: a few float32 steps of this small model drift from the float64 ones by ~1e-3 already,
    # in one process as in two. SGD, not Adam, which turns the rounding noise of a ~0 gradient
    # (a conv bias before BatchNorm) into a full +-lr step.
    learner = _make(name).double().train()
    sampler = metafew.EpisodeSampler(omniglot, 5, 1, 3, seed=1, device="cpu")
    opt = torch.optim.SGD(learner.parameters(), lr=SGD["lr"], momentum=SGD["momentum"])
    for _ in range(3):
        opt.zero_grad()
        learner.meta_loss(_double(sampler.sample_batch(META_BATCH)))[0].backward()
        opt.step()
    mine, theirs = learner.state_dict(), two_ranks[name]["trained"]
    for k in mine:
        torch.testing.assert_close(theirs[k], mine[k], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("auc", [False, True])
def test_sharded_evaluation_is_exactly_one_process(two_ranks: dict, omniglot, auc: bool) -> None:
    episodes = metafew.EpisodeSampler(omniglot, 5, 1, 3, seed=2, device="cpu").fixed(11)
    r = metafew.evaluate(_make("protonet"), episodes, batch_size=3, auc=auc, progress=False)
    got = two_ranks[f"eval-auc{auc}"]
    assert torch.equal(got["acc"], r.accuracies)  # 4 batches of 3, 3, 3, 2 over 2 ranks, back in order
    assert (got["mean"], got["ci"]) == (r.accuracy_mean, r.accuracy_ci95)
    assert (got["aucs"] is None) == (r.aucs is None)
    if r.aucs is not None:
        assert torch.equal(got["aucs"], r.aucs)


def test_pretraining_with_ddp(two_ranks: dict) -> None:
    assert two_ranks["pretrain"]["same"]
    (epoch,) = two_ranks["pretrain"]["history"]
    assert epoch["loss"] > 0 and 0 <= epoch["val_acc"] <= 1  # held-out figures summed over the ranks' shards


def test_slice_of_a_meta_batch_is_that_batch(omniglot) -> None:
    """The slices ranks build are the tasks of the full batch, and the sampler advances as for the full batch."""
    full_sampler = metafew.EpisodeSampler(omniglot, 5, 1, 3, seed=4, device="cpu")
    full = full_sampler.sample_batch(META_BATCH)
    after = full_sampler.sample_batch(1)
    # shard() for rank 1 of 2 (what sample_slice uses); built like sample_slice builds it
    lo, hi = distributed.shard(META_BATCH, 2, 1)
    sampler = metafew.EpisodeSampler(omniglot, 5, 1, 3, seed=4, device="cpu")
    idx, classes = sampler._draw(META_BATCH, sampler.generator)
    part = metafew.EpisodeBatch(*sampler._build(idx[lo:hi], classes[lo:hi], None))
    assert (lo, hi) == (3, 5)
    assert torch.equal(part.support_x, full.support_x[lo:hi]) and torch.equal(part.classes, full.classes[lo:hi])
    assert torch.equal(sampler.sample_batch(1).query_x, after.query_x)
    # in one process, sample_slice is sample_batch
    again = metafew.EpisodeSampler(omniglot, 5, 1, 3, seed=4, device="cpu")
    assert torch.equal(sample_slice(again, META_BATCH).query_x, full.query_x)


# NCHW: this tiny random Conv-4 amplifies rounding (~0.5% of a gradient), and oneDNN's channels-last
# weight gradient is blocked by batch size (2 tasks per rank vs 4), so only NCHW gives the same float32
# sums in both; the float64 checks above hold in any layout
TRAIN = ["--dataset", "omniglot", "--learner", "protonet", "--backbone-option", "hidden=8",
         "--backbone-option", "channels_last=false", "--n-way", "5",
         "--k-shot", "1", "--n-query", "3", "--train-way", "5", "--train-query", "3", "--meta-batch-size", "4",
         "--val-episodes", "6", "--val-every", "2", "--log-every", "1", "--checkpoint-every", "1",
         "--optimizer", "sgd", "--lr", "0.005",
         "--device", "cpu", "--no-progress"]  # fmt: skip


def test_torchrun_train_resume_eval_matches_one_process(tmp_path: Path) -> None:
    two = tmp_path / "two"
    done = _torchrun(2, ["-m", "metafew", "train", *TRAIN, "--steps", "2", "--out", str(two)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: 2 steps") == 1  # rank 0 alone prints
    assert sorted(p.name for p in two.iterdir() if not p.name.startswith(".")) == [
        "best.safetensors", "last.safetensors", "learning_curve.png", "log.jsonl"]  # fmt: skip
    # resumed here, in one process, with more steps (the checkpoint holds no per-rank state)
    assert cli(["train", *TRAIN, "--steps", "4", "--out", str(two), "--resume", "--allow-config-change"]) == 0

    one = tmp_path / "one"
    assert cli(["train", *TRAIN, "--steps", "4", "--out", str(one)]) == 0
    a, _ = metafew.checkpoint.load_state(two / "last.safetensors")
    b, _ = metafew.checkpoint.load_state(one / "last.safetensors")
    for k in b["learner"]:  # float32: equal up to rounding (the float64 checks above are exact)
        torch.testing.assert_close(a["learner"][k], b["learner"][k], rtol=1e-3, atol=1e-4)
    assert torch.equal(a["sampler"]["generator"], b["sampler"]["generator"])  # the same episodes were drawn
    rows = lambda d: [r for r in map(json.loads, (d / "log.jsonl").read_text().splitlines()) if "loss" in r]  # noqa: E731
    assert [r["step"] for r in rows(two)] == [r["step"] for r in rows(one)] == [1, 2, 3, 4]
    for r2, r1 in zip(rows(two), rows(one)):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-4) and r2["acc"] == pytest.approx(r1["acc"], abs=0.02)

    ckpt = two / "best.safetensors"
    evaluation = ["eval", "--checkpoint", str(ckpt), "--episodes", "7", "--batch-size", "2", "--device", "cpu",
                  "--no-progress"]  # fmt: skip
    done = _torchrun(2, ["-m", "metafew", *evaluation, "--json", str(tmp_path / "e2.json")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert cli([*evaluation, "--json", str(tmp_path / "e1.json")]) == 0
    e2, e1 = (json.loads((tmp_path / f"e{n}.json").read_text()) for n in (2, 1))
    assert e2["accuracies"] == e1["accuracies"] and e2["accuracy_ci95"] == e1["accuracy_ci95"]


def test_an_error_under_torchrun_is_one_line_per_rank_and_a_failed_exit(tmp_path: Path) -> None:
    done = _torchrun(2, ["-m", "metafew", "train", *TRAIN, "--meta-batch-size", "1", "--steps", "2",
                         "--out", str(tmp_path / "run")])  # fmt: skip
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("metafew: error:")]
    # each rank that got there before torchrun ended it says so in one line ([rank 1] marks the other one)
    assert 1 <= len(errors) <= 2, done.stderr[-3000:]
    assert all("meta_batch_size 1 is smaller than the 2 processes" in e for e in errors)
    assert all(e.startswith(("metafew: error: meta_batch", "metafew: error: [rank 1] meta_batch")) for e in errors)
    assert "Traceback" not in "".join(line for line in done.stderr.splitlines() if line.startswith("[rank"))


def test_a_stuck_rank_stops_the_others_within_the_timeout(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    start = time.perf_counter()
    done = _torchrun(
        2, [str(script), "hang", str(tmp_path), json.dumps(LEARNERS), "2"], timeout=90, METAFEW_DIST_TIMEOUT="4"
    )
    elapsed = time.perf_counter() - start
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("stopped after")]
    assert len(lines) == 1, done.stderr[-3000:]
    assert "rank 0: " in lines[0] and "did not answer within 4 s" in lines[0]
    assert float(lines[0].split()[2]) < 30 and elapsed < 80


def test_meta_batch_smaller_than_the_processes_is_refused(monkeypatch: pytest.MonkeyPatch, omniglot) -> None:
    monkeypatch.setattr(distributed, "world", lambda: 4)
    sampler = metafew.EpisodeSampler(omniglot, 5, 1, 3, seed=1, device="cpu")
    with pytest.raises(metafew.MetafewError, match="meta_batch_size 2 is smaller than the 4 processes"):
        metafew.train(_make("protonet"), sampler, steps=1, meta_batch_size=2, progress=False)


def test_shards_cover_everything_once() -> None:
    for n in (0, 1, 5, 12):
        for ranks in (1, 2, 3, 5):
            parts = [distributed.shard(n, ranks, r) for r in range(ranks)]
            assert [i for lo, hi in parts for i in range(lo, hi)] == list(range(n))
            assert max(hi - lo for lo, hi in parts) - min(hi - lo for lo, hi in parts) <= 1


def test_timeout_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METAFEW_DIST_TIMEOUT", raising=False)
    assert distributed.timeout_seconds() == distributed.DEFAULT_TIMEOUT
    monkeypatch.setenv("METAFEW_DIST_TIMEOUT", "2.5")
    assert distributed.timeout_seconds() == 2.5
    monkeypatch.setenv("METAFEW_DIST_TIMEOUT", "soon")
    with pytest.raises(metafew.MetafewError, match="METAFEW_DIST_TIMEOUT"):
        distributed.timeout_seconds()
    assert not distributed.active() and distributed.world() == 1 and distributed.is_main()
