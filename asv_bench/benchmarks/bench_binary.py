"""Binary losses: element-wise, with exp/log per element."""

from .common import _LossBenchmark


class BinaryCrossEntropy(_LossBenchmark):
    loss = "binary_cross_entropy"


class BinaryCrossEntropyWithLogits(_LossBenchmark):
    loss = "binary_cross_entropy_with_logits"
