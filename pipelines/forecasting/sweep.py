"""Closed-form selection sweep on the VALIDATION part: the linear path of ``patch_decay_forecaster``
(std-weighted ridge after RevIN) with / without the daily cycle, over look-backs, ridge penalties and
look-back ensembles. Fast (seconds per point, no transformer), so the preset's per-dataset choices can
be rerun:

    python -m pipelines.forecasting.sweep --dataset ETTm1 --lookbacks 192,336,512 --ridges 0.01,0.1
    python -m pipelines.forecasting.sweep --dataset ETTh1 --lookbacks 512 --cycles 0,24,168

Prints one line per (cycle, look-back, ridge) and per look-back ensemble (same cycle and ridge), with
the validation MSE. The test part is never read unless ``--show-test`` is given (for reporting a
configuration after it was chosen, never for choosing it).
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


def cycle_profile(split, period: int) -> torch.Tensor:  # noqa: ANN001
    """Centred per-channel mean profile of the scaled training part by phase (row index mod period)."""
    train = split.part("train").astype(np.float64)
    phase = np.arange(len(train)) % period
    q = np.stack([train[phase == p].mean(0) for p in range(period)])
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


def fit_predict(split, lookback: int, horizon: int, ridge: float, q, parts: list[str]) -> dict:  # noqa: ANN001
    """Fit the std-weighted ridge on train; forecasts [N, H, C] and targets of each part."""
    x, y, first = _windows(split, "train", lookback, horizon)
    x, y, _ = _decycle(x, y, first, q, lookback, horizon)
    xs, ys, _, std = _rows(x, y)
    design = torch.cat([xs, torch.ones(len(xs), 1, dtype=xs.dtype)], 1) * std
    gram = design.T @ design + ridge * float((std**2).sum()) * torch.eye(design.shape[1], dtype=xs.dtype)
    sol = torch.linalg.solve(gram, design.T @ (ys * std))
    out = {}
    for part in parts:
        x, y, first = _windows(split, part, lookback, horizon)
        xc, yc, qy = _decycle(x, y, first, q, lookback, horizon)
        xs, _, mean, std = _rows(xc, yc)
        pred = (torch.cat([xs, torch.ones(len(xs), 1, dtype=xs.dtype)], 1) @ sol) * std + mean
        pred = pred.view(x.shape[0], x.shape[2], horizon).permute(0, 2, 1)
        out[part] = (pred if qy is None else pred + qy, y)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ETTh1")
    p.add_argument("--horizon", type=int, default=96)
    p.add_argument("--lookbacks", default="512")
    p.add_argument("--ridges", default="0.1")
    p.add_argument("--cycles", default=None, help="periods to try, 0 = none (default: 0 and a day)")
    p.add_argument("--show-test", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    day = 96 if args.dataset.startswith("ETTm") else 24
    cycles = [int(c) for c in args.cycles.split(",")] if args.cycles else [0, day]
    lookbacks = [int(v) for v in args.lookbacks.split(",")]
    ridges = [float(r) for r in args.ridges.split(",")]
    parts = ["val", "test"] if args.show_test else ["val"]
    results: list[dict] = []

    def report(kind: str, cfg: dict, preds: dict) -> None:
        row = {"kind": kind, "dataset": args.dataset, "horizon": args.horizon, **cfg}
        for part, (pred, y) in preds.items():
            row[f"{part}_mse"] = round(float(((pred - y) ** 2).mean()), 4)
            row[f"{part}_mae"] = round(float((pred - y).abs().mean()), 4)
        results.append(row)
        print(json.dumps(row), flush=True)

    for period in cycles:
        singles: dict[tuple[int, float], dict] = {}
        for lookback in lookbacks:
            split = load_ett(data_dir(), args.dataset, lookback)
            q = cycle_profile(split, period) if period else None
            for ridge in ridges:
                preds = fit_predict(split, lookback, args.horizon, ridge, q, parts)
                singles[(lookback, ridge)] = preds
                report("single", {"cycle": period, "lookback": lookback, "ridge": ridge}, preds)
        for (
            ridge
        ) in ridges:  # equal-weight ensembles over look-backs (same targets: windows end at the borders)
            for r in range(2, len(lookbacks) + 1):
                for combo in itertools.combinations(lookbacks, r):
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
