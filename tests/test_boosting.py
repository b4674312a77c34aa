"""lossforge.boosting: XGBoost and LightGBM trained with lossforge objectives predict what
they predict with their built-in objectives of the same loss (same data, parameters and
rounds), with sample weights; the callables in the forms each library's estimators call;
a loss a booster lacks trains; the metric against a float64 NumPy reference; bad input."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import lossforge as lf
from lossforge import boosting

xgb = pytest.importorskip("xgboost")
lgb = pytest.importorskip("lightgbm")

ROWS, FEATURES, ROUNDS, CLASSES = 2000, 5, 8, 4


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(16)
    x = rng.normal(size=(ROWS, FEATURES))
    score = x @ rng.normal(size=FEATURES) + rng.normal(size=ROWS)
    labels = {
        "regression": score,
        "binary": (score > 0).astype(np.float64),
        "multiclass": np.digitize(score, [-1.0, 0.0, 1.0]).astype(np.float64),
    }
    return x, labels, rng.random(ROWS) + 0.5


# task: (lossforge loss and options, XGBoost objective, LightGBM objective and parameters)
TASKS = {
    "regression": ("mse_loss", {}, "reg:squarederror", ("regression", {})),
    "huber": ("huber_loss", {"delta": 0.8}, None, ("huber", {"alpha": 0.8})),
    "binary": ("binary_cross_entropy_with_logits", {}, "binary:logistic", ("binary", {})),
    "multiclass": ("cross_entropy", {}, "multi:softprob", ("multiclass", {})),
}


def _labels(task, labels):
    return labels["regression" if task == "huber" else task]


def _xgboost(x, y, weight, task, objective):
    classes = {"num_class": CLASSES} if task == "multiclass" else {}
    d = xgb.DMatrix(x, y, weight=weight)
    # margins start at 0 for both (a built-in objective would estimate its own intercept)
    d.set_base_margin(np.zeros(ROWS * (CLASSES if classes else 1)))
    params = {"tree_method": "hist", "max_depth": 3, "eta": 0.3, "nthread": 2, **classes}
    if isinstance(objective, str):
        booster = xgb.train({**params, "objective": objective}, d, ROUNDS)
    else:
        booster = xgb.train(params, d, ROUNDS, obj=objective)
    return booster.predict(d, output_margin=True)


def _lightgbm(x, y, weight, task, objective, extra=None):
    params = {
        "num_leaves": 8,
        "learning_rate": 0.3,
        "num_threads": 2,
        "verbose": -1,
        "boost_from_average": False,  # margins start at 0, as a custom objective's do
        "objective": objective,
        **(extra or {}),
        **({"num_class": CLASSES} if task == "multiclass" else {}),
    }
    booster = lgb.train(params, lgb.Dataset(x, y, weight=weight), ROUNDS)
    return booster.predict(x, raw_score=True)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("task", [t for t in TASKS if TASKS[t][2]])
def test_xgboost_predicts_as_with_its_builtin_objective(data, task, weighted):
    x, labels, w = data
    name, options, builtin, _ = TASKS[task]
    y, weight = _labels(task, labels), (w if weighted else None)
    expected = _xgboost(x, y, weight, task, builtin)
    got = _xgboost(x, y, weight, task, boosting.xgboost_objective(name, **options))
    assert got.shape == expected.shape
    assert np.abs(expected).max() > 1.0  # the model learnt something
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)  # float32 gradients


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("task", TASKS)
def test_lightgbm_predicts_as_with_its_builtin_objective(data, task, weighted):
    x, labels, w = data
    name, options, _, (builtin, extra) = TASKS[task]
    y, weight = _labels(task, labels), (w if weighted else None)
    expected = _lightgbm(x, y, weight, task, builtin, extra)
    got = _lightgbm(x, y, weight, task, boosting.lightgbm_objective(name, **options))
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_softmax_hessian_conventions(data):
    _, labels, _ = data
    margins = np.random.default_rng(1).normal(size=(ROWS, CLASSES))
    y = labels["multiclass"]
    p = np.exp(margins - margins.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    exact = p * (1 - p)
    for make, factor in [
        (boosting.xgboost_objective("cross_entropy"), 2.0),
        (boosting.lightgbm_objective("cross_entropy"), CLASSES / (CLASSES - 1)),
        (boosting.lightgbm_objective("cross_entropy", softmax_hessian="exact"), 1.0),
    ]:
        grad, hess = make(y, margins)  # the estimators' form: (labels, margins)
        np.testing.assert_allclose(grad, p - np.eye(CLASSES)[y.astype(int)], atol=1e-12)
        np.testing.assert_allclose(hess, factor * exact, rtol=1e-12)


def test_the_estimators_calling_forms(data):
    """The callables as XGBoost's and LightGBM's scikit-learn estimators wrap and call them
    (their own wrappers, which need no scikit-learn), with sample weights."""
    from lightgbm.sklearn import _EvalFunctionWrapper, _ObjectiveFunctionWrapper
    from xgboost.sklearn import _metric_decorator, _objective_decorator

    x, labels, w = data
    y = labels["binary"]
    margins = np.random.default_rng(2).normal(size=ROWS)
    grad, hess = lf.binary_cross_entropy_with_logits.grad_hess(
        margins, y, reduction="none", grad_output=w
    )
    reference = _reference_bce(margins, y, w)

    d = xgb.DMatrix(x, y, weight=w)
    name = "binary_cross_entropy_with_logits"
    g, h = _objective_decorator(boosting.xgboost_objective(name))(margins, d)
    np.testing.assert_allclose(g, grad, rtol=1e-6)
    np.testing.assert_allclose(h, hess, rtol=1e-6)
    assert _metric_decorator(boosting.xgboost_metric(name))(margins, d) == (
        name,
        pytest.approx(reference, rel=1e-6),
    )

    ds = lgb.Dataset(x, y, weight=w).construct()
    g, h = _ObjectiveFunctionWrapper(boosting.lightgbm_objective(name))(margins, ds)
    np.testing.assert_allclose(g, grad, rtol=1e-6)
    np.testing.assert_allclose(h, hess, rtol=1e-6)
    metric = _EvalFunctionWrapper(boosting.lightgbm_metric(name))(margins, ds)
    assert metric == (name, pytest.approx(reference, rel=1e-6), False)


def _reference_bce(margins, y, w=None):
    """Sample-weighted mean of -[y log sigmoid(m) + (1 - y) log sigmoid(-m)], in float64."""
    losses = np.logaddexp(0, -margins) * y + np.logaddexp(0, margins) * (1 - y)
    return np.average(losses, weights=w)


def test_metrics_in_training(data):
    x, labels, w = data
    y = labels["multiclass"]
    d = xgb.DMatrix(x, y, weight=w)
    history = {}
    booster = xgb.train(
        {"num_class": CLASSES, "max_depth": 3, "nthread": 2, "disable_default_eval_metric": 1},
        d,
        3,
        obj=boosting.xgboost_objective("cross_entropy"),
        custom_metric=boosting.xgboost_metric("cross_entropy"),
        evals=[(d, "train")],
        evals_result=history,
        verbose_eval=False,
    )
    margins = booster.predict(d, output_margin=True)
    shifted = margins - margins.max(1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    reference = np.average(-log_p[np.arange(ROWS), y.astype(int)], weights=w)
    losses = history["train"]["cross_entropy"]
    assert losses[-1] == pytest.approx(reference, rel=1e-5)
    assert losses[0] > losses[1] > losses[2]

    history = {}
    train = lgb.Dataset(x, y, weight=w, params={"verbose": -1})
    lgb.train(
        {"objective": boosting.lightgbm_objective("cross_entropy"), "num_class": CLASSES},
        train,
        3,
        valid_sets=[train],
        feval=boosting.lightgbm_metric("cross_entropy"),
        callbacks=[lgb.record_evaluation(history)],
    )
    losses = history["training"]["cross_entropy"]
    assert losses[0] > losses[1] > losses[2]


def test_a_loss_xgboost_lacks_trains(data):
    """Huber loss (XGBoost has only the pseudo-Huber): the loss falls round after round."""
    x, labels, _ = data
    y = labels["regression"] + np.where(np.arange(ROWS) % 50 == 0, 20.0, 0.0)  # outliers
    d = xgb.DMatrix(x, y)
    history = {}
    xgb.train(
        {"max_depth": 3, "nthread": 2, "disable_default_eval_metric": 1},
        d,
        ROUNDS,
        obj=boosting.xgboost_objective("huber_loss", delta=1.0),
        custom_metric=boosting.xgboost_metric("huber_loss", delta=1.0),
        evals=[(d, "train")],
        evals_result=history,
        verbose_eval=False,
    )
    losses = history["train"]["huber_loss"]
    assert np.all(np.diff(losses) < 0)
    d = np.abs(y)  # the loss of the margins the model started from, 0
    at_zero = np.mean(np.where(d < 1.0, 0.5 * d * d, d - 0.5))
    assert losses[-1] < 0.8 * at_zero


def test_bad_use():
    with pytest.raises(ValueError, match="binary_cross_entropy_with_logits"):
        boosting.xgboost_objective("binary_cross_entropy")
    with pytest.raises(KeyError):
        boosting.lightgbm_objective("no_such_loss")
    with pytest.raises(ValueError, match="not a loss of"):
        boosting.lightgbm_metric("cosine_similarity")
    with pytest.raises(TypeError, match="reduction"):
        boosting.xgboost_objective("mse_loss", reduction="mean")
    with pytest.raises(TypeError, match="beta"):
        boosting.xgboost_objective("mse_loss", beta=1.0)
    with pytest.raises(ValueError, match="softmax_hessian"):
        boosting.xgboost_objective("cross_entropy", softmax_hessian="catboost")
    with pytest.raises(NotImplementedError, match="nll_loss"):
        boosting.xgboost_objective("nll_loss")(np.zeros(3), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="num_class"):
        boosting.lightgbm_objective("cross_entropy")(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="class indices"):
        boosting.lightgbm_objective("cross_entropy")(np.array([0.5, 1.0]), np.zeros((2, 3)))


@pytest.mark.parametrize("page", ["docs/boosting.md", "README.md"])
def test_the_examples_run(page):
    """The Python blocks of docs/boosting.md and README.md's boosting example, as a user
    would paste them."""
    text = (Path(__file__).parents[1] / page).read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "boosting" in b]
    assert blocks
    for block in blocks:
        exec(compile(block, page, "exec"), {})
