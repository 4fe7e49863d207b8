"""Evaluate the newest forecaster artifact on its test part against seasonal-naive and DLinear.

    python -m pipelines.forecasting.evaluate --dataset ETTh1 --horizon 96 --json
    python -m pipelines.forecasting.evaluate --dataset CSI300 --horizon 5 --json
    python -m pipelines.forecasting.evaluate --csv my.csv --target load --horizon 24 --json

Writes ``reports/forecasting/<name>/metrics.json`` plus PNG plots (a test forecast with its calibrated
90 % interval, MSE per horizon step). The last stdout line is one JSON object with ``dataset``,
``horizon``, ``mse``, ``mae``, ``coverage_90`` (and ``mape`` / ``directional_accuracy`` against the
last-value baseline for CSI 300).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from backbone.artifacts import latest_artifact  # noqa: E402

from pipelines.forecasting.common import (  # noqa: E402
    REPO_ROOT,
    add_data_args,
    artifact_name,
    load_split,
    model_dir,
    run_cli,
)
from services.forecasting.ml import metrics as M  # noqa: E402
from services.forecasting.ml.data import SeriesSplit  # noqa: E402
from services.forecasting.ml.models import SeasonalNaive, SeasonalNaiveConfig  # noqa: E402
from services.forecasting.ml.predictor import DOMAIN, Forecaster, load_forecaster  # noqa: E402
from services.forecasting.ml.training import evaluate, predict  # noqa: E402

log = logging.getLogger("pipelines.forecasting.evaluate")


def _raw(t: torch.Tensor, split: SeriesSplit) -> torch.Tensor:
    return t * torch.as_tensor(split.std) + torch.as_tensor(split.mean)


def market_metrics(
    pred: torch.Tensor, x: torch.Tensor, y: torch.Tensor, split: SeriesSplit
) -> dict[str, float]:
    """MAPE and directional accuracy in price units, for the model and the last-value baseline."""
    pr, xr, yr = _raw(pred, split), _raw(x, split), _raw(y, split)
    last = xr[:, -1, :]
    naive = last[:, None, :].expand_as(yr)
    return {
        "mape": M.mape(pr, yr),
        "directional_accuracy": M.directional_accuracy(pr, yr, last),
        "last_value_mape": M.mape(naive, yr),
        # a flat forecast has no direction; the reference for directional accuracy is "always up"
        "always_up_directional_accuracy": M.directional_accuracy(
            yr.abs() + last.abs()[:, None, :] * 2, yr, last
        ),
    }


def plot_forecast(
    path: Path, f: Forecaster, t: dict[str, torch.Tensor], base: torch.Tensor | None, title: str
) -> None:
    x, y, pred = t["x"], t["y"], t["pred"]
    i, c = len(x) // 2, x.shape[2] - 1
    hist = x[i, -min(x.shape[1], 2 * y.shape[1]) :, c].numpy()
    h = np.arange(len(hist), len(hist) + y.shape[1])
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(np.arange(len(hist)), hist, color="black", lw=1, label="history")
    ax.plot(h, y[i, :, c].numpy(), color="black", ls="--", lw=1, label="actual")
    ax.plot(h, pred[i, :, c].numpy(), color="tab:blue", lw=1.5, label=f.family)
    if "q05" in t:
        ax.fill_between(
            h,
            t["q05"][i, :, c].numpy(),
            t["q95"][i, :, c].numpy(),
            color="tab:blue",
            alpha=0.2,
            label="90 % interval",
        )
    if base is not None:
        ax.plot(h, base[i, :, c].numpy(), color="tab:orange", lw=1, label="DLinear")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_steps(path: Path, curves: dict[str, np.ndarray], title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, v in curves.items():
        ax.plot(np.arange(1, len(v) + 1), v, label=name)
    ax.set_xlabel("horizon step")
    ax.set_ylabel("MSE (scaled)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    p.add_argument("--json", action="store_true", help="print the metrics JSON as the last stdout line")
    p.add_argument("--report-dir", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    name = artifact_name(args)
    artifact = latest_artifact(args.model_dir or model_dir(), DOMAIN, name)
    f = load_forecaster(artifact)
    split = load_split(args, f.lookback)
    horizon = f.horizon
    main_m, tensors = evaluate(f.model, split, horizon, f.table)
    x, y = tensors["x"], tensors["y"]
    period = int(f.config.get("seasonal_period", 1))
    naive = SeasonalNaive(SeasonalNaiveConfig(f.lookback, horizon, period))
    naive_pred = predict(naive, x)
    baselines: dict[str, dict[str, float]] = {
        f"seasonal_naive(period={period})": M.summary(naive_pred, y),
    }
    base_pred = None
    if f.baseline is not None:
        base_pred = predict(f.baseline, x)
        baselines["dlinear"] = M.summary(base_pred, y)
    elif f.family == "dlinear_forecaster":
        baselines["dlinear"] = M.summary(tensors["pred"], y)
    result: dict[str, Any] = {
        "dataset": f.config.get("dataset", name),
        "horizon": horizon,
        "model": f.family,
        "artifact": str(artifact.path),
        "lookback": f.lookback,
        "mse": round(main_m["mse"], 6),
        "mae": round(main_m["mae"], 6),
        "coverage_90": round(main_m["coverage_90"], 4),
        "coverage_50": round(main_m["coverage_50"], 4),
        "pinball": round(main_m["pinball"], 6),
        "n_windows": main_m["n_windows"],
        "baselines": baselines,
        "gain_vs_baselines": {
            k: round(1 - main_m["mse"] / v["mse"], 4) for k, v in baselines.items() if v["mse"] > 0
        },
    }
    if split.name == "CSI300":
        mm = market_metrics(tensors["pred"], x, y, split)
        result.update({k: round(v, 4) for k, v in mm.items()})
    out_dir = args.report_dir or (REPO_ROOT / "reports" / DOMAIN / name)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{result['dataset']} horizon {horizon}: {f.family} (test, {split.columns[-1]})"
    plot_forecast(out_dir / "forecast.png", f, tensors, base_pred, title)
    curves = {f.family: M.per_step(tensors["pred"], y), "seasonal naive": M.per_step(naive_pred, y)}
    if base_pred is not None:
        curves["dlinear"] = M.per_step(base_pred, y)
    plot_steps(out_dir / "mse_per_step.png", curves, f"{result['dataset']} h{horizon}: test MSE per step")
    result["plots"] = [str(out_dir / "forecast.png"), str(out_dir / "mse_per_step.png")]
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    run_cli(main)
