"""Gradient-boosting objectives and metrics from lossforge losses, for XGBoost and LightGBM.

``xgboost_objective(name, **options)`` is the ``obj=`` of ``xgboost.train`` and the
``objective=`` of its scikit-learn estimators; ``xgboost_metric(name, **options)`` their
``custom_metric=`` / ``eval_metric=``. ``lightgbm_objective`` and ``lightgbm_metric`` are
LightGBM's ``params["objective"]`` / ``objective=`` and ``feval=`` / ``eval_metric=``. Each
callable takes both forms its library calls (``(predictions, dataset)`` from ``train``,
``(labels, predictions, weights)`` from the estimators). Neither library is imported here:
they are optional (``pip install "lossforge[xgboost]"``, ``"lossforge[lightgbm]"``).

What the objective returns, per prediction (``n`` rows, ``K`` outputs a row):

- The first and second derivative of the loss of that row's element with respect to the
  raw margin, ``loss.grad_hess(..., reduction="sum")``, times the row's sample weight
  (neither library weights a custom objective's gradients itself).
- Squared error is the boosters' ``(x - y)^2 / 2``: ``mse_loss`` is halved (gradient
  ``x - y``, Hessian 1), so that ``lambda``, ``min_child_weight`` and
  ``min_sum_hessian_in_leaf`` mean what they mean with the built-in objective. Every other
  loss is taken as lossforge defines it (``huber_loss`` is LightGBM's ``huber``).
- ``cross_entropy`` takes ``(n, K)`` margins and class-index labels: the layout both
  libraries pass to a custom objective in the versions supported (XGBoost >= 2.0,
  LightGBM >= 4.0; LightGBM 3 passed a flat class-major array and is refused). Its Hessian
  diagonal is ``p (1 - p)``; the libraries' built-in softmax objectives scale it, XGBoost's
  by 2 and LightGBM's by ``K / (K - 1)``, and each objective does the same by default, so
  that a model trains as with the built-in objective. ``softmax_hessian="exact"`` gives
  ``p (1 - p)`` (scikit-learn's choice), ``"xgboost"`` and ``"lightgbm"`` either scaling.
- Other losses of ``(n, K)`` margins (``binary_cross_entropy_with_logits`` on multi-label
  targets) are element-wise, each row's weight applied to its ``K`` elements.
  ``multilabel_soft_margin_loss`` is the mean over a row's labels, as PyTorch defines it:
  its derivatives are ``1 / K`` of ``binary_cross_entropy_with_logits``'s.

A loss must have a Hessian (``NotImplementedError`` otherwise) and take raw margins:
``binary_cross_entropy`` takes probabilities and is refused, with
``binary_cross_entropy_with_logits`` named instead.

The metric is the mean of the loss's values (``reduction="none"``: per row, or per element
of ``(n, K)`` element-wise losses) on raw margins, weighted by the sample weights where there
are some; lower is better. Both libraries pass a metric raw
margins when the objective is a custom one, so pair it with a lossforge objective (with a
built-in objective they pass transformed predictions, probabilities for instance).

Threads: the objective runs on one thread by default (``threads=1``); ``threads=n`` gives it
``n`` Numba threads, ``threads=None`` Numba's own count. Measured on 2 shared cores with the
booster on 2 threads (10^6 rows, binary_cross_entropy_with_logits, 10 rounds): the objective
took 5.6 ms a round on one thread against 21 ms on two beside XGBoost (training 3.8 against
5.6 s), 13.5 against 27 ms beside LightGBM (11.1 against 12.3 s). The objective is a
memory-bound pass, a few percent of a round: a second thread buys it little (at most 1.3x on
this machine) and loses much when the booster's OpenMP threads, still spinning after their
region, or other processes hold the cores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np

#: The Hessian factor of each library's built-in softmax objective, by the ``K`` outputs.
SOFTMAX_HESSIANS: dict[str, Callable[[int], float]] = {
    "exact": lambda k: 1.0,
    "xgboost": lambda k: 2.0,
    "lightgbm": lambda k: k / (k - 1) if k > 1 else 1.0,
}


def xgboost_objective(
    name: str, *, softmax_hessian: str = "xgboost", threads: int | None = 1, **options: Any
) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """XGBoost's custom objective for loss ``name`` with its ``options`` (see the module's
    docstring): ``obj(predt, dtrain) -> (grad, hess)`` for ``xgboost.train``, and
    ``obj(y_true, y_pred, sample_weight=None)`` for ``XGBRegressor(objective=obj)`` etc."""
    objective = _Objective(name, options, softmax_hessian, threads)

    def obj(predt: Any, dtrain: Any, sample_weight: Any = None) -> tuple[np.ndarray, np.ndarray]:
        if hasattr(dtrain, "get_label"):  # xgboost.train: (margins, DMatrix)
            return objective(predt, dtrain.get_label(), dtrain.get_weight())
        return objective(dtrain, predt, sample_weight)  # the estimators: (labels, margins)

    return _named(obj, name, objective.__doc__)


def xgboost_metric(name: str, **options: Any) -> Callable[..., Any]:
    """XGBoost's custom metric, the mean loss on raw margins: ``metric(predt, dtrain) ->
    (name, value)`` for ``xgboost.train(custom_metric=...)``, and ``metric(y_true, y_pred,
    sample_weight=None) -> value`` for the estimators' ``eval_metric=``."""
    metric = _Metric(name, options)

    def evaluate(predt: Any, dtrain: Any, sample_weight: Any = None) -> Any:
        if hasattr(dtrain, "get_label"):
            return name, metric(predt, dtrain.get_label(), dtrain.get_weight())
        return metric(dtrain, predt, sample_weight)

    return _named(evaluate, name, metric.__doc__)


