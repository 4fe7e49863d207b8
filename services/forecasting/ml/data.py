"""Time-series data: ETT protocol, generic CSVs, CSI 300, frequency inference, regularisation, windows.

Every loader returns a :class:`SeriesSplit`: the raw frame (regular time index), train / val / test
row ranges following the dataset's protocol, and a standard scaler fitted on the train rows only.
Validation and test ranges start ``lookback`` rows before their border so the first forecast starts at
the border (the Informer / Autoformer / PatchTST convention).
"""

from __future__ import annotations

import csv
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ETT_DATASETS = ("ETTh1", "ETTh2", "ETTm1", "ETTm2")
# the largest magnitude a request or tick may carry: the models compute in float32 (to 3.4e38), where a
# history of 1e25 came back as NaN and one of 1e18 did not
MAX_ABS_VALUE = 1e18


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
    calendar: str | None = None  # pandas offset of a calendar step ("MS", "QE", ...); freq is then its mean

    def future(self, horizon: int) -> pd.DatetimeIndex:
        """The ``horizon`` timestamps after the last row (business days for trading calendars, calendar
        months / quarters / years for such series)."""
        last = self.frame.index[-1]
        if self.business_days:
            return pd.date_range(last + pd.offsets.BDay(1), periods=horizon, freq="B")
        if self.calendar:
            return pd.date_range(last, periods=horizon + 1, freq=self.calendar)[1:]
        return pd.date_range(last + self.freq, periods=horizon, freq=self.freq)

    @property
    def freq_label(self) -> str:
        """The step as reported: the calendar offset ("MS") or the fixed step ("0 days 01:00:00")."""
        return self.calendar or ("B" if self.business_days else str(self.freq))


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
    calendar: str | None = None  # see Regularised.calendar; "B" for a trading-day calendar

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


# steps (in days) of calendar frequencies: a month, a quarter, a year
_CALENDAR_UNITS = {"M": (27.5, 32.5), "Q": (88.5, 93.5), "Y": (364.5, 366.5)}
_EPOCH_UNITS = ((1e11, "s"), (1e14, "ms"), (1e17, "us"))  # |median| below the bound -> unit


def _regularity(index: pd.DatetimeIndex) -> float:
    """Share of the sorted steps within 10 % of the median step (1.0 = regular; calendar months, whose
    steps are 28-31 days, count as regular)."""
    steps = np.diff(np.sort(index.dropna().as_unit("ns").asi8)).astype(np.float64)
    steps = steps[steps > 0]
    if len(steps) == 0:
        return 0.0
    return float(np.mean(np.abs(steps / np.median(steps) - 1.0) <= 0.1))


def _parse_numbers(v: pd.Series) -> pd.DatetimeIndex:
    """Numeric time values: years (1000-2999), YYYYMMDD dates, spreadsheet serial days (10,000-99,999, as
    Excel and LibreOffice store dates), else Unix epoch time in s / ms / us / ns (the unit from the
    magnitude)."""
    integral = bool(np.all(np.mod(v, 1) == 0))
    if integral and v.between(1000, 2999).all():
        return pd.DatetimeIndex(pd.to_datetime(v.astype(np.int64).astype(str), format="%Y", errors="coerce"))
    if integral and v.between(10000101, 29991231).all():
        ymd = pd.to_datetime(v.astype(np.int64).astype(str), format="%Y%m%d", errors="coerce")
        if ymd.notna().all():
            return pd.DatetimeIndex(ymd)
    if v.between(10_000, 99_999).all():  # spreadsheet serial days (1927-2173), not seconds of 1 Jan 1970
        return pd.DatetimeIndex(pd.to_datetime(v, unit="D", origin="1899-12-30", errors="coerce"))
    magnitude = float(np.median(np.abs(v)))
    unit = next((u for bound, u in _EPOCH_UNITS if magnitude < bound), "ns")
    return pd.DatetimeIndex(pd.to_datetime(v, unit=unit, errors="coerce"))


