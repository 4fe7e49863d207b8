"""Forecast metrics: MSE / MAE (scaled), MAPE, directional accuracy, pinball loss, interval coverage."""

from __future__ import annotations

import numpy as np
import torch


def mse(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(torch.mean((pred - target) ** 2))


def mae(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(torch.mean(torch.abs(pred - target)))


def mape(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> float:
    """Mean absolute percentage error in percent (raw units; targets near 0 are guarded by ``eps``)."""
    return float(torch.mean(torch.abs(pred - target) / torch.clamp(torch.abs(target), min=eps)) * 100.0)


def directional_accuracy(pred: torch.Tensor, target: torch.Tensor, last: torch.Tensor) -> float:
    """Share of forecasts whose direction vs the last observed value matches the realised direction.

    ``pred`` / ``target`` [N, H, C], ``last`` [N, C]: sign(pred - last) == sign(target - last), over all
    steps; realised moves of exactly zero are left out.
    """
    real = torch.sign(target - last[:, None, :])
    guess = torch.sign(pred - last[:, None, :])
    mask = real != 0
    if not bool(mask.any()):
        return float("nan")
    return float((real[mask] == guess[mask]).float().mean())


def pinball(pred_q: torch.Tensor, target: torch.Tensor, levels: list[float]) -> float:
    """Mean pinball (quantile) loss; ``pred_q`` [Q, ...] one forecast per level, ``target`` [...]."""
    losses = []
    for i, tau in enumerate(levels):
        diff = target - pred_q[i]
        losses.append(torch.mean(torch.maximum(tau * diff, (tau - 1) * diff)))
    return float(torch.stack(losses).mean())


def coverage(lower: torch.Tensor, upper: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of targets inside [lower, upper]."""
    return float(((target >= lower) & (target <= upper)).float().mean())


def interval_width(lower: torch.Tensor, upper: torch.Tensor) -> float:
    return float(torch.mean(upper - lower))


def summary(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """MSE and MAE rounded for reports."""
    return {"mse": round(mse(pred, target), 6), "mae": round(mae(pred, target), 6)}


def per_step(pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """MSE per horizon step [H] (for plots)."""
    return torch.mean((pred - target) ** 2, dim=(0, 2)).numpy()
