"""Rule 4: arguments that cannot be right are refused in one line, with a suggestion for misspelt names."""

from __future__ import annotations

import pytest
import torch
from cli_helpers import TRAIN, assert_one_line_error, run_cli

BAD_TRAIN = [
    ["--grad-clip", "-1"], ["--grad-clip", "0"], ["--grad-clip", "nan"], ["--gamma", "-1"], ["--gamma", "inf"],
    ["--n-way", "1"], ["--n-way", "0"], ["--n-query", "0"], ["--train-query", "0"], ["--train-way", "1"],
    ["--k-shot", "0"], ["--val-episodes", "-1"], ["--steps", "-1"], ["--steps", "x"], ["--lr", "inf"],
    ["--lr", "nan"], ["--lr", "0"], ["--lr", "-1e-3"], ["--meta-batch-size", "0"], ["--log-every", "0"],
    ["--learner", "maml", "--option", "inner_lr=abc"], ["--learner", "maml", "--option", "inner_steps=-1"],
    ["--learner", "maml", "--option", "inner_lr=-0.1"], ["--learner", "finetune", "--option", "steps=-5"],
    ["--learner", "finetune", "--option", "batch_size=0"], ["--option", "nonsense=1"], ["--option", "novalue"],
    ["--device", "tpu"], ["--schedule", "cosin"], ["--optimizer", "adamm"], ["--backbone-option", "hidden=abc"],
    ["--seed", "-1"],
]  # fmt: skip


@pytest.mark.parametrize("bad", BAD_TRAIN, ids=lambda b: " ".join(b))
def test_train_refuses(bad, capsys, tmp_path):
    code, _, err = run_cli(capsys, *TRAIN, "--steps", "2", "--out", tmp_path / "r", *bad)
    assert_one_line_error(code, err)
    assert not (tmp_path / "r" / "last.safetensors").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu(capsys, tmp_path):
    code, _, err = run_cli(capsys, *TRAIN, "--steps", "2", "--out", tmp_path / "r", "--device", "cuda")
    assert_one_line_error(code, err, "no CUDA GPU")


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--checkpoint", "omniglot-conv4", "--n-query", "0"],
        ["eval", "--checkpoint", "omniglot-conv4", "--batch-size", "0"],
        ["eval", "--checkpoint", "omniglot-conv4", "--episodes", "0"],
        ["pretrain", "--batch-size", "0", "--out", "x"],
        ["pretrain", "--epochs", "0", "--out", "x"],
        ["pretrain", "--lr", "inf", "--out", "x"],
        ["pretrain", "--label-smoothing", "1", "--out", "x"],
        ["adapt", "--data", "breastmnist", "--backbone", "omniglot-conv4", "--out", "m", "--max-eval", "0"],
        ["adapt", "--data", "breastmnist", "--backbone", "omniglot-conv4", "--out", "m", "--draws", "-1"],
        ["adapt", "--data", "breastmnist", "--backbone", "omniglot-conv4", "--out", "m", "--shots", "0"],
        ["predict", "--model", "m.safetensors", "x.png", "--batch-size", "0"],
    ],
    ids=lambda a: " ".join(a),
)
def test_other_commands_refuse(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err)


@pytest.mark.parametrize(
    "argv, suggestion",
    [
        (["trian"], "'train'"),
        (["evl"], "'eval'"),
        ([*TRAIN, "--dataset", "omniglott"], "'omniglot'"),
        ([*TRAIN, "--learner", "protnet"], "'protonet'"),
        ([*TRAIN, "--backbone", "conv5"], "'conv4'"),
        ([*TRAIN, "--schedule", "cosin"], "'cosine'"),
        (["adapt", "--data", "x", "--backbone", "y", "--out", "z", "--method", "protnet"], "'protonet'"),
    ],
)
def test_misspelt_names_get_a_suggestion(argv, suggestion, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, f"did you mean {suggestion}")


@pytest.mark.parametrize(
    "body, fragment",
    [
        ("[[rows]]\nlearner = 5\nn_way = 5\nk_shot = 1\n", "learner"),
        ("rows = 5\n", "rows"),
        ('[[rows]]\nlearner = "protnet"\nn_way = 5\nk_shot = 1\n', "did you mean 'protonet'"),
        ('[[rows]]\nlearner = "protonet"\nn_way = "five"\nk_shot = 1\n', "n_way"),
    ],
)
def test_bad_suite_values(body, fragment, capsys, tmp_path):
    suite = tmp_path / "s.toml"
    suite.write_text('name = "s"\n' + body)
    code, _, err = run_cli(capsys, "bench", "--suite", suite, "--list")
    assert_one_line_error(code, err, fragment)


def test_suite_not_utf8(capsys, tmp_path):
    suite = tmp_path / "s.toml"
    suite.write_bytes(b'name = "caf\xe9"\n')
    code, _, err = run_cli(capsys, "bench", "--suite", suite, "--list")
    assert_one_line_error(code, err, "s.toml")
