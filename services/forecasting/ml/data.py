"""Time-series data: ETT protocol, generic CSVs, CSI 300, frequency inference, regularisation, windows.

Every loader returns a :class:`SeriesSplit`: the raw frame (regular time index), train / val / test
row ranges following the dataset's protocol, and a standard scaler fitted on the train rows only.
Validation and test ranges start ``lookback`` rows before their border so the first forecast starts at
the border (the Informer / Autoformer / PatchTST convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ETT_DATASETS = ("ETTh1", "ETTh2", "ETTm1", "ETTm2")


_NICE_STEPS = (
    "1s",
    "5s",
    "10s",
    "15s",
    "30s",
    "1min",
    "2min",
    "5min",
    "10min",
    "15min",
    "20min",
    "30min",
    "1h",
    "2h",
    "3h",
    "4h",
    "6h",
    "12h",
    "1D",
    "7D",
)


class DataError(ValueError):
    """Input data that cannot be turned into a regular multivariate series (message says why)."""


@dataclass
class Regularised:
    """A regular-grid frame plus what had to be done to get there."""

    frame: pd.DataFrame
    freq: pd.Timedelta
    resampled: bool
    inserted_rows: int
    nan_filled: int
    notes: list[str] = field(default_factory=list)
    business_days: bool = False

    def future(self, horizon: int) -> pd.DatetimeIndex:
        """The ``horizon`` timestamps after the last row (business days for trading calendars)."""
        last = self.frame.index[-1]
        if self.business_days:
            return pd.date_range(last + pd.offsets.BDay(1), periods=horizon, freq="B")
        return pd.date_range(last + self.freq, periods=horizon, freq=self.freq)


@dataclass
class SeriesSplit:
    """A dataset under a protocol: values, borders and the train-fitted scaler."""

    name: str
    frame: pd.DataFrame  # regular time index, numeric columns (raw units)
    freq: pd.Timedelta
    columns: list[str]
    borders: dict[str, tuple[int, int]]  # split -> [start, end) row range (val/test include the lookback)
    mean: np.ndarray
    std: np.ndarray
    lookback: int
    source: list[Path]
    notes: list[str] = field(default_factory=list)

    @property
    def values(self) -> np.ndarray:
        return self.frame.to_numpy(dtype=np.float32)

    def scaled(self) -> np.ndarray:
        """All rows scaled with the train-fitted scaler (float32, [T, C])."""
        return ((self.values - self.mean) / self.std).astype(np.float32)

    def part(self, split: str, scaled: bool = True) -> np.ndarray:
        start, end = self.borders[split]
        data = self.scaled() if scaled else self.values
        return data[start:end]


def infer_frequency(index: pd.DatetimeIndex) -> pd.Timedelta:
    """The series' sampling step: pandas' inference when regular, else the most common positive step."""
    if len(index) < 3:
        raise DataError(f"need at least 3 timestamps to infer a frequency, got {len(index)}")
    with pd.option_context("future.infer_freq_returns_offset", True):
        freq = pd.infer_freq(index)
    if freq is not None:
        offset = pd.tseries.frequencies.to_offset(freq)
        if isinstance(offset, pd.offsets.Tick):  # fixed-length steps; calendar offsets use the modal step
            return pd.Timedelta(offset)
    steps = np.diff(index.as_unit("ns").asi8)
    steps = steps[steps > 0]
    if len(steps) == 0:
        raise DataError("timestamps do not increase")
    values, counts = np.unique(steps, return_counts=True)
    if counts.max() >= 0.5 * len(steps):
        return pd.Timedelta(int(values[np.argmax(counts)]), unit="ns")
    # jittered timestamps: the median step snapped to the nearest common sampling interval
    median = float(np.median(steps))
    nice = np.array([pd.Timedelta(x).value for x in _NICE_STEPS], dtype=np.float64)
    best = nice[np.argmin(np.abs(np.log(nice / median)))]
    return pd.Timedelta(int(best if abs(np.log(best / median)) < 0.25 else median), unit="ns")


def regularise(
    frame: pd.DataFrame,
    freq: pd.Timedelta | None = None,
    *,
    max_gap_fraction: float = 0.2,
    business_days: bool = False,
) -> Regularised:
    """Sort, de-duplicate, put on a regular grid and fill gaps by time interpolation.

    Rejects (``DataError``) unsorted-beyond-repair input: timestamps that fall off the grid and
    cannot be aggregated, or more than ``max_gap_fraction`` of the grid missing. ``business_days``
    keeps the series on its own observed dates (trading calendars: gaps are weekends/holidays).
    """
    notes: list[str] = []
    if not isinstance(frame.index, pd.DatetimeIndex):
        raise DataError("index must be timestamps")
    if frame.index.hasnans:
        raise DataError("missing timestamps (NaT) in the time column")
    frame = frame.copy()
    if frame.index.tz is not None:
        frame.index = frame.index.tz_convert("UTC").tz_localize(None)
    if not frame.index.is_monotonic_increasing:
        frame = frame.sort_index()
        notes.append("timestamps were not sorted; sorted them")
    if frame.index.has_duplicates:
        dup = int(frame.index.duplicated().sum())
        frame = frame.groupby(level=0).mean()
        notes.append(f"{dup} duplicate timestamps averaged")
    nan_before = int(frame.isna().to_numpy().sum())
    if business_days:
        step = infer_frequency(frame.index)
        filled = frame.interpolate(method="time", limit_direction="both")
        if nan_before:
            notes.append(f"{nan_before} NaN values interpolated")
        return Regularised(filled, step, False, 0, nan_before, notes, business_days=True)
    step = freq if freq is not None else infer_frequency(frame.index)
    if not business_days and freq is None and step == pd.Timedelta("1D"):
        full = pd.date_range(frame.index[0].normalize(), frame.index[-1].normalize(), freq="1D")
        absent = full[~full.isin(frame.index.normalize())]
        if len(absent) and (absent.day_of_week >= 5).mean() >= 0.6:
            notes.append("trading-day calendar detected (weekend gaps kept as they are)")
            reg = regularise(frame, business_days=True)
            reg.notes = notes + reg.notes
            return reg
    if step <= pd.Timedelta(0):
        raise DataError("frequency must be positive")
    origin = frame.index[0]
    offsets = (frame.index - origin) / step
    off_grid = np.abs(offsets - np.round(offsets)) > 1e-6
    resampled = False
    if off_grid.any():
        # irregular sampling: aggregate onto the inferred grid (mean per bucket)
        frame = frame.resample(
            step, origin=origin.floor(step) if step <= pd.Timedelta("1D") else origin
        ).mean()
        resampled = True
        notes.append(f"{int(off_grid.sum())} off-grid timestamps resampled to a {step} grid (bucket mean)")
    grid = pd.date_range(frame.index[0], frame.index[-1], freq=step)
    inserted = len(grid) - int(frame.index.isin(grid).sum()) if not resampled else 0
    frame = frame.reindex(grid)
    missing_rows = int(frame.isna().all(axis=1).sum())
    if len(grid) and missing_rows / len(grid) > max_gap_fraction:
        raise DataError(
            f"{missing_rows} of {len(grid)} time steps at frequency {step} have no data "
            f"(more than {max_gap_fraction:.0%}); send a regular history or resample it first"
        )
    if inserted:
        notes.append(f"{inserted} missing time steps inserted and interpolated")
    nan_total = int(frame.isna().to_numpy().sum())
    if nan_total:
        frame = frame.interpolate(method="time", limit_direction="both")
        if nan_before:
            notes.append(f"{nan_before} NaN values interpolated")
    if frame.isna().to_numpy().any():
        raise DataError("a variable has no finite value at all")
    return Regularised(frame, step, resampled, inserted, nan_total, notes)


def read_csv_series(
    path: Path, date_col: str = "date", target: str | list[str] | None = None
) -> pd.DataFrame:
    """A CSV as a time-indexed numeric frame: ``target`` column(s), or every numeric column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    raw = pd.read_csv(path)
    if date_col not in raw.columns:
        raise DataError(f"{path.name}: no column {date_col!r} (columns: {list(raw.columns)})")
    index = pd.to_datetime(raw[date_col], errors="coerce", format="mixed")
    if index.isna().any():
        bad = raw.loc[index.isna(), date_col].head(3).tolist()
        raise DataError(f"{path.name}: unparseable timestamps in {date_col!r}, e.g. {bad}")
    data = raw.drop(columns=[date_col])
    if target is not None:
        cols = [target] if isinstance(target, str) else list(target)
        missing = [c for c in cols if c not in data.columns]
        if missing:
            raise DataError(f"{path.name}: no column(s) {missing} (columns: {list(data.columns)})")
        data = data[cols]
    data = data.apply(pd.to_numeric, errors="coerce")
    data = data.loc[:, data.notna().any()]
    if data.shape[1] == 0:
        raise DataError(f"{path.name}: no numeric columns")
    data.index = pd.DatetimeIndex(index, name="date")
    return data.astype(np.float64)


