"""Input handling on the real fixtures: DICOM (file / series / zip), NIfTI, PNG/JPEG, .npy, rejections."""

from __future__ import annotations

import gzip
import io
import random
import stat
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from services.medical_imaging.app.inputs import InputError, InputLimits, load_study, sniff
from services.medical_imaging.app.preprocess import prepare_2d, prepare_3d


def _read(path: Path) -> tuple[str, bytes]:
    return path.name, path.read_bytes()


def _zip(entries: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, blob in entries:
            zf.writestr(name, blob)
    return buf.getvalue()


def _reject(
    files: list[tuple[str, bytes]], code: str, status: int, limits: InputLimits | None = None
) -> InputError:
    with pytest.raises(InputError) as info:
        load_study(files, limits)
    assert info.value.error == code, info.value.detail
    assert info.value.status_code == status
    return info.value


@pytest.fixture(scope="module")
def fixtures(data_dir: Path) -> Path:
    return data_dir / "dicom_fixtures"


@pytest.fixture(scope="module")
def ct_series(data_dir: Path) -> list[tuple[str, bytes]]:
    return [_read(p) for p in sorted((data_dir / "ct_examples" / "example_ct_dicom").iterdir())]


def test_single_dicom_in_every_decodable_transfer_syntax(fixtures: Path) -> None:
    reference = load_study([_read(fixtures / "MR_small.dcm")])
    assert reference.modality == "MR" and reference.array.shape == (64, 64)
    assert reference.spacing == pytest.approx((0.3125, 0.3125))
    for name in (
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ):
        study = load_study([_read(fixtures / name)])
        np.testing.assert_allclose(
            study.array, reference.array
        )  # lossless syntaxes decode to the same pixels


def test_ct_slice_is_in_hounsfield_units(fixtures: Path) -> None:
    study = load_study([_read(fixtures / "CT_small.dcm")])
    assert study.modality == "CT"
    assert study.array.min() < -500  # rescale slope/intercept applied (air is strongly negative)


def test_series_sorted_by_position_whatever_the_upload_order(ct_series: list[tuple[str, bytes]]) -> None:
    ordered = load_study(ct_series)
    shuffled = list(ct_series)
    random.Random(3).shuffle(shuffled)
    again = load_study(shuffled)
    assert ordered.array.shape == (20, 512, 512)
    np.testing.assert_array_equal(ordered.array, again.array)
    assert ordered.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    z = [float(ds.ImagePositionPatient[2]) for ds in ordered.dicom_refs]
    assert z == sorted(z)
    assert ordered.modality == "CT" and ordered.n_files == 20


def test_series_as_zip_equals_multipart(ct_series: list[tuple[str, bytes]]) -> None:
    zipped = _zip([(f"study/series/{n}", b) for n, b in ct_series] + [("__MACOSX/._x", b"junk")])
    np.testing.assert_array_equal(load_study([("s.zip", zipped)]).array, load_study(ct_series).array)


def test_mixed_series_rejected(fixtures: Path) -> None:
    files = [_read(p) for p in sorted((fixtures / "series_CT2_16x16").iterdir())]
    files += [_read(p) for p in sorted((fixtures / "series_CT5N_16x16").iterdir())]
    _reject(files, "mixed_series", 422)


def test_missing_pixel_data_rejected(fixtures: Path) -> None:
    ds = pydicom.dcmread(fixtures / "CT_small.dcm")
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf)
    _reject([("nopix.dcm", buf.getvalue())], "missing_pixel_data", 422)


def test_unsupported_transfer_syntax_rejected(fixtures: Path) -> None:
    err = _reject([_read(fixtures / "JPEG-lossy.dcm")], "unsupported_transfer_syntax", 415)
    assert "1.2.840.10008.1.2.4.51" in err.detail


def test_no_meta_and_non_image_objects_rejected(fixtures: Path) -> None:
    _reject([_read(fixtures / "no_meta.dcm")], "dicom_no_meta", 422)
    _reject([_read(fixtures / "liver_1frame.dcm")], "not_an_image", 422)  # a DICOM SEG


