"""Fixtures of the manufacturing tests: one tiny real training run (seconds) into a temporary MODEL_DIR."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipelines.manufacturing.common import default_data_dir

DATA_DIR = default_data_dir()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert (DATA_DIR / "neu_det" / "IMAGES").is_dir(), f"NEU-DET missing under {DATA_DIR}"
    return DATA_DIR


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """Run ``python -m pipelines.manufacturing.train --preset tiny`` on the real data into a temp dir."""
    from pipelines.manufacturing.train import main

    model_dir = tmp_path_factory.mktemp("mfg_models")
    os.environ.setdefault("TORCH_NUM_THREADS", "1")
    assert main(["--preset", "tiny", "--model-dir", str(model_dir), "--data-dir", str(data_dir),
                 "--no-progress"]) == 0
    return model_dir
