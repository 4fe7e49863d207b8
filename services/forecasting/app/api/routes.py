"""Forecasting routes: POST /v1/forecast, POST /v1/backtest, GET /v1/models."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import numpy as np
import torch
from backbone.service import metrics as m
from backbone.service.app import ServiceRuntime, get_runtime
from backbone.service.batching import submit_batched
from backbone.service.errors import ServiceError
from fastapi import APIRouter, Depends, Request

from services.forecasting.app.model import (
    ForecastingModels,
    model_ref,
    prepare_history,
    preprocessing_report,
    require_length,
)
from services.forecasting.app.schemas import (
    BacktestRequest,
    BacktestResponse,
    FoldMetrics,
    ForecastRequest,
    ForecastResponse,
    ModelEntry,
    ModelsResponse,
    VariableForecast,
)
from services.forecasting.ml.data import default_period
from services.forecasting.ml.predictor import Forecaster
from services.forecasting.ml.training import intervals

router = APIRouter(prefix="/v1", tags=["forecasting"])

BatchItem = tuple[Forecaster, np.ndarray, int | None]  # model, history [T, C], phase of the window (cycle)


def run_batch(items: list[BatchItem]) -> list[np.ndarray]:
    """Point forecasts for many requests at once: channels are independent, so every variable of every
    request of the same model becomes one row of a single univariate batch. Requests that use the
    model's daily cycle (trained variables with timestamps) are batched as whole windows instead."""
    results: list[np.ndarray | None] = [None] * len(items)
    groups: dict[int, list[int]] = defaultdict(list)
    cyclic: dict[int, list[int]] = defaultdict(list)
    for i, (f, _, phase) in enumerate(items):
        (groups if phase is None else cyclic)[id(f)].append(i)
    with torch.no_grad():
        for idxs in cyclic.values():
            f = items[idxs[0]][0]
            x = torch.as_tensor(np.stack([items[i][1][-f.lookback :] for i in idxs]), dtype=torch.float32)
            out = f.point(x, np.asarray([items[i][2] for i in idxs])).numpy()
            for k, i in enumerate(idxs):
                results[i] = out[k]
        for idxs in groups.values():
            f = items[idxs[0]][0]
            rows = [items[i][1].T[:, -f.lookback :, None] for i in idxs]  # [C_i, L, 1]
            x = torch.as_tensor(np.concatenate(rows), dtype=torch.float32)
            f.model.eval()
            out = f.model(x)[:, :, 0].numpy()  # [sum C_i, H]
            start = 0
            for i, r in zip(idxs, rows, strict=True):
                results[i] = out[start : start + len(r)].T  # [H, C_i]
                start += len(r)
    return results  # type: ignore[return-value]


async def point_forecast(
    request: Request, f: Forecaster, x: np.ndarray, phase: int | None = None
) -> np.ndarray:
    """Point forecast [H, C] through the app's DynamicBatcher (direct call when none is running)."""
    batcher = getattr(request.app.state, "batcher", None)
    return await submit_batched(batcher, (f, x, phase), run_batch, "forecast")


def _models(runtime: ServiceRuntime) -> ForecastingModels:
    return runtime.require_model()


def _model_for(runtime: ServiceRuntime, name: str | None, horizon: int):
    """The requested (or default) forecaster; 422 when it cannot forecast ``horizon`` steps."""
    f = _models(runtime).get(name)
    if horizon > f.horizon:
        raise ServiceError(
            422, "horizon_too_long", f"model {f.name} forecasts at most {f.horizon} steps; asked {horizon}"
        )
    return f


@router.post("/forecast", response_model=ForecastResponse)
async def forecast(
    body: ForecastRequest, request: Request, runtime: ServiceRuntime = Depends(get_runtime)
) -> ForecastResponse:
    """Point forecasts, quantiles and a calibrated central interval for every variable of the history."""
    f = _model_for(runtime, body.model, body.horizon)
    reg, received = await asyncio.to_thread(prepare_history, body, runtime.settings)
    require_length(reg, f)
    values = reg.frame.to_numpy(dtype=np.float32)
    x = values[-f.lookback :]
    phase = f.phase_of(reg.frame.index[-f.lookback :], reg.freq, list(reg.frame.columns))
    point = (await point_forecast(request, f, x, phase))[: body.horizon]
    lo_q, hi_q = (1 - body.interval) / 2, 1 - (1 - body.interval) / 2
    levels = [lo_q, hi_q, *body.quantiles]
    q = intervals(torch.tensor(point)[None], torch.tensor(x)[None], f.table, levels)[:, 0].numpy()
    out: dict[str, VariableForecast] = {}
    for c, name in enumerate(reg.frame.columns):
        out[str(name)] = VariableForecast(
            point=point[:, c].tolist(),
            lower=q[0, :, c].tolist(),
            upper=q[1, :, c].tolist(),
            quantiles={f"{lvl:g}": q[2 + j, :, c].tolist() for j, lvl in enumerate(body.quantiles)},
        )
    m.PREDICTIONS.labels(runtime.settings.service_name, "forecast").inc()
    return ForecastResponse(
        model=model_ref(f),
        horizon=body.horizon,
        interval=body.interval,
        timestamps=[t.isoformat() for t in reg.future(body.horizon)],
        forecasts=out,
        preprocessing=preprocessing_report(reg, received, min(len(reg.frame), f.lookback)),
    )


