"""Model families through backbone's registry, calibration, and the pipelines on a user CSV."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from backbone.artifacts import latest_artifact
from backbone.registry import create_model, list_models, routing_stats

import services.forecasting.ml.models  # noqa: F401  (registers the families)
from pipelines.forecasting import evaluate, train
from pipelines.forecasting.common import run_cli
from services.forecasting.ml.data import load_ett, sliding_windows, split_windows
from services.forecasting.ml.training import CAL_LEVELS, TrainConfig, calibrate, fit, quantile_offsets
from services.forecasting.ml.training import evaluate as evaluate_model


def test_families_registered_and_built_from_backbone_blocks() -> None:
    assert {"patch_decay_forecaster", "dlinear_forecaster", "seasonal_naive_forecaster"} <= set(list_models())
    m = create_model("patch_decay_forecaster", lookback=64, horizon=12, d_model=8, n_heads=2, n_layers=2)
    kinds = {type(b).__name__ for b in m.blocks}
    assert kinds == {"TransformerBlock"}
    assert all(b.attn.cfg.kind == "temporal_decay" for b in m.blocks)
    assert all(float(b.attn.decay_rates().detach().min()) > 0 for b in m.blocks)
    x = torch.randn(3, 64, 5)
    assert m(x).shape == (3, 12, 5)
    stats = routing_stats(m)
    assert len(stats) == 2 and all(s for s in stats.values())
    with pytest.raises(TypeError, match="unknown option"):
        create_model("patch_decay_forecaster", nope=1)


def test_channel_independence_and_revin_equivariance() -> None:
    torch.manual_seed(0)
    m = create_model(
        "patch_decay_forecaster", lookback=64, horizon=8, d_model=8, n_heads=2, n_layers=1
    ).eval()
    with torch.no_grad():
        nn_head = m.head
        nn_head.weight.normal_(0, 0.05)  # make the transformer path matter
        x = torch.randn(2, 64, 3)
        y = m(x)
        x2 = x.clone()
        x2[:, :, 0] += torch.randn(2, 64)
        y2 = m(x2)
        assert torch.allclose(y[:, :, 1:], y2[:, :, 1:], atol=1e-5)  # other channels untouched
        assert not torch.allclose(y[:, :, 0], y2[:, :, 0])
        y3 = m(x * 7.0 + 100.0)
        assert torch.allclose(y3, y * 7.0 + 100.0, rtol=1e-3, atol=1e-2)  # RevIN: scale-free


def test_seasonal_naive_and_dlinear() -> None:
    sn = create_model("seasonal_naive_forecaster", lookback=48, horizon=30, period=24)
    x = torch.arange(48.0).view(1, 48, 1)
    out = sn(x)[0, :, 0]
    assert torch.equal(out[:24], torch.arange(24.0, 48.0)) and torch.equal(out[24:], torch.arange(24.0, 30.0))
    dl = create_model("dlinear_forecaster", lookback=48, horizon=12)
    assert dl(torch.randn(4, 48, 2)).shape == (4, 12, 2)


def test_warm_start_and_conformal_coverage(fc_data_dir: Path) -> None:
    split = load_ett(fc_data_dir, "ETTh1", 96)
    m = create_model("patch_decay_forecaster", lookback=96, horizon=24, d_model=8, n_heads=2, n_layers=1)
    x, y = sliding_windows(split.part("train"), 96, 24, stride=4)
    m.warm_start(x, y)
    xt, yt = sliding_windows(split.part("test"), 96, 24, stride=4)
    with torch.no_grad():
        pred = m.eval()(xt)
        last = xt[:, -1:, :].expand_as(yt)
    assert float(((pred - yt) ** 2).mean()) < 0.9 * float(((last - yt) ** 2).mean())
    table = calibrate(m, split, 24, stride=2)
    assert table.shape == (len(CAL_LEVELS), 24) and np.all(np.diff(table, axis=0) >= 0)
    lo, hi = quantile_offsets(table, [0.05, 0.95])
    sigma = xt.std(dim=1, keepdim=True, unbiased=False).clamp(min=1e-3)
    inside = (yt >= pred + sigma * torch.as_tensor(lo)[None, :, None]) & (
        yt <= pred + sigma * torch.as_tensor(hi)[None, :, None]
    )
    assert 0.8 < float(inside.float().mean()) < 0.98  # calibrated on val, measured on test


def test_artifact_metrics_and_evaluate_cli(fc_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    art = latest_artifact(fc_model_dir, "forecasting", "ETTh1_h96")
    assert art.config["family"] == "patch_decay_forecaster" and (art.path / "weights.safetensors").is_file()
    assert "dlinear" in art.metrics["baselines"]
    capsys.readouterr()
    out = evaluate.main(["--dataset", "ETTh1", "--horizon", "96", "--model-dir", str(fc_model_dir), "--json"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"dataset", "horizon", "mse", "mae", "coverage_90"} <= set(last) and last == json.loads(
        json.dumps(out)
    )
    assert last["dataset"] == "ETTh1" and last["n_windows"] == 14400 - 11520 - 96 + 1
    assert 0.7 < last["coverage_90"] < 0.99 and last["mse"] < 1.0
    assert "seasonal_naive(period=24)" in last["baselines"] and "dlinear" in last["baselines"]
    assert all(Path(p).is_file() for p in last["plots"])


def test_csi300_market_metrics(fc_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    evaluate.main(["--dataset", "CSI300", "--horizon", "5", "--model-dir", str(fc_model_dir), "--json"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["dataset"] == "CSI300" and 0.0 < last["mape"] < 10.0
    assert 0.3 < last["directional_accuracy"] < 0.7 and "last_value_mape" in last


def test_pipelines_on_a_user_csv(
    tmp_path: Path, fc_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = pd.read_csv(fc_data_dir / "ett" / "ETTm2.csv").iloc[:4000].rename(columns={"date": "when"})
    raw = raw.drop(index=[100, 101, 102])  # missing steps are inserted and interpolated
    path = tmp_path / "substation.csv"
    raw[["when", "OT", "HUFL"]].to_csv(path, index=False)
    common = ["--csv", str(path), "--date-col", "when", "--target", "OT,HUFL", "--horizon", "24"]
    md = ["--model-dir", str(tmp_path / "models")]
    res = train.main([*common, *md, "--preset", "tiny", "--no-progress"])
    assert res["dataset"] == "substation" and res["horizon"] == 24
    art = latest_artifact(tmp_path / "models", "forecasting", "substation_h24")
    assert art.config["columns"] == ["OT", "HUFL"] and art.config["freq_seconds"] == 900.0
    capsys.readouterr()
    evaluate.main([*common, *md, "--json", "--report-dir", str(tmp_path / "rep")])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["horizon"] == 24 and last["mse"] > 0 and "seasonal_naive(period=96)" in last["baselines"]


def test_pipelines_on_a_monthly_csv_and_a_too_short_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A month-start series with a day-first date column: calendar months, a yearly seasonal-naive baseline;
    a file too short for any lookback ends with the reason and exit status 2, not a traceback."""
    months = pd.date_range("2001-01-01", periods=240, freq="MS")
    rng = np.random.default_rng(0)
    sales = 100 + 10 * np.sin(2 * np.pi * np.arange(240) / 12) + rng.normal(0, 1, 240)
    path = tmp_path / "sales.csv"
    pd.DataFrame({"month": months.strftime("%d/%m/%Y"), "sales": sales}).to_csv(path, index=False)
    common = [
        "--csv",
        str(path),
        "--date-col",
        "month",
        "--horizon",
        "12",
        "--model-dir",
        str(tmp_path / "m"),
    ]
    train.main([*common, "--preset", "tiny", "--no-progress"])
    art = latest_artifact(tmp_path / "m", "forecasting", "sales_h12")
    assert art.config["calendar"] == "MS" and art.config["seasonal_period"] == 12
    capsys.readouterr()
    evaluate.main([*common, "--json", "--report-dir", str(tmp_path / "rep")])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "seasonal_naive(period=12)" in last["baselines"] and last["mse"] > 0
    short = tmp_path / "tiny.csv"
    pd.DataFrame({"month": months[:20], "sales": sales[:20]}).to_csv(short, index=False)
    argv = ["train", "--csv", str(short), "--date-col", "month", "--horizon", "12", "--preset", "tiny"]
    monkeypatch.setattr("sys.argv", [*argv, "--model-dir", str(tmp_path / "m")])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main)
    assert exit_info.value.code == 2 and "too few" in capsys.readouterr().err


