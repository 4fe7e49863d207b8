"""Study input handling: DICOM (file, series, zip), NIfTI, PNG/JPEG and NumPy ``.npy`` to arrays.

Everything is read in memory (nothing is extracted to disk). Bad input raises :class:`InputError`
(a ``ServiceError`` with a 4xx status and a stable code), never a crash:

* zips: path traversal / absolute names / symlinks, too many entries, nested archives, total
  uncompressed size and compression ratio limits (checked on the declared sizes *and* while reading);
* DICOM: missing file meta header, missing pixel data, non-image objects (SEG, RTSTRUCT, SR ...),
  transfer syntaxes no installed decoder handles, mixed series, inconsistent slice geometry;
* anything that is not a recognised image format (415).

Patient identifiers are never returned in summaries or logged: a study is referred to by
``anon_id``, a salted hash of its Study Instance UID (or of the bytes when there is none).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import stat
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
from backbone.service.errors import ServiceError
from backbone.service.images import ImageTooLarge, decode_grey

log = logging.getLogger(__name__)

#: Objects that carry no image to diagnose.
NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG", "DOC"}
_IGNORED_ZIP_NAMES = {"DICOMDIR", ".DS_Store", "Thumbs.db"}


class InputError(ServiceError):
    """A rejected upload: 4xx with a machine-readable code and the reason."""

    def __init__(self, code: str, detail: str, status_code: int = 422) -> None:
        super().__init__(status_code, code, detail)


@dataclass(frozen=True)
class InputLimits:
    """Limits applied to every upload (bytes, counts, pixels)."""

    max_total_uncompressed_bytes: int = 512 * 1024 * 1024
    max_compression_ratio: float = 200.0
    max_zip_entries: int = 2000
    max_pixels: int = 512 * 512 * 1024  # voxels of one decoded study
    max_image_pixels: int = 8192 * 8192  # PNG/JPEG


@dataclass
class Study:
    """A decoded study: ``array`` is float32 (H, W) or (D, H, W) in the source's own units."""

    array: np.ndarray
    source_format: str  # dicom | dicom_series | nifti | png | jpeg | npy
    modality: str  # CT, MR, CR, DX, ... or OT (unknown)
    spacing: tuple[float, ...] | None  # per axis of ``array`` in mm, None if unknown
    anon_id: str
    affine: np.ndarray | None = None  # 4x4 voxel -> RAS mm for volumes (NIfTI / DICOM series)
    n_files: int = 1
    dicom_refs: list[Any] = field(default_factory=list)  # pydicom Datasets without pixels (for SR)
    notes: list[str] = field(default_factory=list)

    @property
    def ndim(self) -> int:
        return self.array.ndim

    def summary(self) -> dict[str, Any]:
        """What the report says about the input (no identifiers)."""
        return {
            "format": self.source_format,
            "modality": self.modality,
            "dims": self.ndim,
            "size": [int(s) for s in self.array.shape],
            "spacing_mm": [round(float(s), 4) for s in self.spacing] if self.spacing else None,
            "n_files": self.n_files,
            "intensity_range": [float(np.min(self.array)), float(np.max(self.array))],
            "anon_id": self.anon_id,
            "notes": list(self.notes),
        }


def anonymous_id(key: bytes | str) -> str:
    """A short, non-reversible id for logs and reports (sha256 of the key, 16 hex chars)."""
    data = key.encode() if isinstance(key, str) else key
    return hashlib.sha256(b"medical-imaging:" + data).hexdigest()[:16]


# ---------------------------------------------------------------- format detection