@router.post("/backtest", response_model=BacktestResponse)
async def backtest(body: BacktestRequest, runtime: ServiceRuntime = Depends(get_runtime)) -> BacktestResponse:
    """Rolling-origin evaluation: ``folds`` origins ``step`` rows apart, the last ending at the history's end.

    Metrics are in the data's own units; the baseline is seasonal-naive (period = a day of steps for
    sub-daily data, a week for daily data, else the last value).
    """
    f = _model_for(runtime, body.model, body.horizon)
    reg, received = await asyncio.to_thread(prepare_history, body, runtime.settings)
    step = body.step or body.horizon
    extra = body.horizon + (body.folds - 1) * step
    require_length(reg, f, extra, what=f"a {body.folds}-fold backtest at horizon {body.horizon}")
    values = reg.frame.to_numpy(dtype=np.float32)
    n, h = len(values), body.horizon
    origins = [n - h - (body.folds - 1 - k) * step for k in range(body.folds)]
    x = np.stack([values[o - f.lookback : o] for o in origins])  # [F, L, C]
    y = np.stack([values[o : o + h] for o in origins])  # [F, H, C]
    cols = list(reg.frame.columns)
    phases = [f.phase_of(reg.frame.index[o - f.lookback : o], reg.freq, cols) for o in origins]
    phase = None if None in phases else np.asarray(phases)
    point, quant = await asyncio.to_thread(
        f.forecast_batch, x, h, [(1 - body.interval) / 2, 1 - (1 - body.interval) / 2], phase
    )
    period = default_period(reg.freq, f.lookback, business_days=reg.business_days)
    reps = int(np.ceil(h / period))
    base = np.concatenate([x[:, -period:]] * reps, axis=1)[:, :h]
    folds: list[FoldMetrics] = []
    for k, o in enumerate(origins):
        err, berr = point[k] - y[k], base[k] - y[k]
        denom = np.abs(y[k])
        mape = (
            float(np.mean(np.abs(err)[denom > 1e-8] / denom[denom > 1e-8]) * 100)
            if (denom > 1e-8).any()
            else None
        )
        folds.append(
            FoldMetrics(
                fold=k,
                origin=reg.frame.index[o].isoformat(),
                mse=float(np.mean(err**2)),
                mae=float(np.mean(np.abs(err))),
                mape=mape,
                coverage=float(np.mean((y[k] >= quant[0, k]) & (y[k] <= quant[1, k]))),
                baseline_mse=float(np.mean(berr**2)),
                baseline_mae=float(np.mean(np.abs(berr))),
            )
        )
    mapes = [fm.mape for fm in folds if fm.mape is not None]
    overall = {
        "mse": float(np.mean([fm.mse for fm in folds])),
        "mae": float(np.mean([fm.mae for fm in folds])),
        "mape": float(np.mean(mapes)) if mapes else None,
        "coverage": float(np.mean([fm.coverage for fm in folds])),
        "baseline_mse": float(np.mean([fm.baseline_mse for fm in folds])),
        "baseline_mae": float(np.mean([fm.baseline_mae for fm in folds])),
    }
    m.PREDICTIONS.labels(runtime.settings.service_name, "backtest").inc()
    return BacktestResponse(
        model=model_ref(f),
        horizon=h,
        interval=body.interval,
        baseline=f"seasonal_naive(period={period})",
        folds=folds,
        overall=overall,
        preprocessing=preprocessing_report(reg, received, n),
    )


@router.get("/models", response_model=ModelsResponse)
async def list_models(runtime: ServiceRuntime = Depends(get_runtime)) -> ModelsResponse:
    """Every loaded forecasting model with its test metrics."""
    models = _models(runtime)
    entries = [
        ModelEntry(
            name=name,
            version=f.artifact.version,
            family=f.family,
            dataset=f.config.get("dataset"),
            lookback=f.lookback,
            max_horizon=f.horizon,
            loaded=True,
            default=name == models.default_name,
            metrics={"test": f.metrics.get("test", {}), "baselines": f.metrics.get("baselines", {})},
        )
        for name, f in sorted(models.forecasters.items())
    ]
    return ModelsResponse(default=models.default_name, models=entries)
