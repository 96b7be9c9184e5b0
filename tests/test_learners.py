"""The learner interface: registry, shapes, grad modes, devices, options and errors.

Synthetic data and a narrow Conv-4 keep this file fast; what the learners compute is
checked against independent computations in test_learner_correctness.py.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import metafew
from metafew import learners
from metafew.backbones import create as create_backbone
from metafew.data import EpisodeBatch, EpisodeSampler, FewShotDataset
from metafew.errors import ConfigError, MetafewError
from metafew.learners import MAML, Classifier, FineTune, Learner, ProtoNet, Reptile, create
from metafew.learners.base import class_means, minibatch_indices, squared_distances
from metafew.learners.bn import batch_norm_explicit, batch_stats_bn

N_WAY, K_SHOT, N_QUERY = 5, 1, 3
# Options that keep a test fast; every registered learner is tested, with n_way given where it takes one.
FAST = {
    "maml": {"test_inner_steps": 2},
    "fomaml": {"test_inner_steps": 2},
    "reptile": {"inner_steps": 2, "test_inner_steps": 2},
    "finetune": {"steps": 5},
    "metaoptnet": {},
}


def options(name: str) -> dict:
    return {**({"n_way": N_WAY} if learners.accepts(name, "n_way") else {}), **FAST.get(name, {})}


OPTIONS = {name: options(name) for name in learners.available()}


@pytest.fixture(scope="module")
def sampler() -> EpisodeSampler:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(12).repeat_interleave(6)
    images = torch.randint(0, 256, (len(labels), 1, 28, 28), generator=g, dtype=torch.uint8)
    ds = FewShotDataset("synthetic", labels, [f"c{i}" for i in range(12)], images, channels=1, image_size=(28, 28))
    return EpisodeSampler(ds, N_WAY, K_SHOT, N_QUERY, seed=0, device="cpu")


@pytest.fixture
def backbone():
    torch.manual_seed(0)
    return create_backbone("conv4", in_channels=1, image_size=28, hidden=8)


# -- registry and package exports ----------------------------------------------------------
def test_registry_names_and_classes(backbone):
    assert {"finetune", "fomaml", "maml", "protonet", "reptile"} <= set(learners.available())
    built = {name: create(name, backbone, **opts) for name, opts in OPTIONS.items()}
    assert isinstance(built["protonet"], ProtoNet)
    assert isinstance(built["maml"], MAML) and not built["maml"].first_order
    assert isinstance(built["fomaml"], MAML) and built["fomaml"].first_order
    assert isinstance(built["reptile"], Reptile)
    assert isinstance(built["finetune"], FineTune)
    assert all(isinstance(lr, Learner) and lr.backbone is backbone for lr in built.values())
    assert create("MAML", backbone, n_way=5).inner_lr == 0.4


def test_registry_errors_are_one_line_config_errors(backbone):
    with pytest.raises(ConfigError, match="unknown learner 'protonett'"):
        create("protonett", backbone)
    with pytest.raises(ConfigError, match="inner_lrr"):
        create("maml", backbone, n_way=5, inner_lrr=0.1)
    with pytest.raises(ConfigError, match="n_way"):
        create("reptile", backbone)
    with pytest.raises(ConfigError, match="first_order"):
        create("fomaml", backbone, n_way=5, first_order=False)
    assert create("fomaml", backbone, n_way=5, first_order=True).first_order


def test_package_exports():
    for name in ("ProtoNet", "MAML", "Reptile", "FineTune"):
        assert name in metafew.__all__
        assert getattr(metafew, name) is getattr(learners, name)


def test_policies_and_default_optimizers(backbone):
    expected = {
        "protonet": ("frozen", {"name": "adam", "lr": 1e-3}),
        "maml": ("transductive", {"name": "adam", "lr": 1e-3}),
        "fomaml": ("transductive", {"name": "adam", "lr": 1e-3}),
        "reptile": ("transductive", {"name": "sgd", "lr": 1.0}),
        "finetune": ("frozen", {"name": "adam", "lr": 1e-3}),
    }
    for name, (policy, opt) in expected.items():
        learner = create(name, backbone, **OPTIONS[name])
        assert learner.bn_policy == policy
        assert learner.default_optimizer == opt
        learner.default_optimizer["lr"] = 123.0  # per-instance copy: the class default is untouched
        assert type(learner).default_optimizer["lr"] != 123.0


# -- meta_loss / adapt / evaluate_batch ------------------------------------------------------
@pytest.mark.parametrize("name", ["protonet", "maml", "fomaml", "reptile"])
def test_meta_loss_returns_scalars_and_trains(name, backbone, sampler):
    learner = create(name, backbone, **OPTIONS[name])
    cfg = dict(learner.default_optimizer)
    opt = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[cfg.pop("name")](learner.parameters(), **cfg)
    before = [p.detach().clone() for p in learner.parameters()]
    loss, acc = learner.meta_loss(sampler.sample_batch(3))
    assert loss.dim() == 0 and acc.dim() == 0 and loss.requires_grad
    assert 0.0 <= float(acc) <= 1.0 and torch.isfinite(loss)
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, learner.parameters()))


@pytest.mark.parametrize("name", list(OPTIONS))
def test_adapt_returns_a_classifier_and_evaluate_batch_per_episode(name, backbone, sampler):
    learner = create(name, backbone, **OPTIONS[name]).eval()
    batch = sampler.sample_batch(3)
    classifier = learner.adapt(batch.support_x[0], batch.support_y[0])
    assert isinstance(classifier, Classifier)
    logits = classifier(batch.query_x[0])
    assert logits.shape == (N_WAY * N_QUERY, N_WAY) and logits.dtype == torch.float32
    accs = learner.evaluate_batch(batch)
    assert accs.shape == (3,) and not accs.requires_grad
    for i, episode in enumerate(batch):  # the default/vectorised evaluation is adapt() per task
        with torch.no_grad():
            logits = learner.adapt(episode.support_x, episode.support_y)(episode.query_x)
        if name not in ("reptile",):  # Reptile shuffles its inner minibatches: only shapes compare
            assert torch.isclose(accs[i], (logits.argmax(-1) == episode.query_y).float().mean())


@pytest.mark.parametrize("name", ["maml", "fomaml", "reptile", "finetune"])
def test_adapt_trains_under_no_grad_and_leaves_parameters_alone(name, backbone, sampler):
    options = dict(OPTIONS[name], **({"full": True} if name == "finetune" else {}))
    learner = create(name, backbone, **options)
    state = {k: v.clone() for k, v in learner.state_dict().items()}
    episode = sampler.sample()
    with torch.no_grad():
        logits = learner.adapt(episode.support_x, episode.support_y)(episode.query_x)
    assert not logits.requires_grad
    for k, v in learner.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in learner.parameters())


def test_maml_adapt_runs_test_inner_steps(backbone, sampler):
    episode = sampler.sample()
    zero = MAML(backbone, n_way=5, test_inner_steps=0)
    three = MAML(backbone, n_way=5, test_inner_steps=3, test_inner_lr=0.1)
    three.head.load_state_dict(zero.head.state_dict())
    a = zero.adapt(episode.support_x, episode.support_y)
    b = three.adapt(episode.support_x, episode.support_y)
    assert all(torch.equal(a.params[k], v) for k, v in zero.meta_params().items())
    assert not torch.equal(a.params["head.weight"], b.params["head.weight"])
    # More steps fit the support set better.
    loss_a = F.cross_entropy(a(episode.support_x), episode.support_y)
    loss_b = F.cross_entropy(b(episode.support_x), episode.support_y)
    assert loss_b < loss_a


def test_maml_anil_adapts_only_the_head(backbone, sampler):
    learner = MAML(backbone, n_way=5, inner_params="head", test_inner_steps=2)
    episode = sampler.sample()
    params = learner.adapt(episode.support_x, episode.support_y).params
    for k, v in learner.meta_params().items():
        assert torch.equal(params[k], v) == k.startswith("backbone."), k


def test_meta_loss_under_no_grad_gives_the_same_value(backbone, sampler):
    batch = sampler.sample_batch(2)
    for name in ("protonet", "maml", "fomaml"):
        learner = create(name, backbone, **OPTIONS[name])
        learner.eval()  # ProtoNet: no running-stat update between the two calls
        loss, acc = learner.meta_loss(batch)
        with torch.no_grad():
            loss_ng, acc_ng = learner.meta_loss(batch)
        assert not loss_ng.requires_grad
        torch.testing.assert_close(loss_ng, loss.detach())
        torch.testing.assert_close(acc_ng, acc)


def test_maml_vmap_handles_every_head(backbone, sampler):
    batch = sampler.sample_batch(2)
    for head_init in ("learned", "zero", "prototypes"):
        opts = {"n_way": 5} if head_init == "learned" else {}
        loop = MAML(backbone, head_init=head_init, **opts)
        vm = MAML(backbone, head_init=head_init, vmap_tasks=True, **opts)
        if loop.head is not None:
            vm.head.load_state_dict(loop.head.state_dict())
        a, b = loop.meta_loss(batch)[0], vm.meta_loss(batch)[0]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_task_specific_heads_work_for_any_n_way(backbone):
    g = torch.Generator().manual_seed(0)
    batch = EpisodeBatch(
        torch.randn(2, 3, 1, 28, 28, generator=g),
        torch.arange(3).expand(2, -1),
        torch.randn(2, 6, 1, 28, 28, generator=g),
        torch.arange(3).repeat_interleave(2).expand(2, -1),
        torch.arange(3).expand(2, -1),
    )
    for learner in (MAML(backbone, head_init="zero"), MAML(backbone, head_init="prototypes"), ProtoNet(backbone)):
        loss, _ = learner.meta_loss(batch)
        assert torch.isfinite(loss)
        assert learner.adapt(batch.support_x[0], batch.support_y[0])(batch.query_x[0]).shape == (6, 3)
        assert learner.evaluate_batch(batch).shape == (2,)


def test_wrong_n_way_and_bad_options_raise_metafew_errors(backbone, sampler):
    batch3 = EpisodeSampler(sampler.dataset, 3, 1, 2, device="cpu").sample_batch(1)
    with pytest.raises(MetafewError, match="5-way"):
        MAML(backbone, n_way=5).meta_loss(batch3)
    with pytest.raises(MetafewError, match="5-way"):
        Reptile(backbone, n_way=5).meta_loss(batch3)
    with pytest.raises(MetafewError, match="n_way"):
        MAML(backbone, head_init="learned")
    with pytest.raises(MetafewError, match="head_init"):
        MAML(backbone, n_way=5, head_init="random")
    with pytest.raises(MetafewError, match="distance"):
        ProtoNet(backbone, distance="manhattan")
    with pytest.raises(MetafewError, match="inner_optimizer"):
        Reptile(backbone, n_way=5, inner_optimizer="rmsprop")
    with pytest.raises(MetafewError, match="head"):
        FineTune(backbone, head="mlp")


def test_finetune_has_no_meta_training(backbone, sampler):
    with pytest.raises(MetafewError, match=r"metafew\.pretrain"):
        FineTune(backbone).meta_loss(sampler.sample_batch(1))


def test_finetune_fits_the_support_set(backbone):
    """Support images with a bright block in a class-specific place: every head fits them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 1, 28, 28, generator=g) * 0.1
    for i in range(10):
        c = i % 5
        x[i, 0, 4 * c : 4 * c + 8, 4 * c : 4 * c + 8] += 3.0
    y = torch.arange(10) % 5
    with torch.no_grad():
        backbone.train()(x)  # running statistics of these images (the eval-mode features use them)
    for head in ("linear", "cosine"):
        for full in (False, True):
            learner = FineTune(backbone, head=head, full=full, optimizer="adam", lr=0.05, steps=50)
            logits = learner.adapt(x, y)(x)
            assert (logits.argmax(-1) == y).all(), (head, full)
            assert F.cross_entropy(logits, y) < 1.6, (head, full)  # log(5) = 1.609 at the zero init