def lightgbm_objective(
    name: str, *, softmax_hessian: str = "lightgbm", threads: int | None = 1, **options: Any
) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """LightGBM's custom objective for loss ``name`` with its ``options`` (see the module's
    docstring): ``objective(preds, train_data) -> (grad, hess)`` for ``lightgbm.train``
    (``params={"objective": objective}``), and ``objective(y_true, y_pred, weight)`` for
    ``LGBMRegressor(objective=objective)`` etc."""
    objective = _Objective(name, options, softmax_hessian, threads)

    def obj(preds: Any, train_data: Any, weight: Any = None) -> tuple[np.ndarray, np.ndarray]:
        if hasattr(train_data, "get_label"):  # lightgbm.train: (margins, Dataset)
            return objective(preds, train_data.get_label(), train_data.get_weight())
        return objective(train_data, preds, weight)

    return _named(obj, name, objective.__doc__)


def lightgbm_metric(name: str, **options: Any) -> Callable[..., tuple[str, float, bool]]:
    """LightGBM's custom metric, the mean loss on raw margins: ``feval(preds, eval_data) ->
    (name, value, False)`` for ``lightgbm.train``, and ``feval(y_true, y_pred, weight)`` for
    the estimators' ``eval_metric=``."""
    metric = _Metric(name, options)

    def feval(preds: Any, eval_data: Any, weight: Any = None) -> tuple[str, float, bool]:
        if hasattr(eval_data, "get_label"):
            return name, metric(preds, eval_data.get_label(), eval_data.get_weight()), False
        return name, metric(eval_data, preds, weight), False

    return _named(feval, name, metric.__doc__)


def _named(fn: Any, name: str, doc: str | None) -> Any:
    # XGBoost's estimators name a metric after its __name__
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    return fn


def _loss(name: str, options: dict[str, Any]) -> Any:
    from lossforge import get

    loss = get(name)
    if name == "binary_cross_entropy":
        raise ValueError(
            "binary_cross_entropy takes probabilities, and boosting trains raw margins: "
            "use binary_cross_entropy_with_logits"
        )
    if loss.arguments != ("input", "target") or not loss.reduced:
        raise ValueError(f"{name} is not a loss of (input, target): it cannot be an objective")
    if "reduction" in options:
        raise TypeError("reduction is chosen by the objective and the metric: leave it out")
    unknown = options.keys() - loss.options.keys()
    if unknown:
        raise TypeError(f"{name}() got an unexpected keyword argument {sorted(unknown)[0]!r}")
    return loss