def parse_timestamps(values: pd.Series | list) -> pd.DatetimeIndex:
    """Timestamps of a user's series as naive UTC (NaT where unparseable).

    Strings with UTC offsets (also mixed ones, as across a daylight-saving change) are converted to UTC;
    numbers are years, YYYYMMDD dates or Unix epoch times; strings in one consistent format are parsed with
    it, and where both a month-first and a day-first reading parse (every day <= 12, as in "01/02/2020",
    "01/03/2020", ...), the one giving the more regular series wins (ties: month-first, pandas' default);
    mixed formats are parsed one by one."""
    s = pd.Series(values).reset_index(drop=True)
    numbers = pd.to_numeric(s, errors="coerce")
    if len(s) and numbers.notna().all() and np.isfinite(numbers.to_numpy(dtype=np.float64)).all():
        return _parse_numbers(numbers.astype(np.float64))
    text = s.astype("string").str.strip()
    candidates: list[pd.DatetimeIndex] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas' "could not infer format" notices
        for dayfirst in (False, True):
            try:
                candidates.append(pd.DatetimeIndex(pd.to_datetime(text, utc=True, dayfirst=dayfirst)))
            except (ValueError, TypeError, OverflowError):
                continue
        if not candidates:
            candidates.append(
                pd.DatetimeIndex(pd.to_datetime(text, utc=True, errors="coerce", format="mixed"))
            )
    best = max(candidates, key=_regularity)  # max keeps the first (month-first) on a tie
    return best.tz_convert("UTC").tz_localize(None)


def _calendar_unit(index: pd.DatetimeIndex) -> str | None:
    """ "M", "Q" or "Y" when the series steps by calendar months / quarters / years (median step)."""
    if len(index) < 3:
        return None
    days = np.median(np.diff(index.as_unit("ns").asi8)) / 86_400e9
    return next((unit for unit, (lo, hi) in _CALENDAR_UNITS.items() if lo <= days <= hi), None)


def _fill_gaps(
    frame: pd.DataFrame,
    missing: int,
    what: str,
    max_gap_fraction: float,
    nan_before: int,
    notes: list[str],
    inserted_note: str | None,
    method: str = "time",
) -> tuple[pd.DataFrame, int]:
    """Reject a grid whose empty points (``missing`` of ``len(frame)`` ``what``) exceed ``max_gap_fraction``,
    else interpolate every gap; returns the filled frame and the number of values filled."""
    if len(frame) and missing / len(frame) > max_gap_fraction:
        raise DataError(
            f"{missing} of {len(frame)} {what} have no data (more than {max_gap_fraction:.0%}); "
            "send a regular history or resample it first"
        )
    if inserted_note:
        notes.append(inserted_note)
    nan_total = int(frame.isna().to_numpy().sum())
    if nan_total:
        frame = frame.interpolate(method=method, limit_direction="both")
        if nan_before:
            notes.append(f"{nan_before} NaN values interpolated")
    if frame.isna().to_numpy().any():
        raise DataError("a variable has no finite value at all")
    return frame, nan_total


def _regularise_calendar(
    frame: pd.DataFrame, unit: str, notes: list[str], max_gap_fraction: float
) -> Regularised:
    """Monthly / quarterly / yearly series: one row per calendar period (values of a period averaged),
    missing periods inserted and interpolated, each row stamped at its period's start or end (the
    convention most input rows follow)."""
    periods = frame.index.to_period(unit)
    at_end = float((frame.index.normalize() == periods.to_timestamp(how="end").normalize()).mean()) > 0.5
    grouped = frame.groupby(periods).mean()
    if len(grouped) < len(frame):
        notes.append(f"{len(frame) - len(grouped)} rows in an already seen period averaged")
    grid = pd.period_range(grouped.index.min(), grouped.index.max(), freq=unit)
    nan_before = int(grouped.isna().to_numpy().sum())
    out = grouped.reindex(grid)
    inserted = int(len(grid) - len(grouped))
    stamps = grid.to_timestamp(how="end").normalize() if at_end else grid.to_timestamp(how="start")
    out.index = pd.DatetimeIndex(stamps, name=frame.index.name)
    inserted_note = f"{inserted} missing periods inserted and interpolated" if inserted else None
    out, nan_total = _fill_gaps(
        out, inserted, f"periods ({unit})", max_gap_fraction, nan_before, notes, inserted_note, "linear"
    )
    calendar = {"M": "M", "Q": "Q", "Y": "Y"}[unit] + ("E" if at_end else "S")
    mean_step = (out.index[-1] - out.index[0]) / max(len(out) - 1, 1)
    notes.append(f"calendar frequency {calendar}")
    return Regularised(out, mean_step, False, inserted, nan_total, notes, calendar=calendar)