def test_protonet_cosine_scale_is_learnable_or_fixed(backbone):
    learned = ProtoNet(backbone, distance="cosine", scale=5.0)
    fixed = ProtoNet(backbone, distance="cosine", scale=5.0, learn_scale=False)
    assert "scale" in dict(learned.named_parameters())
    assert "scale" not in dict(fixed.named_parameters())
    assert float(fixed.scale) == 5.0
    assert "scale" not in dict(ProtoNet(backbone).named_parameters())


def test_bf16_autocast_runs_every_learner(backbone, sampler):
    batch = sampler.sample_batch(2)
    for name, opts in OPTIONS.items():
        learner = create(name, backbone, amp="bf16", **opts)
        if name != "finetune":
            loss, _ = learner.meta_loss(batch)
            assert loss.dtype == torch.float32 and torch.isfinite(loss)
            loss.backward()
        logits = learner.adapt(batch.support_x[0], batch.support_y[0])(batch.query_x[0])
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_bf16_maml_meta_gradient_follows_the_float32_one(sampler):
    torch.manual_seed(0)
    backbone = create_backbone("conv4", in_channels=1, image_size=28)  # full width: bf16 noise averages out
    batch = sampler.sample_batch(4)
    grads = {}
    for amp in (None, "bf16"):
        learner = create("maml", backbone, amp=amp, **OPTIONS["maml"])
        torch.manual_seed(1)
        learner.head.reset_parameters()
        learner.zero_grad()
        learner.meta_loss(batch)[0].backward()
        grads[amp] = torch.cat([p.grad.flatten() for p in learner.parameters() if p.grad is not None])
    cos = F.cosine_similarity(grads[None], grads["bf16"], dim=0)
    assert cos > 0.97, f"bf16 meta-gradient points elsewhere (cosine {cos:.3f})"


