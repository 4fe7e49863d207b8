"""Closed-form selection sweep on the VALIDATION part: the linear path of ``patch_decay_forecaster``
(std-weighted ridge after RevIN) with / without the daily cycle, over look-backs, ridge penalties and
look-back ensembles. Fast (seconds per point, no transformer), so the preset's per-dataset choices can
be rerun:

    python -m pipelines.forecasting.sweep --dataset ETTm1 --lookbacks 192,336,512 --ridges 0.01,0.1
    python -m pipelines.forecasting.sweep --dataset ETTh1 --lookbacks 512 --cycles 0,24,168

Prints one line per (cycle, look-back, ridge) and per look-back ensemble (same cycle and ridge), with
the validation MSE. The test part is never read unless ``--show-test`` is given (for reporting a
configuration after it was chosen, never for choosing it).

``--backtest`` adds a second selection criterion inside train + val, for the single configurations: a
rolling-origin backtest that fits on months [0, o) (the cycle profile too) and scores the windows whose
forecast lies in months [o, o + 2), for o = 6, 8, 10, 12, 14 (``backtest_mse``: their mean;
``backtest_folds``). ``--prior-lasts`` probes a variant the model does not have: the ridge shrinks the map
towards "forecast = p x the window's last value + (1 - p) x its mean" (in RevIN units) instead of towards
the mean alone (p = 0, the model's ridge).
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import torch

from pipelines.forecasting.common import data_dir, run_cli
from services.forecasting.ml.data import load_ett, sliding_windows


def _windows(split, part: str, lookback: int, horizon: int):  # noqa: ANN001, ANN202
    x, y = sliding_windows(split.part(part), lookback, horizon, 1)
    return x.double(), y.double(), split.borders[part][0] + np.arange(len(x))


def cycle_profile(values: np.ndarray, period: int) -> torch.Tensor:
    """Centred per-channel mean profile of scaled rows [T, C] (row 0 = phase 0) by phase (row mod period)."""
    values = values.astype(np.float64)
    phase = np.arange(len(values)) % period
    q = np.stack([values[phase == p].mean(0) for p in range(period)])
    return torch.as_tensor(q - q.mean(0))


def _decycle(x, y, first, q, lookback, horizon):  # noqa: ANN001, ANN202
    if q is None:
        return x, y, None
    period = len(q)
    qx = q[torch.as_tensor((first[:, None] + np.arange(lookback)[None]) % period)]
    qy = q[torch.as_tensor((first[:, None] + lookback + np.arange(horizon)[None]) % period)]
    return x - qx, y - qy, qy


def _rows(x: torch.Tensor, y: torch.Tensor):  # noqa: ANN202
    n, length, _ = x.shape
    xs = x.permute(0, 2, 1).reshape(-1, length)
    ys = y.permute(0, 2, 1).reshape(-1, y.shape[1])
    mean = xs.mean(1, keepdim=True)
    std = torch.sqrt(xs.var(1, keepdim=True, unbiased=False) + 1e-5)
    return (xs - mean) / std, (ys - mean) / std, mean, std


def _fit(x, y, first, q, ridge: float, prior_last: float = 0.0) -> torch.Tensor:  # noqa: ANN001
    """The std-weighted ridge map [L + 1, H] (last row: bias) on windows x [N, L, C], y [N, H, C], shrunk
    towards ``prior_last`` x the last input value."""
    lookback, horizon = x.shape[1], y.shape[1]
    x, y, _ = _decycle(x, y, first, q, lookback, horizon)
    xs, ys, _, std = _rows(x, y)
    design = torch.cat([xs, torch.ones(len(xs), 1, dtype=xs.dtype)], 1) * std
    penalty = ridge * float((std**2).sum())
    prior = torch.zeros(lookback + 1, horizon, dtype=xs.dtype)
    prior[lookback - 1] = prior_last
    gram = design.T @ design + penalty * torch.eye(design.shape[1], dtype=xs.dtype)
    return torch.linalg.solve(gram, design.T @ (ys * std) + penalty * prior)


def _predict(sol: torch.Tensor, x, first, q) -> torch.Tensor:  # noqa: ANN001
    """Forecasts [N, H, C] of the map ``sol`` for windows x [N, L, C] (the cycle added back)."""
    lookback, horizon = x.shape[1], sol.shape[1]
    dummy = x.new_zeros(x.shape[0], horizon, x.shape[2])
    xc, _, qy = _decycle(x, dummy, first, q, lookback, horizon)
    xs, _, mean, std = _rows(xc, dummy)
    pred = (torch.cat([xs, torch.ones(len(xs), 1, dtype=xs.dtype)], 1) @ sol) * std + mean
    pred = pred.view(x.shape[0], x.shape[2], horizon).permute(0, 2, 1)
    return pred if qy is None else pred + qy


def fit_predict(  # noqa: ANN201
    split, lookback: int, horizon: int, ridge: float, q, parts: list[str], prior_last: float = 0.0  # noqa: ANN001
) -> dict:
    """Fit the std-weighted ridge on train; forecasts [N, H, C] and targets of each part."""
    sol = _fit(*_windows(split, "train", lookback, horizon), q, ridge, prior_last)
    out = {}
    for part in parts:
        x, y, first = _windows(split, part, lookback, horizon)
        out[part] = (_predict(sol, x, first, q), y)
    return out


BACKTEST_ORIGINS = (6, 8, 10, 12, 14)  # months; each fold scores the two months after its origin


def backtest(  # noqa: ANN201
    split, lookback: int, horizon: int, ridge: float, period: int, prior_last: float = 0.0  # noqa: ANN001
) -> list[float]:
    """Rolling-origin MSE inside train + val (ETT: 30-day months): per origin o in ``BACKTEST_ORIGINS``, the
    map and the cycle profile (``period`` > 0) fitted on months [0, o), scored on the windows whose forecast
    starts in months [o, o + 2) - ``horizon`` + 1. The test part is not read."""
    month = split.borders["train"][1] // 12
    series = split.scaled()[: split.borders["val"][1]].astype(np.float64)
    x_all, y_all = sliding_windows(series, lookback, horizon, 1)
    x_all, y_all = x_all.double(), y_all.double()
    start = np.arange(len(x_all)) + lookback  # first forecast row of each window
    errors = []
    for origin in BACKTEST_ORIGINS:
        fit_end, score_end = origin * month, min((origin + 2) * month, len(series))
        q = cycle_profile(series[:fit_end], period) if period else None
        fit = start + horizon <= fit_end
        held = (start >= fit_end) & (start + horizon <= score_end)
        first = start - lookback
        sol = _fit(x_all[fit], y_all[fit], first[fit], q, ridge, prior_last)
        pred = _predict(sol, x_all[held], first[held], q)
        errors.append(float(((pred - y_all[held]) ** 2).mean()))
    return errors


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ETTh1")
    p.add_argument("--horizon", type=int, default=96)
    p.add_argument("--lookbacks", default="512")
    p.add_argument("--ridges", default="0.1")
    p.add_argument("--cycles", default=None, help="periods to try, 0 = none (default: 0 and a day)")
    p.add_argument("--show-test", action="store_true")
    p.add_argument("--backtest", action="store_true", help="add the rolling-origin backtest in train + val")
    p.add_argument("--prior-lasts", default="0", help="ridge shrunk to p x the last value (0: the model)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    day = 96 if args.dataset.startswith("ETTm") else 24
    cycles = [int(c) for c in args.cycles.split(",")] if args.cycles else [0, day]
    lookbacks = [int(v) for v in args.lookbacks.split(",")]
    ridges = [float(r) for r in args.ridges.split(",")]
    priors = [float(v) for v in args.prior_lasts.split(",")]
    parts = ["val", "test"] if args.show_test else ["val"]
    results: list[dict] = []

    def report(kind: str, cfg: dict, preds: dict, folds: list[float] | None = None) -> None:
        row = {"kind": kind, "dataset": args.dataset, "horizon": args.horizon, **cfg}
        for part, (pred, y) in preds.items():
            row[f"{part}_mse"] = round(float(((pred - y) ** 2).mean()), 4)
            row[f"{part}_mae"] = round(float((pred - y).abs().mean()), 4)
        if folds is not None:
            row["backtest_mse"] = round(float(np.mean(folds)), 4)
            row["backtest_folds"] = [round(v, 4) for v in folds]
        results.append(row)
        print(json.dumps(row), flush=True)

    for period in cycles:
        singles: dict[tuple[int, float], dict] = {}
        for lookback in lookbacks:
            split = load_ett(data_dir(), args.dataset, lookback)
            q = cycle_profile(split.part("train"), period) if period else None
            for ridge, prior in itertools.product(ridges, priors):
                preds = fit_predict(split, lookback, args.horizon, ridge, q, parts, prior)
                folds = None
                if args.backtest:
                    folds = backtest(split, lookback, args.horizon, ridge, period, prior)
                cfg = {"cycle": period, "lookback": lookback, "ridge": ridge}
                if prior:
                    cfg["prior_last"] = prior
                else:
                    singles[(lookback, ridge)] = preds
                report("single", cfg, preds, folds)
        for (
            ridge
        ) in ridges:  # equal-weight ensembles over look-backs (same targets: windows end at the borders)
            for r in range(2, len(lookbacks) + 1):
                for combo in itertools.combinations(lookbacks, r):
                    if any((lb, ridge) not in singles for lb in combo):
                        continue  # ensembles are of the model's ridge (p = 0) only
                    preds = {
                        part: (
                            sum(singles[(lb, ridge)][part][0] for lb in combo) / r,
                            singles[(combo[0], ridge)][part][1],
                        )
                        for part in parts
                    }
                    report("ensemble", {"cycle": period, "lookbacks": list(combo), "ridge": ridge}, preds)
    return results


if __name__ == "__main__":
    run_cli(main)
