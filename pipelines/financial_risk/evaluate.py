"""Evaluate the newest fraud or credit artifact on its protocol's test data.

    python -m pipelines.financial_risk.evaluate --task fraud|credit [--json] [--out reports/financial_risk]

Fraud: the handbook protocol (test week 2018-08-08..14 after a 7-day gap; features from the
streaming engine, labels only via the delayed feedback path): ``auc``, ``average_precision``,
``card_precision_at_100``. Credit: the fixed stratified 20 % test split: ``auc``.
Writes ROC and precision-recall curves (PNG) and ``<task>_report.json``; the last stdout line
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from backbone.artifacts import latest_artifact, verify_artifact  # noqa: E402
from backbone.cli import run_cli  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve  # noqa: E402

from pipelines.financial_risk.common import (  # noqa: E402
    CREDIT_NAME,
    DOMAIN,
    FRAUD_NAME,
    FRAUD_PRESETS,
    FraudPreset,
    build_fraud_data,
    credit_frame,
    credit_split,
    fraud_metrics,
)
from pipelines.financial_risk.data import CREDIT_TARGET, default_data_dir  # noqa: E402
from pipelines.financial_risk.train import default_model_dir  # noqa: E402
from services.financial_risk.app.model import LgbmScorer  # noqa: E402
from services.financial_risk.explain import contributions, top_k_agreement  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("pipelines.financial_risk.evaluate")


def plot_curves(y: np.ndarray, scores: np.ndarray, out_dir: Path, prefix: str, title: str) -> list[str]:
    """ROC and precision-recall curves as PNG files; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fpr, tpr, _ = roc_curve(y, scores)
    prec, rec, _ = precision_recall_curve(y, scores)
    paths = []
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUC {roc_auc_score(y, scores):.3f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{title}: ROC")
    ax.legend(loc="lower right")
    p = out_dir / f"{prefix}_roc.png"
    fig.savefig(p, dpi=110, bbox_inches="tight")
    plt.close(fig)
    paths.append(str(p))
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(rec, prec)
    ax.axhline(float(np.mean(y)), color="k", ls="--", lw=0.8, label=f"base rate {np.mean(y):.4f}")
    ax.set(xlabel="recall", ylabel="precision", title=f"{title}: precision-recall")
    ax.legend(loc="upper right")
    p = out_dir / f"{prefix}_pr.png"
    fig.savefig(p, dpi=110, bbox_inches="tight")
    plt.close(fig)
    paths.append(str(p))
    return paths


def reason_agreement(scorer: LgbmScorer, x: np.ndarray, n: int = 1000, seed: int = 0) -> dict:
    """How the served decision-path reason codes agree with exact TreeSHAP on ``n`` sampled rows, and
    what each costs per row (single thread)."""
    rng = np.random.default_rng(seed)
    rows = x[rng.choice(len(x), size=min(n, len(x)), replace=False)]
    t0 = time.process_time()
    path = contributions(scorer.booster, rows, "path", scorer.paths)
    t1 = time.process_time()
    shap = contributions(scorer.booster, rows, "shap")
    t2 = time.process_time()
    return {
        "rows": len(rows),
        **top_k_agreement(path, shap, k=5),
        "path_us_per_row": round((t1 - t0) / len(rows) * 1e6, 1),
        "shap_us_per_row": round((t2 - t1) / len(rows) * 1e6, 1),
    }


def evaluate_fraud(data_dir: Path, model_dir: Path, out_dir: Path) -> dict:
    art = latest_artifact(model_dir, DOMAIN, FRAUD_NAME)
    verify_artifact(art)
    cfg = art.config
    preset = FraudPreset(**cfg["preset"]) if "preset" in cfg else FRAUD_PRESETS["full"]
    scorer = LgbmScorer.load(art)  # what the service serves: LightGBM (+ the MoE blend when trained)
    data = build_fraud_data(data_dir, preset)
    if data.feature_names != cfg["feature_names"]:
        raise ValueError("the artifact's features differ from the engine's; retrain the model")
    scores, _ = scorer.predict(data.x_test)
    metrics = fraud_metrics(scores, data)
    metrics["lgbm_only_auc"] = float(roc_auc_score(data.y_test, scorer.booster.predict(data.x_test)))
    metrics["reason_codes"] = reason_agreement(scorer, data.x_test)
    thr = float(cfg.get("threshold", 0.5))
    alerts = scores >= thr
    metrics.update(
        {
            "threshold": thr,
            "alert_rate": float(alerts.mean()),
            "precision_at_threshold": float(data.y_test[alerts].mean()) if alerts.any() else float("nan"),
            "recall_at_threshold": float(alerts[data.y_test == 1].mean()),
        }
    )
    plots = plot_curves(data.y_test, scores, out_dir, "fraud", "fraud (test week 2018-08-08..14)")
    return {
        "task": "fraud",
        "model_version": art.version,
        "preset": preset.name,
        **metrics,
        "plots": plots,
        "protocol": cfg.get("protocol"),
        "handbook_baselines": {"auc": 0.871, "average_precision": 0.658, "card_precision_at_100": 0.291},
    }


def evaluate_credit(data_dir: Path, model_dir: Path, out_dir: Path) -> dict:
    art = latest_artifact(model_dir, DOMAIN, CREDIT_NAME)
    verify_artifact(art)
    cfg = art.config
    scorer = LgbmScorer.load(art)
    _, test = credit_split(data_dir)
    x = credit_frame(test)[cfg["feature_names"]].to_numpy()
    scores, _ = scorer.predict(x)
    y = test[CREDIT_TARGET].to_numpy()
    plots = plot_curves(y, scores, out_dir, "credit", "credit (taiwan_default 20% test)")
    return {
        "task": "credit",
        "model_version": art.version,
        "auc": float(roc_auc_score(y, scores)),
        "n_test": int(len(y)),
        "reason_codes": reason_agreement(scorer, x),
        "split": cfg.get("split"),
        "plots": plots,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["fraud", "credit"], default="fraud")
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--model-dir", type=Path, default=default_model_dir())
    p.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "financial_risk")
    p.add_argument("--json", action="store_true", help="(the last line is JSON in any case)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fn = evaluate_fraud if args.task == "fraud" else evaluate_credit
    report = fn(args.data_dir, args.model_dir, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.task}_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    run_cli(main)
