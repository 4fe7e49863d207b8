"""The service's loaded models and the history preprocessing every endpoint shares."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from backbone.service.app import ModelInfo
from backbone.service.errors import ServiceError

from services.forecasting.app.core.config import Settings
from services.forecasting.app.schemas import History, ModelRef, Preprocessing
from services.forecasting.ml.data import (
    MAX_ABS_VALUE,
    DataError,
    Regularised,
    parse_freq,
    parse_timestamps,
    regularise,
)
from services.forecasting.ml.predictor import Forecaster, available_models, load_forecaster

log = logging.getLogger(__name__)


@dataclass
class ForecastingModels:
    """Every forecasting artifact under MODEL_DIR (newest version each); one is the default."""

    default_name: str
    forecasters: dict[str, Forecaster]
    info: ModelInfo
    errors: dict[str, str] = field(default_factory=dict)

    def get(self, name: str | None) -> Forecaster:
        """The named forecaster (404 listing the known ones if absent)."""
        key = name or self.default_name
        if key not in self.forecasters:
            raise ServiceError(
                404, "unknown_model", f"no model {key!r}; available: {sorted(self.forecasters)}"
            )
        return self.forecasters[key]

    def stream_forecaster(self, preferred: str | None) -> Forecaster:
        """The forecaster for the market stream: ``preferred``, else a CSI300 one, else the default."""
        if preferred and preferred in self.forecasters:
            return self.forecasters[preferred]
        csi = sorted(n for n in self.forecasters if n.upper().startswith("CSI300"))
        return self.forecasters[csi[0]] if csi else self.forecasters[self.default_name]


def load_models(settings: Settings) -> ForecastingModels:
    """Load the newest artifact of every model name; the default one must load."""
    found = available_models(settings.model_dir)
    if settings.default_model not in found:
        raise FileNotFoundError(
            f"no artifact {settings.default_model!r} under {settings.model_dir}/forecasting "
            f"(found {sorted(found)}); run `python -m pipelines.forecasting.train --preset quick`"
        )
    forecasters: dict[str, Forecaster] = {}
    errors: dict[str, str] = {}
    for name, artifact in found.items():
        try:
            forecasters[name] = load_forecaster(artifact)
        except Exception as exc:  # one broken artifact must not take the others down
            if name == settings.default_model:
                raise
            errors[name] = f"{type(exc).__name__}: {exc}"
            log.error("could not load %s: %s", artifact.path, exc)
    default = forecasters[settings.default_model]
    info = ModelInfo(
        name=default.name,
        version=default.artifact.version,
        path=str(default.artifact.path),
        metrics=default.metrics.get("test", {}),
        created_at=default.artifact.manifest.get("created_at"),
    )
    return ForecastingModels(settings.default_model, forecasters, info, errors)


def model_ref(f: Forecaster) -> ModelRef:
    return ModelRef(
        name=f.name, version=f.artifact.version, family=f.family, lookback=f.lookback, max_horizon=f.horizon
    )


def prepare_history(body: History, settings: Settings) -> tuple[Regularised, int]:
    """Validate and regularise a request history (422 with the reason on anything unusable)."""
    n = len(body.timestamps)
    if n > settings.max_history:
        raise ServiceError(422, "history_too_long", f"{n} time steps; at most {settings.max_history}")
    if len(body.series) > settings.max_variables:
        raise ServiceError(
            422, "too_many_variables", f"{len(body.series)} variables; at most {settings.max_variables}"
        )
    bad = {k: len(v) for k, v in body.series.items() if len(v) != n}
    if bad:
        raise ServiceError(
            422, "length_mismatch", f"{n} timestamps but these variables have other lengths: {bad}"
        )
    index = parse_timestamps(body.timestamps)
    if index.isna().any():
        pos = [int(i) for i in np.flatnonzero(np.asarray(index.isna()))[:5]]
        raise ServiceError(
            422,
            "invalid_timestamps",
            f"unparseable or missing timestamps at rows {pos}: {[body.timestamps[i] for i in pos]}",
        )
    values = {
        k: np.array([np.nan if (x is None or not math.isfinite(x)) else x for x in v], dtype=np.float64)
        for k, v in body.series.items()
    }
    frame = pd.DataFrame(values, index=index)
    empty = [k for k in frame.columns if frame[k].isna().all()]
    if empty:
        raise ServiceError(422, "no_values", f"variables with no finite value: {empty}")
    huge = [k for k in frame.columns if float(frame[k].abs().max()) > MAX_ABS_VALUE]
    if huge:
        raise ServiceError(
            422, "value_out_of_range", f"values beyond +-{MAX_ABS_VALUE:g} in {huge} (rescale them)"
        )
    freq, unit, business_days = None, None, False
    if body.freq:
        try:
            freq, unit, business_days = parse_freq(body.freq)
        except ValueError as exc:
            raise ServiceError(422, "invalid_freq", f"cannot use freq {body.freq!r}: {exc}") from exc
    try:
        reg = regularise(
            frame, freq, max_gap_fraction=settings.max_gap_fraction, business_days=business_days,
            calendar_unit=unit,
        )  # fmt: skip
    except DataError as exc:
        raise ServiceError(422, "irregular_timestamps", str(exc)) from exc
    return reg, n


def preprocessing_report(reg: Regularised, received: int, used: int) -> Preprocessing:
    return Preprocessing(
        freq=reg.freq_label,
        rows_received=received,
        rows_used=used,
        resampled=reg.resampled,
        inserted_steps=reg.inserted_rows,
        nan_filled=reg.nan_filled,
        notes=reg.notes,
    )


def require_length(reg: Regularised, f: Forecaster, extra: int = 0, what: str = "forecast") -> None:
    """422 naming the minimum when the regularised history is shorter than the model needs."""
    need = f.lookback + extra
    have = len(reg.frame)
    if have < need:
        raise ServiceError(
            422,
            "history_too_short",
            {
                "message": f"{what} with model {f.name} needs at least {need} time steps "
                f"(lookback {f.lookback}{f' + {extra}' if extra else ''}); got {have} after regularisation",
                "minimum": need,
                "got": have,
            },
        )
