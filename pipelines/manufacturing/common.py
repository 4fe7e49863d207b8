"""Shared pieces of the manufacturing pipelines: presets, the training loop, feature batches."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from backbone.moe import total_aux_loss
from tqdm import tqdm

from pipelines.manufacturing.data import augment
from services.manufacturing.app.modeling import DefectNet, DefectNetEnsemble
from services.manufacturing.app.patchcore import PatchFeatureExtractor

log = logging.getLogger("pipelines.manufacturing")
REPO_ROOT = Path(__file__).resolve().parents[2]
DOMAIN = "manufacturing"
CLASSIFIER = "defect_classifier"
ANOMALY = "anomaly_magnetic_tile"
STUDENT = "defect_student"
BASE = "anomaly_base_model"


def default_model_dir() -> Path:
    return Path(os.environ.get("MODEL_DIR", REPO_ROOT / "models"))


def default_data_dir() -> Path:
    return Path(os.environ.get("DATA_DIR", (REPO_ROOT / ".." / "shared" / "data").resolve()))


def default_report_dir() -> Path:
    return Path(os.environ.get("REPORT_DIR", REPO_ROOT / "reports" / DOMAIN))


@dataclass
class Preset:
    """Training budget of one preset."""

    image_size: int
    epochs: int
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.05
    per_class_limit: int = 0  # 0 = every training image (tests use a few per class)
    model_overrides: dict | None = None
    anomaly_image_size: int = 128
    anomaly_train_limit: int = 0
    anomaly_calib_limit: int = 0
    coreset_max: int = 4000
    max_bank_input: int = 60_000
    student_epochs: int = 0
    patience: int = 8
    zoom: float = 1.0  # random-resized-crop augmentation: smallest visible fraction of the side (1 = off)
    # after the run that selects the epoch on val: train again from scratch on train + val for that many
    # epochs (same seed and settings) and keep that model; the selection run's val accuracy is reported
    refit_train_val: bool = False
    # classifier members (seeds seed, seed + 1, ...) averaged by ``DefectNetEnsemble``; members after the
    # first reuse its selected epoch count (with ``refit_train_val`` they train on train + val straight away)
    classifier_members: int = 1
    # self-supervised base model of the tile detector (synthetic anomalies on train_good, random crops)
    base_steps: int = 4000
    base_batch: int = 16
    base_crop: int = 64
    base_lr: float = 3e-3
    base_channels: tuple[int, ...] = (16, 32, 64, 96)
    base_kinds: tuple[str, ...] = ("texture", "intensity", "stroke")  # synthetic anomaly kinds
    # base models in the tile detector (seeds seed, seed + 1, ...): their patch features are concatenated
    anomaly_bases: int = 1
    # PatchCoreConfig fields of the tile detector, chosen on validation (docs/manufacturing.md): the frozen
    # self-supervised base net's decoder maps + segmentation logit + the fixed filter bank, 15 % border band,
    # image score = maximum + level term (the map's median, weighted on held-out good tiles), each patch
    # compared with good patches at about the same place (the tiles are photographed in one pose)
    anomaly_overrides: dict = field(
        default_factory=lambda: {"features": "learned", "learned_parts": ["dec", "seg", "fb"], "border": 0.15,
                                 "patch_kernel": 5, "level_quantile": 0.5, "position_weight": 60.0}
    )


PRESETS: dict[str, Preset] = {
    # unit tests: seconds
    "tiny": Preset(
        image_size=64, epochs=1, batch_size=32, per_class_limit=12,
        model_overrides={"trunk_kwargs": {"channels": [8, 16, 32, 64]}, "dim": 32, "expert_hidden": 64,
                         "n_heads": 2},
        anomaly_image_size=64, anomaly_train_limit=16, anomaly_calib_limit=12, coreset_max=300,
        max_bank_input=5000, student_epochs=0,
        base_steps=20, base_batch=8, base_crop=32, base_channels=(8, 16, 32, 48),
        anomaly_bases=2, classifier_members=2,  # the ensemble paths of the full preset, at test scale
    ),
    # the demo's models, about 7 minutes at 1 thread: an 800-step base model and a 16,000-entry bank of every
    # train_good tile at 96 px (tile val AUROC 0.920; 0.729 with 300 steps and 1,500 entries of 200 tiles)
    "quick": Preset(
        image_size=64, epochs=3, batch_size=32, anomaly_image_size=96, anomaly_calib_limit=100,
        coreset_max=16_000, max_bank_input=400_000, student_epochs=0, base_steps=800,
    ),
    # the serious run (issue targets)
    # tile detector, chosen on validation (docs/manufacturing.md): two base models (seeds 0 and 1), their
    # patch features concatenated, and a coreset of 10 % of every train_good patch (571 tiles x 1,024: 58,470
    # entries; the coreset_ratio caps coreset_max): val image AUROC 0.962 against 0.956 for one base model
    # and 32,000 entries, for about twice the inspection time
    # classifier: two members (`classifier_cv --run-folds 0,2`, train + val only: 10 errors of 720 held-out
    # images against 12 for each member alone)
    "full": Preset(image_size=128, epochs=32, batch_size=32, anomaly_image_size=128, student_epochs=30,
                   patience=10, refit_train_val=True, coreset_max=64_000, max_bank_input=600_000,
                   anomaly_bases=2, classifier_members=2),
}


def set_threads() -> None:
    torch.set_num_threads(int(os.environ.get("TORCH_NUM_THREADS", "1")))


def write_study(report_dir: Path, name: str, result: dict[str, Any],
                plot: Callable[[Path, dict[str, Any]], None]) -> None:
    """A study's outputs: ``<name>.png`` drawn by ``plot`` (its path stored in ``result["plot"]``),
    ``<name>.json`` in ``report_dir``, and ``result`` as the last stdout line."""
    report_dir.mkdir(parents=True, exist_ok=True)
    result["plot"] = str(report_dir / f"{name}.png")
    plot(Path(result["plot"]), result)
    (report_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


def save_plot(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    """Label a study's plot (axes, title, small legend) and write it as a PNG (the caller closes it)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_study_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Add the options every tile study shares (``--model-dir``, ``--data-dir``, ``--report-dir``,
    ``--no-progress``) to ``p`` and parse ``argv``; warnings to stderr, torch threads from the environment."""
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--report-dir", type=Path, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    set_threads()
    return args


@torch.no_grad()
def predict_logits(model: torch.nn.Module, x: torch.Tensor, batch: int = 128) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch]) for i in range(0, x.shape[0], batch)])


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict_logits(model, x).argmax(1) == y).float().mean())


Images = tuple[torch.Tensor, torch.Tensor]  # (images [N, C, H, W], labels [N])
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels, images)


def train_classifier(
    model: DefectNet, train: Images, val: Images, preset: Preset, *, seed: int = 0, progress: bool = True,
    loss_fn: LossFn | None = None, desc: str = "train", select: bool = True,
) -> dict:
    """AdamW + one-cycle cosine, label smoothing, MoE aux loss, flips/rot90/brightness (+ random-resized
    crop with ``preset.zoom`` < 1) augmentation; keeps the weights of the best validation accuracy (early
    stopping after ``preset.patience`` flat epochs), or with ``select=False`` (``val`` is part of the
    training data) runs every epoch and keeps the last weights."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = train
    steps_per_epoch = math.ceil(x.shape[0] / preset.batch_size)
    total = steps_per_epoch * preset.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=preset.lr, weight_decay=preset.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=preset.lr, total_steps=max(total, 1), pct_start=0.15
    )
    best = (-1.0, None, 0)
    history = []
    bar = tqdm(total=total, desc=desc, disable=not progress, mininterval=2.0)
    t0 = time.perf_counter()
    for epoch in range(preset.epochs):
        model.train()
        perm = torch.randperm(x.shape[0], generator=g)
        losses = []
        for i in range(0, x.shape[0], preset.batch_size):
            idx = perm[i : i + preset.batch_size]
            xb, yb = augment(x[idx], g, preset.zoom), y[idx]
            logits = model(xb)
            if loss_fn is not None:
                loss = loss_fn(logits, yb, xb)
            else:
                loss = F.cross_entropy(logits, yb, label_smoothing=0.1)
            loss = loss + total_aux_loss(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses):.3f}")
        val_logits = predict_logits(model, val[0])
        val_acc = float((val_logits.argmax(1) == val[1]).float().mean())
        val_nll = float(F.cross_entropy(val_logits, val[1]))
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_accuracy": val_acc,
                        "val_nll": val_nll})
        log.info("epoch %d loss %.4f val_acc %.4f", epoch + 1, np.mean(losses), val_acc)
        bar.write(f"{desc} ep {epoch + 1}/{preset.epochs} loss {np.mean(losses):.4f} val {val_acc:.4f} "
                  f"nll {val_nll:.4f}")
        if not select:
            best = (val_acc, None, epoch + 1)
        elif val_acc > best[0]:
            best = (val_acc, {k: v.detach().clone() for k, v in model.state_dict().items()}, epoch + 1)
        elif epoch + 1 - best[2] >= preset.patience:
            bar.write(f"early stop at epoch {epoch + 1} (best {best[2]})")
            break
    bar.close()
    if best[1] is not None:
        model.load_state_dict(best[1])
    return {
        "best_val_accuracy": best[0],
        "best_epoch": best[2],
        "train_seconds": time.perf_counter() - t0,
        "history": history,
    }


