"""The public API as a user meets it: `import metafew`, the registries, RunConfig, `metafew.load`,
and the house rules that keep the package easy to live in (doctests, no import circles)."""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import torch

import metafew
from metafew.config import RunConfig, build, load_run, train_run
from metafew.errors import CheckpointError, ConfigError
from metafew.learners import LEARNERS, Learner, register_learner
from metafew.registry import Registry

PACKAGE = Path(metafew.__file__).parent


def all_modules() -> list[str]:
    return sorted(
        m.name
        for m in pkgutil.walk_packages([str(PACKAGE)], "metafew.")
        if not m.name.startswith("metafew.suites") and m.name != "metafew.cli.__main__"
    )


# -- discoverable from `import metafew` ----------------------------------------------------------
def test_the_registries_are_listed_from_the_top():
    assert {"protonet", "maml", "fomaml", "reptile", "finetune"} <= set(metafew.list_learners())
    assert {"conv4", "resnet12", "resnet18"} <= set(metafew.list_backbones())
    assert {"omniglot", "omniglot-lake", "pneumoniamnist", "caltech101"} <= set(metafew.list_datasets())


def test_create_by_name_from_the_top():
    backbone = metafew.create_backbone("conv4", in_channels=1, image_size=28)
    learner = metafew.create_learner("maml", backbone, n_way=5)
    assert learner.backbone is backbone
    with pytest.raises(ConfigError, match="did you mean 'resnet12'"):
        metafew.create_backbone("resnet-12")
    with pytest.raises(ConfigError, match="did you mean 'reptile'"):
        metafew.create_learner("reptil", backbone)


@pytest.mark.parametrize("module", all_modules())
def test_docstring_examples_run(module):
    mod = importlib.import_module(module)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(mod, module):
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} doctest failure(s) in {module}"


def test_every_public_function_has_an_example():
    missing = [
        name
        for name in metafew.__all__
        if inspect.isfunction(getattr(metafew, name)) and ">>>" not in (inspect.getdoc(getattr(metafew, name)) or "")
    ]
    assert not missing, f"public functions without a docstring example: {missing}"


# -- one registry idiom ----------------------------------------------------------------------------
def test_registry_refuses_duplicates_and_suggests_names():
    reg: Registry = Registry("widget")
    reg.register("gear", int)
    reg.register("gear", int)  # the same object again (a module imported twice) is fine
    with pytest.raises(ConfigError, match="registered twice"):
        reg.register("gear", float)
    with pytest.raises(ConfigError, match=r"unknown widget 'gaer'; did you mean 'gear'\?"):
        reg.get("gaer")
    assert "GEAR" in reg and reg.names() == ["gear"]


def test_plugins_come_in_through_entry_points(monkeypatch):
    class FakeEntryPoint:
        name, value = "plugged", "somewhere:thing"

        def load(self):
            return len

    monkeypatch.setattr(
        "metafew.registry.entry_points", lambda group: [FakeEntryPoint()] if group == "metafew.gadgets" else []
    )
    reg: Registry = Registry("gadget", group="metafew.gadgets")
    assert reg.get("plugged") is len and "plugged" in reg.names()