def _fit_scaler(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std < 1e-8, 1.0, std)
    return mean.astype(np.float32), std.astype(np.float32)


def _make_split(
    name: str,
    frame: pd.DataFrame,
    freq: pd.Timedelta,
    ends: tuple[int, int, int],
    lookback: int,
    source: list[Path],
    notes: list[str] | None = None,
) -> SeriesSplit:
    train_end, val_end, test_end = ends
    if train_end <= lookback:
        raise DataError(f"{name}: the train part ({train_end} rows) is shorter than the lookback {lookback}")
    borders = {
        "train": (0, train_end),
        "val": (train_end - lookback, val_end),
        "test": (val_end - lookback, test_end),
    }
    mean, std = _fit_scaler(frame.to_numpy(dtype=np.float64)[:train_end])
    return SeriesSplit(
        name, frame, freq, list(frame.columns), borders, mean, std, lookback, source, notes or []
    )


def load_ett(data_dir: Path, dataset: str, lookback: int) -> SeriesSplit:
    """ETTh1/h2/m1/m2 under the standard 12/4/4-month protocol (all 7 variables)."""
    if dataset not in ETT_DATASETS:
        raise DataError(f"unknown ETT dataset {dataset!r}; choose one of {ETT_DATASETS}")
    path = Path(data_dir) / "ett" / f"{dataset}.csv"
    frame = read_csv_series(path, "date")
    per_hour = 4 if dataset.startswith("ETTm") else 1
    month = 30 * 24 * per_hour
    ends = (12 * month, 16 * month, 20 * month)
    return _make_split(dataset, frame, infer_frequency(frame.index), ends, lookback, [path])


