"""Training / evaluation pipelines on the real data (tiny preset), and the generic ``--npz`` path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from backbone.artifacts import latest_artifact, verify_artifact

from pipelines.medical_imaging import evaluate as evaluate_mod
from pipelines.medical_imaging import train as train_mod
from pipelines.medical_imaging.data import load_npz, resolve_npz


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
            "--mc-samples",
            "2",
            "--tta-views",
            "2",
            "--mc-draws",
            "2",
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
    draws = result["mc_draws"]["auc"]
    assert len(draws["values"]) == 2 and min(draws["values"]) <= draws["mean"] <= max(draws["values"])
    assert "auc" in result["single_pass"]
    flag = result["review_flag"]
    assert 0.0 <= flag["flagged_rate"] <= 1.0 and flag["errors_flagged"] <= flag["errors"] <= 96
    assert flag["errors"] == round((1 - result["acc"]) * 96)  # the flag judges the served decisions


def test_review_flag_metrics_count_caught_errors() -> None:
    from pipelines.medical_imaging.metrics import review_flag_metrics

    sure_pos = np.array([[0.02, 0.98]] * 8)  # confident pneumonia
    sure_neg = np.array([[0.97, 0.03]] * 8)
    torn = np.array([[0.9, 0.1], [0.1, 0.9]] * 4)  # interval spans the threshold -> flagged
    samples = [sure_pos, sure_neg, torn, sure_neg, torn]
    # torn studies average 0.5 -> called positive: study 4 is a flagged false alarm, study 3 a confident miss
    labels = np.array([1, 0, 1, 1, 0])
    m = review_flag_metrics(samples, labels, threshold=0.5, max_entropy=0.7, max_std=0.12)
    assert m["flagged_rate"] == pytest.approx(0.4) and m["errors"] == 2 and m["errors_flagged"] == 1
    assert m["error_capture"] == pytest.approx(0.5) and m["acc_unflagged"] == pytest.approx(2 / 3)
    assert m["missed_positives"] == 1 and m["missed_positives_flagged"] == 0


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


def test_64_cube_gets_the_strided_stem(data_dir: Path) -> None:
    """``--dataset adrenalmnist3d`` is the 64^3 file; its stem keeps the token grid at 4^3 in every preset,
    and ``--model`` still overrides it."""
    from services.medical_imaging.app.networks import MedicalHybridConfig

    for preset in ("quick", "full"):
        cfg = train_mod.build_config(
            train_mod.build_parser().parse_args(
                ["--dataset", "adrenalmnist3d", "--preset", preset, "--data-dir", str(data_dir)]
            )
        )
        assert cfg.model["stem_stride"] == 2 and cfg.threshold_rule == "argmax"
        assert MedicalHybridConfig.from_dict({**cfg.model, "img_size": 64, "spatial_dims": 3}).grid == 4
    args = ["--dataset", "adrenalmnist3d", "--model", '{"stem_stride": 1}', "--data-dir", str(data_dir)]
    assert train_mod.build_config(train_mod.build_parser().parse_args(args)).model["stem_stride"] == 1
    two_d = ["--dataset", "pneumoniamnist", "--data-dir", str(data_dir)]
    assert "stem_stride" not in train_mod.build_config(train_mod.build_parser().parse_args(two_d)).model


def test_ensemble_artifact_averages_its_members(trained_model_dir: Path, data_dir: Path) -> None:
    """The 2-D fixture is a 2-member deep ensemble: seeds differ, the artifact's network averages them."""
    import torch
    from backbone.ensemble import DeepEnsemble

    from pipelines.medical_imaging.metrics import softmax
    from services.medical_imaging.app.networks import load_network

    art = latest_artifact(trained_model_dir, "medical_imaging", "pneumoniamnist")
    assert art.config["ensemble_size"] == 2 and art.config["threshold_rule"] == "argmax"
    assert 0.0 < art.config["threshold"] < 1.0
    members = art.metrics["members"]
    assert [m["seed"] for m in members] == [0, 1] and all(m["epochs_run"] >= 1 for m in members)
    assert art.metrics["test_by_rule"]["argmax"]["threshold"] == 0.5
    assert art.config["threshold"] == 0.5
    boot = art.metrics["youden_bootstrap"]
    assert 0 < boot["p5"] <= boot["p50"] <= boot["p95"] < 1 and boot["resamples"] == 200
    assert "MC-dropout" in art.metrics["served"] and "auc" in art.metrics["test_single_pass"]
    net = load_network(art)
    assert isinstance(net, DeepEnsemble) and len(net.members) == 2
    x = load_npz(resolve_npz(data_dir, "pneumoniamnist")).images["val"][:32]
    x_t = torch.from_numpy(x)
    with torch.no_grad():
        p_members = [softmax(m(x_t).numpy()) for m in net.members]
        p_ens = softmax(net(x_t).numpy())
    assert not np.allclose(p_members[0], p_members[1])  # independently trained
    np.testing.assert_allclose(p_ens, (p_members[0] + p_members[1]) / 2, atol=1e-5)
    assert net.last_gate is not None and net.last_gate.shape[0] == 32


def test_threshold_rules() -> None:
    from pipelines.medical_imaging.calibrate import decision_threshold, youden_threshold

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p1 = 1 / (1 + np.exp(-(2.0 * y - 1 + rng.normal(0, 1.5, 200) - 0.7)))
    probs = np.stack([1 - p1, p1], axis=1)
    assert decision_threshold(probs, y, "argmax") == 0.5
    youden = decision_threshold(probs, y, "youden")
    assert youden == youden_threshold(probs, y) and 0 < youden < 1 and youden != 0.5
    with pytest.raises(ValueError, match="threshold rule"):
        decision_threshold(probs, y, "best_on_test")


def test_calibrate_cli_sets_a_new_operating_point(
    trained_model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``calibrate`` refits temperature and threshold on validation into a new version, same weights."""
    import shutil

    from pipelines.medical_imaging import calibrate as calibrate_mod

    model_dir = tmp_path / "models"
    shutil.copytree(trained_model_dir, model_dir)
    before = latest_artifact(model_dir, "medical_imaging", "adrenalmnist3d")
    calibrate_mod.main(
        ["--dataset", "adrenalmnist3d", "--threshold-rule", "youden", "--model-dir", str(model_dir),
         "--data-dir", str(data_dir), "--mc-samples", "2", "--tta-views", "1"]
    )  # fmt: skip
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    after = latest_artifact(model_dir, "medical_imaging", "adrenalmnist3d")
    assert after.version != before.version and after.config["calibrated_from"] == before.version
    assert after.config["threshold"] == out["threshold"] and after.config["threshold_rule"] == "youden"
    assert 0 < after.config["threshold"] < 1 and before.config["threshold"] == 0.5  # argmax, the default
    weights = "weights.safetensors"
    assert (after.path / weights).read_bytes() == (before.path / weights).read_bytes()
    verify_artifact(after)