# -- helpers ----------------------------------------------------------------------------------
def test_class_means_and_distances():
    x = torch.tensor([[0.0, 0.0], [2.0, 2.0], [1.0, 3.0], [5.0, 5.0]])
    y = torch.tensor([0, 0, 1, 1])
    means = class_means(x, y, 2)
    torch.testing.assert_close(means, torch.tensor([[1.0, 1.0], [3.0, 4.0]]))
    torch.testing.assert_close(squared_distances(x[:1], means), torch.tensor([[2.0, 25.0]]))
    batched = class_means(torch.stack([x, x + 1]), torch.stack([y, y]), 2)
    torch.testing.assert_close(batched[1], means + 1)


def test_batch_stats_bn_restores_modes_and_explicit_matches_fused(backbone):
    backbone.eval()
    x = torch.randn(6, 1, 28, 28)
    with batch_stats_bn(backbone):
        fused = backbone(x)
    with batch_stats_bn(backbone, explicit=True):
        explicit = backbone(x)
    torch.testing.assert_close(fused, explicit, rtol=1e-4, atol=1e-5)
    bn = backbone[0][1]
    assert not bn.training and bn.track_running_stats and "forward" not in bn.__dict__

    def patched(x):
        return x

    bn.forward = patched  # an outer context's patch survives ours
    for explicit in (False, True):
        with batch_stats_bn(backbone, explicit=explicit):
            pass
        assert bn.__dict__.get("forward") is patched
    del bn.forward
    y = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    w, b = torch.rand(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    torch.testing.assert_close(batch_norm_explicit(y, w, b, 1e-5), F.batch_norm(y, None, None, w, b, training=True))


def test_minibatch_indices_sweep_epochs():
    assert minibatch_indices(5, None, 3, torch.device("cpu")) is None
    assert minibatch_indices(5, 10, 3, torch.device("cpu")) is None
    idx = minibatch_indices(12, 4, 6, torch.device("cpu"))
    assert idx.shape == (6, 4)
    assert sorted(idx[:3].flatten().tolist()) == list(range(12))  # each epoch sees every example once
    assert sorted(idx[3:].flatten().tolist()) == list(range(12))


# -- no host syncs ------------------------------------------------------------------------------
def test_learner_sources_have_no_item_calls():
    root = Path(inspect.getfile(learners)).parent
    for path in root.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"[\w)\]]\.(item|tolist|cpu|numpy)\(\)", text), path.name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_meta_loss_never_syncs_with_the_host_on_cuda(sampler):
    torch.manual_seed(0)
    backbone = create_backbone("conv4", in_channels=1, image_size=28, hidden=8).cuda()
    batch = sampler.sample_batch(2).to("cuda")
    for name in [n for n in learners.available() if n != "finetune"]:  # FineTune has no meta-training loss
        learner = create(name, backbone, **OPTIONS[name]).cuda()
        learner.meta_loss(batch)  # warm-up (lazy init may sync)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss, acc = learner.meta_loss(batch)
            loss.backward()
            learner.evaluate_batch(batch) if name == "protonet" else None
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert loss.device.type == "cuda" and acc.device.type == "cuda"


