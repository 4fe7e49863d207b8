"""Evaluate the newest (or a given) medical-imaging artifact on the official test split.

    python -m pipelines.medical_imaging.evaluate --dataset pneumoniamnist --json
    python -m pipelines.medical_imaging.evaluate --npz /path/to/nodulemnist3d.npz --json

Writes ROC and reliability diagrams (PNG) and a JSON report under ``reports/medical_imaging/<dataset>/``;
the last stdout line is one JSON object with ``auc``, ``acc``, ``ece`` (temperature-scaled
probabilities, the ones the service reports) and the same for the MC-dropout x TTA mean with ``--mc``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from backbone.artifacts import Artifact, latest_artifact, verify_artifact
from backbone.registry import create_model
from backbone.service.config import REPO_ROOT, default_data_dir, default_model_dir
from tqdm import tqdm

from pipelines.medical_imaging.data import load_npz, resolve_npz
from pipelines.medical_imaging.metrics import classification_metrics, plot_reliability, plot_roc, softmax
from pipelines.medical_imaging.train import DOMAIN, predict_logits
from services.medical_imaging.app import networks  # noqa: F401
from services.medical_imaging.app.uncertainty import sample_probabilities


def load_artifact_model(artifact: Artifact) -> torch.nn.Module:
    verify_artifact(artifact)
    cfg = artifact.config
    model = create_model(cfg["family"], **cfg["model"])
    model.load_state_dict(artifact.load_tensors(), strict=True)
    return model.eval()


def evaluate(
    artifact: Artifact,
    npz: Path,
    out_dir: Path,
    *,
    mc: bool = False,
    mc_samples: int = 4,
    tta_views: int = 4,
    max_n: int | None = None,
) -> dict[str, object]:
    """Metrics, plots and the JSON report for ``artifact`` on the test split of ``npz``."""
    cfg = artifact.config
    data = load_npz(npz, cfg["dataset"])
    x, y = data.images["test"], data.labels["test"]
    if max_n is not None:
        x, y = x[:max_n], y[:max_n]
    model = load_artifact_model(artifact)
    logits = predict_logits(model, x)
    t = float(cfg.get("temperature", 1.0))
    probs = softmax(logits, t)
    result: dict[str, object] = {
        "dataset": cfg["dataset"],
        "model": artifact.name,
        "version": artifact.version,
        "split": "test",
        **classification_metrics(probs, y, cfg.get("threshold", 0.5)),
    }
    result["uncalibrated"] = classification_metrics(softmax(logits), y)  # T = 1, threshold 0.5
    result["temperature"] = t
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_roc(probs, y, out_dir / "roc.png", f"{cfg['dataset']} test ROC")
    plot_reliability(probs, y, out_dir / "reliability.png", f"{cfg['dataset']} test reliability (T={t:.2f})")
    if mc:
        mc_probs = []
        for i in tqdm(range(len(y)), desc="MC dropout x TTA", file=sys.stderr):
            s = sample_probabilities(
                model,
                torch.from_numpy(x[i : i + 1]),
                mc_samples=mc_samples,
                tta_views_n=tta_views,
                temperature=t,
            )
            mc_probs.append(s.mean(axis=0))
        mcp = np.stack(mc_probs)
        result["mc_tta"] = {
            "mc_samples": mc_samples,
            "tta_views": tta_views,
            **classification_metrics(mcp, y, cfg.get("threshold", 0.5)),
        }
        plot_reliability(mcp, y, out_dir / "reliability_mc_tta.png", f"{cfg['dataset']} MC dropout x TTA")
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
    parser.add_argument("--mc", action="store_true", help="also evaluate the MC dropout x TTA mean")
    parser.add_argument("--max-n", type=int, default=None)
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
    if args.artifact:
        from backbone.artifacts import Artifact as _A

        artifact = _A(args.artifact, json.loads((args.artifact / "manifest.json").read_text()))
    else:
        artifact = latest_artifact(args.model_dir, DOMAIN, name)
    out_dir = args.out_dir or (REPO_ROOT / "reports" / DOMAIN / name)
    result = evaluate(artifact, npz, out_dir, mc=args.mc, max_n=args.max_n)
    if not args.json:
        for key in ("auc", "acc", "ece", "sensitivity", "specificity"):
            if key in result:
                print(f"{key:12s} {result[key]:.4f}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