def test_cycle_lookback_ensemble_and_residual_training(fc_data_dir: Path) -> None:
    """CycleNet-style daily cycle + linear paths on two look-backs (closed form, then frozen) + the
    transformer trained on the residual, its weight picked on validation."""
    split = load_ett(fc_data_dir, "ETTh1", 96)
    m = create_model(
        "patch_decay_forecaster",
        lookback=96,
        horizon=24,
        d_model=8,
        n_heads=2,
        n_layers=1,
        n_experts=2,
        expert_hidden=8,
        top_k=1,
        cycle_len=24,
        cycle_channels=7,
        skip_lookbacks=[48],
    )
    cfg = TrainConfig(
        epochs=1,
        samples_per_epoch=256,
        batch_size=64,
        freeze_linear=True,
        correction_weights=(0.0, 0.5, 1.0),
        progress=False,
    )
    hist = fit(m, split, 24, cfg)
    assert float(m.cycle.abs().mean()) > 0.05 and torch.allclose(m.cycle.mean(0), torch.zeros(7), atol=1e-4)
    assert not any(p.requires_grad for p in m.linear_parameters())
    assert m.cfg.correction_weight in (0.0, 0.5, 1.0) and hist["best_val_mse"] <= hist["warm_val_mse"]
    x, y, phase = split_windows(split, "test", 24, stride=8, cycle_len=24)
    start = split.borders["test"][0] + 8 * np.arange(len(x))
    assert np.array_equal(phase.numpy(), split.frame.index[start].hour.to_numpy())  # phase = hour of day
    with torch.no_grad():
        m.eval()
        with_cycle = float(((m(x, phase=phase) - y) ** 2).mean())
        shifted = float(((m(x, phase=(phase + 12) % 24) - y) ** 2).mean())
        assert m(x[:, :, :3]).shape == (len(x), 24, 3)  # other widths: no cycle, still a forecast
    assert with_cycle < shifted  # the cycle is aligned with the time of day
    metrics, _ = evaluate_model(m, split, 24, None, part="test", stride=8)
    assert metrics["mse"] == pytest.approx(with_cycle, rel=1e-5)