def load_csi300(data_dir: Path, lookback: int, column: str = "close") -> SeriesSplit:
    """CSI 300 daily close: train up to 2017, validation 2018-2019, test 2020-2021 (trading days)."""
    path = Path(data_dir) / "csi300" / "CSI300_daily_2005_2021.csv"
    frame = read_csv_series(path, "date", column)
    reg = regularise(frame, business_days=True)
    idx = reg.frame.index
    train_end = int((idx < "2018-01-01").sum())
    val_end = int((idx < "2020-01-01").sum())
    return _make_split(
        "CSI300", reg.frame, reg.freq, (train_end, val_end, len(idx)), lookback, [path], reg.notes
    )


def load_csv(
    path: Path,
    lookback: int,
    date_col: str = "date",
    target: str | list[str] | None = None,
    fractions: tuple[float, float] = (0.7, 0.1),
) -> SeriesSplit:
    """Any CSV: regularised at its inferred frequency, split 70/10/20 in time (Autoformer custom)."""
    path = Path(path)
    frame = read_csv_series(path, date_col, target)
    reg = regularise(frame)
    n = len(reg.frame)
    train_end = int(n * fractions[0])
    val_end = n - int(n * (1.0 - fractions[0] - fractions[1]))
    return _make_split(path.stem, reg.frame, reg.freq, (train_end, val_end, n), lookback, [path], reg.notes)


def sliding_windows(
    data: np.ndarray, lookback: int, horizon: int, stride: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (input, target) window of ``data`` [T, C] at ``stride``: views [N, L, C] and [N, H, C]."""
    series = torch.as_tensor(np.ascontiguousarray(data), dtype=torch.float32)
    total = lookback + horizon
    if series.shape[0] < total:
        raise DataError(f"{series.shape[0]} rows are fewer than lookback + horizon = {total}")
    win = series.unfold(0, total, stride)  # [N, C, L+H]
    win = win.permute(0, 2, 1)
    return win[:, :lookback], win[:, lookback:]


def window_starts(length: int, lookback: int, horizon: int, stride: int = 1) -> np.ndarray:
    """Start rows of the windows :func:`sliding_windows` makes."""
    return np.arange(0, length - lookback - horizon + 1, stride)


def default_period(freq: pd.Timedelta, lookback: int) -> int:
    """Seasonal-naive period: steps per day (sub-daily, if it fits the lookback), 7 for daily, else 1."""
    if freq < pd.Timedelta("1D"):
        per_day = int(round(pd.Timedelta("1D") / freq))
        if 1 < per_day <= lookback:
            return per_day
        return 1
    if freq == pd.Timedelta("1D") and lookback >= 7:
        return 7
    return 1


def step_phase(index: pd.DatetimeIndex, freq: pd.Timedelta, cycle_len: int) -> np.ndarray:
    """Phase of each timestamp in a cycle of ``cycle_len`` steps of ``freq``, counted from the Unix epoch
    (for a daily cycle of a sub-daily series: the step of the day)."""
    step = max(int(pd.Timedelta(freq).value), 1)
    return ((index.as_unit("ns").asi8 // step) % cycle_len).astype(np.int64)


def split_windows(
    split: SeriesSplit, part: str, horizon: int, stride: int = 1, cycle_len: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`sliding_windows` of a part (scaled) plus, when ``cycle_len`` > 0, the phase [N] of each
    window's first step."""
    x, y = sliding_windows(split.part(part), split.lookback, horizon, stride)
    if cycle_len <= 0:
        return x, y, None
    start = split.borders[part][0] + np.arange(len(x)) * stride
    phase = step_phase(split.frame.index[start], split.freq, cycle_len)
    return x, y, torch.as_tensor(phase)
