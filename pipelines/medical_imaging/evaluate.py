"""Evaluate the newest (or a given) medical-imaging artifact on the official test split.

    python -m pipelines.medical_imaging.evaluate --dataset pneumoniamnist --json
    python -m pipelines.medical_imaging.evaluate --npz /path/to/nodulemnist3d.npz --json

Writes ROC and reliability diagrams (PNG) and a JSON report under ``reports/medical_imaging/<dataset>/``;
the last stdout line is one JSON object with ``auc``, ``acc``, ``ece`` of what the service reports by
default (the temperature-scaled mean over MC-dropout x TTA passes, at the service's default counts), and
``single_pass`` (one deterministic pass). ``--mc-samples 1 --tta-views 1``: single pass only (fast).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from backbone.artifacts import Artifact, latest_artifact, load_artifact
from backbone.cli import run_cli
from backbone.service.config import REPO_ROOT, default_data_dir, default_model_dir

from pipelines.medical_imaging.data import load_npz, resolve_npz
from pipelines.medical_imaging.metrics import (
    classification_metrics,
    plot_reliability,
    plot_roc,
    review_flag_metrics,
    softmax,
)
from pipelines.medical_imaging.train import DOMAIN, predict_logits
from services.medical_imaging.app.core.config import Settings
from services.medical_imaging.app.networks import load_network
from services.medical_imaging.app.uncertainty import served_probabilities, served_samples

SERVICE_DEFAULTS = Settings()


def evaluate(
    artifact: Artifact,
    npz: Path,
    out_dir: Path,
    *,
    mc_samples: int = SERVICE_DEFAULTS.mc_samples,
    tta_views: int = SERVICE_DEFAULTS.tta_views,
    max_n: int | None = None,
    mc_draws: int = 0,
) -> dict[str, object]:
    """Metrics, plots and the JSON report for ``artifact`` on the test split of ``npz``.

    The headline ``auc`` / ``acc`` / ``ece`` score what the service reports by default: the mean over
    ``mc_samples`` x ``tta_views`` passes (the service's defaults), at the artifact's temperature and
    threshold.
    ``single_pass`` holds the same metrics for one deterministic pass (the service with uncertainty off).
    ``mc_samples = tta_views = 1`` makes the single pass the headline.
    """
    cfg = artifact.config
    data = load_npz(npz, cfg["dataset"])
    x, y = data.images["test"], data.labels["test"]
    if max_n is not None:
        x, y = x[:max_n], y[:max_n]
    model = load_network(artifact)
    t = float(cfg.get("temperature", 1.0))
    threshold = float(cfg.get("threshold", 0.5))
    logits = predict_logits(model, x)
    single = softmax(logits, t)
    if mc_samples * tta_views > 1:
        samples = served_samples(model, x, t, mc_samples, tta_views)
        served = np.stack([s.mean(axis=0) for s in samples])
    else:
        samples, served = [], single
    result: dict[str, object] = {
        "dataset": cfg["dataset"],
        "model": artifact.name,
        "version": artifact.version,
        "split": "test",
        "prediction": f"mean of {mc_samples} MC-dropout x {tta_views} TTA passes (the service's default)",
        **classification_metrics(served, y, threshold),
        "threshold": threshold,
        "temperature": t,
        "ensemble_size": int(cfg.get("ensemble_size", 1)),
        "single_pass": classification_metrics(single, y, threshold),
        "uncalibrated_single_pass": classification_metrics(softmax(logits), y),  # T = 1, threshold 0.5
    }
    if samples:  # the service's review flag on these studies (at its default limits)
        result["review_flag"] = review_flag_metrics(
            samples, y, threshold, SERVICE_DEFAULTS.review_entropy, SERVICE_DEFAULTS.review_std
        )
    if mc_draws and mc_samples * tta_views > 1:  # how much the served metrics depend on the MC draw
        draws = [
            classification_metrics(
                served_probabilities(model, x, t, mc_samples, tta_views, draw=d), y, threshold
            )
            for d in range(1, mc_draws + 1)
        ]
        result["mc_draws"] = {
            key: {
                "values": [r[key] for r in draws],
                "mean": float(np.mean([r[key] for r in draws])),
                "sd": float(np.std([r[key] for r in draws], ddof=1)) if len(draws) > 1 else 0.0,
            }
            for key in ("auc", "acc", "ece")
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_roc(served, y, out_dir / "roc.png", f"{cfg['dataset']} test ROC")
    plot_reliability(
        served, y, out_dir / "reliability.png", f"{cfg['dataset']} test reliability (served, T={t:.2f})"
    )
    plot_reliability(single, y, out_dir / "reliability_single_pass.png", f"{cfg['dataset']} single pass")
    result["plots"] = sorted(str(p) for p in out_dir.glob("*.png"))
    (out_dir / "report.json").write_text(json.dumps(result, indent=2))
    result["report"] = str(out_dir / "report.json")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="pneumoniamnist")
    parser.add_argument("--npz", default=None, help="any MedMNIST-layout npz (artifact name = file stem)")
    parser.add_argument("--artifact", type=Path, default=None, help="an artifact directory (default: newest)")
    parser.add_argument(
        "--mc-samples",
        type=int,
        default=SERVICE_DEFAULTS.mc_samples,
        help="MC-dropout passes (service default)",
    )
    parser.add_argument(
        "--tta-views", type=int, default=SERVICE_DEFAULTS.tta_views, help="TTA views (1 + 1: single pass)"
    )
    parser.add_argument("--max-n", type=int, default=None)
    parser.add_argument(
        "--mc-draws", type=int, default=0, help="also score N other MC draws (mean / sd of auc, acc, ece)"
    )
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON line (last line)")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("DATA_DIR", default_data_dir())))
    parser.add_argument(
        "--model-dir", type=Path, default=Path(os.environ.get("MODEL_DIR", default_model_dir()))
    )
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), int(os.environ.get("TORCH_THREADS", "1")))))
    name = Path(args.npz).stem if args.npz else args.dataset
    npz = Path(args.npz) if args.npz else resolve_npz(args.data_dir, args.dataset)
    artifact = (
        load_artifact(args.artifact) if args.artifact else latest_artifact(args.model_dir, DOMAIN, name)
    )
    out_dir = args.out_dir or (REPO_ROOT / "reports" / DOMAIN / name)
    result = evaluate(
        artifact,
        npz,
        out_dir,
        mc_samples=args.mc_samples,
        tta_views=args.tta_views,
        max_n=args.max_n,
        mc_draws=args.mc_draws,
    )
    if not args.json:
        for key in ("auc", "acc", "ece", "sensitivity", "specificity"):
            if key in result:
                print(f"{key:12s} {result[key]:.4f}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    run_cli(main)
