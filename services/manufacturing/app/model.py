"""The loaded inspection model: NEU defect classifier + PatchCore anomaly detection with per-line memory
banks and thresholds (production lines), heat maps, and line registration without retraining."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from backbone.artifacts import Artifact, latest_artifact, load_artifact, verify_artifact
from backbone.service.app import ModelInfo
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save_file

from pipelines.manufacturing.data import to_tensor
from services.manufacturing.app.anomaly_net import AnomalySegNet, load_base
from services.manufacturing.app.modeling import (
    DefectNet,
    DefectNetConfig,
    DefectNetEnsemble,
    create_defectnet,
)
from services.manufacturing.app.patchcore import (
    Calibration,
    MemoryBank,
    PatchCoreConfig,
    calibrate,
    make_extractor,
)

log = logging.getLogger(__name__)
DOMAIN = "manufacturing"
CLASSIFIER = "defect_classifier"
ANOMALY = "anomaly_magnetic_tile"
LINE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
ProgressFn = Callable[[float, str], None]
# PatchCore settings that change what a patch feature is: a line built with other values is stale
_FEATURE_KEYS = ("image_size", "features", "layers", "patch_kernel", "feature_dim", "normalize", "fb_scales",
                 "fb_stride", "channel_standardize", "learned_parts", "base_versions")
BASE = "anomaly_base_model"


def load_classifier(artifact: Artifact) -> tuple[DefectNet | DefectNetEnsemble, dict[str, Any]]:
    """Rebuild the classifier from an artifact (config + safetensors weights), in eval mode: one
    ``DefectNet``, or a ``DefectNetEnsemble`` where the config names ``members`` > 1."""
    verify_artifact(artifact)
    config = artifact.config
    cfg = DefectNetConfig.from_dict(config["model"])
    members = int(config.get("members", 1))
    model: DefectNet | DefectNetEnsemble = (
        create_defectnet("teacher", cfg) if members == 1
        else DefectNetEnsemble([create_defectnet("teacher", cfg) for _ in range(members)])
    )
    model.load_state_dict(artifact.load_tensors())
    model.eval()
    return model, config


# a line registered with up to this many good images is calibrated by K-fold cross-fitting (build_line)
CROSS_FIT_MAX_IMAGES = 60
CALIB_FOLDS = 5


SUSPECT_Z = 5.0  # robust z-score of an out-of-fold good score above which the image is reported
# floor of the robust spread, as a fraction of the median score: images of a line so uniform that its good
# scores barely spread are not left out for a few per cent above the rest (SUSPECT_Z x 0.05 = 25 %)
SUSPECT_MIN_SPREAD = 0.05
MIN_KEPT_GOOD = 3  # suspects are left out of a line's bank only while at least this many good images remain


def suspect_images(scores: torch.Tensor, z: float = SUSPECT_Z) -> list[int]:
    """Positions of the scores far above the rest: more than ``z`` robust standard deviations (1.4826 x the
    median absolute deviation, at least ``SUSPECT_MIN_SPREAD`` x the median) above the median. Among a
    line's good images these are the ones a bank of the others finds anomalous: a defect uploaded as good,
    or a kind of good part seen only once."""
    s = scores.double()
    med = s.median()
    spread = torch.maximum(1.4826 * (s - med).abs().median(), SUSPECT_MIN_SPREAD * med.abs())
    if float(spread) <= 0:
        return []
    return [int(i) for i in torch.nonzero((s - med) / spread > z).flatten()]


@dataclass
class Line:
    """One production line: its memory bank, threshold and build state."""

    line_id: str
    description: str = ""
    state: str = "building"  # building | ready | failed
    progress: float = 0.0
    message: str = "queued"
    source: str = "api"  # artifact | api
    bank: MemoryBank | None = None
    n_good_images: int = 0
    n_defect_images: int = 0
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    build_seconds: float | None = None
    classifier_version: str | None = None

    @property
    def calibration(self) -> Calibration | None:
        return self.bank.calibration if self.bank is not None else None

    def summary(self) -> dict[str, Any]:
        cal = self.calibration
        return {
            "line_id": self.line_id,
            "description": self.description,
            "state": self.state,
            "progress": round(self.progress, 3),
            "message": self.message,
            "source": self.source,
            "n_good_images": self.n_good_images,
            "n_defect_images": self.n_defect_images,
            "bank_size": int(self.bank.bank.shape[0]) if self.bank is not None else 0,
            "threshold": cal.threshold if cal else None,
            "calibration": cal.to_dict() if cal else None,
            "image_score": self.bank.image_score() if self.bank is not None else None,
            "position_weight": self.bank.position if self.bank is not None else None,
            "created_at": self.created_at,
            "build_seconds": self.build_seconds,
        }


def _colormap_overlay(
    img: Image.Image, amap: np.ndarray, threshold: float, box: tuple[float, float] = (0.0, 1.0)
) -> bytes:
    """PNG of the grey image with the anomaly map (scaled so 1.0 = 2x threshold) as a jet overlay and, when
    the image score leaves a border band out, a white frame around the inspected square (``box``: its first
    and past-the-end row and column as fractions of the side): the map outside it localises, it does not
    count."""
    from matplotlib import colormaps
    from PIL import ImageDraw

    h, w = img.height, img.width
    m = torch.from_numpy(amap)[None, None].float()
    m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    norm = np.clip(m / (2.0 * max(threshold, 1e-8)), 0.0, 1.0)
    heat = (colormaps["jet"](norm)[..., :3] * 255).astype(np.float32)
    grey = np.asarray(img.convert("RGB"), dtype=np.float32)
    alpha = 0.25 + 0.35 * norm[..., None]
    out = Image.fromarray((grey * (1 - alpha) + heat * alpha).clip(0, 255).astype(np.uint8))
    if box != (0.0, 1.0):
        lo, hi = box
        line = max(1, round(min(h, w) / 200))
        frame = [round(lo * w), round(lo * h), round(hi * w) - 1, round(hi * h) - 1]
        ImageDraw.Draw(out).rectangle(frame, outline=(255, 255, 255), width=line)
    buf = io.BytesIO()
    out.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


class InspectionModel:
    """Classifier + anomaly detector + the registry of production lines (``.info`` for the service)."""

    def __init__(
        self,
        classifier: DefectNet | DefectNetEnsemble,
        classes: Sequence[str],
        patchcore: PatchCoreConfig,
        info: ModelInfo,
        classifier_version: str,
        lines_dir: Path | None = None,
        base: Sequence[AnomalySegNet] = (),
    ) -> None:
        self.classifier = classifier.eval()
        self.classes = list(classes)
        self.image_size = classifier.cfg.image_size
        self.patchcore = patchcore
        self.extractor = make_extractor(patchcore, classifier.trunk, base)
        self.info = info
        self.classifier_version = classifier_version
        self.lines_dir = lines_dir
        self.lines: dict[str, Line] = {}
        self.active_line: Line | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------ lines
    def get_line(self, line_id: str) -> Line:
        """The line, or KeyError."""
        line = self.lines.get(line_id)
        if line is None:
            raise KeyError(line_id)
        return line

    def activate(self, line_id: str) -> Line:
        """Make ``line_id`` the active line (a dictionary lookup and a pointer swap)."""
        line = self.lines[line_id]
        if line.state != "ready" or line.bank is None:
            raise RuntimeError(f"line {line_id!r} is {line.state}, not ready")
        self.active_line = line
        return line

    def add_artifact_line(self, line_id: str, bank: MemoryBank, n_good: int, description: str) -> None:
        self.lines[line_id] = Line(
            line_id=line_id, description=description, state="ready", progress=1.0, message="ready",
            source="artifact", bank=bank, n_good_images=n_good, classifier_version=self.classifier_version,
        )

    def new_line(self, line_id: str, description: str) -> Line:
        """Reserve a line id (ValueError if taken by a line that is building or ready; failed and stale
        lines are replaced)."""
        with self._lock:
            old = self.lines.get(line_id)
            if old is not None and old.state in ("building", "ready"):
                raise ValueError(f"line {line_id!r} already exists ({old.state})")
            line = Line(line_id=line_id, description=description, classifier_version=self.classifier_version)
            self.lines[line_id] = line
            return line

    @torch.no_grad()
    def features(self, images: Sequence[Image.Image], batch: int = 4) -> torch.Tensor:
        """Patch features of ``images``, extracted ``batch`` at a time (on one CPU thread a batch of 4 costs
        12 ms per tile, one of 16 15 ms: larger activations fall out of the cache; docs/manufacturing.md)."""
        size = self.patchcore.image_size
        out = []
        for i in range(0, len(images), batch):
            x = torch.stack([to_tensor(im, size) for im in images[i : i + batch]])
            out.append(self.extractor(x))
        return torch.cat(out)

    def build_line(
        self,
        line: Line,
        good: Sequence[Image.Image],
        defects: Sequence[Image.Image] = (),
        calib_fraction: float = 0.25,
        seed: int = 0,
        cross_fit_max: int = CROSS_FIT_MAX_IMAGES,
        position_weight: float = 0.0,
    ) -> Line:
        """A line's memory bank and pass/fail threshold, without retraining.

        Up to ``cross_fit_max`` good images (a line onboarded from a handful): ``CALIB_FOLDS``-fold
        cross-fitting. Each good image is scored by a bank built without its fold, so the threshold rests
        on every image (not on the quarter held out), and the served bank holds them all; labelled
        defects are scored by every fold's bank (mean). More images: a bank from most of them, the
        threshold from the held-out rest (``calib_fraction``). ``position_weight`` > 0 compares each patch
        only with good patches at about the same place (parts imaged in one pose, and enough images to cover
        each place); 0, the default, with good patches anywhere (PatchCore's search)."""
        t0 = time.perf_counter()
        cfg = replace(self.patchcore, position_weight=float(position_weight))

        def progress(frac: float, msg: str) -> None:
            line.progress, line.message = frac, msg

        try:
            n = len(good)
            order = np.random.default_rng(seed).permutation(n)
            if n <= cross_fit_max:
                mb, good_scores, defect_scores, folds, suspects = self._cross_fit(
                    good, defects, order, progress, cfg)
            else:
                n_cal = max(2, int(round(calib_fraction * n)))
                cal_idx, fit_idx = order[:n_cal], order[n_cal:]
                progress(0.05, f"extracting features of {len(fit_idx)} good images")
                feats = self.features([good[i] for i in fit_idx])
                progress(0.3, "coreset subsampling")
                mb = MemoryBank.fit(feats, cfg, lambda f, m: progress(0.3 + 0.5 * f, m))
                progress(0.85, f"calibrating on {n_cal} held-out good and {len(defects)} defect images")
                peak, level, _ = mb.image_stats(self.features([good[i] for i in cal_idx]))
                mb.fit_level(peak, level)
                good_scores = mb.combine(peak, level)
                defect_scores = mb.score(self.features(list(defects)))[0] if defects else None
                folds, suspects = None, None
            mb.calibration = calibrate(good_scores, self.patchcore.threshold_quantile, defect_scores)
            mb.calibration.cross_fit_folds = folds
            mb.calibration.suspect_good = suspects  # cross-fitted lines: every good image has its own score
            line.bank = mb
            line.n_good_images, line.n_defect_images = n, len(defects)
            line.build_seconds = round(time.perf_counter() - t0, 3)
            if self.lines_dir is not None:
                self.save_line(line)
            line.state, line.progress, line.message = "ready", 1.0, "ready"
            if suspects:
                left_out = mb.calibration.n_good < n
                line.message = (f"ready; good images {suspects} (upload order) score far above the others"
                                + (" and were left out of the bank and the threshold" if left_out else ""))
        except Exception as exc:
            log.exception("line build failed")
            line.state, line.message = "failed", f"{type(exc).__name__}: {exc}"
        return line

    def _cross_fit(
        self,
        good: Sequence[Image.Image],
        defects: Sequence[Image.Image],
        order: np.ndarray,
        progress: Callable[[float, str], None],
        cfg: PatchCoreConfig,
    ) -> tuple[MemoryBank, torch.Tensor, torch.Tensor | None, int, list[int]]:
        """(bank, out-of-fold good scores, fold-mean defect scores, number of folds, suspect good images);
        the bank's level term is fitted on the out-of-fold statistics (``MemoryBank.fit_level``). Good images
        whose out-of-fold score is far above the others' (:func:`suspect_images`: a defect uploaded as good,
        or a kind of good part seen once) are left out of the bank and of the calibration scores, so one of
        them can neither teach the bank a defect nor lift the threshold above every defect; the line lists
        them."""
        n = len(good)
        k = min(CALIB_FOLDS, n)
        progress(0.05, f"extracting features of {n} good and {len(defects)} defect images")
        feats = self.features(good)
        defect_feats = self.features(list(defects)) if defects else None
        good_stats = torch.empty(2, n)  # out-of-fold (maximum, level) of every good image
        defect_stats = torch.zeros(2, len(defects))  # summed over the folds' banks
        for j, held in enumerate(np.array_split(order, k)):
            progress(0.1 + 0.6 * j / k, f"calibration fold {j + 1} of {k}: a bank without {len(held)} images")
            rest = torch.as_tensor(np.setdiff1d(order, held))
            fold_bank = MemoryBank.fit(feats[rest], cfg)
            peak, level, _ = fold_bank.image_stats(feats[torch.as_tensor(held)])
            good_stats[:, torch.as_tensor(held)] = torch.stack([peak, level]).float()
            if defect_feats is not None:
                defect_stats += torch.stack(fold_bank.image_stats(defect_feats)[:2]).float()
        probe = MemoryBank(torch.zeros(1, feats.shape[-1]), cfg)  # the level term alone ranks the good images
        probe.fit_level(good_stats[0], good_stats[1])
        suspects = suspect_images(probe.combine(good_stats[0], good_stats[1]))
        left = set(suspects)
        keep = torch.as_tensor([i for i in range(n) if i not in left])
        if len(keep) < MIN_KEPT_GOOD:
            keep = torch.arange(n)
        left_out = f" (without {suspects})" if len(keep) < n else ""
        progress(0.7, f"bank of {len(keep)} good images{left_out}")
        mb = MemoryBank.fit(feats[keep], cfg, lambda f, m: progress(0.7 + 0.25 * f, m))
        mb.fit_level(good_stats[0, keep], good_stats[1, keep])
        defect_scores = mb.combine(*(defect_stats / k)) if defects else None
        return mb, mb.combine(good_stats[0, keep], good_stats[1, keep]), defect_scores, k, suspects

    def save_line(self, line: Line) -> Path:
        """Persist a line (bank as safetensors, the rest as JSON) under ``lines_dir/<line_id>``."""
        assert self.lines_dir is not None and line.bank is not None
        target = self.lines_dir / line.line_id
        tmp = self.lines_dir / f".{line.line_id}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(line.bank.tensors(), str(tmp / "bank.safetensors"))
        meta = line.summary() | {"classifier_version": line.classifier_version,
                                 "patchcore": self.patchcore.to_dict()}
        meta["state"], meta["progress"], meta["message"] = "ready", 1.0, "ready"
        (tmp / "line.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        return target

    def load_lines(self) -> list[str]:
        """Load persisted lines built on this classifier version (others are listed as stale)."""
        loaded = []
        if self.lines_dir is None or not self.lines_dir.is_dir():
            return loaded
        for d in sorted(self.lines_dir.iterdir()):
            meta_file = d / "line.json"
            if d.name.startswith(".") or not meta_file.is_file():
                continue
            meta = json.loads(meta_file.read_text())
            line = Line(line_id=meta["line_id"], description=meta.get("description", ""), source="api",
                        n_good_images=meta.get("n_good_images", 0),
                        n_defect_images=meta.get("n_defect_images", 0),
                        created_at=meta.get("created_at", ""), build_seconds=meta.get("build_seconds"),
                        classifier_version=meta.get("classifier_version"))
            line_pc = PatchCoreConfig.from_dict(meta.get("patchcore", {})).to_dict()
            own_pc = self.patchcore.to_dict()
            same_features = meta.get("classifier_version") == self.classifier_version and all(
                line_pc[k] == own_pc[k] for k in _FEATURE_KEYS
            )
            if not same_features:
                line.state = "stale"
                theirs = f"{line_pc['features']}, base models {'+'.join(line_pc['base_versions']) or '-'}"
                ours = f"{own_pc['features']}, base models {'+'.join(own_pc['base_versions']) or '-'}"
                line.message = (f"built on classifier {meta.get('classifier_version')} ({theirs}); the "
                                f"service runs {self.classifier_version} ({ours}): register the line again")
            else:
                cal = Calibration(**meta["calibration"])
                tensors = load_file(str(d / "bank.safetensors"))
                line.bank = MemoryBank.from_tensors(tensors, self.patchcore, cal)
                line.state, line.progress, line.message = "ready", 1.0, "ready"
                loaded.append(line.line_id)
            self.lines.setdefault(line.line_id, line)
        return loaded

    # ---------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def classify(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Class probabilities (N, C)."""
        x = torch.stack([to_tensor(im, self.image_size) for im in images])
        return torch.softmax(self.classifier(x), dim=1)

    @torch.no_grad()
    def inspect(
        self, images: Sequence[Image.Image], line_id: str, heatmap: bool = False
    ) -> list[dict[str, Any]]:
        """Class, probabilities, anomaly score, pass/fail (score above the line threshold fails), heat map."""
        line = self.activate(line_id)
        bank = line.bank
        assert bank is not None
        probs = self.classify(images)
        scores, maps = bank.score(self.features(images))
        thr = bank.threshold
        side = maps.shape[-1]
        box = tuple(v / side for v in bank.inspected_box(side))  # the square the score comes from
        results = []
        for i, img in enumerate(images):
            p = probs[i]
            score = float(scores[i])
            res: dict[str, Any] = {
                "predicted_class": self.classes[int(p.argmax())],
                "confidence": float(p.max()),
                "probabilities": {c: round(float(v), 6) for c, v in zip(self.classes, p, strict=True)},
                "anomaly_score": score,
                "threshold": thr,
                "normalized_score": score / thr if thr > 0 else float("inf"),
                "passed": score <= thr,
                "width": img.width,
                "height": img.height,
            }
            if heatmap:
                png = _colormap_overlay(img, maps[i].numpy(), thr, box)
                res["heatmap_png_base64"] = base64.b64encode(png).decode()
            results.append(res)
        return results


def load_inspection_model(settings: Any) -> InspectionModel:
    """Newest anomaly artifact + the classifier it was built on; persisted API lines are reloaded."""
    model_dir = Path(settings.model_dir)
    anomaly = latest_artifact(model_dir, DOMAIN, ANOMALY)
    verify_artifact(anomaly)
    acfg = anomaly.config
    cls_path = Path(acfg["classifier_path"])
    if not cls_path.is_dir():  # artifacts moved: find the same version under this MODEL_DIR
        cls_path = model_dir / DOMAIN / CLASSIFIER / acfg["classifier_version"]
    classifier_art = load_artifact(cls_path)
    classifier, ccfg = load_classifier(classifier_art)
    pc = PatchCoreConfig.from_dict(acfg["patchcore"])
    bases: list[AnomalySegNet] = []
    if pc.features == "learned":  # the frozen self-supervised base models the bank was built on
        paths = acfg.get("base_paths") or ([acfg["base_path"]] if acfg.get("base_path") else [])
        for i, version in enumerate(pc.base_versions):
            path = Path(paths[i]) if i < len(paths) else None
            if path is None or not path.is_dir():  # artifacts moved: same version under this MODEL_DIR
                path = model_dir / DOMAIN / BASE / version
            base_art = load_artifact(path)
            if base_art.version != version:
                raise ValueError(f"{path} holds base model {base_art.version}; the bank needs {version}")
            bases.append(load_base(base_art))
    cal = Calibration(**anomaly.metrics["calibration"])
    bank = MemoryBank.from_tensors(st_load((anomaly.path / "bank.safetensors").read_bytes()), pc, cal)
    info = ModelInfo(
        name="manufacturing-inspector",
        version=f"{classifier_art.version}+{anomaly.version}",
        path=str(anomaly.path),
        metrics={"classifier": {k: v for k, v in classifier_art.metrics.items() if k != "history"},
                 "anomaly": anomaly.metrics},
        created_at=anomaly.manifest.get("created_at"),
    )
    lines_dir = Path(getattr(settings, "lines_dir", None) or model_dir / DOMAIN / "lines")
    model = InspectionModel(classifier, ccfg["classes"], pc, info, classifier_art.version, lines_dir, bases)
    default_line = getattr(settings, "default_line", "magnetic_tile")
    model.add_artifact_line(default_line, bank, int(acfg.get("n_train_images", 0)),
                            "magnetic tile surfaces (built at training time from defect-free tiles)")
    model.load_lines()
    return model
