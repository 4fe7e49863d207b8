"""Train a medical-imaging hybrid (MONAI stem + backbone MoE / sparse-attention blocks) on a MedMNIST npz.

    python -m pipelines.medical_imaging.train --preset quick                  # PneumoniaMNIST, ~2 min
    python -m pipelines.medical_imaging.train --dataset adrenalmnist3d        # full preset (default)
    python -m pipelines.medical_imaging.train --npz /path/to/nodulemnist3d.npz

Official train / val / test splits; MONAI augmentation; an EMA of the weights, early-stopped on its
validation AUC (the best epoch's EMA weights are kept); ``ensemble_size`` such members from consecutive
seeds, trained in parallel worker processes and saved together as one ``DeepEnsemble``; temperature and
decision threshold fitted on validation (the threshold on the served MC x TTA mean); test metrics of the
served prediction computed once at the end. The artifact (safetensors weights,
config, metrics) goes to ``MODEL_DIR/medical_imaging/<dataset>/<version>/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from backbone.artifacts import Artifact, save_artifact
from backbone.cli import run_cli
from backbone.registry import create_model, routing_stats
from backbone.service.config import default_data_dir, default_model_dir
from backbone.training import fit
from torch.utils.data import DataLoader

from pipelines.medical_imaging.calibrate import (
    DEFAULT_THRESHOLD_RULE,
    SERVICE_DEFAULTS,
    THRESHOLD_RULES,
    calibrate_and_test,
)
from pipelines.medical_imaging.data import (
    CLASS_NAMES,
    DATASET_DESCRIPTIONS,
    ArrayDataset,
    MedMNISTData,
    batch_affine_3d,
    load_npz,
    resolve_npz,
    train_transforms,
)
from pipelines.medical_imaging.metrics import classification_metrics, softmax
from services.medical_imaging.app.networks import build_network

log = logging.getLogger("pipelines.medical_imaging.train")
DOMAIN = "medical_imaging"

PRESETS: dict[str, dict[str, Any]] = {
    # seconds: for tests
    "tiny": {
        "epochs": 1,
        "max_train": 256,
        "max_eval": 128,
        "batch_size": 64,
        "served_mc_samples": 2,
        "served_tta_views": 2,
        "model": {
            "stem_channels": (8, 16, 16),
            "dim": 32,
            "depth": 1,
            "expert_hidden": 32,
            "n_experts": 2,
            "top_k": 1,
        },
    },
    # about two minutes on a 2-core CPU
    "quick": {
        "epochs": 3,
        "batch_size": 128,
        "lr": 2e-3,
        "patience": 3,
        "model": {"stem_channels": (16, 32, 64), "dim": 64, "depth": 1, "expert_hidden": 96},
    },
    # the serious run: early stopping on the validation AUC of the EMA weights; per dimensionality
    # (``by_dims``) because 2-D and 3-D differ in what is slow on a CPU (bf16 autocast pays off for the 3-D
    # convolutions, and costs time in the small 2-D matmuls). Sized for the shared 2-core CPU (< 30 min).
    "full": {
        "batch_size": 64,
        "lr": 2e-3,
        # a deep ensemble of three seeds, trained two at a time on a 2-core CPU
        "ensemble_size": 3,
        "by_dims": {
            # mixup (--mixup-alpha 0.2) was measured and not kept: best validation AUC 0.9959 vs 0.9967
            2: {"epochs": 24, "patience": 8, "ema_decay": 0.995, "bf16": False},
            # the 3-D stem stays at stride 1: a stride-2 first conv (``stem_stride=2``, stem (16, 32)) made an
            # epoch ~1.3x faster but lowered the best validation AUC (0.828 vs 0.844 at stride 1)
            3: {"epochs": 20, "patience": 8, "ema_decay": 0.98, "bf16": True},
        },
        "model": {},
    },
}


#: model settings by input shape (spatial dims, side): over the preset's, under ``--model``. A 64^3 volume
#: gets a stride-2 first conv and one more stage, so the token grid is 4^3 and an epoch stays CPU-sized
#: (AdrenalMNIST3D 64^3: served validation AUC 0.861 vs 0.837 at 28^3, see docs/medical_imaging.md)
SHAPE_MODEL_DEFAULTS: dict[tuple[int, int], dict[str, Any]] = {
    (3, 64): {"stem_stride": 2, "stem_channels": (8, 16, 32, 32)},
}


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved into the artifact)."""

    dataset: str = "pneumoniamnist"
    npz: str | None = None
    preset: str = "full"
    epochs: int = 40
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    patience: int = 8
    label_smoothing: float = 0.05
    bf16: bool = True
    seed: int = 0
    max_train: int | None = None
    max_eval: int | None = None
    aug_strength: float = 1.0
    ema_decay: float = 0.0  # > 0: exponential moving average of the weights (validated, selected and saved)
    mixup_alpha: float = 0.0  # > 0: mixup of image pairs, mixing weight ~ Beta(alpha, alpha)
    # 3-D affine jitter: no scaling by default; on AdrenalMNIST3D the mask volume alone separates the classes
    # (AUC 0.68 train / 0.71 val, mean volume +28 % for masses), and a +-10 % scale jitter (+-33 % volume)
    # blurs exactly that cue
    affine_scale_3d: float = 0.0
    # a deep ensemble of this many members (seeds seed, seed + 1, ...), probabilities averaged
    ensemble_size: int = 1
    jobs: int = 0  # members trained at once in worker processes (0: one per CPU core)
    threshold_rule: str = DEFAULT_THRESHOLD_RULE  # "argmax" (0.5) | "youden" (on served validation probs)
    # the served prediction that calibration and test scoring use (None: the service's defaults)
    served_mc_samples: int | None = None
    served_tta_views: int | None = None
    model: dict[str, Any] = field(default_factory=dict)


