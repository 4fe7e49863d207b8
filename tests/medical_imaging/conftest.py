"""Fixtures of the medical_imaging tests: tiny real models trained once per session into a tmp MODEL_DIR."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from backbone.service.config import default_data_dir


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("DATA_DIR", default_data_dir()))
    assert (path / "pneumoniamnist").is_dir(), f"shared data not found at {path}"
    return path


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """Train the tiny preset on the real PneumoniaMNIST (a 2-member ensemble) and AdrenalMNIST3D 64^3 data."""
    import torch

    from pipelines.medical_imaging.train import PRESETS, SHAPE_MODEL_DEFAULTS, TrainConfig, train

    torch.set_num_threads(1)
    model_dir = tmp_path_factory.mktemp("models")
    tiny = PRESETS["tiny"]
    # the 2-D model is a deep ensemble of two members trained in two worker processes
    cfg2 = dict(tiny, ensemble_size=2, jobs=2)
    train(TrainConfig(dataset="pneumoniamnist", preset="tiny", **cfg2), data_dir, model_dir)
    # the service's 3-D model: AdrenalMNIST3D at 64^3, with the stem that 64^3 gets (a 4^3 token grid)
    model3 = {**tiny["model"], **SHAPE_MODEL_DEFAULTS[(3, 64)]}
    cfg3 = dict(tiny, max_train=64, max_eval=64, batch_size=32, model=model3)
    train(TrainConfig(dataset="adrenalmnist3d", preset="tiny", **cfg3), data_dir, model_dir)
    return model_dir
