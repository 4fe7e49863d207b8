"""Evaluate the manufacturing models; the last stdout line is one JSON object.

    python -m pipelines.manufacturing.evaluate --task classify --json
    python -m pipelines.manufacturing.evaluate --task anomaly --dataset magnetic_tile --json
    python -m pipelines.manufacturing.evaluate --task anomaly --dataset neu --json     # open set, per class
    python -m pipelines.manufacturing.evaluate --task anomaly --dataset /data/line7 --json  # MVTec layout
    python -m pipelines.manufacturing.evaluate --task edge --json

Writes PNG plots and a JSON report under ``reports/manufacturing/`` (``--report-dir``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from backbone.artifacts import latest_artifact  # noqa: E402
from backbone.cli import run_cli  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import confusion_matrix, f1_score, roc_curve  # noqa: E402

from pipelines.manufacturing.common import (  # noqa: E402
    CLASSIFIER,
    DOMAIN,
    PRESETS,
    Preset,
    default_data_dir,
    default_model_dir,
    default_report_dir,
    extract,
    limit_per_class,
    predict_logits,
    set_threads,
    train_classifier,
)
from pipelines.manufacturing.data import (  # noqa: E402
    MT_DEFECTS,
    NEU_CLASSES,
    decode_image,
    load_mt,
    load_neu,
    mt_split,
    neu_label,
    neu_split,
)
from services.manufacturing.app.core.config import Settings  # noqa: E402
from services.manufacturing.app.model import Line, load_classifier, load_inspection_model  # noqa: E402
from services.manufacturing.app.modeling import DefectNetConfig, create_defectnet  # noqa: E402
from services.manufacturing.app.patchcore import (  # noqa: E402
    MemoryBank,
    PatchCoreConfig,
    PatchFeatureExtractor,
    auroc,
)


def _save_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=float))


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def eval_classify(
    data_dir: Path, model_dir: Path, report_dir: Path, per_class_limit: int = 0
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class recall and the confusion matrix on the kept NEU test part."""
    art = latest_artifact(model_dir, DOMAIN, CLASSIFIER)
    model, cfg = load_classifier(art)
    classes = cfg["classes"]
    files = limit_per_class(neu_split(data_dir)["test"], neu_label, per_class_limit)
    te = load_neu(data_dir, files, model.cfg.image_size, classes)
    t0 = time.perf_counter()
    pred = predict_logits(model, te.x).argmax(1).numpy()
    secs = time.perf_counter() - t0
    y = te.y.numpy()
    cm = confusion_matrix(y, pred, labels=list(range(len(classes))))
    plot_confusion(cm, classes, report_dir / "classify_confusion.png",
                   f"NEU test ({len(y)} images), acc {float((pred == y).mean()):.4f}")
    result = {
        "task": "classify",
        "model_version": art.version,
        "n_test": int(len(y)),
        "accuracy": float((pred == y).mean()),
        "macro_f1": float(f1_score(y, pred, average="macro")),
        "per_class_recall": {c: float(cm[i, i] / max(1, cm[i].sum())) for i, c in enumerate(classes)},
        "confusion_matrix": cm.tolist(),
        "images_per_s": float(len(y) / secs),
        "confusion_png": str(report_dir / "classify_confusion.png"),
    }
    _save_json(report_dir / "classify.json", result)
    return result


