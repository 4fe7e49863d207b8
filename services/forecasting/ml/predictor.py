"""A trained forecaster as loaded from an artifact: model + calibration table + metadata.

Used by the evaluation pipeline and by the service. Inputs are in raw units; the model's RevIN makes
scaling unnecessary for point forecasts and the calibration table is in window-std units, so the same
artifact serves a user's own series of any scale and any number of variables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from backbone.artifacts import Artifact, latest_artifact, list_artifacts, verify_artifact
from safetensors.torch import load as load_safetensors
from torch import nn

from services.forecasting.ml.data import step_phase
from services.forecasting.ml.models import build_model
from services.forecasting.ml.training import intervals

DOMAIN = "forecasting"
CALIBRATION_FILE = "calibration.json"
BASELINE_FILE = "baseline_dlinear.safetensors"


class HistoryTooShortError(ValueError):
    """The history has fewer rows than the model's lookback."""

    def __init__(self, got: int, minimum: int) -> None:
        super().__init__(f"history has {got} time steps; this model needs at least {minimum}")
        self.got = got
        self.minimum = minimum


@dataclass
class Forecaster:
    """One artifact, ready to forecast."""

    name: str
    family: str
    model: nn.Module
    lookback: int
    horizon: int
    table: np.ndarray  # [len(CAL_LEVELS), horizon] calibrated residual quantiles (window-std units)
    config: dict[str, Any]
    metrics: dict[str, Any]
    artifact: Artifact
    baseline: nn.Module | None = None

    @property
    def cycle_len(self) -> int:
        """Steps of the model's learned daily cycle (0: none)."""
        return int(self.config.get("model", {}).get("cycle_len", 0) or 0)

    def phase_of(self, index: pd.DatetimeIndex, freq: pd.Timedelta, columns: list[str]) -> int | None:
        """Phase of the first timestamp of ``index`` in the model's cycle, when the cycle applies: the
        request has the trained variables (same names, same order) at the trained frequency; else None
        (the forecast then uses the linear path and transformer without the cycle)."""
        if self.cycle_len <= 0 or len(index) == 0 or [str(c) for c in columns] != self.config.get("columns"):
            return None
        if abs(pd.Timedelta(freq).total_seconds() - float(self.config.get("freq_seconds", -1))) > 1e-6:
            return None
        return int(step_phase(index[:1], pd.Timedelta(freq), self.cycle_len)[0])

    @torch.no_grad()
    def point(self, x: torch.Tensor, phase: np.ndarray | None = None) -> torch.Tensor:
        """Point forecasts [B, H, C] of raw windows x [B, L, C]; ``phase`` [B] turns the cycle on (the
        cycle lives in the training scale, so the windows go through the artifact's scaler)."""
        self.model.eval()
        if phase is None or self.cycle_len <= 0:
            return self.model(x)
        mean = torch.as_tensor(self.config["scaler"]["mean"], dtype=torch.float32)
        std = torch.as_tensor(self.config["scaler"]["std"], dtype=torch.float32)
        out = self.model((x - mean) / std, phase=torch.as_tensor(np.asarray(phase), dtype=torch.long))
        return out * std + mean

    @torch.no_grad()
    def forecast(
        self,
        values: np.ndarray,
        horizon: int | None = None,
        levels: list[float] | None = None,
        phase: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Point forecast [H, C] and quantiles [Q, H, C] from the last ``lookback`` rows of values [T, C]
        (``phase``: of the first of those rows, see :meth:`phase_of`)."""
        phases = None if phase is None else np.asarray([phase])
        point, quant = self.forecast_batch(values[None], horizon, levels, phases)
        return point[0], quant[:, 0]

    @torch.no_grad()
    def forecast_batch(
        self,
        values: np.ndarray,
        horizon: int | None = None,
        levels: list[float] | None = None,
        phase: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Batched :meth:`forecast`: values [B, T, C] -> point [B, H, C], quantiles [Q, B, H, C]."""
        horizon = self.horizon if horizon is None else horizon
        if horizon < 1 or horizon > self.horizon:
            raise ValueError(f"horizon must be in [1, {self.horizon}] for model {self.name}")
        if values.shape[1] < self.lookback:
            raise HistoryTooShortError(values.shape[1], self.lookback)
        x = torch.as_tensor(np.ascontiguousarray(values[:, -self.lookback :]), dtype=torch.float32)
        point = self.point(x, phase)
        quant = intervals(point, x, self.table, levels or [])
        return point[:, :horizon].numpy(), quant[:, :, :horizon].numpy()


def _load_module(family: str, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    model = build_model(family, **cfg)
    model.load_state_dict(tensors, strict=True)
    model.eval()
    return model


def load_forecaster(artifact: Artifact, verify: bool = True) -> Forecaster:
    """Rebuild the model of an artifact (weights via safetensors) with its calibration table."""
    if verify:
        verify_artifact(artifact)
    config = artifact.config
    family = config["family"]
    model_cfg = config["model"]
    tensors = artifact.load_tensors() if (artifact.path / "weights.safetensors").exists() else {}
    model = _load_module(family, model_cfg, tensors)
    cal = json.loads((artifact.path / CALIBRATION_FILE).read_text())
    table = np.asarray(cal["table"], dtype=np.float32)
    baseline = None
    if (artifact.path / BASELINE_FILE).exists():
        base_cfg = config["baseline_dlinear"]
        baseline = _load_module(
            "dlinear_forecaster", base_cfg, load_safetensors((artifact.path / BASELINE_FILE).read_bytes())
        )
    return Forecaster(
        name=artifact.name,
        family=family,
        model=model,
        lookback=int(model_cfg["lookback"]),
        horizon=int(model_cfg["horizon"]),
        table=table,
        config=config,
        metrics=artifact.metrics,
        artifact=artifact,
        baseline=baseline,
    )


def load_latest(model_dir: Path, name: str) -> Forecaster:
    """The newest artifact ``<model_dir>/forecasting/<name>/<version>``."""
    return load_forecaster(latest_artifact(model_dir, DOMAIN, name))


def available_models(model_dir: Path) -> dict[str, Artifact]:
    """Newest artifact of every forecasting model name under ``model_dir``."""
    root = Path(model_dir) / DOMAIN
    found: dict[str, Artifact] = {}
    if root.is_dir():
        for child in sorted(root.iterdir()):
            versions = list_artifacts(model_dir, DOMAIN, child.name) if child.is_dir() else []
            if versions:
                found[child.name] = versions[-1]
    return found
