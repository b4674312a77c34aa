"""Gradient boosting with a lossforge objective, the same objective written in NumPy (what
users write today), and the booster's built-in objective: total training time and the
objective's share of it, for binary logistic loss on generated data.

    python benchmarks/boosting_bench.py [--rows 1000000] [--rounds 100] [--threads 2]

Needs ``pip install "lossforge[xgboost,lightgbm]"``. The table goes in docs/boosting.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from lossforge.boosting import lightgbm_objective, xgboost_objective


def numpy_logistic(margins: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The NumPy objective of the XGBoost and LightGBM tutorials."""
    p = 1.0 / (1.0 + np.exp(-margins))
    return p - labels, p * (1.0 - p)


def timed(objective):
    """``objective`` and a list that collects the seconds of each of its calls."""
    spent: list[float] = []

    def wrapper(*args):
        start = time.perf_counter()
        result = objective(*args)
        spent.append(time.perf_counter() - start)
        return result

    return wrapper, spent


def run_xgboost(X, y, rounds, threads, kind):
    import xgboost as xgb

    train = xgb.DMatrix(X, y, nthread=threads)
    params = {"tree_method": "hist", "max_depth": 6, "nthread": threads, "verbosity": 0}
    spent: list[float] = []
    obj = None
    if kind == "built-in":
        params["objective"] = "binary:logistic"
    elif kind == "lossforge":
        obj, spent = timed(xgboost_objective("binary_cross_entropy_with_logits"))
    else:
        obj, spent = timed(lambda m, d: numpy_logistic(m, d.get_label()))
    start = time.perf_counter()
    xgb.train(params, train, num_boost_round=rounds, obj=obj)
    return time.perf_counter() - start, sum(spent)


def run_lightgbm(X, y, rounds, threads, kind):
    import lightgbm as lgb

    train = lgb.Dataset(X, y, params={"verbose": -1})
    params = {"num_threads": threads, "verbose": -1, "num_leaves": 63}
    spent: list[float] = []
    if kind == "built-in":
        params["objective"] = "binary"
    elif kind == "lossforge":
        params["objective"], spent = timed(lightgbm_objective("binary_cross_entropy_with_logits"))
    else:
        params["objective"], spent = timed(lambda m, d: numpy_logistic(m, d.get_label()))
    start = time.perf_counter()
    lgb.train(params, train, num_boost_round=rounds)
    return time.perf_counter() - start, sum(spent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    X = rng.standard_normal((args.rows, 8)).astype(np.float32)
    y = (X @ rng.standard_normal(8) + rng.standard_normal(args.rows) > 0).astype(np.float64)
    # compile (or load from the disk cache) lossforge's kernels before anything is timed
    for dtype in (np.float32, np.float64):  # XGBoost's margins, LightGBM's
        xgboost_objective("binary_cross_entropy_with_logits")(y, np.zeros(y.size, dtype))
    print(f"{args.rows} rows x {args.rounds} rounds, {args.threads} booster threads")
    print("| library | objective | training s | objective s | objective share |")
    print("| --- | --- | --- | --- | --- |")
    for library, run in (("XGBoost", run_xgboost), ("LightGBM", run_lightgbm)):
        for kind in ("built-in", "lossforge", "NumPy"):
            results = [run(X, y, args.rounds, args.threads, kind) for _ in range(args.repeat)]
            total, objective = sorted(results)[len(results) // 2]  # the median run
            share = f"{objective / total:.0%}" if kind != "built-in" else "-"
            shown = f"{objective:.2f}" if kind != "built-in" else "-"
            print(f"| {library} | {kind} | {total:.2f} | {shown} | {share} |")


if __name__ == "__main__":
    main()