def _snap_to_grid(frame: pd.DataFrame, step: pd.Timedelta) -> pd.DataFrame:
    """Jittered timestamps onto a regular grid of ``step``: each row goes to its nearest grid point, the
    grid aligned with the stamps' typical phase and labelled at whole multiples of ``step`` (mean per point).
    """
    base = frame.index[0].floor(step) if step <= pd.Timedelta("1D") else frame.index[0]
    rel = np.asarray((frame.index - base) / step, dtype=np.float64)  # steps from the base
    angle = 2 * np.pi * np.mod(rel, 1.0)
    center = float(np.mod(np.arctan2(np.sin(angle).mean(), np.cos(angle).mean()) / (2 * np.pi), 1.0))
    k = np.round(rel - center).astype(np.int64) + (1 if center >= 0.5 else 0)
    snapped = pd.DatetimeIndex(base + pd.to_timedelta(k * step.value, unit="ns"), name=frame.index.name)
    return frame.groupby(snapped).mean()


_CALENDAR_ALIASES = {"M": "M", "ME": "M", "MS": "M", "BM": "M", "BMS": "M", "Q": "Q", "QE": "Q", "QS": "Q",
                     "Y": "Y", "YE": "Y", "YS": "Y", "A": "Y", "AS": "Y"}  # fmt: skip


def parse_freq(text: str) -> tuple[pd.Timedelta | None, str | None, bool]:
    """A user's sampling step: a fixed step ("1h", "15min", "30s", "1D", "W"), a calendar period ("MS", "ME",
    "M", "QS", "Q", "YS", "Y", upper case; start or end follows the data) or trading days ("B") ->
    (step, calendar unit, business days); ValueError otherwise (also for multiples of calendar periods)."""
    m = re.fullmatch(r"\s*(\d*)\s*([A-Za-z]+)(-[A-Za-z]+)?\s*", text)
    if m and m.group(2) in _CALENDAR_ALIASES:
        if m.group(1) not in ("", "1"):
            raise ValueError(f"{text!r}: multiples of calendar periods are not supported")
        return None, _CALENDAR_ALIASES[m.group(2)], False
    if m and m.group(2) == "B" and m.group(1) in ("", "1"):
        return None, None, True
    if m and m.group(2) == "W":
        return pd.Timedelta(weeks=int(m.group(1) or 1)), None, False
    try:
        step = pd.Timedelta(text if (m is None or m.group(1)) else f"1{m.group(2)}")
    except ValueError as exc:
        hint = "a fixed step (1h, 15min, 1D, W), MS / ME, QS / QE, YS / YE or B"
        raise ValueError(f"{text!r}: use {hint}") from exc
    if step <= pd.Timedelta(0):
        raise ValueError("freq must be positive")
    return step, None, False


def regularise(
    frame: pd.DataFrame,
    freq: pd.Timedelta | None = None,
    *,
    max_gap_fraction: float = 0.2,
    business_days: bool = False,
    calendar_unit: str | None = None,
) -> Regularised:
    """Sort, de-duplicate, put on a regular grid and fill gaps by time interpolation.

    Rejects (``DataError``) unsorted-beyond-repair input: timestamps that fall off the grid and
    cannot be aggregated, or more than ``max_gap_fraction`` of the grid missing. ``business_days``
    keeps the series on its own observed dates (trading calendars: gaps are weekends/holidays);
    ``calendar_unit`` ("M", "Q", "Y") puts it on calendar periods (else inferred from the median step).
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
    unit = calendar_unit or (_calendar_unit(frame.index) if freq is None else None)
    if unit is not None:
        return _regularise_calendar(frame, unit, notes, max_gap_fraction)
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
        # irregular sampling: every row to its nearest grid point (mean per point)
        frame = _snap_to_grid(frame, step)
        resampled = True
        notes.append(f"{int(off_grid.sum())} off-grid timestamps moved to a {step} grid (mean per point)")
    grid = pd.date_range(frame.index[0], frame.index[-1], freq=step)
    inserted = len(grid) - int(frame.index.isin(grid).sum()) if not resampled else 0
    frame = frame.reindex(grid)
    missing_rows = int(frame.isna().all(axis=1).sum())
    inserted_note = f"{inserted} missing time steps inserted and interpolated" if inserted else None
    frame, nan_total = _fill_gaps(
        frame,
        missing_rows,
        f"time steps at frequency {step}",
        max_gap_fraction,
        nan_before,
        notes,
        inserted_note,
    )
    return Regularised(frame, step, resampled, inserted, nan_total, notes)


def _read_table(path: Path) -> pd.DataFrame:
    """A delimited text file as exported by spreadsheets and loggers: the delimiter sniffed from its start
    (comma, semicolon, tab or pipe), a decimal comma where the delimiter is not a comma and the numbers are
    written that way ("12,5"), a UTF-8 byte-order mark ignored."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:
        sample = fh.read(64 * 1024)
    try:
        sep = csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
    except csv.Error:
        sep = ","
    decimal = "," if sep != "," and re.search(r"(?<![\d.,])\d+,\d+(?![\d.,])", sample) else "."
    return pd.read_csv(path, sep=sep, decimal=decimal, encoding="utf-8-sig")


