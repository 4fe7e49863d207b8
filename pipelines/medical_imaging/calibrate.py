"""Post-hoc calibration on the validation split: temperature scaling and the decision threshold.

    python -m pipelines.medical_imaging.calibrate --dataset adrenalmnist3d

Loads the newest artifact, fits the temperature (NLL) and, for binary tasks, the threshold that maximises
Youden's J (sensitivity + specificity - 1) on the validation split only, and saves a new artifact version
with the same weights and the updated config. Training runs the same step, so this is for older artifacts.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from backbone.artifacts import latest_artifact, save_artifact
from backbone.service.config import default_data_dir, default_model_dir
from sklearn.metrics import roc_curve

from pipelines.medical_imaging.data import load_npz, resolve_npz
from pipelines.medical_imaging.metrics import classification_metrics, fit_temperature, softmax


def youden_threshold(probs: np.ndarray, labels: np.ndarray) -> float:
    """Threshold on P(class 1) maximising sensitivity + specificity - 1 (0.5 for multi-class)."""
    if probs.shape[1] != 2 or len(np.unique(labels)) < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(labels, probs[:, 1])
    best = int(np.argmax(tpr - fpr))
    return float(np.clip(thr[best], 1e-4, 1 - 1e-4))


def calibrate_logits(val_logits: np.ndarray, y_val: np.ndarray) -> tuple[float, float]:
    """(temperature, threshold) fitted on validation logits."""
    temperature = fit_temperature(val_logits, y_val)
    return temperature, youden_threshold(softmax(val_logits, temperature), y_val)


def main(argv: list[str] | None = None) -> None:
    from pipelines.medical_imaging.evaluate import load_artifact_model
    from pipelines.medical_imaging.train import DOMAIN, predict_logits

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="pneumoniamnist")
    parser.add_argument("--npz", default=None)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("DATA_DIR", default_data_dir())))
    parser.add_argument(
        "--model-dir", type=Path, default=Path(os.environ.get("MODEL_DIR", default_model_dir()))
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    name = Path(args.npz).stem if args.npz else args.dataset
    npz = Path(args.npz) if args.npz else resolve_npz(args.data_dir, args.dataset)
    art = latest_artifact(args.model_dir, DOMAIN, name)
    model = load_artifact_model(art)
    data = load_npz(npz, name)
    x_va, y_va = data.images["val"], data.labels["val"]
    val_logits = predict_logits(model, x_va)
    temperature, threshold = calibrate_logits(val_logits, y_va)
    config = dict(
        art.config,
        temperature=temperature,
        threshold=threshold,
        threshold_rule="youden_on_val",
        calibrated_from=art.version,
    )
    metrics = dict(art.metrics)
    metrics["val"] = classification_metrics(softmax(val_logits, temperature), y_va, threshold)
    metrics["temperature"] = temperature
    metrics["threshold"] = threshold
    test_probs = softmax(predict_logits(model, data.images["test"]), temperature)
    metrics["test"] = classification_metrics(test_probs, data.labels["test"], threshold)
    new = save_artifact(
        args.model_dir,
        DOMAIN,
        name,
        config=config,
        metrics=metrics,
        data_files=[npz],
        tensors=art.load_tensors(),
    )
    print(
        json.dumps(
            {"artifact": str(new.path), "temperature": temperature, "threshold": threshold, **metrics["test"]}
        )
    )


if __name__ == "__main__":
    main()
