"""Multi-label loss on (rows, 100 classes): a sigmoid and a log loss per output."""

from .common import _LossBenchmark


class MultilabelSoftMarginLoss(_LossBenchmark):
    loss = "multilabel_soft_margin_loss"
