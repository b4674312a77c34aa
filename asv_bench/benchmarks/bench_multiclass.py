"""Multi-class losses on (rows, classes) logits: element counts give rows of 100 classes;
``cross_entropy`` also runs at explicit (rows, classes) shapes, from few classes (vectorized
across rows) to a language model's vocabulary."""

from typing import ClassVar

from .common import DTYPES, SHAPES, SIZES, THREADS, _LossBenchmark


class CrossEntropy(_LossBenchmark):
    loss = "cross_entropy"
    params: ClassVar[list] = [SIZES + SHAPES, DTYPES, THREADS]


class NllLoss(_LossBenchmark):
    loss = "nll_loss"