def test_non_images_rejected(fixtures: Path) -> None:
    _reject([_read(fixtures / "PROVENANCE.txt")], "unsupported_media_type", 415)
    _reject([("a.png", b"\x89PNG\r\n\x1a\n" + b"garbage")], "invalid_image", 422)
    _reject([("x.npy", b"\x93NUMPY" + b"\x00" * 20)], "invalid_npy", 422)
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _reject([("pickle.npy", obj.getvalue())], "invalid_npy", 422)  # never unpickled


def test_zip_path_traversal_and_links_rejected() -> None:
    for name in ("../evil.dcm", "/etc/passwd", "a/../../b.dcm", "C:\\\\win.dcm"):
        _reject([("a.zip", _zip([(name, b"x")]))], "zip_path_traversal", 400)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("link.dcm")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    _reject([("a.zip", buf.getvalue())], "zip_symlink", 400)
    _reject([("a.zip", _zip([("inner.zip", _zip([("x", b"1")]))], zipfile.ZIP_STORED))], "nested_zip", 400)


def test_zip_bombs_rejected() -> None:
    bomb = _zip([("big.dcm", b"\x00" * (20 * 1024 * 1024))])
    err = _reject([("bomb.zip", bomb)], "zip_bomb", 413)
    assert "ratio" in err.detail
    # many moderately compressible entries: caught by the total uncompressed size
    limits = InputLimits(max_total_uncompressed_bytes=1_000_000, max_compression_ratio=1e9)
    entries = [(f"f{i}.dcm", np.random.default_rng(i).bytes(300_000)) for i in range(5)]
    err = _reject([("many.zip", _zip(entries))], "zip_bomb", 413, limits)
    assert "total uncompressed" in err.detail


def test_gzip_bomb_rejected() -> None:
    blob = gzip.compress(b"\x00" * (30 * 1024 * 1024))
    _reject([("vol.nii.gz", blob)], "gzip_bomb", 413)


def test_nifti_volumes(data_dir: Path) -> None:
    ct = load_study([_read(data_dir / "ct_examples" / "example_ct.nii.gz")])
    assert ct.ndim == 3 and ct.modality == "CT"
    assert ct.spacing == pytest.approx((3.0, 3.0, 3.0))
    mr = load_study([_read(data_dir / "nifti_fixtures" / "anatomical.nii")])
    assert mr.ndim == 3 and mr.modality != "CT"  # brain MR is not mistaken for CT
    assert sniff(_read(data_dir / "nifti_fixtures" / "anatomical.nii")[1], "anatomical.nii") == "nifti"


def test_png_jpeg_npy(data_dir: Path) -> None:
    with np.load(data_dir / "pneumoniamnist" / "pneumoniamnist_reconstructed.npz") as z:
        img = z["test_images"][0]
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format=fmt)
        study = load_study([(f"x.{fmt.lower()}", buf.getvalue())])
        assert study.array.shape == (28, 28) and study.source_format == fmt.lower()
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    x = prepare_2d(load_study([("x.png", buf.getvalue())]), 28).tensor
    np.testing.assert_allclose(x[0, 0].numpy(), img / 255.0, atol=1e-6)  # identical to the training scaling
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint16) * 257).save(buf, format="PNG")  # a 16-bit X-ray PNG
    x16 = prepare_2d(load_study([("x16.png", buf.getvalue())]), 28).tensor
    np.testing.assert_allclose(x16[0, 0].numpy(), img / 255.0, atol=1e-5)  # scaled, not clipped to white
    patch = load_study([_read(data_dir / "luna16_patches" / "positive_patch.npy")])
    assert patch.array.shape == (64, 64, 64)


def test_3d_preprocessing_window_and_roi(ct_series: list[tuple[str, bytes]]) -> None:
    study = load_study(ct_series)
    whole = prepare_3d(study, 28)
    assert whole.tensor.shape == (1, 1, 28, 28, 28)
    assert 0.0 <= float(whole.tensor.min()) and float(whole.tensor.max()) <= 1.0
    roi = prepare_3d(study, 28, roi_center=(10, 256, 256), roi_size_mm=40)
    assert roi.tensor.shape == (1, 1, 28, 28, 28)
    assert any("crop" in s for s in roi.steps)
    with pytest.raises(InputError):
        prepare_3d(study, 28, roi_center=(50, 0, 0))
