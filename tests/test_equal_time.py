"""benchmarks/learn2learn/equal_time.py: the episodes both sides are scored on hold no class either side trained on."""

from __future__ import annotations

import random

from bench_scripts import load_benchmark

import metafew

equal_time = load_benchmark("learn2learn/equal_time", "equal_time")


def test_scored_classes_are_in_both_test_splits_and_in_no_training_split() -> None:
    # learn2learn's split as its Omniglot benchmark draws it: all 1,623 characters shuffled
    test = metafew.load_dataset("omniglot", "test")
    train = metafew.load_dataset("omniglot", "train")
    characters = sorted({c.rpartition("/")[0] for d in (test, train, metafew.load_dataset("omniglot", "val"))
                         for c in d.classes})  # fmt: skip
    order = list(range(len(characters)))
    random.Random(42).shuffle(order)
    splits = [order[:1100], order[1100:1200], order[1200:]]

    scored, n_characters = equal_time.common_classes(splits, characters)

    scored_chars = {c.rpartition("/")[0] for c in scored.classes}
    l2l_train = {characters[i] for i in splits[0] + splits[1]}
    ours_train = {c.rpartition("/")[0] for c in train.classes}
    assert len(scored_chars) == n_characters and 50 < n_characters < 200  # ~423 x 423 / 1623
    assert not scored_chars & l2l_train and not scored_chars & ours_train
    assert scored_chars == {c.rpartition("/")[0] for c in test.classes} & {characters[i] for i in splits[2]}
    assert len(scored.classes) == 4 * n_characters  # every rotation of each character, as metafew's test classes