def _roc_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, (y, s) in curves.items():
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc(y, s):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _heatmap_examples(x: torch.Tensor, masks: torch.Tensor, maps: torch.Tensor, thr: float, titles: list[str],
                      path: Path, box: tuple[int, int] | None = None) -> None:
    """Image, defect mask and heat map of each example; ``box``: the inspected square (first and past-the-end
    pixel), framed in white on the heat maps."""
    n = len(titles)
    fig, axes = plt.subplots(3, n, figsize=(2.2 * n, 6.6))
    for j in range(n):
        axes[0, j].imshow(x[j, 0].numpy(), cmap="gray")
        axes[0, j].set_title(titles[j], fontsize=7)
        axes[1, j].imshow(masks[j].numpy(), cmap="gray")
        axes[2, j].imshow(x[j, 0].numpy(), cmap="gray")
        axes[2, j].imshow(maps[j].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=2 * thr)
        if box is not None and box != (0, maps.shape[-1]):
            lo, hi = box
            frame = plt.Rectangle((lo - 0.5, lo - 0.5), hi - lo, hi - lo, fill=False, ec="white", lw=0.8)
            axes[2, j].add_patch(frame)
        for r in range(3):
            axes[r, j].axis("off")
    axes[0, 0].set_ylabel("image")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def eval_anomaly_mt(
    data_dir: Path, model_dir: Path, report_dir: Path, limit: int = 0, part: str = "test"
) -> dict[str, Any]:
    """Image / pixel AUROC on held-out defect-free tiles + the five defect types (bank: train good only).

    ``part="test"``: ``test_good`` + ``test_defect`` (the reported figures); ``part="val"``: ``calib_good`` +
    ``val_defect``, the part methods and settings are chosen on (its good tiles also set the threshold, so
    its false-reject rate is optimistic)."""

    class _S:
        pass

    s = _S()
    s.model_dir = model_dir  # type: ignore[attr-defined]
    s.lines_dir = str(report_dir / ".no_lines")  # type: ignore[attr-defined]
    s.default_line = "magnetic_tile"  # type: ignore[attr-defined]
    model = load_inspection_model(s)
    line = model.lines["magnetic_tile"]
    bank = line.bank
    assert bank is not None
    split = mt_split(data_dir)
    size = model.patchcore.image_size
    good_key, defect_key = ("test_good", "test_defect") if part == "test" else ("calib_good", "val_defect")
    groups = {"good": split[good_key][: limit or None]}
    groups |= {d: split[defect_key][d][: limit or None] for d in MT_DEFECTS}
    scores: dict[str, np.ndarray] = {}
    pix_scores, pix_labels = [], []
    examples = []
    for name, files in groups.items():
        out = []
        for i in range(0, len(files), 32):
            x, m = load_mt(data_dir, files[i : i + 32], size, with_masks=True)
            sc, maps = bank.score(extract(model.extractor, x))
            out.append(sc)
            # pixel AUROC on a 64x64 grid (PatchCore-style full-image pixel evaluation, downsampled)
            pm = torch.nn.functional.adaptive_avg_pool2d(maps.unsqueeze(1), 64).squeeze(1)
            mm = torch.nn.functional.adaptive_max_pool2d(m.float().unsqueeze(1), 64).squeeze(1)
            pix_scores.append(pm.flatten().numpy())
            pix_labels.append(mm.flatten().numpy() > 0.5)
            if i == 0 and len(examples) < 6:
                examples.append((x[:1], m[:1], maps[:1], name))
        scores[name] = torch.cat(out).numpy()
    good = scores["good"]
    bad = np.concatenate([scores[d] for d in MT_DEFECTS])
    y = np.r_[np.zeros(len(good)), np.ones(len(bad))]
    s_all = np.r_[good, bad]
    thr = bank.threshold
    per_defect = {d: auroc(np.r_[np.zeros(len(good)), np.ones(len(scores[d]))], np.r_[good, scores[d]])
                  for d in MT_DEFECTS}
    result = {
        "task": "anomaly",
        "dataset": "magnetic_tile",
        "split": part,
        "model_version": model.info.version,
        "features": model.patchcore.features,
        "image_auroc": auroc(y, s_all),
        "pixel_auroc": auroc(np.concatenate(pix_labels), np.concatenate(pix_scores)),
        "per_defect_image_auroc": per_defect,
        "threshold": thr,
        "test_good_false_reject_rate": float((good > thr).mean()),
        "test_defect_recall": float((bad > thr).mean()),
        "n_test_good": int(len(good)),
        "n_test_defect": int(len(bad)),
        "n_bank_images": line.n_good_images,
        "bank_size": int(bank.bank.shape[0]),
    }
    tag = "" if part == "test" else f"_{part}"
    _roc_plot({"all defects": (y, s_all)} | {d: (np.r_[np.zeros(len(good)), np.ones(len(scores[d]))],
                                                np.r_[good, scores[d]]) for d in MT_DEFECTS},
              report_dir / f"anomaly_magnetic_tile{tag}_roc.png", f"magnetic tile ({part}): image-level ROC")
    xs = torch.cat([e[0] for e in examples])
    _heatmap_examples(xs, torch.cat([e[1] for e in examples]), torch.cat([e[2] for e in examples]), thr,
                      [e[3] for e in examples], report_dir / f"anomaly_magnetic_tile{tag}_heatmaps.png",
                      bank.inspected_box(maps.shape[-1]))
    result["plots"] = [str(report_dir / f"anomaly_magnetic_tile{tag}_roc.png"),
                       str(report_dir / f"anomaly_magnetic_tile{tag}_heatmaps.png")]
    _save_json(report_dir / f"anomaly_magnetic_tile{tag}.json", result)
    return result


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _mask(root: Path, kind: str, image: Path, size: int) -> torch.Tensor | None:
    """The pixel mask of a test image in the MVTec AD layout (``ground_truth/<kind>/<stem>_mask.png``)."""
    for name in (f"{image.stem}_mask.png", f"{image.stem}.png"):
        path = root / "ground_truth" / kind / name
        if path.is_file():
            with Image.open(path) as m:
                m = m.convert("L").resize((size, size), Image.NEAREST)
                return torch.from_numpy(np.asarray(m) > 127)
    return None


