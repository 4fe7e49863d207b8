"""Train the manufacturing models on the real data and save them as artifacts.

    python -m pipelines.manufacturing.train --preset quick            # classifier + base model + anomaly bank
    python -m pipelines.manufacturing.train --task classify           # full NEU classifier
    python -m pipelines.manufacturing.train --task anomaly_base       # self-supervised base model (tiles)
    python -m pipelines.manufacturing.train --task anomaly            # magnetic-tile memory bank
    python -m pipelines.manufacturing.train --task edge               # distilled student + INT8

Artifacts (``<MODEL_DIR>/manufacturing/<name>/<version>/``): ``defect_classifier`` (timm trunk + backbone
sparse-attention/MoE stage, NEU six classes), ``anomaly_base_model`` (U-Net trained self-supervised on
defect-free tiles with synthetic anomalies), ``anomaly_magnetic_tile`` (PatchCore memory bank of defect-free
tiles on the configured extractor, with its calibrated threshold) and ``defect_student``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from backbone.artifacts import Artifact, latest_artifact, load_artifact, save_artifact
from backbone.cli import run_cli
from safetensors.torch import save as st_save

from pipelines.manufacturing.anomaly_base import base_models_for, train_anomaly_base
from pipelines.manufacturing.common import (
    ANOMALY,
    CLASSIFIER,
    DOMAIN,
    PRESETS,
    Preset,
    accuracy,
    default_data_dir,
    default_model_dir,
    extract,
    limit_per_class,
    set_threads,
    train_members,
)
from pipelines.manufacturing.data import (
    NEU_CLASSES,
    NEU_SPLIT_FILE,
    load_mt,
    load_neu,
    mt_split,
    neu_label,
    neu_split,
)
from services.manufacturing.app.modeling import DefectNetConfig, create_defectnet
from services.manufacturing.app.patchcore import (
    MemoryBank,
    PatchCoreConfig,
    calibrate,
    make_extractor,
)

log = logging.getLogger("pipelines.manufacturing.train")


def train_classify(preset: Preset, data_dir: Path, model_dir: Path, seed: int, progress: bool) -> Artifact:
    """Train the NEU classifier on the kept split's train part, select on val, report test; save."""
    split = neu_split(data_dir)
    size = preset.image_size
    tr_files = limit_per_class(split["train"], neu_label, preset.per_class_limit)
    va_files = limit_per_class(split["val"], neu_label, preset.per_class_limit)
    te_files = limit_per_class(split["test"], neu_label, preset.per_class_limit)
    tr, va, te = (load_neu(data_dir, f, size) for f in (tr_files, va_files, te_files))
    cfg = DefectNetConfig.from_dict({**(preset.model_overrides or {}), "image_size": size})
    model, info = train_members(lambda: create_defectnet("teacher", cfg), (tr.x, tr.y), (va.x, va.y),
                                preset, seed=seed, progress=progress, desc="classifier")
    fit_files = tr_files + va_files if preset.refit_train_val else tr_files
    seconds = info["train_seconds"]
    test_acc = accuracy(model, te.x, te.y)
    metrics = {
        "val_accuracy": info["best_val_accuracy"],  # of the selection run (a refit model has seen val)
        "test_accuracy": test_acc,
        "best_epoch": info["best_epoch"],
        "refit_train_val": preset.refit_train_val,
        "train_seconds": round(seconds, 1),
        "n_train": len(fit_files),
        "members": info["members"],
        "history": info["history"],
    }
    if info["members"] > 1:
        metrics["member_test_accuracy"] = [accuracy(m, te.x, te.y) for m in model.members]
    print(f"classifier: val_acc {info['best_val_accuracy']:.4f} test_acc {test_acc:.4f} "
          f"({info['members']} member(s), {seconds:.0f}s"
          f"{', refit on train + val' if preset.refit_train_val else ''})", file=sys.stderr)
    return save_artifact(
        model_dir, DOMAIN, CLASSIFIER,
        config={"model": cfg.to_dict(), "members": info["members"], "classes": list(NEU_CLASSES),
                "split_file": NEU_SPLIT_FILE.name, "preset": preset.__dict__, "seed": seed},
        metrics=metrics,
        data_files=[data_dir / "neu_det" / f for f in fit_files],
        tensors=model.state_dict(),
    )


