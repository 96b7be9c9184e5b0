"""Matching Networks, R2-D2 and MetaOptNet: what each head computes, and that each learns.

* MatchingNet's logits are the log of the cosine attention summed per class, by hand.
* R2-D2's Woodbury solve equals the primal normal equations ``(X^T X + lam I) W = X^T Y``.
* MetaOptNet's SVM solution satisfies the KKT conditions of the Crammer-Singer dual and
  its gradient matches finite differences.
* Each works through the registry, ``RunConfig`` and the CLI, its adapted classifier
  round-trips through a file, and a short real-Omniglot run takes it well above chance.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metafew
from metafew.backbones import create as create_backbone
from metafew.checkpoint import load_state, save_state
from metafew.cli.main import main
from metafew.config import RunConfig, build
from metafew.data import EpisodeBatch, EpisodeSampler
from metafew.errors import MetafewError
from metafew.learners import Learner, create
from metafew.learners.matchingnet import MatchingNet
from metafew.learners.metaoptnet import R2D2, MetaOptNet, kkt_residual, ridge_weights, svm_dual

NAMES = ["matchingnet", "matchingnet-fce", "r2d2", "metaoptnet"]


def build_learner(name: str, backbone: nn.Module) -> Learner:
    if name == "matchingnet-fce":
        return create("matchingnet", backbone, fce=True, fce_steps=2)
    return create(name, backbone)


def small_conv4(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_backbone("conv4", in_channels=1, image_size=28, hidden=8)


def random_batch(b: int = 2, n: int = 5, k: int = 1, q: int = 3, seed: int = 0, dtype=torch.float32) -> EpisodeBatch:
    g = torch.Generator().manual_seed(seed)
    return EpisodeBatch(
        torch.randn(b, n * k, 1, 28, 28, generator=g, dtype=dtype),
        torch.arange(n).repeat_interleave(k).expand(b, -1),
        torch.randn(b, n * q, 1, 28, 28, generator=g, dtype=dtype),
        torch.arange(n).repeat_interleave(q).expand(b, -1),
        torch.arange(n).expand(b, -1),
    )


class Linear(nn.Linear):
    """A linear backbone on vectors, so the heads can be checked on plain random features."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__(d_in, d_out)
        self.out_features = d_out


def vector_episode(n: int, k: int, q: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(n * k, d, generator=g, dtype=torch.float64)
    qx = torch.randn(n * q, d, generator=g, dtype=torch.float64)
    return sx, torch.arange(n).repeat_interleave(k), qx, torch.arange(n).repeat_interleave(q)


# -- MatchingNet -------------------------------------------------------------------------------
def test_matchingnet_logits_are_log_attention_summed_per_class():
    torch.manual_seed(0)
    backbone = Linear(6, 4).double()
    learner = MatchingNet(backbone)
    sx, sy, qx, _ = vector_episode(n=3, k=2, q=4, d=6)
    f_s, f_q = backbone(sx).detach(), backbone(qx).detach()
    expected = torch.empty(len(qx), 3, dtype=torch.float64)
    for i in range(len(qx)):
        cos = torch.stack([f_q[i] @ f_s[j] / (f_q[i].norm() * f_s[j].norm()) for j in range(len(sx))])
        attention = cos.exp() / cos.exp().sum()
        for c in range(3):
            expected[i, c] = attention[sy == c].sum().log()
    logits = learner.adapt(sx, sy)(qx).detach()
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(len(qx), dtype=torch.float64))


def test_matchingnet_meta_loss_is_the_negative_log_likelihood():
    torch.manual_seed(0)
    backbone = Linear(6, 4).double()
    g = torch.Generator().manual_seed(1)
    batch = EpisodeBatch(
        torch.randn(2, 6, 6, generator=g, dtype=torch.float64),
        torch.arange(3).repeat_interleave(2).expand(2, -1),
        torch.randn(2, 9, 6, generator=g, dtype=torch.float64),
        torch.arange(3).repeat_interleave(3).expand(2, -1),
        torch.arange(3).expand(2, -1),
    )
    for fce in (False, True):
        learner = MatchingNet(backbone, fce=fce, fce_steps=3).double()
        per_task = [learner.adapt(e.support_x, e.support_y)(e.query_x) for e in batch]  # one task at a time
        nll = -torch.cat([lp.gather(1, e.query_y[:, None]) for lp, e in zip(per_task, batch)]).mean()
        loss, acc = learner.meta_loss(batch)  # all tasks at once
        torch.testing.assert_close(loss, nll)
        assert 0 <= float(acc) <= 1
        loss.backward()
        assert all(p.grad is not None for p in learner.parameters())


