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
    regularise,
    sliding_windows,
)


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
