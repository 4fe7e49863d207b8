"""K-fold cross-validation of the NEU classifier on train + val: each seed alone and the seeds averaged.

    python -m pipelines.manufacturing.classifier_cv [--seeds 0,1] [--folds 4] [--run-folds 0,2]

The validation part (360 images) is saturated at 2-3 errors for every variant and cannot rank them; this
study pools train + val (1,440 images), cuts it into ``--folds`` class-stratified folds (a seeded shuffle
per class) and, for each fold of ``--run-folds``, trains one classifier per seed on the other folds (the
preset's settings and epoch count, no selection: the held-out fold is never used for a choice) and scores
the held-out fold. Reported per seed and for the mean of the seeds' class distributions (the served
``DefectNetEnsemble``): errors, accuracy and NLL over the held-out images, per fold, and the misclassified
files. The test part is never read. Writes ``classifier_cv.json`` and a PNG of errors per fold to the
report dir; last stdout line: JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from backbone.cli import run_cli

from pipelines.manufacturing.common import (
    PRESETS,
    default_data_dir,
    default_report_dir,
    limit_per_class,
    parse_study_args,
    predict_logits,
    save_plot,
    train_classifier,
    write_study,
)
from pipelines.manufacturing.data import NEU_CLASSES, load_neu, neu_label, neu_split
from services.manufacturing.app.modeling import DefectNetConfig, create_defectnet

FOLD_SEED = 123


def stratified_folds(labels: np.ndarray, folds: int, seed: int = FOLD_SEED) -> np.ndarray:
    """Fold index of each row: per class (in label order) a seeded shuffle cut into ``folds`` near-equal
    parts."""
    rng = np.random.default_rng(seed)
    fold_of = np.zeros(len(labels), dtype=int)
    for c in np.unique(labels):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        for k, part in enumerate(np.array_split(idx, folds)):
            fold_of[part] = k
    return fold_of


def _summary(probs: np.ndarray, y: np.ndarray, files: list[str]) -> dict[str, Any]:
    wrong = np.where(probs.argmax(1) != y)[0]
    return {
        "errors": len(wrong),
        "accuracy": round(1 - len(wrong) / len(y), 4),
        "nll": round(float(-np.log(probs[np.arange(len(y)), y] + 1e-12).mean()), 4),
        "misclassified": [f"{Path(files[i]).stem} -> {NEU_CLASSES[int(probs[i].argmax())]}" for i in wrong],
    }


def _plot(path: Path, result: dict[str, Any]) -> None:
    names = [*result["seeds"], "ensemble"]
    rows = [*result["seeds"].values(), result["ensemble"]]
    folds = result["run_folds"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    width = 0.8 / len(names)
    for i, (name, row) in enumerate(zip(names, rows, strict=True)):
        ax.bar(np.arange(len(folds)) + i * width, row["errors_per_fold"], width,
               label=f"{'seed ' + name if name != 'ensemble' else 'mean of the seeds'}: {row['errors']}")
    ax.set_xticks(np.arange(len(folds)) + 0.4 - width / 2, [f"fold {k}" for k in folds])
    save_plot(fig, ax, path, "held-out fold (train + val pooled)", "misclassified images",
              f"NEU classifier, {result['folds']}-fold CV ({result['n']} held-out images)")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    p.add_argument("--seeds", default="0,1", help="one classifier per seed and fold; the ensemble averages")
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--run-folds", default=None, help="which folds to hold out (default: all)")
    args = parse_study_args(p, argv)
    preset = PRESETS[args.preset]
    if args.epochs is not None:
        preset = dataclasses.replace(preset, epochs=args.epochs)
    seeds = [int(s) for s in args.seeds.split(",")]
    run_folds = [int(k) for k in args.run_folds.split(",")] if args.run_folds else list(range(args.folds))
    if args.folds < 2 or any(not 0 <= k < args.folds for k in run_folds):
        raise ValueError(f"--run-folds must lie in 0..{args.folds - 1} and --folds be at least 2")
    data_dir = args.data_dir or default_data_dir()
    split = neu_split(data_dir)
    files = [f for part in ("train", "val")
             for f in limit_per_class(split[part], neu_label, preset.per_class_limit)]
    data = load_neu(data_dir, files, preset.image_size)
    y = data.y.numpy()
    fold_of = stratified_folds(y, args.folds)
    cfg = DefectNetConfig.from_dict({**(preset.model_overrides or {}), "image_size": preset.image_size})
    probs = {s: np.full((len(files), len(NEU_CLASSES)), np.nan) for s in seeds}
    for k in run_folds:
        fit, held = fold_of != k, fold_of == k
        for s in seeds:
            model = create_defectnet("teacher", cfg)
            train_classifier(model, (data.x[fit], data.y[fit]), (data.x[held], data.y[held]), preset, seed=s,
                             progress=not args.no_progress, desc=f"fold {k} seed {s}", select=False)
            probs[s][held] = predict_logits(model, data.x[held]).softmax(1).numpy()
    rows = np.isin(fold_of, run_folds)
    held_files = [f for f, r in zip(files, rows, strict=True) if r]

    def summary(p: np.ndarray) -> dict[str, Any]:
        out = _summary(p[rows], y[rows], held_files)
        out["errors_per_fold"] = [int((p[fold_of == k].argmax(1) != y[fold_of == k]).sum())
                                  for k in run_folds]
        return out

    result: dict[str, Any] = {
        "preset": args.preset, "epochs": preset.epochs, "image_size": preset.image_size, "folds": args.folds,
        "run_folds": run_folds, "fold_seed": FOLD_SEED, "n": int(rows.sum()),
        "seeds": {str(s): summary(probs[s]) for s in seeds},
        "ensemble": summary(np.mean([probs[s] for s in seeds], axis=0)),
    }  # fmt: skip
    write_study(args.report_dir or default_report_dir(), "classifier_cv", result, _plot)
    return 0


if __name__ == "__main__":
    run_cli(main)