def train_select_refit(
    make_model: Callable[[], DefectNet], train: Images, val: Images, preset: Preset, *, seed: int = 0,
    progress: bool = True, loss_fn: LossFn | None = None, desc: str = "train",
) -> tuple[DefectNet, dict]:
    """:func:`train_classifier` (epoch selected on ``val``); with ``preset.refit_train_val`` a fresh model
    then trains on train + val for the selected number of epochs (same seed) and is returned instead. The
    info keeps the selection run's ``best_val_accuracy`` / ``best_epoch``; ``train_seconds`` covers both."""
    model = make_model()
    info = train_classifier(model, train, val, preset, seed=seed, progress=progress, loss_fn=loss_fn,
                            desc=desc)
    info["refit_train_val"] = preset.refit_train_val
    if preset.refit_train_val:
        model = make_model()
        both = (torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]]))
        refit = dataclasses.replace(preset, epochs=info["best_epoch"])
        again = train_classifier(model, both, val, refit, seed=seed, progress=progress, loss_fn=loss_fn,
                                 desc=f"{desc} refit", select=False)
        info["train_seconds"] += again["train_seconds"]
    return model, info


def train_members(
    make_model: Callable[[], DefectNet], train: Images, val: Images, preset: Preset, *, seed: int = 0,
    progress: bool = True, desc: str = "train",
) -> tuple[DefectNet | DefectNetEnsemble, dict]:
    """``preset.classifier_members`` models from seeds ``seed``, ``seed + 1``, ...: the first by
    :func:`train_select_refit`, the others for its selected epoch count, on train + val with
    ``refit_train_val`` (else on train, keeping their best val epoch within it). One member is returned
    as is, several as a :class:`DefectNetEnsemble`; ``train_seconds`` covers all of them."""
    first, info = train_select_refit(make_model, train, val, preset, seed=seed, progress=progress, desc=desc)
    members = [first]
    again = dataclasses.replace(preset, epochs=info["best_epoch"])
    data = (torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]])) if preset.refit_train_val else train
    for k in range(1, preset.classifier_members):
        model = make_model()
        more = train_classifier(model, data, val, again, seed=seed + k, progress=progress,
                                desc=f"{desc} member {k + 1}", select=not preset.refit_train_val)
        info["train_seconds"] += more["train_seconds"]
        members.append(model)
    info["members"] = len(members)
    return (members[0] if len(members) == 1 else DefectNetEnsemble(members)), info


@torch.no_grad()
def extract(extractor: PatchFeatureExtractor, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Patch features of preloaded images, in batches."""
    extractor.eval()
    return torch.cat([extractor(x[i : i + batch]) for i in range(0, x.shape[0], batch)])


def limit_per_class(files: Sequence[str], label: Callable[[str], str], limit: int) -> list[str]:
    """The first ``limit`` files of each class (0 = all)."""
    if not limit:
        return list(files)
    counts: dict[str, int] = {}
    out = []
    for f in files:
        c = label(f)
        if counts.get(c, 0) < limit:
            out.append(f)
            counts[c] = counts.get(c, 0) + 1
    return out
