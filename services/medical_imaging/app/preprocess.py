"""MONAI-based mapping of a decoded :class:`Study` into a model's input space.

2-D: intensity scaling to [0, 1] (8-bit images / 255 like MedMNIST; DICOM by percentiles, CT by a
window), then area resize to the model's size. 3-D: CT Hounsfield windowing, isotropic resampling with
MONAI ``Spacing``, an optional crop around a voxel coordinate (``roi_center``, in the input array's
(z, y, x) index space) of ``roi_size_mm``, pad-to-cube and resize to the model's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor, set_track_meta
from monai.transforms import (
    Resize,
    ResizeWithPadOrCrop,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    Spacing,
    SpatialCrop,
)

from services.medical_imaging.app.inputs import InputError, Study

#: window (low, high) in HU applied to CT before the model
CT_WINDOW_3D = (-160.0, 240.0)  # soft tissue (W 400 / L 40)
CT_WINDOW_2D = (-1000.0, 400.0)  # chest / lung-mediastinum


@dataclass
class Prepared:
    """The model input (1, C, *spatial) in [0, 1] and what was done to get it."""

    tensor: torch.Tensor
    steps: list[str]


def _scale(arr: np.ndarray, study: Study, window: tuple[float, float]) -> tuple[torch.Tensor, str]:
    t = torch.as_tensor(arr, dtype=torch.float32)[None]
    lo, hi = float(arr.min()), float(arr.max())
    if study.modality == "CT":
        return ScaleIntensityRange(window[0], window[1], 0.0, 1.0, clip=True)(t), f"CT window {window} HU"
    if study.source_format in ("png", "jpeg") or (
        lo >= 0 and hi <= 255 and hi > 1.0 and study.source_format == "npy"
    ):
        return torch.clamp(t / 255.0, 0, 1), "8-bit intensities / 255"
    if lo >= 0 and hi <= 1.0:
        return t, "intensities already in [0, 1]"
    scaled = ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True)(t)
    return torch.as_tensor(scaled), "percentile scaling 0.5-99.5 %"


def prepare_2d(study: Study, img_size: int, in_channels: int = 1) -> Prepared:
    """A 2-D study in the model's (1, C, S, S) space."""
    if study.ndim != 2:
        raise InputError("wrong_dimensions", f"the 2-D model needs a 2-D image, got {study.ndim}-D", 422)
    t, how = _scale(study.array, study, CT_WINDOW_2D)
    resized = Resize((img_size, img_size), mode="area")(t)
    x = torch.as_tensor(resized).float().as_subclass(torch.Tensor)  # plain tensor (no MONAI metadata)
    if in_channels > 1:
        x = x.expand(in_channels, -1, -1)
    h, w = study.array.shape
    return Prepared(x[None].contiguous(), [how, f"area resize {h}x{w} -> {img_size}x{img_size}"])


def prepare_3d(
    study: Study,
    img_size: int,
    *,
    roi_center: tuple[float, float, float] | None = None,
    roi_size_mm: float = 96.0,
    target_spacing_mm: float = 2.0,
) -> Prepared:
    """A 3-D study in the model's (1, 1, S, S, S) space."""
    if study.ndim != 3:
        raise InputError("wrong_dimensions", f"the 3-D model needs a volume, got {study.ndim}-D", 422)
    set_track_meta(True)  # Spacing needs the affine carried by MetaTensor
    steps: list[str] = []
    t, how = _scale(study.array, study, CT_WINDOW_3D)
    steps.append(how)
    spacing = study.spacing or (1.0, 1.0, 1.0)
    mt = MetaTensor(
        torch.as_tensor(t).as_subclass(torch.Tensor),
        affine=torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64)),
    )
    vol: torch.Tensor = mt
    if study.spacing is not None:
        vol = Spacing(pixdim=(target_spacing_mm,) * 3, mode="bilinear")(mt)
        steps.append(
            f"resampled {tuple(round(s, 3) for s in spacing)} mm -> {target_spacing_mm} mm isotropic"
        )
        scale = np.array(spacing) / target_spacing_mm
    else:
        scale = np.ones(3)
        steps.append("no spacing known: voxel grid used as is")
    if roi_center is not None:
        shape = np.array(study.array.shape)
        c = np.asarray(roi_center, dtype=float)
        if c.shape != (3,) or np.any(c < 0) or np.any(c >= shape):
            raise InputError(
                "invalid_roi", f"roi_center {roi_center} is outside the volume of shape {tuple(shape)}", 422
            )
        centre = np.round(c * scale).astype(int)
        size_vox = (
            int(round(roi_size_mm / target_spacing_mm)) if study.spacing is not None else int(roi_size_mm)
        )
        vol = SpatialCrop(roi_center=centre.tolist(), roi_size=[size_vox] * 3)(vol)
        vol = ResizeWithPadOrCrop([size_vox] * 3)(vol)
        steps.append(f"crop {size_vox}^3 voxels ({roi_size_mm} mm) around voxel {tuple(int(v) for v in c)}")
    else:
        side = int(max(vol.shape[1:]))
        vol = ResizeWithPadOrCrop([side] * 3)(vol)
        steps.append(f"whole volume padded to a {side}^3 cube")
    out = Resize((img_size,) * 3, mode="area")(vol)
    steps.append(f"area resize -> {img_size}^3")
    x = torch.as_tensor(out).float().as_subclass(torch.Tensor)
    return Prepared(x[None].contiguous(), steps)