def cpu_has_bf16() -> bool:
    """bf16 autocast pays off on CPUs with native bf16 (AVX512-BF16 / AMX); elsewhere it is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def peek_shape(path: Path) -> tuple[int, int]:
    """(spatial dims 2 or 3, image side), from the shape of ``train_images`` (reads only that array)."""
    with np.load(path, allow_pickle=False) as z:
        shape = z["train_images"].shape
    dims = 3 if len(shape) == 4 and shape[-1] != 3 else 2
    return dims, int(shape[-1] if dims == 3 else shape[2])


def preset_values(preset: str, spatial_dims: int) -> dict[str, Any]:
    """The preset's settings with its ``by_dims`` entry for ``spatial_dims`` merged in."""
    values = {k: v for k, v in PRESETS[preset].items() if k != "by_dims"}
    values.update(PRESETS[preset].get("by_dims", {}).get(spatial_dims, {}))
    return values


def build_config(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig(dataset=args.dataset, npz=args.npz, preset=args.preset)
    path = Path(args.npz) if args.npz else resolve_npz(args.data_dir, args.dataset)
    dims, side = peek_shape(path)
    preset = preset_values(args.preset, dims)
    bf16_wanted = preset.pop("bf16", True)
    for key, value in preset.items():
        setattr(cfg, key, value)
    cfg.model = {**cfg.model, **SHAPE_MODEL_DEFAULTS.get((dims, side), {})}
    keys = ("epochs", "batch_size", "lr", "patience", "seed", "max_train", "ema_decay", "mixup_alpha")
    for key in (*keys, "affine_scale_3d", "ensemble_size", "jobs", "threshold_rule"):
        if getattr(args, key, None) is not None:
            setattr(cfg, key, getattr(args, key))
    if getattr(args, "model", None):
        cfg.model = {**cfg.model, **json.loads(args.model)}
    cfg.bf16 = bool(bf16_wanted) and not args.no_bf16 and cpu_has_bf16()
    return cfg


def _subset(x: np.ndarray, y: np.ndarray, n: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if n is None or n >= len(y):
        return x, y
    idx = np.random.default_rng(seed).permutation(len(y))[:n]
    return x[idx], y[idx]


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module, images: np.ndarray, batch_size: int = 256, bf16: bool = False
) -> np.ndarray:
    """Deterministic logits for an array of images (N, C, *spatial)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out.append(model(x).float())
    return torch.cat(out).numpy()


def dataset_name(cfg: TrainConfig) -> str:
    return Path(cfg.npz).stem if cfg.npz else cfg.dataset


def load_data(cfg: TrainConfig, data_dir: Path) -> MedMNISTData:
    path = Path(cfg.npz) if cfg.npz else resolve_npz(data_dir, cfg.dataset)
    return load_npz(path, dataset_name(cfg))


@dataclass
class MemberResult:
    """One trained ensemble member: its best (EMA) weights and how it got there."""

    index: int
    seed: int
    state: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    best_epoch: int
    stopped_early: bool
    averaged: bool
    seconds: float


def model_family(data: MedMNISTData) -> tuple[str, dict[str, Any]]:
    """The registry family and the model settings for ``data`` (before the config's overrides)."""
    return f"medical_hybrid_{data.spatial_dims}d", {
        "in_channels": data.in_channels,
        "num_classes": data.num_classes,
        "img_size": data.img_size,
    }


def train_member(cfg: TrainConfig, data: MedMNISTData, index: int) -> MemberResult:
    """Train ensemble member ``index`` (seed ``cfg.seed + index``: initialisation, shuffling, augmentation);
    early stopping on the validation AUC of its EMA weights."""
    seed = cfg.seed + index
    torch.manual_seed(seed)
    np.random.seed(seed)
    family, data_cfg = model_family(data)
    model = create_model(family, **{**cfg.model, **data_cfg})
    # the subsets (tiny presets) are the same for every member: they depend on cfg.seed only
    x_tr, y_tr = _subset(data.images["train"], data.labels["train"], cfg.max_train, cfg.seed)
    x_va, y_va = _subset(data.images["val"], data.labels["val"], cfg.max_eval, cfg.seed)
    augment = train_transforms(data.spatial_dims, cfg.aug_strength)
    augment.set_random_state(seed=seed)  # MONAI transforms draw from their own RNG, unseeded by default
    loader = DataLoader(
        ArrayDataset(x_tr, y_tr, augment),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(y_tr) > cfg.batch_size,
    )
    val_loader = DataLoader(ArrayDataset(x_va, y_va), batch_size=256)
    counts = np.bincount(y_tr, minlength=data.num_classes).astype(float)
    class_weight = torch.tensor(len(y_tr) / (data.num_classes * np.maximum(counts, 1)), dtype=torch.float32)

    mixup = torch.distributions.Beta(cfg.mixup_alpha, cfg.mixup_alpha) if cfg.mixup_alpha > 0 else None

    def forward_fn(m: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        x, y = batch
        if not m.training:  # validation (on the EMA weights when ema_decay > 0, see backbone fit)
            return m(x), y
        if data.spatial_dims == 3 and cfg.aug_strength > 0:
            # batched 3-D affine jitter on top of the MONAI flips / rotations
            x = batch_affine_3d(x, scale=cfg.affine_scale_3d)
        if mixup is not None:
            lam = float(mixup.sample())
            perm = torch.randperm(x.shape[0])
            return m(lam * x + (1 - lam) * x[perm]), (y, y[perm], lam)
        return m(x), y

    def loss_fn(logits: torch.Tensor, y: Any) -> torch.Tensor:
        def ce(target: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(
                logits.float(), target, weight=class_weight, label_smoothing=cfg.label_smoothing
            )

        if isinstance(y, tuple):  # mixup: the same mix of the two targets' losses
            y_a, y_b, lam = y
            return lam * ce(y_a) + (1 - lam) * ce(y_b)
        return ce(y)

    def val_auc(logits: torch.Tensor, y: torch.Tensor) -> float:
        probs = softmax(logits.float().numpy())
        return classification_metrics(probs, y.numpy())["auc"]

    log.info(
        "member %d/%d (seed %d): training %s on %s", index + 1, cfg.ensemble_size, seed, family, data.name
    )
    t0 = time.time()
    result = fit(
        model,
        loader,
        val_loader,
        loss_fn,
        epochs=cfg.epochs,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        bf16_autocast=cfg.bf16,
        early_stopping_patience=cfg.patience,
        metric_fn=val_auc,
        metric_mode="max",
        warmup_steps=min(100, len(loader)),
        forward_fn=forward_fn,
        progress=True,
        ema_decay=cfg.ema_decay,
    )
    return MemberResult(
        index=index,
        seed=seed,
        state=model.state_dict(),
        history=result.history,
        best_epoch=result.best_epoch,
        stopped_early=result.stopped_early,
        averaged=result.averaged,
        seconds=round(time.time() - t0, 1),
    )


def _train_member_in_process(cfg: TrainConfig, data_dir: Path, index: int, threads: int) -> MemberResult:
    """Entry point of a member-training worker process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(threads)
    return train_member(cfg, load_data(cfg, data_dir), index)


def train_members(cfg: TrainConfig, data: MedMNISTData, data_dir: Path) -> list[MemberResult]:
    """Train the ``cfg.ensemble_size`` members: in this process, or ``cfg.jobs`` at a time in worker
    processes (each with this process's torch thread count)."""
    jobs = min(cfg.ensemble_size, cfg.jobs or os.cpu_count() or 1)
    if jobs <= 1:
        return [train_member(cfg, data, i) for i in range(cfg.ensemble_size)]
    threads = torch.get_num_threads()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            pool.submit(_train_member_in_process, cfg, data_dir, i, threads) for i in range(cfg.ensemble_size)
        ]
        return [f.result() for f in futures]


def train(cfg: TrainConfig, data_dir: Path, model_dir: Path) -> Artifact:
    """Train the member(s), calibrate on validation, test once, and save the artifact."""
    data = load_data(cfg, data_dir)
    family, data_cfg = model_family(data)
    config = {
        "family": family,
        "ensemble_size": cfg.ensemble_size,
        "dataset": data.name,
        "dataset_description": DATASET_DESCRIPTIONS.get(data.name, f"MedMNIST-layout file {data.path.name}"),
        "class_names": CLASS_NAMES.get(data.name, [f"class {i}" for i in range(data.num_classes)]),
        "positive_class": 1 if data.num_classes == 2 else None,
        "spatial_dims": data.spatial_dims,
        "img_size": data.img_size,
        "in_channels": data.in_channels,
        "train": asdict(cfg),
    }
    member_cfg = create_model(family, **{**cfg.model, **data_cfg}).cfg.to_dict()
    config["model"] = member_cfg
    t0 = time.time()
    members = train_members(cfg, data, data_dir)
    train_s = time.time() - t0
    model = build_network(config)
    if cfg.ensemble_size == 1:
        model.load_state_dict(members[0].state)
    else:
        for member, result in zip(model.members, members, strict=True):  # type: ignore[union-attr]
            member.load_state_dict(result.state)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())

    # float32 inference, as in evaluate and the service (bf16 autocast is for training speed only);
    # temperature and threshold from the validation split only, then the test split scored once
    x_va, y_va = _subset(data.images["val"], data.labels["val"], cfg.max_eval, cfg.seed)
    x_te, y_te = _subset(data.images["test"], data.labels["test"], cfg.max_eval, cfg.seed)
    counts = {
        "mc_samples": cfg.served_mc_samples or SERVICE_DEFAULTS.mc_samples,
        "tta_views": cfg.served_tta_views or SERVICE_DEFAULTS.tta_views,
    }
    scores = calibrate_and_test(model, (x_va, y_va), (x_te, y_te), rule=cfg.threshold_rule, **counts)
    metrics = {
        **scores,
        "train_seconds": round(train_s, 1),
        "n_params": n_params,
        "routing": routing_stats(model),
        "members": [],
    }
    for member, result in zip(getattr(model, "members", [model]), members, strict=True):
        metrics["members"].append(
            {
                "seed": result.seed,
                "seconds": result.seconds,
                "epochs_run": len(result.history),
                "best_epoch": result.best_epoch,
                "stopped_early": result.stopped_early,
                "weights": "ema" if result.averaged else "raw",
                "val_auc": classification_metrics(softmax(predict_logits(member, x_va)), y_va)["auc"],
                "test_auc": classification_metrics(softmax(predict_logits(member, x_te)), y_te)["auc"],
                "history": result.history,
            }
        )
    config.update({k: scores[k] for k in ("temperature", "threshold", "threshold_rule")})
    artifact = save_artifact(
        model_dir,
        DOMAIN,
        data.name,
        config=config,
        metrics=metrics,
        data_files=[data.path],
        tensors=model.state_dict(),
    )
    log.info("saved %s (test %s)", artifact.path, json.dumps(metrics["test"]))
    return artifact


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m pipelines.medical_imaging.train``."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dataset",
        default="pneumoniamnist",
        help="pneumoniamnist | adrenalmnist3d (64^3) | adrenalmnist3d_28",
    )
    parser.add_argument("--npz", default=None, help="any MedMNIST-layout npz (overrides --dataset)")
    parser.add_argument("--preset", default="full", choices=sorted(PRESETS))
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--patience", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-train", type=int)
    parser.add_argument("--ema-decay", type=float, help="EMA of the weights (0 = off)")
    parser.add_argument("--mixup-alpha", type=float, help="mixup Beta(alpha, alpha) (0 = off)")
    parser.add_argument("--affine-scale-3d", type=float, help="scale jitter of the 3-D affine (default 0)")
    parser.add_argument("--ensemble-size", type=int, help="deep-ensemble members (default: the preset's)")
    parser.add_argument("--jobs", type=int, help="members trained at once in worker processes (0: per core)")
    parser.add_argument(
        "--threshold-rule",
        choices=THRESHOLD_RULES,
        help=f"decision threshold (default {DEFAULT_THRESHOLD_RULE})",
    )
    parser.add_argument("--model", default=None, help="JSON model overrides, e.g. '{\"stem_stride\": 2}'")
    parser.add_argument(
        "--no-bf16",
        action="store_true",
        help="train in float32 (default: bf16 autocast when the CPU has native bf16)",
    )
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("DATA_DIR", default_data_dir())))
    parser.add_argument(
        "--model-dir", type=Path, default=Path(os.environ.get("MODEL_DIR", default_model_dir()))
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), int(os.environ.get("TORCH_THREADS", "1")))))
    cfg = build_config(args)
    artifact = train(cfg, args.data_dir, args.model_dir)
    print(
        json.dumps({"artifact": str(artifact.path), "version": artifact.version, **artifact.metrics["test"]})
    )


if __name__ == "__main__":
    run_cli(main)
