"""Load the newest 2-D and 3-D artifacts and turn a decoded study into a structured report.

Routing: 2-D inputs go to the 2-D model (PneumoniaMNIST chest X-ray), 3-D inputs (DICOM series, NIfTI,
3-D arrays) to the 3-D model (AdrenalMNIST3D). Every report names the model and what it was trained on,
and flags inputs outside that domain for radiologist review.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from backbone.artifacts import Artifact, latest_artifact
from backbone.service.app import ModelInfo

from services.medical_imaging.app.core.config import Settings
from services.medical_imaging.app.inputs import InputError, Study
from services.medical_imaging.app.networks import load_network
from services.medical_imaging.app.preprocess import prepare_2d, prepare_3d
from services.medical_imaging.app.schemas import DiagnoseOptions
from services.medical_imaging.app.uncertainty import (
    decide,
    sample_probabilities,
    study_seed,
    uncertainty_review_reasons,
)

log = logging.getLogger(__name__)
DOMAIN = "medical_imaging"
#: modalities the 2-D chest X-ray model was trained on (PneumoniaMNIST = CXR); 8-bit images are assumed CXR
CXR_MODALITIES = {"CR", "DX", "OT"}


@dataclass
class LoadedNet:
    """One trained network with its artifact and calibration."""

    key: str
    artifact: Artifact
    net: torch.nn.Module
    config: dict[str, Any]
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def temperature(self) -> float:
        return float(self.config.get("temperature", 1.0))

    @property
    def threshold(self) -> float:
        return float(self.config.get("threshold", 0.5))

    @property
    def class_names(self) -> list[str]:
        return list(self.config["class_names"])

    @property
    def img_size(self) -> int:
        return int(self.config["img_size"])

    @property
    def trained_on(self) -> str:
        return str(self.config.get("dataset_description", self.config.get("dataset")))


@dataclass
class InferItem:
    """A prepared model input waiting in the DynamicBatcher."""

    key: str
    tensor: torch.Tensor  # (1, C, *spatial)
    mc_samples: int
    tta_views: int


@dataclass
class InferResult:
    probs: np.ndarray  # (samples, classes)
    gate: np.ndarray | None  # attention-gate map of the deterministic pass, (*grid)
    ms: float


def load_net(settings: Settings, key: str, name: str) -> LoadedNet:
    """Build the registered family from the artifact config and load its safetensors weights."""
    artifact = latest_artifact(settings.model_dir, DOMAIN, name)
    return LoadedNet(key, artifact, load_network(artifact), artifact.config)


class ImagingModel:
    """The service's model: a 2-D and/or a 3-D network, with report building."""

    def __init__(self, nets: dict[str, LoadedNet], settings: Settings) -> None:
        if not nets:
            raise FileNotFoundError(
                "no medical_imaging artifact found; run `python -m pipelines.medical_imaging.train`"
            )
        self.nets = nets
        self.settings = settings
        parts = [f"{k}:{n.artifact.name}" for k, n in sorted(nets.items())]
        self.info = ModelInfo(
            name="medical_hybrid[" + ",".join(parts) + "]",
            version="+".join(n.artifact.version for _, n in sorted(nets.items())),
            path=str(next(iter(nets.values())).artifact.path.parent.parent),
            metrics={k: n.artifact.metrics.get("test", {}) for k, n in nets.items()},
            created_at=max(n.artifact.manifest.get("created_at", "") for n in nets.values()),
        )

    # ------------------------------------------------------------------ routing / preprocessing
    def route(self, study: Study, requested: str = "auto") -> LoadedNet:
        key = requested if requested != "auto" else ("3d" if study.ndim == 3 else "2d")
        net = self.nets.get(key)
        if net is None:
            raise InputError(
                "no_model_for_input", f"no {key} model is loaded for a {study.ndim}-D input", 422
            )
        if (key == "3d") != (study.ndim == 3):
            raise InputError("wrong_dimensions", f"the {key} model cannot read a {study.ndim}-D input", 422)
        return net

    def prepare(self, study: Study, options: DiagnoseOptions) -> tuple[LoadedNet, torch.Tensor, list[str]]:
        net = self.route(study, options.model)
        if net.key == "2d":
            prep = prepare_2d(study, net.img_size, int(net.config.get("in_channels", 1)))
        else:
            prep = prepare_3d(
                study, net.img_size, roi_center=options.roi_center, roi_size_mm=options.roi_size_mm
            )
        return net, prep.tensor, prep.steps

    # ------------------------------------------------------------------ inference (batched)
    def infer_batch(self, items: list[InferItem]) -> list[InferResult]:
        """Run many prepared studies: one deterministic pass for all, then the MC x TTA samples."""
        results: list[InferResult | None] = [None] * len(items)
        for key in {it.key for it in items}:
            idx = [i for i, it in enumerate(items) if it.key == key]
            net = self.nets[key]
            with net.lock, torch.inference_mode():
                t0 = time.perf_counter()
                x = torch.cat([items[i].tensor.as_subclass(torch.Tensor) for i in idx])
                net.net.eval()
                logits = net.net(x)
                gates = net.net.last_gate
                det = torch.softmax(logits.float() / net.temperature, dim=-1).numpy()
                for j, i in enumerate(idx):
                    it = items[i]
                    gate = gates[j, 0].float().numpy() if gates is not None else None
                    if it.mc_samples * it.tta_views > 1:
                        probs = sample_probabilities(
                            net.net,
                            it.tensor,
                            mc_samples=it.mc_samples,
                            tta_views_n=it.tta_views,
                            temperature=net.temperature,
                            seed=study_seed(it.tensor),  # the same study always gets the same report
                        )
                    else:
                        probs = det[j : j + 1]
                    results[i] = InferResult(probs, gate, (time.perf_counter() - t0) * 1000 / len(idx))
        return [r for r in results if r is not None]

    # ------------------------------------------------------------------ report
    def build_report(
        self,
        study: Study,
        net: LoadedNet,
        tensor: torch.Tensor,
        steps: list[str],
        result: InferResult,
        options: DiagnoseOptions,
        timings: dict[str, float],
    ) -> dict[str, Any]:
        s = self.settings
        names = net.class_names
        binary = len(names) == 2
        mean_probs = result.probs.mean(axis=0)
        predicted, unc = decide(result.probs, net.threshold)
        p = unc.mean
        reasons: list[str] = []
        warnings: list[str] = []
        uncertainty = None
        if options.uncertainty and unc.n_samples > 1:
            uncertainty = {
                "method": uncertainty_method(int(net.config.get("ensemble_size", 1))),
                "mc_samples": options.mc_samples or s.mc_samples,
                "tta_views": options.tta_views or s.tta_views,
                "n_samples": unc.n_samples,
                "mean": p,
                "std": unc.std,
                "predictive_entropy": unc.predictive_entropy,
                "mutual_information": unc.mutual_information,
                "interval_95": unc.interval_95,
            }
            reasons.extend(
                uncertainty_review_reasons(unc, net.threshold, binary, s.review_entropy, s.review_std)
            )
        else:
            warnings.append("uncertainty passes disabled: single deterministic prediction")
            if binary and abs(p - net.threshold) < 0.2:
                reasons.append(
                    f"probability {p:.2f} is within 0.2 of the threshold (no uncertainty passes run)"
                )
        reasons.extend(self._domain_reasons(study, net))
        finding = {
            "label": names[predicted],
            "positive": bool(predicted == 1) if binary else None,
            "probability": p,
            "threshold": net.threshold,
            "class_probabilities": {n: float(v) for n, v in zip(names, mean_probs, strict=True)},
        }
        report: dict[str, Any] = {
            "report_id": uuid.uuid4().hex,
            "study_anon_id": study.anon_id,
            "created_at": datetime.now(UTC).isoformat(),
            "finding": finding,
            "uncertainty": uncertainty,
            "needs_review": bool(reasons),
            "review_reasons": reasons,
            "model": {
                "key": net.key,
                "name": net.artifact.name,
                "version": net.artifact.version,
                "family": net.config["family"],
                "trained_on": net.trained_on,
                "test_metrics": {
                    k: float(v)
                    for k, v in net.artifact.metrics.get("test", {}).items()
                    if k in ("auc", "acc", "ece")
                },
            },
            "input": study.summary(),
            "preprocessing": steps,
            "warnings": warnings,
            "timings_ms": timings,
        }
        if options.saliency and result.gate is not None:
            report["saliency_png_base64"] = saliency_png(tensor, result.gate)
        if options.dicom_sr:
            from services.medical_imaging.app.dicom_sr import build_sr

            report["dicom_sr_base64"] = base64.b64encode(build_sr(study, report)).decode()
        return report

    @staticmethod
    def _domain_reasons(study: Study, net: LoadedNet) -> list[str]:
        """Honest out-of-domain flags: the report must say when the model never saw this kind of input."""
        reasons = []
        if net.key == "2d" and study.modality not in CXR_MODALITIES:
            reasons.append(
                f"input modality {study.modality} is outside the training domain ({net.trained_on})"
            )
        if net.key == "3d":
            values = np.unique(study.array[:: max(1, study.array.shape[0] // 8)])
            if values.size > 2:
                reasons.append(
                    f"the 3-D model was trained on binary segmentation masks ({net.trained_on}); "
                    f"this input is a "
                    f"{study.modality} intensity volume, so the result is out of domain"
                )
        return reasons


def uncertainty_method(ensemble_size: int) -> str:
    """How the report's samples were drawn."""
    method = "MC dropout x test-time augmentation (flips, 1-voxel shifts), temperature-scaled"
    if ensemble_size > 1:
        method += f"; deep ensemble of {ensemble_size} networks, each sample drawn through one in turn"
    return method


def saliency_png(tensor: torch.Tensor, gate: np.ndarray, size: int = 256) -> str:
    """Base64 PNG: the attention-gate map (jet colours) over the model input (for 3-D the axial slice
    through the gate's maximum)."""
    from matplotlib import colormaps
    from PIL import Image

    img = tensor[0, 0].float().numpy()
    if img.ndim == 3:
        z_gate = int(np.unravel_index(np.argmax(gate), gate.shape)[0])
        z_img = int(round((z_gate + 0.5) * img.shape[0] / gate.shape[0] - 0.5))
        img, gate = img[min(max(z_img, 0), img.shape[0] - 1)], gate[z_gate]
    g = torch.as_tensor(gate)[None, None].float()
    g = torch.nn.functional.interpolate(g, size=(size, size), mode="bilinear", align_corners=False)[
        0, 0
    ].numpy()
    g = (g - g.min()) / max(float(g.max() - g.min()), 1e-6)
    base = torch.nn.functional.interpolate(
        torch.as_tensor(img)[None, None].float(), size=(size, size), mode="bilinear", align_corners=False
    )[0, 0].numpy()
    base = np.clip(base, 0, 1)
    heat = colormaps["jet"](g)[..., :3]
    rgb = (0.6 * np.repeat(base[..., None], 3, axis=2) + 0.4 * heat) * 255
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def load_model(settings: Settings) -> ImagingModel:
    """Load the newest 2-D and 3-D artifacts (at least one must exist)."""
    torch.set_num_threads(settings.torch_threads)
    nets: dict[str, LoadedNet] = {}
    errors = []
    for key, name in (("2d", settings.model_2d_name), ("3d", settings.model_3d_name)):
        try:
            nets[key] = load_net(settings, key, name)
        except FileNotFoundError as exc:
            errors.append(str(exc))
    if not nets:
        raise FileNotFoundError("; ".join(errors))
    for err in errors:
        log.warning("model missing: %s", err)
    return ImagingModel(nets, settings)