def read_csv_series(
    path: Path, date_col: str = "date", target: str | list[str] | None = None
) -> pd.DataFrame:
    """A CSV as a time-indexed numeric frame: ``target`` column(s), or every numeric column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    raw = _read_table(path)
    if date_col not in raw.columns:
        raise DataError(f"{path.name}: no column {date_col!r} (columns: {list(raw.columns)})")
    index = parse_timestamps(raw[date_col])
    if index.isna().any():
        bad = raw.loc[np.asarray(index.isna()), date_col].head(3).tolist()
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
    huge = [str(c) for c in data.columns if float(data[c].abs().max()) > MAX_ABS_VALUE]
    if huge:
        raise DataError(f"{path.name}: values beyond +-{MAX_ABS_VALUE:g} in {huge} (rescale them)")
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
    min_part_rows: int = 0,
) -> SeriesSplit:
    """Any CSV: regularised at its inferred frequency, split 70/10/20 in time (Autoformer custom).

    ``min_part_rows`` (the horizon): a short file whose validation or test part would hold fewer rows
    gets parts of that size, taken from the end of the train part, so each has at least one window."""
    path = Path(path)
    frame = read_csv_series(path, date_col, target)
    reg = regularise(frame)
    n = len(reg.frame)
    n_test = int(n * (1.0 - fractions[0] - fractions[1]))
    n_val = n - n_test - int(n * fractions[0])
    notes = list(reg.notes)
    if min_part_rows and (n_val < min_part_rows or n_test < min_part_rows):
        n_val, n_test = max(n_val, min_part_rows), max(n_test, min_part_rows)
        notes.append(
            f"short file: validation and test parts of {n_val} and {n_test} rows (at least the horizon)"
        )
    val_end, train_end = n - n_test, n - n_test - n_val
    if train_end < lookback + max(min_part_rows, 1):
        need = lookback + max(min_part_rows, 1) + n_val + n_test
        raise DataError(
            f"{path.name}: {n} rows at {reg.freq_label} are too few for a lookback of {lookback} and horizon "
            f"{min_part_rows} (train, validation and test parts need about {need})"
        )
    split = _make_split(path.stem, reg.frame, reg.freq, (train_end, val_end, n), lookback, [path], notes)
    split.calendar = reg.calendar or ("B" if reg.business_days else None)
    return split


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


def default_period(freq: pd.Timedelta, lookback: int, business_days: bool = False) -> int:
    """Seasonal-naive period: steps per day (sub-daily), a week of days (5 on a trading calendar), a year
    of weeks / months / quarters; 1 (the last value) when that season does not fit the lookback."""
    if freq < pd.Timedelta("1D"):
        period = int(round(pd.Timedelta("1D") / freq))
    else:
        days = freq / pd.Timedelta("1D")
        yearly = {7.0: 52, **{d: 12 for d in range(28, 33)}, **{d: 4 for d in range(89, 94)}}
        period = (5 if business_days else 7) if days == 1 else yearly.get(round(days), 1)
    return period if 1 < period <= lookback else 1


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
