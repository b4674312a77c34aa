"""Regression losses: element-wise and memory-bound (the target is the bandwidth floor)."""

from .common import _LossBenchmark


class MseLoss(_LossBenchmark):
    loss = "mse_loss"


class L1Loss(_LossBenchmark):
    loss = "l1_loss"


class SmoothL1Loss(_LossBenchmark):
    loss = "smooth_l1_loss"


class HuberLoss(_LossBenchmark):
    loss = "huber_loss"
