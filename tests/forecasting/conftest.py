"""Forecasting test fixtures: tiny real models trained once per session into a tmp MODEL_DIR."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipelines.forecasting import train

DATA_DIR = Path(
    os.environ.get("DATA_DIR", Path(__file__).resolve().parents[2] / ".." / "shared" / "data")
).resolve()


@pytest.fixture(scope="session")
def fc_data_dir() -> Path:
    assert (DATA_DIR / "ett" / "ETTh1.csv").is_file(), f"ETT data missing under {DATA_DIR}"
    return DATA_DIR


@pytest.fixture(scope="session")
def fc_model_dir(tmp_path_factory: pytest.TempPathFactory, fc_data_dir: Path) -> Path:
    """ETTh1 h96 (the service default) and CSI300 h5: tiny patch-decay transformers (+ DLinear baselines)."""
    root = tmp_path_factory.mktemp("fc_models")
    common = ["--preset", "tiny", "--model-dir", str(root), "--data-dir", str(fc_data_dir), "--no-progress"]
    train.main(["--dataset", "ETTh1", "--horizon", "96", *common])
    train.main(["--dataset", "CSI300", "--horizon", "5", *common])
    return root