def test_matchingnet_fce_changes_the_embeddings_and_needs_out_features():
    backbone = small_conv4()
    plain, fce = MatchingNet(backbone), MatchingNet(backbone, fce=True)
    assert {k.split(".")[0] for k, _ in fce.named_parameters()} == {"backbone", "fce"}
    batch = random_batch()
    with torch.no_grad():
        a = plain.eval().adapt(batch.support_x[0], batch.support_y[0])
        b = fce.eval().adapt(batch.support_x[0], batch.support_y[0])
    assert a.support.shape == b.support.shape and not torch.allclose(a.support, b.support)
    with pytest.raises(MetafewError, match="out_features"):
        MatchingNet(nn.Flatten(), fce=True)


# -- R2-D2 -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "k", "d"), [(5, 1, 64), (5, 5, 16), (3, 4, 5)])
def test_r2d2_woodbury_head_equals_the_primal_normal_equations(n, k, d):
    sx, sy, _, _ = vector_episode(n, k, 1, d)
    y = F.one_hot(sy, n).double()
    lam = 0.7
    primal = torch.linalg.solve(sx.T @ sx + lam * torch.eye(d, dtype=torch.float64), sx.T @ y)  # [D, N]
    torch.testing.assert_close(ridge_weights(sx, y, lam), primal.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ridge_weights(sx, y, lam), primal.T, rtol=1e-10, atol=1e-10)

    backbone = nn.Identity()
    learner = R2D2(backbone, lam=lam, learn_lambda=False, scale=3.0, bias=0.5).double()
    clf = learner.adapt(sx, sy)  # lambda kept as a float32 log: equal to 1e-5
    torch.testing.assert_close(clf.weight, primal.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(clf(sx[:3]), 3.0 * sx[:3] @ primal + 0.5, rtol=1e-5, atol=1e-5)


def test_r2d2_lambda_scale_and_bias_are_meta_learned():
    learner = R2D2(small_conv4(), lam=2.0)
    assert {"log_lambda", "scale", "bias"} <= set(dict(learner.named_parameters()))
    torch.testing.assert_close(learner.lam, torch.tensor(2.0))
    fixed = R2D2(small_conv4(), lam=2.0, learn_lambda=False)
    assert "log_lambda" not in dict(fixed.named_parameters())
    loss, _ = learner.meta_loss(random_batch())
    loss.backward()
    assert all(learner.get_parameter(k).grad is not None for k in ("log_lambda", "scale", "bias"))


# -- MetaOptNet's SVM --------------------------------------------------------------------------
def dual_objective(x, y, alpha, ridge):
    return 0.5 * ((x @ x.T) * (alpha @ alpha.T)).sum() + 0.5 * ridge * alpha.pow(2).sum() - (alpha * y).sum()


@pytest.mark.parametrize(("n", "k", "d", "c"), [(3, 2, 4, 0.1), (5, 1, 8, 0.1), (4, 3, 6, 1.0)])
def test_svm_solution_satisfies_the_kkt_conditions(n, k, d, c):
    sx, sy, _, _ = vector_episode(n, k, 1, d)
    sx = sx * 2
    y = F.one_hot(sy, n).double()
    alpha = svm_dual(sx, y, c=c, ridge=1.0)
    slack = c * y - alpha
    assert (slack >= -1e-10).all()  # alpha <= C * Y
    torch.testing.assert_close(alpha.sum(-1), torch.zeros(n * k, dtype=torch.float64), atol=1e-10, rtol=0)
    # stationarity: grad + lambda + nu 1^T = 0, lambda >= 0, lambda * slack = 0
    grad = (sx @ sx.T) @ alpha + alpha - y
    nu = -grad.gather(1, slack.argmax(1, keepdim=True))
    lam = -(grad + nu)
    assert (lam >= -1e-9).all(), lam.min()
    assert (lam * slack).abs().max() < 1e-9
    assert float(kkt_residual(sx, y, alpha, c=c)) < 1e-9
    # and it is the minimum: moving towards any other feasible point never lowers the dual objective
    g = torch.Generator().manual_seed(1)
    best = dual_objective(sx, y, alpha, 1.0)
    for _ in range(20):
        other = c * y - c * torch.randn(alpha.shape, generator=g, dtype=torch.float64).softmax(-1)  # feasible
        for t in (1e-3, 0.1, 1.0):
            assert dual_objective(sx, y, (1 - t) * alpha + t * other, 1.0) >= best - 1e-12


def test_svm_reaches_the_kkt_conditions_on_harder_problems_and_batched():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 20, 32, generator=g, dtype=torch.float64) * 3).relu()  # large kernel values
    y = F.one_hot(torch.arange(10).repeat_interleave(2), 10).double().expand(3, -1, -1)
    alpha = svm_dual(x, y)
    assert alpha.shape == (3, 20, 10)
    assert kkt_residual(x, y, alpha).max() < 1e-9
    for t in range(3):  # batched over tasks = one task at a time
        torch.testing.assert_close(alpha[t], svm_dual(x[t], y[t]), rtol=1e-8, atol=1e-10)