# -- adapted classifiers are modules; the BatchNorm policy object decides ------------------------
@pytest.mark.parametrize("name", list(OPTIONS))
def test_adapted_classifier_state_dict_round_trips(name, backbone, sampler, tmp_path):
    from metafew.checkpoint import load_state, save_state

    episode = sampler.sample()
    classifier = create(name, backbone, **OPTIONS[name]).adapt(episode.support_x, episode.support_y)
    assert isinstance(classifier, torch.nn.Module)
    path = save_state(classifier.state_dict(), tmp_path / "classifier.safetensors")
    torch.manual_seed(123)  # a fresh learner on other random weights: everything comes from the file
    fresh = create(name, create_backbone("conv4", in_channels=1, image_size=28, hidden=8), **OPTIONS[name])
    state, _ = load_state(path)
    rebuilt = fresh.classifier_type.from_state_dict(fresh, state)
    assert type(rebuilt) is type(classifier)
    with torch.no_grad():
        assert torch.equal(rebuilt(episode.query_x), classifier(episode.query_x))


def test_transductive_classifier_with_support_statistics_is_batch_independent(backbone, sampler):
    from metafew.learners.bn import Transductive

    episode = sampler.sample()
    learner = MAML(backbone, n_way=N_WAY, test_inner_steps=2)
    deployed = learner.adapt(episode.support_x, episode.support_y, bn=Transductive(support_statistics=True))
    batch_bn = learner.adapt(episode.support_x, episode.support_y)
    assert deployed.bn_stats is not None and batch_bn.bn_stats is None
    q = episode.query_x
    with torch.no_grad():
        together = deployed(q)
        alone = torch.cat([deployed(q[i : i + 1]) for i in range(len(q))])
        torch.testing.assert_close(alone, together, rtol=1e-4, atol=1e-5)
        assert torch.equal(alone.argmax(-1), together.argmax(-1))
        # With batch statistics (MAML's original test-time BatchNorm) one image alone is another input.
        assert not torch.allclose(batch_bn(q[:1]), batch_bn(q)[:1], atol=1e-3)