def eval_anomaly_folder(root: Path, model_dir: Path, report_dir: Path, seed: int = 0) -> dict[str, Any]:
    """A line the models never saw, from a folder in the MVTec AD layout: ``train/good/`` (defect-free images
    the line is built from, as ``POST /v1/lines`` builds it: same code, frozen models), ``test/good/`` and
    ``test/<defect kind>/``, optional ``ground_truth/<kind>/<stem>_mask.png``. Image AUROC (all and per kind),
    pixel AUROC where masks exist, and the false-reject rate / recall at the line's own threshold."""
    for sub in ("train/good", "test/good"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root} has no {sub}/ folder (expected the MVTec AD layout)")
    kinds = sorted(d.name for d in (root / "test").iterdir() if d.is_dir() and d.name != "good")
    if not kinds:
        raise FileNotFoundError(f"{root}/test has no defect folder besides good/")
    s = Settings(model_dir=model_dir, lines_dir=None)
    model = load_inspection_model(s)
    decode = lambda p: decode_image(p.read_bytes(), max_pixels=s.max_image_pixels)  # noqa: E731
    line = Line(line_id="folder")
    good_train = [decode(p) for p in _images(root / "train" / "good")]
    model.build_line(line, good_train, seed=seed)
    if line.state != "ready" or line.bank is None:
        raise RuntimeError(f"the line could not be built: {line.message}")
    size = model.patchcore.image_size
    scores: dict[str, np.ndarray] = {}
    pix_scores, pix_labels = [], []
    for kind in ["good", *kinds]:
        files = _images(root / "test" / kind)
        out = []
        for i in range(0, len(files), 16):
            chunk = files[i : i + 16]
            sc, maps = line.bank.score(model.features([decode(p) for p in chunk]))
            out.append(sc)
            none = torch.zeros(size, size, dtype=torch.bool)
            masks = [none if kind == "good" else _mask(root, kind, p, size) for p in chunk]
            for mp, mk in zip(maps, masks, strict=True):
                if mk is not None:
                    pix_scores.append(mp.flatten().numpy())
                    pix_labels.append(mk.flatten().numpy())
        scores[kind] = torch.cat(out).numpy() if out else np.zeros(0)
    good = scores["good"]
    bad = np.concatenate([scores[k] for k in kinds])
    y, s_all = np.r_[np.zeros(len(good)), np.ones(len(bad))], np.r_[good, bad]
    thr = line.bank.threshold
    curves = {"all defects": (y, s_all)}
    for k in kinds:
        curves[k] = (np.r_[np.zeros(len(good)), np.ones(len(scores[k]))], np.r_[good, scores[k]])
    per_kind = {k: auroc(*curves[k]) for k in kinds}
    has_masks = any(lbl.any() for lbl in pix_labels)
    result = {
        "task": "anomaly", "dataset": str(root), "model_version": model.info.version,
        "image_auroc": auroc(y, s_all),
        "pixel_auroc": auroc(np.concatenate(pix_labels), np.concatenate(pix_scores)) if has_masks else None,
        "per_defect_image_auroc": per_kind, "threshold": thr,
        "calibration": line.bank.calibration.to_dict() if line.bank.calibration else None,
        "test_good_false_reject_rate": float((good > thr).mean()) if len(good) else None,
        "test_defect_recall": float((bad > thr).mean()) if len(bad) else None,
        "n_train_good": len(good_train), "n_test_good": int(len(good)), "n_test_defect": int(len(bad)),
        "bank_size": int(line.bank.bank.shape[0]),
    }  # fmt: skip
    report_dir.mkdir(parents=True, exist_ok=True)
    tag = root.name or "folder"
    _roc_plot(curves, report_dir / f"anomaly_{tag}_roc.png", f"{tag}: image-level ROC (line from train/good)")
    result["plots"] = [str(report_dir / f"anomaly_{tag}_roc.png")]
    _save_json(report_dir / f"anomaly_{tag}.json", result)
    return result


