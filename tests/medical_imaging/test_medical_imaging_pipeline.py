"""Training / evaluation pipelines on the real data (tiny preset), and the generic ``--npz`` path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from backbone.artifacts import latest_artifact, verify_artifact

from pipelines.medical_imaging import evaluate as evaluate_mod
from pipelines.medical_imaging import train as train_mod
from pipelines.medical_imaging.data import load_npz


def test_artifacts_are_complete(trained_model_dir: Path) -> None:
    for name, dims in (("pneumoniamnist", 2), ("adrenalmnist3d", 3)):
        art = latest_artifact(trained_model_dir, "medical_imaging", name)
        verify_artifact(art)
        cfg, metrics = art.config, art.metrics
        assert cfg["family"] == f"medical_hybrid_{dims}d" and cfg["spatial_dims"] == dims
        assert cfg["temperature"] > 0 and len(cfg["class_names"]) == 2
        assert 0.0 <= metrics["test"]["auc"] <= 1.0 and metrics["test"]["n"] > 0
        assert (art.path / "weights.safetensors").is_file()
        assert metrics["routing"], "MoE routing statistics are recorded"


def test_evaluate_cli_writes_plots_and_json(
    trained_model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evaluate_mod.main(
        [
            "--dataset",
            "pneumoniamnist",
            "--json",
            "--max-n",
            "96",
            "--model-dir",
            str(trained_model_dir),
            "--data-dir",
            str(data_dir),
            "--out-dir",
            str(tmp_path),
        ]
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    for key in ("auc", "acc", "ece"):
        assert 0.0 <= result[key] <= 1.0
    assert (tmp_path / "roc.png").stat().st_size > 1000
    assert (tmp_path / "reliability.png").stat().st_size > 1000
    assert json.loads((tmp_path / "report.json").read_text())["n"] == 96


def _fake_medmnist(path: Path, shape: tuple[int, ...], n_classes: int) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 48), ("val", 16), ("test", 16)):
        labels = rng.integers(0, n_classes, size=(n, 1)).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, *shape)).astype(np.uint8)
        images[labels[:, 0] > 0] += 150  # a learnable signal
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    np.savez_compressed(path, **arrays)


def test_generic_npz_3d_multiclass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Any MedMNIST-layout file (a NoduleMNIST3D-shaped one, 3 classes) trains and evaluates via --npz."""
    npz = tmp_path / "nodulelike3d.npz"
    _fake_medmnist(npz, (28, 28, 28), 3)
    data = load_npz(npz)
    assert (data.spatial_dims, data.in_channels, data.num_classes) == (3, 1, 3)
    model_dir = tmp_path / "models"
    train_mod.main(["--npz", str(npz), "--preset", "tiny", "--model-dir", str(model_dir), "--no-bf16"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == 16
    evaluate_mod.main(
        ["--npz", str(npz), "--json", "--model-dir", str(model_dir), "--out-dir", str(tmp_path / "r")]
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) >= {"auc", "acc", "ece"} and result["dataset"] == "nodulelike3d"


def test_rgb_2d_layout_is_detected(tmp_path: Path) -> None:
    npz = tmp_path / "rgb.npz"
    _fake_medmnist(npz, (28, 28, 3), 2)
    data = load_npz(npz)
    assert (data.spatial_dims, data.in_channels) == (2, 3)
    assert data.images["train"].shape == (48, 3, 28, 28) and data.images["train"].max() <= 1.0


def test_full_preset_is_per_dimensionality() -> None:
    two, three = train_mod.preset_values("full", 2), train_mod.preset_values("full", 3)
    assert "by_dims" not in two and two["ema_decay"] > 0 and three["ema_decay"] > 0
    assert two["bf16"] is False  # bf16 autocast is slower than float32 for the small 2-D matmuls
    assert train_mod.preset_values("quick", 2) == {k: v for k, v in train_mod.PRESETS["quick"].items()}