def anomaly_config(preset: Preset, bases: Artifact | Sequence[Artifact] = ()) -> PatchCoreConfig:
    """The tile detector's PatchCore settings (selected on the validation part, see docs) on ``bases``."""
    pc = PatchCoreConfig(image_size=preset.anomaly_image_size, coreset_max=preset.coreset_max,
                         max_bank_input=preset.max_bank_input, **preset.anomaly_overrides)
    if pc.features == "learned":
        bases = [bases] if isinstance(bases, Artifact) else list(bases)
        if not bases:
            raise ValueError("features='learned' needs an anomaly base model artifact")
        pc.base_versions = tuple(b.version for b in bases)
    return pc


def train_anomaly(
    preset: Preset, data_dir: Path, model_dir: Path, classifier: Artifact, progress: bool,
    bases: Sequence[Artifact] = (),
) -> Artifact:
    """PatchCore memory bank of defect-free magnetic tiles on the configured extractor (the frozen
    self-supervised base models, the filter bank or the classifier's trunk); threshold from the held-out good
    (calibration) tiles."""
    from services.manufacturing.app.anomaly_net import load_base
    from services.manufacturing.app.model import load_classifier

    model, _ = load_classifier(classifier)
    split = mt_split(data_dir)
    pc = anomaly_config(preset, bases)
    nets = [load_base(b) for b in bases] if pc.features == "learned" else []
    ext = make_extractor(pc, model.trunk, nets)
    train_files = split["train_good"][: preset.anomaly_train_limit or None]
    calib_files = split["calib_good"][: preset.anomaly_calib_limit or None]
    x_tr, _ = load_mt(data_dir, train_files, pc.image_size)
    feats = extract(ext, x_tr)

    def report(frac: float, msg: str) -> None:
        if progress and msg.endswith("0") and int(frac * 20) % 5 == 0:
            print(f"anomaly: {msg}", file=sys.stderr)

    mb = MemoryBank.fit(feats, pc, report)
    bank = mb.bank
    x_cal, _ = load_mt(data_dir, calib_files, pc.image_size)
    peak, level, _ = mb.image_stats(extract(ext, x_cal))
    mb.fit_level(peak, level)  # the image score's level term (when the config has a level quantile)
    cal = calibrate(mb.combine(peak, level), pc.threshold_quantile)
    print(f"anomaly: bank {tuple(bank.shape)} threshold {cal.threshold:.4f}", file=sys.stderr)
    return save_artifact(
        model_dir, DOMAIN, ANOMALY,
        config={"patchcore": pc.to_dict(), "classifier_version": classifier.version,
                "classifier_path": str(classifier.path), "dataset": "magnetic_tile",
                "base_paths": [str(b.path) for b in bases] if nets else [],
                "n_train_images": len(train_files), "n_calib_images": len(calib_files)},
        metrics={"calibration": cal.to_dict(), "bank_size": int(bank.shape[0])},
        data_files=[data_dir / "magnetic_tile" / f for f in train_files + calib_files],
        binary_files={"bank.safetensors": st_save(mb.tensors())},
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--task", choices=["all", "classify", "anomaly_base", "anomaly", "edge"], default="all")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    p.add_argument("--image-size", type=int, default=None, help="override the classifier's input size")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--anomaly-set", action="append", default=[], metavar="KEY=JSON",
                   help="override a PatchCoreConfig field of the tile detector (value parsed as JSON, else a "
                        "string), e.g. patch_kernel=3 features=trunk border=0; repeatable, for ablations")
    p.add_argument("--base-set", action="append", default=[], metavar="KEY=JSON",
                   help="override a base_* preset field of the self-supervised base model (JSON value), e.g. "
                        "base_steps=1200; repeatable")
    p.add_argument("--set", dest="preset_set", action="append", default=[], metavar="KEY=JSON",
                   help="override any preset field (JSON value), e.g. zoom=0.7 epochs=40; repeatable")
    p.add_argument("--classifier", type=Path, default=None,
                   help="classifier artifact folder for --task anomaly / edge (default: the newest one)")
    p.add_argument("--base", type=Path, action="append", default=[],
                   help="anomaly base model artifact folder for --task anomaly, repeatable: their features "
                        "are concatenated (default: for each of the preset's anomaly_bases seeds from --seed "
                        "on, the newest base model of the preset's recipe in MODEL_DIR, trained if missing)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    set_threads()
    preset = PRESETS[args.preset]
    if args.epochs is not None:
        preset = Preset(**{**preset.__dict__, "epochs": args.epochs})
    if args.image_size is not None:
        preset = Preset(**{**preset.__dict__, "image_size": args.image_size})
    if args.anomaly_set:
        overrides = dict(preset.anomaly_overrides)
        for item in args.anomaly_set:
            key, _, value = item.partition("=")
            try:
                overrides[key] = json.loads(value)
            except json.JSONDecodeError:
                overrides[key] = value  # bare strings: features=trunk
        preset = Preset(**{**preset.__dict__, "anomaly_overrides": overrides})
    for flag, items, prefix in (("--base-set", args.base_set, "base_"), ("--set", args.preset_set, "")):
        fields = {}
        for item in items:
            key, _, value = item.partition("=")
            if not key.startswith(prefix) or key not in preset.__dict__:
                p.error(f"{flag}: unknown preset field {key!r}")
            fields[key] = json.loads(value)
        preset = Preset(**{**preset.__dict__, **fields})
    data_dir = args.data_dir or default_data_dir()
    model_dir = args.model_dir or default_model_dir()
    progress = not args.no_progress
    out: dict = {"preset": args.preset, "task": args.task}
    classifier: Artifact | None = None
    if args.task in ("all", "classify"):
        classifier = train_classify(preset, data_dir, model_dir, args.seed, progress)
        out["classifier"] = {
            "path": str(classifier.path), "test_accuracy": classifier.metrics["test_accuracy"]
        }
    bases: list[Artifact] = []
    learned = preset.anomaly_overrides.get("features") == "learned"
    if args.task == "anomaly_base":
        bases = [train_anomaly_base(preset, data_dir, model_dir, args.seed, progress)]
    elif args.task == "all" and learned:
        bases = [train_anomaly_base(preset, data_dir, model_dir, args.seed + i, progress)
                 for i in range(preset.anomaly_bases)]  # fmt: skip
    elif args.task == "anomaly" and learned:
        if args.base:
            bases = [load_artifact(b.resolve()) for b in args.base]
        else:
            bases = base_models_for(preset, data_dir, model_dir, args.seed, progress)
    if bases:
        out["anomaly_base"] = [{"path": str(b.path), **b.metrics} for b in bases]
    if classifier is None and args.classifier is not None:
        classifier = load_artifact(args.classifier.resolve())
    if args.task in ("all", "anomaly"):
        classifier = classifier or latest_artifact(model_dir, DOMAIN, CLASSIFIER)
        anomaly = train_anomaly(preset, data_dir, model_dir, classifier, progress, bases)
        out["anomaly"] = {"path": str(anomaly.path), "threshold": anomaly.metrics["calibration"]["threshold"]}
    if args.task in ("all", "edge") and (args.task == "edge" or preset.student_epochs):
        from pipelines.manufacturing.edge import train_edge

        classifier = classifier or latest_artifact(model_dir, DOMAIN, CLASSIFIER)
        student = train_edge(preset, data_dir, model_dir, classifier, args.seed, progress)
        out["student"] = {"path": str(student.path), **{k: student.metrics[k] for k in
                                                        ("student_test_accuracy", "int8_test_accuracy")}}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    run_cli(main)
