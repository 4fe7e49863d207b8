"""Shared fixtures: a tiny fraud + credit model trained on the real data into a tmp MODEL_DIR."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.financial_risk.data import default_data_dir


@pytest.fixture(scope="session")
def fr_data_dir() -> Path:
    path = default_data_dir()
    assert (path / "fraud_handbook_sim").is_dir(), f"dataset missing under {path}"
    return path


@pytest.fixture(scope="session")
def fr_model_dir(tmp_path_factory: pytest.TempPathFactory, fr_data_dir: Path) -> Path:
    """Train the ``tiny`` presets (seconds) into a temporary model directory."""
    from pipelines.financial_risk.train import train_credit, train_fraud

    model_dir = tmp_path_factory.mktemp("fr_models")
    train_fraud(fr_data_dir, model_dir, "tiny")
    train_credit(fr_data_dir, model_dir, "tiny")
    return model_dir