def test_linear_fine_tune_keeps_the_best_validation_point(fc_data_dir: Path) -> None:
    """The closed-form linear path fine-tuned with an L1 loss: the kept point is never worse on validation
    than the closed form, and ``forward_linear`` is the forecast without the transformer's correction."""
    split = load_ett(fc_data_dir, "ETTh1", 96)
    kw = {"lookback": 96, "horizon": 24, "d_model": 8, "n_heads": 2, "n_layers": 1, "n_experts": 2}
    m = create_model("patch_decay_forecaster", **kw, cycle_len=24, cycle_channels=7, skip_lookbacks=[48])
    cfg = TrainConfig(
        epochs=0, linear_epochs=1, linear_batch_size=256, linear_evals_per_epoch=2, progress=False
    )
    hist = fit(m, split, 24, cfg)
    closed = create_model("patch_decay_forecaster", **kw, cycle_len=24, cycle_channels=7, skip_lookbacks=[48])
    hist_closed = fit(closed, split, 24, TrainConfig(epochs=0, progress=False))
    assert hist["warm_val_mse"] <= hist_closed["warm_val_mse"] + 1e-6
    x, _, phase = split_windows(split, "val", 24, stride=16, cycle_len=24)
    with torch.no_grad():
        m.eval()
        m.cfg.correction_weight = 0.0
        assert torch.allclose(m.forward_linear(x, phase), m(x, phase=phase), atol=1e-5)
        loss = m.linear_training_loss(x[:8], x[:8, :24], "l1", phase[:8])
    assert float(loss) > 0


def test_sweep_backtest_and_last_value_prior(fc_data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The selection sweep's rolling-origin backtest scores five two-month folds inside train + val and the
    test part stays hidden; a huge ridge towards the last-value prior gives "repeat the last value"."""
    from pipelines.forecasting import sweep

    monkeypatch.setenv("DATA_DIR", str(fc_data_dir))
    rows = sweep.main(["--dataset", "ETTh1", "--horizon", "24", "--lookbacks", "96", "--ridges", "0.1",
                       "--cycles", "24", "--prior-lasts", "0,0.5", "--backtest", "--threads", "1"])
    singles = [r for r in rows if r["kind"] == "single"]
    assert [r.get("prior_last") for r in singles] == [None, 0.5]
    for r in singles:
        assert len(r["backtest_folds"]) == len(sweep.BACKTEST_ORIGINS)
        assert r["backtest_mse"] == pytest.approx(np.mean(r["backtest_folds"]), abs=1e-4)
        assert 0 < r["val_mse"] < 2 and not any(k.startswith("test") for k in r)
    assert singles[0]["val_mse"] != singles[1]["val_mse"]
    split = load_ett(fc_data_dir, "ETTh1", 96)
    x, y, first = sweep._windows(split, "train", 96, 24)
    sol = sweep._fit(x, y, first, None, ridge=1e6, prior_last=1.0)
    expected = torch.zeros_like(sol)
    expected[95] = 1.0
    torch.testing.assert_close(sol, expected, atol=1e-3, rtol=0)