def test_the_bn_policy_object_decides(backbone, sampler):
    from metafew.learners.bn import Frozen, Transductive

    episode = sampler.sample()
    with torch.no_grad():
        backbone.train()(episode.query_x * 2 + 1)  # running statistics unlike the support images'
    backbone.eval()
    before = {k: v.clone() for k, v in backbone.named_buffers()}
    learner = ProtoNet(backbone)
    sx, sy, q = episode.support_x, episode.support_y, episode.query_x
    frozen = learner.adapt(sx, sy)
    adabn = learner.adapt(sx, sy, bn=Frozen(reestimate=True))
    with torch.no_grad():
        assert not torch.allclose(frozen(q), adabn(q))
        # AdaBN's statistics are exactly those a re-estimation of the running statistics gives.
        import copy

        reference = copy.deepcopy(backbone)
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        reference.train()(sx)
        expected = {k: v for k, v in reference.named_buffers() if k.endswith(("running_mean", "running_var"))}
        stats = adabn.support_stats()
        assert {f"{k}.running_{s}" for k in stats for s in ("mean", "var")} == set(expected)
        assert all(torch.equal(stats[k][0], expected[f"{k}.running_mean"]) for k in stats)
        learner.bn = Transductive()  # a policy set on the learner: batch statistics everywhere
        transductive = learner.adapt(sx, sy)
        assert learner.bn_policy == "transductive" and not torch.allclose(
            transductive(q[:1]), transductive(q)[:1], atol=1e-3
        )
    for k, v in backbone.named_buffers():
        assert torch.equal(v, before[k]), k  # no policy touched the backbone's own statistics


def test_proto_maml_head_scale_scales_the_initial_logits(backbone, sampler):
    episode = sampler.sample()
    heads = {}
    for scale in (1.0, 0.25):
        learner = MAML(backbone, head_init="prototypes", head_scale=scale)
        theta = learner.meta_params()
        heads[scale] = learner.task_params(theta, episode.support_x, episode.support_y, N_WAY)
    for key in ("head.weight", "head.bias"):
        assert torch.allclose(heads[0.25][key], 0.25 * heads[1.0][key])
    with pytest.raises(Exception, match="head_scale must be positive"):
        MAML(backbone, head_init="prototypes", head_scale=0.0)