def test_svm_gradient_matches_finite_differences():
    sx, sy, qx, _ = vector_episode(n=3, k=2, q=2, d=4)
    y = F.one_hot(sy, 3).double()

    def query_scores(support: torch.Tensor) -> torch.Tensor:
        alpha = svm_dual(support, y, c=0.5, ridge=1.0)
        return qx @ (alpha.T @ support).T  # [M, N]: what the logits are made of

    support = (sx * 1.5).requires_grad_()
    alpha = svm_dual(support.detach(), y, c=0.5)
    slack = 0.5 * y - alpha
    assert ((slack > 1e-6) & (slack < 0.5 - 1e-6)).any()  # some constraints active, some not: a real test
    assert torch.autograd.gradcheck(query_scores, (support,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_metaoptnet_records_a_small_kkt_residual_in_meta_loss():
    learner = MetaOptNet(small_conv4())
    loss, acc = learner.meta_loss(random_batch(b=3))
    assert loss.dim() == 0 and acc.dim() == 0 and torch.isfinite(loss)
    assert learner.solver_residual is not None and learner.solver_residual.shape == (3,)
    assert learner.solver_residual.max() < 1e-4
    loss.backward()
    assert learner.scale.grad is not None
    with pytest.raises(MetafewError, match="ridge"):
        MetaOptNet(small_conv4(), ridge=0.0)


# -- registry, RunConfig, CLI, classifiers ------------------------------------------------------
def test_registered_and_built_from_run_config():
    assert {"matchingnet", "r2d2", "metaoptnet"} <= set(metafew.list_learners())
    backbone = small_conv4()
    assert isinstance(metafew.create_learner("matchingnet", backbone), MatchingNet)
    assert isinstance(metafew.create_learner("metaoptnet", backbone, c=0.5), MetaOptNet)
    learner = build(RunConfig(learner="r2d2", n_way=5, learner_options={"lam": 0.5}), device="cpu")
    assert isinstance(learner, R2D2) and learner.bn_policy == "frozen"
    torch.testing.assert_close(learner.lam, torch.tensor(0.5))
    from metafew.adaptation.core import methods

    assert {"matchingnet", "r2d2", "metaoptnet"} <= set(methods())


@pytest.mark.parametrize("name", NAMES)
def test_meta_loss_adapt_and_evaluate_batch(name):
    learner = build_learner(name, small_conv4())
    assert learner.bn_policy == "frozen" and learner.default_optimizer == {"name": "adam", "lr": 1e-3}
    batch = random_batch(b=3)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in learner.parameters()]
    loss, acc = learner.meta_loss(batch)
    assert loss.dim() == 0 and acc.dim() == 0 and loss.requires_grad and torch.isfinite(loss)
    loss.backward()
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, learner.parameters()))  # every parameter learns
    learner.eval()
    accs = learner.evaluate_batch(batch)
    assert accs.shape == (3,) and not accs.requires_grad
    for i, episode in enumerate(batch):  # the batched evaluation is adapt() per task
        with torch.no_grad():
            logits = learner.adapt(episode.support_x, episode.support_y)(episode.query_x)
        assert logits.shape == (15, 5) and logits.dtype == torch.float32
        assert torch.isclose(accs[i], (logits.argmax(-1) == episode.query_y).float().mean())


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast(name):
    learner = build_learner(name, small_conv4())
    learner.amp = "bf16"
    batch = random_batch()
    loss, _ = learner.meta_loss(batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    logits = learner.adapt(batch.support_x[0], batch.support_y[0])(batch.query_x[0])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_adapted_classifier_state_dict_round_trips(name, tmp_path):
    episode = random_batch(b=1)[0]
    classifier = build_learner(name, small_conv4(0)).eval().adapt(episode.support_x, episode.support_y)
    path = save_state(classifier.state_dict(), tmp_path / "classifier.safetensors")
    fresh = build_learner(name, small_conv4(123)).eval()  # other random weights: everything comes from the file
    state, _ = load_state(path)
    rebuilt = fresh.classifier_type.from_state_dict(fresh, state)
    assert type(rebuilt) is type(classifier)
    with torch.no_grad():
        assert torch.equal(rebuilt(episode.query_x), classifier(episode.query_x))


def test_cli_trains_and_evaluates_metaoptnet(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--device", "cpu", "--no-progress"]
    episodes = ["--n-way", "5", "--k-shot", "1", "--n-query", "3", "--val-episodes", "2", "--val-every", "2"]
    code = main(
        [
            "train",
            "--learner",
            "metaoptnet",
            "--steps",
            "2",
            *common,
            "--backbone-option",
            "hidden=8",
            *episodes,
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    code = main(["eval", "--checkpoint", str(out / "best.safetensors"), *common, "--episodes", "4", "--n-query", "3"])
    assert code == 0, capsys.readouterr().err
    assert "5-way 1-shot" in capsys.readouterr().out


# -- learning on real Omniglot -------------------------------------------------------------------
# 5-way 1-shot, Conv-4 with 32 filters, one thread; 50 fixed test episodes. Chance is 20%;
# untrained, MatchingNet scores 43% and the R2-D2 and SVM heads 24-25% (Adam, lr 3e-3).
@pytest.fixture(scope="module")
def omniglot_test_episodes(omniglot_test):
    return EpisodeSampler(omniglot_test, 5, 1, 5, seed=123, device="cpu").fixed(50)


LEARN = {  # name: (steps, meta-batch size); measured here: matchingnet .72, r2d2 .81, metaoptnet .78
    "matchingnet": (150, 4),
    "r2d2": (100, 2),
    "metaoptnet": (100, 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LEARN))
def test_learns_omniglot(name, omniglot_train, omniglot_test_episodes):
    steps, meta_batch_size = LEARN[name]
    torch.manual_seed(0)
    learner = create(name, create_backbone("conv4", in_channels=1, image_size=28, hidden=32))
    sampler = EpisodeSampler(omniglot_train, 5, 1, 5, seed=0, device="cpu")
    start = time.perf_counter()
    metafew.train(learner, sampler, steps=steps, meta_batch_size=meta_batch_size, lr=3e-3, progress=False)
    seconds = time.perf_counter() - start
    learner.eval()
    acc = float(torch.cat([learner.evaluate_batch(b) for b in omniglot_test_episodes.batches(25)]).mean())
    print(f"{name}: {acc:.3f} on 50 test episodes after {steps} steps in {seconds:.1f}s")
    assert acc > 0.5, acc


@pytest.mark.parametrize("method", ["matchingnet", "r2d2", "metaoptnet"])
def test_metafew_adapt_offers_each_method(method):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (18, 1, 28, 28), dtype=torch.uint8, generator=g)
    data = metafew.FewShotDataset(
        "toy", [0] * 6 + [1] * 6 + [2] * 6, ["a", "b", "c"], images, channels=1, image_size=(28, 28)
    )
    backbone = small_conv4()
    model = metafew.adapt(data, backbone, method=method, mean=[0.5], std=[0.25], shots=2, eval_draws=2, device="cpu")
    assert model.classes == ["a", "b", "c"] and model.report.draws == 2
    assert len(model.predict(images[:4])) == 4
