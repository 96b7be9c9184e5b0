"""Training loops: supervised pretraining, episodic meta-training, and evaluation on fixed episodes."""

from .curves import plot_learning_curve
from .evaluate import EvalResult, PairedDifference, evaluate, paired_difference
from .pretrain import pretrain
from .train import TrainResult, load_weights, train

__all__ = [
    "EvalResult",
    "PairedDifference",
    "TrainResult",
    "evaluate",
    "load_weights",
    "paired_difference",
    "plot_learning_curve",
    "pretrain",
    "train",
]