def _arrays(name: str, margins: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Margins as the booster passed them and labels as the loss takes them: class indices
    for cross_entropy, else floats of the margins' shape."""
    # the margins' own float32 (XGBoost) or float64 (LightGBM), other types as float64: a
    # conversion of every margin and back cost more than the kernel (10^6 logits: 10 ms a
    # call against 3 for NumPy's float32 objective)
    x = np.asarray(margins)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    y = np.asarray(labels)
    if name == "cross_entropy":
        if x.ndim != 2:
            raise ValueError(
                "cross_entropy needs (n, K) margins, one column a class: set num_class "
                f"(K >= 2) in the booster's parameters (got margins of shape {x.shape})"
            )
        classes = y.astype(np.int64)
        if not np.array_equal(classes, y):
            raise ValueError("cross_entropy needs labels that are class indices 0, 1, ..., K-1")
        return x, classes
    y = y.astype(x.dtype, copy=False)
    if y.size == x.size and y.shape != x.shape:  # (n, K) targets a library passed flat
        y = y.reshape(x.shape)
    return x, y


class _Objective:
    """``(margins, labels, weights) -> (grad, hess)``: see the module's docstring."""

    def __init__(self, name: str, options: dict, softmax_hessian: str, threads: int | None):
        self.loss = _loss(name, options)
        if softmax_hessian not in SOFTMAX_HESSIANS:
            raise ValueError(
                f"softmax_hessian must be one of {sorted(SOFTMAX_HESSIANS)}, got "
                f"{softmax_hessian!r}"
            )
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        self.name = name
        self.options = options
        self.softmax = SOFTMAX_HESSIANS[softmax_hessian] if name == "cross_entropy" else None
        self.scale = 0.5 if name == "mse_loss" else 1.0  # the boosters' (x - y)^2 / 2
        self.threads = threads
        self.__doc__ = f"The {name} objective for gradient boosting.\n\n{self.loss.__doc__}"

    def __call__(
        self, margins: Any, labels: Any, weights: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        x, y = _arrays(self.name, margins, labels)
        rows = x.shape[:1] if self.name == "cross_entropy" else x.shape  # the values' shape
        if weights is None or not np.size(weights):
            go = np.full(rows, self.scale, x.dtype)
        else:
            go = np.asarray(weights, x.dtype) * self.scale
            if go.shape != rows:  # element-wise losses of (n, K) margins: each of the row's
                go = np.broadcast_to(go[:, None], rows)
        with _threads(self.threads):
            grad, hess = self.loss.grad_hess(x, y, grad_output=go, reduction="none", **self.options)
        if self.softmax is not None:
            factor = self.softmax(x.shape[1])
            if factor != 1.0:
                hess *= factor
        return grad, hess


class _Metric:
    """``(margins, labels, weights) -> the mean loss``: see the module's docstring."""

    def __init__(self, name: str, options: dict):
        self.loss = _loss(name, options)
        self.name = name
        self.options = options
        self.__doc__ = f"The mean {name} of raw margins.\n\n{self.loss.__doc__}"

    def __call__(self, margins: Any, labels: Any, weights: Any = None) -> float:
        x, y = _arrays(self.name, margins, labels)
        values = self.loss(x, y, reduction="none", **self.options)
        if weights is None or not np.size(weights):
            return float(np.mean(values))
        w = np.asarray(weights, np.float64)
        if values.ndim == 2:  # element-wise losses of (n, K) margins: a row's weight each
            w = np.broadcast_to(w[:, None], values.shape)
        return float(np.sum(values * w) / np.sum(w))


def _threads(n: int | None) -> Any:
    if n is None:
        return contextlib.nullcontext()
    from lossforge.runtime.cpu import threads

    return threads(n)
