"""Data protocol tests on the real ETT / CSI 300 files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from services.forecasting.ml.data import (
    DataError,
    default_period,
    infer_frequency,
    load_csi300,
    load_csv,
    load_ett,
    parse_timestamps,
    regularise,
    sliding_windows,
)
from services.forecasting.ml.training import CAL_LEVELS, CAL_MIN_SAMPLES, conformal_table


def test_ett_protocol_borders_and_train_only_scaler(fc_data_dir: Path) -> None:
    s = load_ett(fc_data_dir, "ETTh1", 336)
    assert s.borders == {"train": (0, 8640), "val": (8640 - 336, 11520), "test": (11520 - 336, 14400)}
    assert s.freq == pd.Timedelta("1h")
    assert s.columns[-1] == "OT" and len(s.columns) == 7
    train = s.part("train")
    np.testing.assert_allclose(train.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(train.std(axis=0), 1.0, atol=1e-3)
    assert abs(float(s.part("test").mean())) > 0.01  # test is not re-standardised
    x, y = sliding_windows(s.part("test"), 336, 96)
    assert x.shape == (2785, 336, 7) and y.shape == (2785, 96, 7)  # stride-1, first target at the border
    np.testing.assert_allclose(y[0, 0].numpy(), s.scaled()[11520], rtol=1e-6)
    m = load_ett(fc_data_dir, "ETTm1", 512)
    assert m.borders["test"] == (46080 - 512, 57600) and m.freq == pd.Timedelta("15min")


def test_csi300_split_by_year(fc_data_dir: Path) -> None:
    s = load_csi300(fc_data_dir, 60)
    idx = s.frame.index
    assert s.columns == ["close"] and s.freq == pd.Timedelta("1D")
    assert idx[s.borders["train"][1] - 1].year == 2017
    assert idx[s.borders["test"][0] + 60].year == 2020 and idx[-1].year == 2021
    assert default_period(s.freq, 60) == 7 and default_period(pd.Timedelta("15min"), 336) == 96


def test_regularise_inserts_interpolates_and_reports(fc_data_dir: Path) -> None:
    raw = pd.read_csv(fc_data_dir / "ett" / "ETTh1.csv", parse_dates=["date"], index_col="date").iloc[:300]
    holes = raw.drop(raw.index[[10, 11, 150]])
    holes.iloc[20, 0] = np.nan
    reg = regularise(holes)
    assert reg.freq == pd.Timedelta("1h") and reg.inserted_rows == 3 and len(reg.frame) == 300
    assert reg.nan_filled == 3 * 7 + 1 and not reg.frame.isna().any().any()
    assert any("inserted" in n for n in reg.notes)
    # jittered timestamps are put back on the hourly grid
    jitter = raw.copy()
    jitter.index = raw.index + pd.to_timedelta(np.random.default_rng(0).integers(0, 900, len(raw)), unit="s")
    rj = regularise(jitter)
    assert rj.resampled and rj.freq == pd.Timedelta("1h")
    # mostly missing -> rejected
    sparse = raw.iloc[::4]
    sparse = pd.concat([sparse.iloc[:10], raw.iloc[100:110]])
    with pytest.raises(DataError, match="have no data"):
        regularise(sparse, pd.Timedelta("1h"))


def test_generic_csv_infers_frequency_and_splits(tmp_path: Path, fc_data_dir: Path) -> None:
    raw = pd.read_csv(fc_data_dir / "ett" / "ETTm2.csv").iloc[:3000]
    raw = raw.drop(index=[5, 6, 7]).rename(columns={"date": "ts"})
    path = tmp_path / "sensor.csv"
    raw.to_csv(path, index=False)
    s = load_csv(path, 96, date_col="ts", target=["OT", "HUFL"])
    assert s.freq == pd.Timedelta("15min") and s.columns == ["OT", "HUFL"]
    assert len(s.frame) == 3000 and s.borders["train"] == (0, 2100)
    with pytest.raises(DataError, match="no column"):
        load_csv(path, 96, date_col="ts", target="nope")
    assert infer_frequency(pd.date_range("2020", periods=10, freq="7D")) == pd.Timedelta("7D")


def test_timestamps_in_the_forms_users_send() -> None:
    """Offsets across a daylight-saving change, epoch numbers, years, YYYYMMDD, day-first dates, garbage."""
    stamps = lambda values: [str(t) for t in parse_timestamps(values)]  # noqa: E731
    dst = ["2021-03-28T00:00:00+01:00", "2021-03-28T01:00:00+01:00", "2021-03-28T03:00:00+02:00"]
    assert stamps(dst) == ["2021-03-27 23:00:00", "2021-03-28 00:00:00", "2021-03-28 01:00:00"]  # UTC
    hourly = ["2020-09-13 12:26:40", "2020-09-13 13:26:40", "2020-09-13 14:26:40"]
    assert stamps([1600000000, 1600003600, 1600007200]) == hourly  # seconds
    assert stamps(["1600000000000", "1600003600000", "1600007200000"]) == hourly  # milliseconds, as text
    assert stamps([2001, 2002, 2003])[0] == "2001-01-01 00:00:00"
    assert stamps([20200130, 20200131, 20200201])[2] == "2020-02-01 00:00:00"
    assert stamps([43831, 43832.5, 43833])[:2] == ["2020-01-01 00:00:00", "2020-01-02 12:00:00"]  # serials
    # both readings parse; day-first gives months, month-first twelve days then a jump of a year
    firsts = [f"01/{m:02d}/{y}" for y in (2019, 2020) for m in range(1, 13)]
    assert stamps(firsts)[:2] == ["2019-01-01 00:00:00", "2019-02-01 00:00:00"]
    assert stamps(["04/03/2020", "04/04/2020", "04/05/2020"])[0] == "2020-04-03 00:00:00"
    assert stamps(["13/01/2020", "14/01/2020", "15/01/2020"])[0] == "2020-01-13 00:00:00"
    assert parse_timestamps(["2020-01-01", "not a time", "2020-01-03"]).isna().tolist() == [
        False,
        True,
        False,
    ]


def test_calendar_months_and_jittered_grids() -> None:
    months = pd.date_range("2000-01-31", periods=60, freq="ME")
    frame = pd.DataFrame({"y": np.arange(60.0)}, index=months).drop(months[[10]])
    frame.loc[pd.Timestamp("2003-02-14")] = 37.0  # a second row in February 2003: averaged
    reg = regularise(frame.sort_index())
    assert reg.calendar == "ME" and len(reg.frame) == 60 and reg.inserted_rows == 1
    assert reg.frame.index[10] == pd.Timestamp("2000-11-30") and reg.frame["y"].iloc[10] == 10.0
    assert reg.future(3).tolist() == list(pd.date_range("2005-01-31", periods=3, freq="ME"))
    assert default_period(reg.freq, 24) == 12 and default_period(pd.Timedelta("7D"), 104) == 52
    quarters = regularise(
        pd.DataFrame({"y": np.arange(12.0)}, index=pd.date_range("2001", periods=12, freq="QS"))
    )
    assert quarters.calendar == "QS" and quarters.future(1)[0] == pd.Timestamp("2004-01-01")
    # stamps jittered both ways around round 10-minute marks go to their nearest mark
    rng = np.random.default_rng(0)
    marks = pd.date_range("2020-01-01", periods=500, freq="10min")
    jitter = pd.DataFrame(
        {"y": np.arange(500.0)}, index=marks + pd.to_timedelta(rng.integers(-40, 40, 500), "s")
    )
    rj = regularise(jitter)
    assert rj.freq == pd.Timedelta("10min") and rj.frame.index.equals(marks)
    assert np.array_equal(rj.frame["y"].to_numpy(), np.arange(500.0))


def test_short_csv_parts_hold_a_horizon_or_the_error_says_so(tmp_path: Path) -> None:
    path = tmp_path / "short.csv"
    days = pd.date_range("2023-01-01", periods=60, freq="D")
    pd.DataFrame({"date": days, "y": np.sin(np.arange(60.0))}).to_csv(path, index=False)
    s = load_csv(path, 21, min_part_rows=7)  # 70/10/20 would leave 6 validation rows
    assert s.borders["val"][1] - s.borders["val"][0] == 21 + 7 and s.borders["test"] == (60 - 12 - 21, 60)
    assert any("short file" in n for n in s.notes)
    with pytest.raises(DataError, match="too few"):
        load_csv(path, 42, min_part_rows=7)
    huge = tmp_path / "huge.csv"
    pd.DataFrame({"date": days, "y": np.full(60, 1e300)}).to_csv(huge, index=False)
    with pytest.raises(DataError, match="rescale"):  # float32 models would forecast NaN
        load_csv(huge, 21)


def test_a_short_validation_part_pools_neighbouring_steps() -> None:
    rng = np.random.default_rng(0)
    top = int(np.argmin(np.abs(CAL_LEVELS - 0.95)))
    # 4 windows: on its own, a step's 95 % level would be the largest of its 4 residuals
    few = rng.normal(size=(12, 4)).astype(np.float32)
    table = conformal_table(few)
    pooled = np.sort(few[:10].ravel())  # step 0 pools steps 0-9 (ceil(39 / 4) = 10 steps)
    assert table[top, 0] == pooled[int(np.ceil(41 * 0.95)) - 1] and table[top, 0] < few[:10].max()
    many = rng.normal(size=(3, CAL_MIN_SAMPLES)).astype(np.float32)  # enough residuals: every step on its own
    assert np.array_equal(conformal_table(many)[top], np.sort(many, axis=1)[:, 37])


def test_spreadsheet_exports_semicolons_decimal_commas_tabs_and_a_bom(tmp_path: Path) -> None:
    hours = pd.date_range("2021-03-01", periods=300, freq="h")
    load = 10 + np.sin(np.arange(300) / 24 * 2 * np.pi)
    german = tmp_path / "zaehler.csv"  # a European spreadsheet export: ';', decimal commas, dd.mm.yyyy
    rows = [f"{t:%d.%m.%Y %H:%M};" + f"{v:.3f}".replace(".", ",") for t, v in zip(hours, load, strict=True)]
    german.write_text("Zeit;Last kW\n" + "\n".join(rows) + "\n", encoding="utf-8-sig")
    s = load_csv(german, 48, date_col="Zeit")
    assert s.columns == ["Last kW"] and s.freq == pd.Timedelta("1h") and s.frame.index[0] == hours[0]
    assert np.allclose(s.frame["Last kW"].to_numpy(), load, atol=1e-3)
    tabs = tmp_path / "logger.tsv"
    tabs.write_text("date\ty\n" + "\n".join(f"{t}\t{v}" for t, v in zip(hours, load, strict=True)) + "\n")
    assert np.allclose(load_csv(tabs, 48).frame["y"].to_numpy(), load)