def eval_open_set_neu(data_dir: Path, report_dir: Path, preset: Preset, progress: bool) -> dict[str, Any]:
    """Leave one NEU class out: train a 5-class classifier + memory bank without it, then measure how well
    its test images are flagged as novel against the known classes' test images (per held-out class)."""
    split = neu_split(data_dir)
    per = {}
    size = preset.image_size
    for held in NEU_CLASSES:
        known = [c for c in NEU_CLASSES if c != held]
        tr_f = limit_per_class([f for f in split["train"] if neu_label(f) in known], neu_label,
                               preset.per_class_limit)
        va_f = limit_per_class([f for f in split["val"] if neu_label(f) in known], neu_label,
                               preset.per_class_limit)
        tr, va = load_neu(data_dir, tr_f, size, known), load_neu(data_dir, va_f, size, known)
        cfg = DefectNetConfig.from_dict({**(preset.model_overrides or {}), "image_size": size,
                                         "num_classes": len(known)})
        model = create_defectnet("teacher", cfg)
        train_classifier(
            model, (tr.x, tr.y), (va.x, va.y), preset, progress=progress, desc=f"open-set -{held}"
        )
        model.eval()
        pc = PatchCoreConfig(
            image_size=size, coreset_max=preset.coreset_max, max_bank_input=preset.max_bank_input,
            features="trunk", channel_standardize=False,
        )
        ext = PatchFeatureExtractor(model.trunk, pc)
        bank = MemoryBank.fit(extract(ext, tr.x), pc)
        te_known = limit_per_class([f for f in split["test"] if neu_label(f) in known], neu_label,
                                   preset.per_class_limit)
        te_novel = limit_per_class([f for f in split["test"] if neu_label(f) == held], neu_label,
                                   preset.per_class_limit)
        xk = load_neu(data_dir, te_known, size, NEU_CLASSES).x
        xn = load_neu(data_dir, te_novel, size, NEU_CLASSES).x
        sk, _ = bank.score(extract(ext, xk))
        sn, _ = bank.score(extract(ext, xn))
        y = np.r_[np.zeros(len(sk)), np.ones(len(sn))]
        msp_k = torch.softmax(predict_logits(model, xk), 1).max(1).values.numpy()
        msp_n = torch.softmax(predict_logits(model, xn), 1).max(1).values.numpy()
        per[held] = {
            "novel_auroc_patchcore": auroc(y, np.r_[sk.numpy(), sn.numpy()]),
            "novel_auroc_msp": auroc(y, -np.r_[msp_k, msp_n]),
            "known_val_accuracy": float((predict_logits(model, va.x).argmax(1) == va.y).float().mean()),
            "n_known_test": len(te_known),
            "n_novel_test": len(te_novel),
        }
        print(f"open set, held out {held}: {per[held]}", file=sys.stderr)
    vals = [v["novel_auroc_patchcore"] for v in per.values()]
    result = {
        "task": "anomaly",
        "dataset": "neu",
        "novel_auroc": float(np.mean(vals)),
        "novel_auroc_min": float(np.min(vals)),
        "novel_auroc_msp_mean": float(np.mean([v["novel_auroc_msp"] for v in per.values()])),
        "per_held_out_class": per,
        "protocol": f"per held-out class: {preset.epochs}-epoch {size}px classifier on the 5 known classes "
                    "(train part), PatchCore bank of their train images; score known vs novel test images",
    }
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    names = list(per)
    pcs = [per[n]["novel_auroc_patchcore"] for n in names]
    ax.bar(np.arange(len(names)) - 0.2, pcs, 0.4, label="PatchCore")
    ax.bar(np.arange(len(names)) + 0.2, [per[n]["novel_auroc_msp"] for n in names], 0.4, label="max softmax")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("novel-class AUROC")
    ax.legend()
    fig.tight_layout()
    report_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(report_dir / "anomaly_neu_open_set.png", dpi=110)
    plt.close(fig)
    result["plots"] = [str(report_dir / "anomaly_neu_open_set.png")]
    _save_json(report_dir / "anomaly_neu_open_set.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["classify", "anomaly", "edge"], default="classify")
    p.add_argument(
        "--dataset", default="magnetic_tile",
        help="magnetic_tile, neu (open set), or a folder in the MVTec AD layout (train/good, test/<kind>)",
    )  # fmt: skip
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help="training budget of the open-set (leave-one-class-out) models")
    p.add_argument("--limit", type=int, default=0, help="at most this many test images per group (0 = all)")
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="magnetic tile: report on the test part (default) or the validation part")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--report-dir", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0, help="folder dataset: the line build's fold assignment")
    p.add_argument("--json", action="store_true", help="(default) print the metrics as one JSON line")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    set_threads()
    data_dir = args.data_dir or default_data_dir()
    model_dir = args.model_dir or default_model_dir()
    report_dir = args.report_dir or default_report_dir()
    if args.task == "classify":
        result = eval_classify(data_dir, model_dir, report_dir, args.limit)
    elif args.task == "anomaly" and args.dataset == "magnetic_tile":
        result = eval_anomaly_mt(data_dir, model_dir, report_dir, args.limit, args.split)
    elif args.task == "anomaly" and args.dataset == "neu":
        result = eval_open_set_neu(data_dir, report_dir, PRESETS[args.preset], not args.no_progress)
    elif args.task == "anomaly":
        if not Path(args.dataset).is_dir():
            p.error(f"--dataset {args.dataset!r}: not magnetic_tile, neu or a folder")
        result = eval_anomaly_folder(Path(args.dataset), model_dir, report_dir, args.seed)
    else:
        from pipelines.manufacturing.edge import eval_edge

        result = eval_edge(data_dir, model_dir, report_dir)
    print(json.dumps(result, default=float))
    return 0


if __name__ == "__main__":
    run_cli(main)
