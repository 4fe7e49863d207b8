"""Edge export: a thin student distilled from the classifier (backbone KD loss), then INT8 (the CNN trunk
statically quantized, calibrated on training images; Linear layers dynamically; ``quantize_defectnet``);
accuracy, size and speed against the teacher."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from backbone.artifacts import Artifact, latest_artifact, load_artifact, save_artifact, verify_artifact
from backbone.distillation import kd_loss
from backbone.quantization import model_size_mb
from torch import nn

from pipelines.manufacturing.common import (
    CLASSIFIER,
    DOMAIN,
    STUDENT,
    Preset,
    accuracy,
    limit_per_class,
    predict_logits,
    train_select_refit,
)
from pipelines.manufacturing.data import NEU_CLASSES, load_neu, neu_label, neu_split
from services.manufacturing.app.model import load_classifier
from services.manufacturing.app.modeling import (
    DefectNet,
    DefectNetEnsemble,
    create_defectnet,
    quantize_defectnet,
    student_config,
)


def load_student(artifact: Artifact) -> DefectNet:
    """The fp32 student from its artifact (INT8 is derived with :func:`calibrated_int8` at load)."""
    verify_artifact(artifact)
    model = create_defectnet("student", student_config(**artifact.config["model"]))
    model.load_state_dict(artifact.load_tensors())
    return model.eval()


CALIBRATION_IMAGES = 256  # the first N training images (kept split order) calibrate the INT8 activations


def calibrated_int8(
    model: DefectNet | DefectNetEnsemble, data_dir: Path, per_class_limit: int = 0
) -> DefectNet | DefectNetEnsemble:
    """The INT8 model of ``model`` (the edge student, or the classifier in the benchmark), calibrated on the
    first ``CALIBRATION_IMAGES`` training images of the kept split."""
    files = limit_per_class(neu_split(data_dir)["train"], neu_label, per_class_limit)[:CALIBRATION_IMAGES]
    return quantize_defectnet(model, load_neu(data_dir, files, model.cfg.image_size).x)


def _speed(model: nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    """Images per second over ``x`` (median of repeats)."""
    times = []
    with torch.inference_mode():
        model(x[:8])
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return float(x.shape[0] / sorted(times)[len(times) // 2])


def train_edge(preset: Preset, data_dir: Path, model_dir: Path, teacher_art: Artifact, seed: int,
               progress: bool) -> Artifact:
    """Distil the student from the teacher on the NEU train part (KD + hard labels), quantize, report."""
    teacher, tcfg = load_classifier(teacher_art)
    size = teacher.cfg.image_size
    split = neu_split(data_dir)
    tr_f, va_f, te_f = (
        limit_per_class(split[k], neu_label, preset.per_class_limit) for k in ("train", "val", "test")
    )
    tr, va, te = (load_neu(data_dir, f, size) for f in (tr_f, va_f, te_f))
    scfg = student_config(image_size=size, **({"trunk_kwargs": {"channels": [8, 16, 32, 64]}, "dim": 32}
                                              if preset.per_class_limit else {}))

    def loss_fn(logits: torch.Tensor, y: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_logits = teacher(xb)
        return kd_loss(logits, t_logits, y, temperature=4.0, alpha=0.7)

    epochs = Preset(**{**preset.__dict__, "epochs": preset.student_epochs or 1})
    student, info = train_select_refit(lambda: create_defectnet("student", scfg), (tr.x, tr.y), (va.x, va.y),
                                       epochs, seed=seed, progress=progress, loss_fn=loss_fn, desc="student")
    student.eval()
    int8 = calibrated_int8(student, data_dir, preset.per_class_limit)
    metrics: dict[str, Any] = {
        "teacher_test_accuracy": accuracy(teacher, te.x, te.y),
        "student_test_accuracy": accuracy(student, te.x, te.y),
        "int8_test_accuracy": float((predict_logits(int8, te.x).argmax(1) == te.y).float().mean()),
        "teacher_size_mb": model_size_mb(teacher),
        "student_size_mb": model_size_mb(student),
        "int8_size_mb": model_size_mb(int8),
        "teacher_images_per_s": _speed(teacher, te.x[:64]),
        "student_images_per_s": _speed(student, te.x[:64]),
        "int8_images_per_s": _speed(int8, te.x[:64]),
        "distill_seconds": round(info["train_seconds"], 1),
        "student_val_accuracy": info["best_val_accuracy"],  # of the selection run
        "student_best_epoch": info["best_epoch"],
        "refit_train_val": preset.refit_train_val,
        "n_test": len(te_f),
    }
    metrics["accuracy_drop_points"] = 100 * (metrics["teacher_test_accuracy"] - metrics["int8_test_accuracy"])
    metrics["size_ratio"] = metrics["teacher_size_mb"] / metrics["int8_size_mb"]
    metrics["speed_ratio"] = metrics["int8_images_per_s"] / metrics["teacher_images_per_s"]
    print(f"edge: {metrics}", file=sys.stderr)
    return save_artifact(
        model_dir, DOMAIN, STUDENT,
        config={"model": scfg.to_dict(), "classes": list(NEU_CLASSES), "teacher_version": teacher_art.version,
                "teacher_config": tcfg["model"],
                "quantization": f"int8 at load: static trunk (calibrated on the first {CALIBRATION_IMAGES} "
                                "training images), dynamic nn.Linear"},
        metrics=metrics,
        data_files=[data_dir / "neu_det" / f for f in (tr_f + va_f if preset.refit_train_val else tr_f)],
        tensors=student.state_dict(),
    )


def eval_edge(data_dir: Path, model_dir: Path, report_dir: Path) -> dict[str, Any]:
    """Re-measure the saved student (fp32 and INT8) against its teacher on the NEU test part."""
    art = latest_artifact(model_dir, DOMAIN, STUDENT)
    teacher_dir = model_dir / DOMAIN / CLASSIFIER / art.config["teacher_version"]
    teacher, _ = load_classifier(load_artifact(teacher_dir))
    student = load_student(art)
    int8 = calibrated_int8(student, data_dir)
    te = load_neu(data_dir, neu_split(data_dir)["test"], student.cfg.image_size)
    t_acc, s_acc = accuracy(teacher, te.x, te.y), accuracy(student, te.x, te.y)
    q_acc = float((predict_logits(int8, te.x).argmax(1) == te.y).float().mean())
    result = {
        "task": "edge",
        "teacher_accuracy": t_acc,
        "student_accuracy": s_acc,
        "int8_accuracy": q_acc,
        "accuracy_drop_points": 100 * (t_acc - q_acc),
        "size_ratio": model_size_mb(teacher) / model_size_mb(int8),
        "speed_ratio": _speed(int8, te.x[:64]) / _speed(teacher, te.x[:64]),
        "teacher_size_mb": model_size_mb(teacher),
        "int8_size_mb": model_size_mb(int8),
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "edge.json").write_text(json.dumps(result, indent=2))
    return result