def test_a_new_learner_is_one_file(tmp_path, monkeypatch):
    """A learner added by one module with a decorator is built by name, by RunConfig and by the CLI."""
    (tmp_path / "nearest_mean.py").write_text(
        "from metafew.learners import ProtoNet, register_learner\n\n"
        "@register_learner('nearest-mean-test')\n"
        "class NearestMean(ProtoNet):\n"
        "    '''ProtoNet under another name: enough to prove the path.'''\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        importlib.import_module("nearest_mean")
        assert "nearest-mean-test" in metafew.list_learners()
        learner = build(RunConfig(learner="nearest-mean-test", in_channels=1, image_size=(28, 28)), device="cpu")
        assert type(learner).__name__ == "NearestMean"
        from metafew.cli.main import main

        assert (
            main(
                [
                    "train",
                    "--learner",
                    "nearest-mean-test",
                    "--steps",
                    "2",
                    "--val-episodes",
                    "0",
                    "--train-way",
                    "5",
                    "--out",
                    str(tmp_path / "run"),
                    "--no-progress",
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
        assert type(metafew.load(tmp_path / "run" / "last.safetensors", device="cpu")).__name__ == "NearestMean"
    finally:
        LEARNERS._entries.pop("nearest-mean-test", None)


def test_register_learner_refuses_a_taken_name():
    with pytest.raises(ConfigError, match="registered twice"):

        @register_learner("protonet")
        class Impostor(Learner):
            pass


# -- RunConfig ---------------------------------------------------------------------------------------
def test_runconfig_refuses_values_that_cannot_be_right():
    for bad, match in [
        ({"n_way": 1}, "n_way must be an integer >= 2"),
        ({"grad_clip": -1.0}, "grad_clip must be a number > 0"),
        ({"gamma": -0.5}, "gamma must be a number > 0"),
        ({"n_query": 0}, "n_query must be an integer >= 1"),
        ({"meta_batch_size": 0}, "meta_batch_size"),
        ({"val_episodes": -1}, "val_episodes"),
        ({"schedule": "cosin"}, "did you mean 'cosine'"),
        ({"optimizer": "adamm"}, "did you mean 'adam'"),
        ({"amp": "fp8"}, "amp must be"),
        ({"learner_options": 5}, "learner_options must be a table"),
    ]:
        with pytest.raises(ConfigError, match=match):
            RunConfig(**bad)
    with pytest.raises(ConfigError, match="unknown key 'n_wya'; did you mean 'n_way'"):
        RunConfig.from_dict({"n_wya": 5})


def test_runconfig_round_trips_through_a_checkpoint(tmp_path):
    config = RunConfig(learner="protonet", train_way=10, n_query=5, steps=3, val_episodes=0, log_every=1)
    learner, result = train_run(config, tmp_path / "run", device="cpu", progress=False)
    assert result.steps == 3
    loaded, rebuilt, record = load_run(tmp_path / "run" / "last.safetensors", device="cpu")
    assert loaded.train_setting == (10, 1, 5) and loaded.in_channels == 1 and loaded.image_size == (28, 28)
    assert record["config"]["config_version"] == 2
    for a, b in zip(learner.state_dict().values(), rebuilt.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu())
    assert config.in_channels is None  # the caller's config is not changed by the run


def test_a_010_checkpoint_still_loads(tmp_path):
    """0.1.0 stored a benchmark row (with published/source and no config_version) as the run config."""
    from metafew.checkpoint import save_state

    learner = build(RunConfig(in_channels=1, image_size=(28, 28)), device="cpu")
    old = {
        "learner": "protonet",
        "n_way": 5,
        "k_shot": 1,
        "name": "protonet-5w1s",
        "dataset": "omniglot",
        "published": 98.8,
        "source": "Snell et al. 2017",
        "notes": "",
        "metric": "accuracy",
        "backbone": "conv4",
        "backbone_checkpoint": None,
        "pretrained_backbone": "x.safetensors",
        "in_channels": 1,
        "image_size": [28, 28],
    }
    save_state(learner, tmp_path / "best.safetensors", {"config": old, "steps": 10})
    config, rebuilt, _ = load_run(tmp_path / "best.safetensors", device="cpu")
    assert config.learner == "protonet" and type(rebuilt).__name__ == "ProtoNet"
    save_state(learner, tmp_path / "future.safetensors", {"config": {**old, "config_version": 99}})
    with pytest.raises(CheckpointError, match="run configuration version 99, this metafew reads versions 1 to 2"):
        load_run(tmp_path / "future.safetensors", device="cpu")


# -- metafew.load: any file metafew writes -------------------------------------------------------------
def test_load_says_what_a_file_is_when_it_is_not_a_model(tmp_path):
    (tmp_path / "report.json").write_text('{"format": "metafew-adaptation-report"}')
    (tmp_path / "plot.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(CheckpointError, match="a JSON file of format 'metafew-adaptation-report'"):
        metafew.load(tmp_path / "report.json")
    with pytest.raises(CheckpointError, match="a PNG image"):
        metafew.load(tmp_path / "plot.png")
    with pytest.raises(CheckpointError, match="a folder"):
        metafew.load(tmp_path)


# -- the shape of the house ----------------------------------------------------------------------------
# Lower layers never import higher ones at module level (lazy imports inside functions may reach up).
LAYERS = [
    {"errors", "registry", "seeding", "paths", "outputs", "progress", "device", "distributed", "_version"},
    {"cache_keys"},
    {"data"},
    {"backbones"},
    {"checkpoint"},
    {"learners"},
    {"engine"},
    {"config"},
    {"bench", "adaptation", "interop"},
    {"loading"},
    {"__init__", "cli", "__main__"},
]


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} belongs to no layer of the test; add it to LAYERS")


def _module_level_imports(module: str) -> set[str]:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text())
    package = module if spec.origin.endswith("__init__.py") else module.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in tree.body:  # module level only
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("metafew"):
                out.add(target)
                for alias in node.names:  # `from . import conv4` imports a submodule
                    if importlib.util.find_spec(f"{target}.{alias.name}") if _is_package(target) else False:
                        out.add(f"{target}.{alias.name}")
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("metafew"))
    return out


def _is_package(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.submodule_search_locations is not None


def test_no_upward_imports_and_no_import_circles():
    modules = all_modules()
    graph = {m: {t for t in _module_level_imports(m) if t in modules and t != m} for m in modules}
    upward = [(m, t) for m, ts in graph.items() for t in ts if _layer(t) > _layer(m)]
    assert not upward, f"module-level imports reaching up a layer: {upward}"
    # package __init__ files import their children; a child importing its own package's __init__ is the circle
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                raise AssertionError(
                    f"import circle: {' -> '.join([*path[path.index(t) :], t]) if t in path else m + ' -> ' + t}"
                )
            if t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in modules:
        if m not in state:
            visit(m, [m])


# -- a suite that pretrains its backbone ------------------------------------------------------------------
def test_a_suite_pretrains_its_backbone_once(tmp_path):
    from metafew.bench import load_suite, run_suite

    suite_file = tmp_path / "tiny.toml"
    suite_file.write_text(
        'name = "tiny"\n'
        '[pretrain]\ndataset = "breastmnist"\nsubset = "train"\nval_subset = "val"\nepochs = 2\nkeep = "best"\n'
        'augment = { name = "flipcrop", padding = 2 }\n'
        '[defaults]\ndataset = "breastmnist"\nval_subset = "none"\nn_way = 2\nk_shot = 5\neval_episodes = 20\n'
        '[[rows]]\nlearner = "protonet"\nsteps = 0\n'
    )
    suite = load_suite(suite_file)
    assert suite.pretrain is not None and suite.pretrain.keep == "best"
    lines: list[str] = []
    rows = run_suite(suite, tmp_path / "out.json", device="cpu", progress=False, log=lines.append)
    assert rows[0]["backbone"].startswith("pretrained pretrain-conv4-breastmnist-")
    assert 0 <= rows[0]["accuracy_mean"] <= 100
    backbone = metafew.load(next((tmp_path / "runs" / "tiny").glob("pretrain-*.safetensors")), device="cpu")
    assert backbone.out_features == 64
    lines.clear()
    run_suite(load_suite(suite_file), tmp_path / "out.json", device="cpu", progress=False, log=lines.append)
    assert any("(reused)" in line for line in lines)


def test_a_suite_rejects_a_bad_pretrain_table(tmp_path):
    from metafew.bench import load_suite

    bad = tmp_path / "bad.toml"
    bad.write_text('[pretrain]\nepoch = 3\n[[rows]]\nlearner = "protonet"\nn_way = 5\nk_shot = 1\n')
    with pytest.raises(ConfigError, match="unknown key 'epoch'; did you mean 'epochs'"):
        load_suite(bad)
    bad.write_text('[pretrain]\nkeep = "best"\n[[rows]]\nlearner = "protonet"\nn_way = 5\nk_shot = 1\n')
    with pytest.raises(ConfigError, match="needs a val_subset"):
        load_suite(bad)


def test_backbone_options_apply_on_top_of_a_backbone_checkpoint():
    """``backbone_options`` with a pretrained checkpoint: a layout option applies, a shape change is refused."""
    from metafew.backbones.conv4 import ChannelsLastConv2d

    shipped = build(RunConfig(learner="protonet", backbone_checkpoint="omniglot-conv4"), device="cpu")
    nchw = build(
        RunConfig(learner="protonet", backbone_checkpoint="omniglot-conv4", backbone_options={"channels_last": False}),
        device="cpu",
    )
    assert isinstance(shipped.backbone[0][0], ChannelsLastConv2d) and type(nchw.backbone[0][0]) is torch.nn.Conv2d
    assert all(torch.equal(a, b) for a, b in zip(shipped.state_dict().values(), nchw.state_dict().values()))
    x = torch.rand(6, 1, 28, 28)
    torch.testing.assert_close(shipped.backbone.eval()(x), nchw.backbone.eval()(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(CheckpointError, match="shape"):
        build(RunConfig(learner="protonet", backbone_checkpoint="omniglot-conv4", backbone_options={"hidden": 32}))