def sniff(data: bytes, filename: str = "") -> str:
    """Detect the format from magic bytes (the file name only breaks ties)."""
    name = filename.lower()
    if data[:4] == b"PK\x03\x04" or data[:4] == b"PK\x05\x06":
        return "zip"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:6] == b"\x93NUMPY":
        return "npy"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data[:2] == b"\x1f\x8b":
        return "nifti_gz" if name.endswith((".nii.gz", ".gz")) else "gzip"
    if len(data) >= 348 and data[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    if len(data) >= 540 and data[4:8] in (b"n+2\x00", b"ni2\x00"):
        return "nifti"
    if len(data) >= 348 and 348 in (int.from_bytes(data[:4], "little"), int.from_bytes(data[:4], "big")):
        return "nifti" if name.endswith((".nii", ".hdr", ".img")) else "unknown"
    if name.endswith(".dcm"):
        return "dicom_no_meta"
    return "unknown"


# ---------------------------------------------------------------- zip


def _safe_member_name(name: str) -> str:
    if "\x00" in name:
        raise InputError("zip_path_traversal", f"zip entry name contains a NUL byte: {name!r}", 400)
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(name).drive or ".." in posix.parts:
        raise InputError("zip_path_traversal", f"zip entry {name!r} points outside the archive", 400)
    return str(posix)


def read_zip(data: bytes, limits: InputLimits) -> list[tuple[str, bytes]]:
    """Files of a zip, in memory, after the safety checks (traversal, bombs, links, nesting)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InputError("invalid_zip", f"not a readable zip archive: {exc}", 400) from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_zip_entries:
            raise InputError("zip_too_many_entries", f"{len(infos)} entries > {limits.max_zip_entries}", 413)
        declared = 0
        members = []
        for info in infos:
            name = _safe_member_name(info.filename)
            mode = info.external_attr >> 16
            if mode and stat.S_ISLNK(mode):
                raise InputError("zip_symlink", f"zip entry {name!r} is a symbolic link", 400)
            if info.is_dir():
                continue
            base = PurePosixPath(name).name
            if base in _IGNORED_ZIP_NAMES or base.startswith("._") or name.startswith("__MACOSX/"):
                continue
            if info.flag_bits & 0x1:
                raise InputError("zip_encrypted", f"zip entry {name!r} is encrypted", 400)
            declared += info.file_size
            if declared > limits.max_total_uncompressed_bytes:
                raise InputError(
                    "zip_bomb",
                    f"total uncompressed size exceeds {limits.max_total_uncompressed_bytes} bytes",
                    413,
                )
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > limits.max_compression_ratio:
                raise InputError(
                    "zip_bomb",
                    f"zip entry {name!r} compression ratio {ratio:.0f} > {limits.max_compression_ratio:.0f}",
                    413,
                )
            members.append((name, info))
        total = 0
        files: list[tuple[str, bytes]] = []
        for name, info in members:
            # never trust the declared sizes: read with a hard cap
            budget = limits.max_total_uncompressed_bytes - total
            try:
                with zf.open(info) as fh:
                    blob = fh.read(min(budget, info.file_size) + 1)
            except (
                zipfile.BadZipFile,
                OSError,
                ValueError,
                NotImplementedError,
                EOFError,
                zlib.error,
            ) as exc:
                raise InputError("invalid_zip", f"cannot read zip entry {name!r}: {exc}", 400) from exc
            if len(blob) > info.file_size or len(blob) > budget:
                raise InputError("zip_bomb", f"zip entry {name!r} inflates beyond its declared size", 413)
            total += len(blob)
            if sniff(blob, name) == "zip":
                raise InputError("nested_zip", f"zip entry {name!r} is itself an archive", 400)
            files.append((name, blob))
    if not files:
        raise InputError("empty_zip", "the zip contains no files", 400)
    return files


# ---------------------------------------------------------------- DICOM


def _read_dicom(data: bytes, name: str) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError as exc:
        raise InputError(
            "dicom_no_meta",
            f"{name!r} has no DICOM file meta header (Part 10 'DICM' prefix); re-export it as a DICOM file",
            422,
        ) from exc
    except Exception as exc:  # truncated or corrupt files
        raise InputError(
            "invalid_dicom", f"{name!r} is not a readable DICOM file: {type(exc).__name__}", 422
        ) from exc
    return ds


def _check_dicom_image(ds: Any, name: str) -> None:
    modality = str(ds.get("Modality", "") or "").upper()
    if modality in NON_IMAGE_MODALITIES:
        raise InputError("not_an_image", f"{name!r} is a DICOM {modality} object, not an image", 422)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InputError("missing_pixel_data", f"{name!r} has no pixel data", 422)
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None:
        raise InputError("dicom_no_meta", f"{name!r} has no transfer syntax in its file meta", 422)


def _decode_pixels(ds: Any, name: str) -> np.ndarray:
    ts = ds.file_meta.TransferSyntaxUID
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except (NotImplementedError, RuntimeError, ValueError, AttributeError, TypeError, KeyError) as exc:
        syntax = getattr(ts, "name", str(ts))
        if ts.is_compressed:
            raise InputError(
                "unsupported_transfer_syntax",
                f"{name!r}: transfer syntax {syntax} ({ts}) cannot be decoded by the installed decoders",
                415,
            ) from exc
        raise InputError("invalid_pixel_data", f"{name!r}: pixel data cannot be decoded: {exc}", 422) from exc
    if arr.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) > 1:
        arr = arr.mean(axis=-1)  # colour -> luminance
    elif arr.ndim == 4:
        arr = arr.mean(axis=-1)
    arr = arr.astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    arr = arr * slope + intercept
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        arr = arr.max() - arr + arr.min()
    return arr


def _strip(ds: Any) -> Any:
    """A copy of the header without pixel data (kept to reference the study in a DICOM SR)."""
    import copy

    meta = copy.deepcopy(ds)
    for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if tag in meta:
            delattr(meta, tag)
    return meta


def _spacing2d(ds: Any) -> tuple[float, float] | None:
    ps = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if ps and len(ps) == 2:
        return float(ps[0]), float(ps[1])
    return None


def _study_key(ds: Any, data: bytes) -> str:
    uid = str(ds.get("StudyInstanceUID", "") or "")
    return anonymous_id(uid if uid else hashlib.sha256(data).hexdigest())


def load_dicom_files(files: list[tuple[str, bytes]], limits: InputLimits) -> Study:
    """One DICOM file (2-D or multi-frame) or a series of slices sorted by position."""
    datasets = []
    for name, blob in files:
        ds = _read_dicom(blob, name)
        _check_dicom_image(ds, name)
        datasets.append((name, ds))
    series = {str(ds.get("SeriesInstanceUID", "") or "") for _, ds in datasets}
    if len(series) > 1:
        raise InputError(
            "mixed_series",
            f"the upload mixes {len(series)} series; send one series per study",
            422,
        )
    modalities = {str(ds.get("Modality", "") or "OT").upper() for _, ds in datasets}
    if len(modalities) > 1:
        raise InputError("mixed_series", f"the upload mixes modalities {sorted(modalities)}", 422)
    modality = modalities.pop() or "OT"
    key = _study_key(datasets[0][1], files[0][1])
    if len(datasets) == 1:
        name, ds = datasets[0]
        rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if rows * cols * frames > limits.max_pixels:
            raise InputError("image_too_large", f"{rows}x{cols}x{frames} voxels > {limits.max_pixels}", 413)
        arr = _decode_pixels(ds, name)
        sp2 = _spacing2d(ds)
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        spacing: tuple[float, ...] | None
        if arr.ndim == 3:
            thick = float(ds.get("SpacingBetweenSlices", ds.get("SliceThickness", 1.0)) or 1.0)
            spacing = (thick, *sp2) if sp2 else None
        else:
            spacing = sp2
        return Study(arr, "dicom", modality, spacing, key, n_files=1, dicom_refs=[_strip(ds)])
    # a series: consistent geometry, sorted along the slice normal
    shapes = {(int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) for _, ds in datasets}
    if len(shapes) > 1:
        raise InputError("mixed_series", f"slices have different sizes {sorted(shapes)}", 422)
    rows, cols = shapes.pop()
    if rows * cols * len(datasets) > limits.max_pixels:
        raise InputError(
            "image_too_large", f"{len(datasets)} slices of {rows}x{cols} > {limits.max_pixels}", 413
        )
    orients = {
        tuple(round(float(v), 3) for v in ds.get("ImageOrientationPatient", []) or []) for _, ds in datasets
    }
    notes: list[str] = []
    positioned = all(ds.get("ImagePositionPatient") is not None for _, ds in datasets) and len(orients) == 1
    if len(orients) > 1:
        raise InputError("mixed_series", "slices have different orientations", 422)
    if positioned and len(next(iter(orients))) == 6:
        o = np.array(next(iter(orients)), dtype=float)
        normal = np.cross(o[:3], o[3:])
        pos = [float(np.dot(normal, np.array(ds.ImagePositionPatient, dtype=float))) for _, ds in datasets]
        order = np.argsort(pos)
        sorted_pos = np.array(pos)[order]
        gaps = np.diff(sorted_pos)
        if np.any(np.abs(gaps) < 1e-3):
            raise InputError("duplicate_slices", "two or more slices share the same position", 422)
        if gaps.size and (gaps.max() - gaps.min()) > 0.1 * max(abs(float(np.median(gaps))), 1e-3):
            notes.append("non-uniform slice spacing; median spacing used")
        dz = float(np.median(gaps)) if gaps.size else 1.0
    else:
        order = np.argsort([int(ds.get("InstanceNumber", i) or i) for i, (_, ds) in enumerate(datasets)])
        dz = float(datasets[0][1].get("SliceThickness", 1.0) or 1.0)
        notes.append("slices sorted by InstanceNumber (no ImagePositionPatient)")
    slices = [_decode_pixels(datasets[i][1], datasets[i][0]) for i in order]
    if any(s.ndim != 2 for s in slices):
        raise InputError("mixed_series", "a series must be made of single-frame slices", 422)
    vol = np.stack(slices, axis=0)
    sp2 = _spacing2d(datasets[0][1]) or (1.0, 1.0)
    return Study(
        vol,
        "dicom_series",
        modality,
        (abs(dz), *sp2),
        key,
        n_files=len(datasets),
        dicom_refs=[_strip(datasets[i][1]) for i in order],
        notes=notes,
    )


# ---------------------------------------------------------------- other formats


def _gunzip_limited(data: bytes, limits: InputLimits) -> bytes:
    out = io.BytesIO()
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    chunk = data
    try:
        while chunk:
            piece = d.decompress(chunk, 1 << 20)
            out.write(piece)
            if out.tell() > limits.max_total_uncompressed_bytes:
                raise InputError("gzip_bomb", "gzip stream inflates beyond the upload limit", 413)
            if out.tell() > limits.max_compression_ratio * max(len(data), 1) and out.tell() > 1 << 20:
                raise InputError("gzip_bomb", "gzip compression ratio exceeds the limit", 413)
            chunk = d.unconsumed_tail
    except zlib.error as exc:
        raise InputError("invalid_gzip", f"corrupt gzip stream: {exc}", 400) from exc
    return out.getvalue()


def load_nifti(data: bytes, name: str, limits: InputLimits) -> Study:
    """A NIfTI volume in RAS orientation (MONAI ``Orientation``), spacing from the header."""
    import nibabel as nib

    raw = _gunzip_limited(data, limits) if data[:2] == b"\x1f\x8b" else data
    try:
        img = nib.Nifti1Image.from_bytes(raw)
    except Exception as exc:
        try:
            img = nib.Nifti2Image.from_bytes(raw)
        except Exception:
            raise InputError("invalid_nifti", f"{name!r} is not a readable NIfTI file: {exc}", 422) from exc
    shape = img.shape
    if int(np.prod(shape)) > limits.max_pixels:
        raise InputError("image_too_large", f"NIfTI of shape {shape} > {limits.max_pixels} voxels", 413)
    arr = np.asarray(img.dataobj, dtype=np.float32)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise InputError("unsupported_dimensions", f"NIfTI with shape {shape}: need a 2-D or 3-D image", 422)
    if arr.ndim == 2:
        return Study(
            arr, "nifti", "OT", tuple(float(z) for z in img.header.get_zooms()[:2]), anonymous_id(data)
        )
    from monai.data import MetaTensor, set_track_meta
    from monai.transforms import Orientation

    set_track_meta(True)
    mt = MetaTensor(arr[None], affine=img.affine)
    ras = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(mt)
    affine = np.asarray(ras.affine, dtype=np.float64)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    vol = np.asarray(ras[0], dtype=np.float32)
    # array axes as (D, H, W) = (S, A, R) reversed order keeps the "slices first" convention
    vol = np.transpose(vol, (2, 1, 0))
    desc = img.header.get("descrip")
    desc_text = bytes(desc).decode(errors="ignore").lower() if desc is not None else ""
    lo, hi = float(np.min(vol)), float(np.max(vol))
    looks_hu = lo <= -900 and hi <= 5000 and float(np.percentile(vol, 1)) < -700
    modality = "CT" if looks_hu or "ct" in desc_text.split() else "OT"
    study = Study(
        vol, "nifti", modality, (float(zooms[2]), float(zooms[1]), float(zooms[0])), anonymous_id(data)
    )
    study.affine = affine
    if modality == "CT":
        study.notes.append("modality inferred as CT from Hounsfield-range intensities")
    return study


def load_raster(data: bytes, fmt: str, name: str, limits: InputLimits) -> Study:
    """PNG / JPEG / ... as a grayscale 2-D image on the 8-bit scale, 16-bit images (X-ray PNGs) scaled
    rather than clipped (:func:`backbone.service.images.decode_grey`; decompression-bomb safe)."""
    try:
        arr = decode_grey(data, max_pixels=limits.max_image_pixels)
    except ImageTooLarge as exc:
        raise InputError("image_too_large", str(exc), 413) from exc
    except ValueError as exc:
        raise InputError("invalid_image", f"{name!r} is not a readable {fmt.upper()}: {exc}", 422) from exc
    return Study(arr, fmt, "OT", None, anonymous_id(data))


def load_npy(data: bytes, name: str, limits: InputLimits) -> Study:
    """A NumPy array (no pickle): 2-D (H, W), 3-D (D, H, W) or either with a leading channel of 1."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError("invalid_npy", f"{name!r} is not a plain .npy array: {exc}", 422) from exc
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise InputError("invalid_npy", f"array dtype {arr.dtype} is not numeric", 422)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim not in (2, 3) or min(arr.shape) < 2:
        raise InputError("unsupported_dimensions", f"array of shape {arr.shape}: need 2-D or 3-D", 422)
    if arr.size > limits.max_pixels:
        raise InputError("image_too_large", f"array of {arr.size} voxels > {limits.max_pixels}", 413)
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise InputError("invalid_npy", "array contains NaN or infinite values", 422)
    return Study(arr, "npy", "OT", None, anonymous_id(data))


def load_study(files: list[tuple[str, bytes]], limits: InputLimits | None = None) -> Study:
    """Decode one study from uploaded files (a zip, one or many DICOM files, or one other image)."""
    limits = limits or InputLimits()
    if not files:
        raise InputError("no_file", "upload at least one file", 400)
    if len(files) == 1 and sniff(files[0][1], files[0][0]) == "zip":
        files = read_zip(files[0][1], limits)
    kinds = [sniff(blob, name) for name, blob in files]
    for (name, blob), kind in zip(files, kinds, strict=True):
        if not blob:
            raise InputError("empty_file", f"{name!r} is empty", 400)
        if kind == "zip":
            raise InputError("nested_zip", f"{name!r}: send one zip per study, not mixed with files", 400)
    if all(k in ("dicom", "dicom_no_meta") for k in kinds):
        return load_dicom_files(files, limits)
    if len(files) > 1:
        raise InputError(
            "unsupported_media_type",
            "several files are accepted only as one DICOM series; got " + ", ".join(sorted(set(kinds))),
            415,
        )
    name, blob = files[0]
    kind = kinds[0]
    if kind in ("nifti", "nifti_gz"):
        return load_nifti(blob, name, limits)
    if kind in ("png", "jpeg"):
        return load_raster(blob, kind, name, limits)
    if kind == "npy":
        return load_npy(blob, name, limits)
    raise InputError(
        "unsupported_media_type",
        f"{name!r} is not a DICOM, NIfTI, PNG, JPEG, NumPy or zip file",
        415,
    )


def gzip_bytes(data: bytes) -> bytes:
    """Helper for clients/tests: gzip ``data`` (e.g. to send ``.nii.gz``)."""
    return gzip.compress(data)
