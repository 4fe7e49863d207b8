"""Request and response bodies of the forecasting API."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator

DEFAULT_QUANTILES = [0.05, 0.5, 0.95]


class History(BaseModel):
    """A multivariate history: one timestamp per row, one list of values per variable (null = missing)."""

    timestamps: list[str | int | float] = Field(
        ...,
        min_length=3,
        description="one per row: ISO-8601 strings (UTC offsets allowed) or Unix epoch numbers (s to ns)",
    )
    series: dict[str, list[float | None]] = Field(
        ...,
        min_length=1,
        description="variable name -> values aligned with timestamps (null or NaN = missing)",
    )
    freq: str | None = Field(default=None, description="sampling step, e.g. '1h' (default: inferred)")
    model: str | None = Field(
        default=None, description="artifact name (GET /v1/models); default: the service's"
    )


class ForecastRequest(History):
    horizon: int = Field(..., ge=1, le=10_000)
    quantiles: list[float] = Field(default_factory=lambda: list(DEFAULT_QUANTILES), max_length=99)
    interval: float = Field(
        default=0.9, gt=0.0, lt=1.0, description="central interval level returned as lower/upper"
    )

    @field_validator("quantiles")
    @classmethod
    def _levels(cls, v: list[float]) -> list[float]:
        for q in v:
            if not 0.0 < q < 1.0:
                raise ValueError(f"quantile {q} must be strictly between 0 and 1")
        return sorted(set(v))


class Preprocessing(BaseModel):
    """What was done to the history before forecasting."""

    freq: str
    rows_received: int
    rows_used: int
    resampled: bool
    inserted_steps: int
    nan_filled: int
    notes: list[str]


class VariableForecast(BaseModel):
    point: list[float]
    lower: list[float]
    upper: list[float]
    quantiles: dict[str, list[float]]


class ModelRef(BaseModel):
    name: str
    version: str
    family: str
    lookback: int
    max_horizon: int


class ForecastResponse(BaseModel):
    model: ModelRef
    horizon: int
    interval: float
    timestamps: list[str]
    forecasts: dict[str, VariableForecast]
    preprocessing: Preprocessing


class BacktestRequest(History):
    horizon: int = Field(..., ge=1, le=10_000)
    folds: int = Field(default=5, ge=1, le=200)
    step: int | None = Field(default=None, ge=1, description="rows between fold origins (default: horizon)")
    interval: float = Field(default=0.9, gt=0.0, lt=1.0)


class FoldMetrics(BaseModel):
    fold: int
    origin: str
    mse: float
    mae: float
    mape: float | None
    coverage: float
    baseline_mse: float
    baseline_mae: float


class BacktestResponse(BaseModel):
    model: ModelRef
    horizon: int
    interval: float
    baseline: str
    folds: list[FoldMetrics]
    overall: dict[str, float | None]
    preprocessing: Preprocessing


class ModelEntry(BaseModel):
    name: str
    version: str
    family: str
    dataset: str | None
    lookback: int
    max_horizon: int
    loaded: bool
    default: bool
    metrics: dict[str, Any]


class ModelsResponse(BaseModel):
    default: str
    models: list[ModelEntry]
