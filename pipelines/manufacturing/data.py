"""Manufacturing data: NEU-DET (6 steel defect classes) and Magnetic Tile (defect-free + 5 defect types).

Both datasets have no official split, so a seeded, stratified split is made once, written to
``pipelines/manufacturing/splits/*.json`` (file names relative to the dataset folder) and kept: later
runs read the file instead of re-splitting. ``docs/manufacturing.md`` documents the protocol.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from backbone.service.images import decode_grey_image
from PIL import Image

NEU_CLASSES: tuple[str, ...] = (
    "crazing",
    "inclusion",
    "patches",
    "pitted_surface",
    "rolled-in_scale",
    "scratches",
)
MT_DEFECTS: tuple[str, ...] = ("Blowhole", "Break", "Crack", "Fray", "Uneven")
SPLIT_DIR = Path(__file__).resolve().parent / "splits"
NEU_SPLIT_FILE = SPLIT_DIR / "neu_det_split.json"
MT_SPLIT_FILE = SPLIT_DIR / "magnetic_tile_split.json"
SPLIT_SEED = 20240607
# Images are normalised to [0, 1] grey, then with these constants (NEU + MT grey mean / std).
MAX_IMAGE_PIXELS = 40_000_000  # an upload above it is refused (413) before decoding
GREY_MEAN = 0.45
GREY_STD = 0.22


def neu_label(filename: str) -> str:
    """Class of a NEU file from its name (``rolled-in_scale_12.jpg`` -> ``rolled-in_scale``)."""
    stem = Path(filename).stem
    return stem.rsplit("_", 1)[0]


def _stratified(items: dict[str, list[str]], fractions: Sequence[float], seed: int) -> list[list[str]]:
    """Split every group with the same fractions (seeded shuffle), concatenate per part."""
    rng = random.Random(seed)
    parts: list[list[str]] = [[] for _ in fractions]
    for key in sorted(items):
        files = sorted(items[key])
        rng.shuffle(files)
        n = len(files)
        bounds = [0]
        acc = 0.0
        for frac in fractions[:-1]:
            acc += frac
            bounds.append(round(acc * n))
        bounds.append(n)
        for i in range(len(fractions)):
            parts[i].extend(files[bounds[i] : bounds[i + 1]])
    return [sorted(p) for p in parts]


def make_neu_split(data_dir: Path, seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """Seeded stratified 60/20/20 split of NEU-DET (per class 180/60/60)."""
    img_dir = Path(data_dir) / "neu_det" / "IMAGES"
    groups: dict[str, list[str]] = {c: [] for c in NEU_CLASSES}
    for f in sorted(img_dir.glob("*.jpg")):
        groups[neu_label(f.name)].append(f"IMAGES/{f.name}")
    train, val, test = _stratified(groups, (0.6, 0.2, 0.2), seed)
    return {"seed": seed, "classes": list(NEU_CLASSES), "train": train, "val": val, "test": test}


def make_mt_split(data_dir: Path, seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """Magnetic tile: defect-free 60/20/20 (bank / threshold calibration / test); every defect in test."""
    root = Path(data_dir) / "magnetic_tile"
    free = [f"MT_Free/Imgs/{f.name}" for f in sorted((root / "MT_Free" / "Imgs").glob("*.jpg"))]
    train, calib, test_good = _stratified({"free": free}, (0.6, 0.2, 0.2), seed)
    defects = {
        d: [f"MT_{d}/Imgs/{f.name}" for f in sorted((root / f"MT_{d}" / "Imgs").glob("*.jpg"))]
        for d in MT_DEFECTS
    }
    split = {
        "seed": seed,
        "train_good": train,
        "calib_good": calib,
        "test_good": test_good,
        "test_defect": {d: v for d, v in defects.items()},
    }
    return add_mt_val_defects(split, seed)


def add_mt_val_defects(split: dict, seed: int = SPLIT_SEED) -> dict:
    """Split version 2: a seeded third of every defect type moves from ``test_defect`` to ``val_defect``
    (method / hyper-parameter selection, together with ``calib_good``); the rest stays test only. The
    defect-free parts are unchanged. The detector is still fit on ``train_good`` only."""
    if "val_defect" in split:
        return split
    val: dict[str, list[str]] = {}
    test: dict[str, list[str]] = {}
    for d in sorted(split["test_defect"]):
        v, t = _stratified({d: split["test_defect"][d]}, (1 / 3, 2 / 3), seed)
        val[d], test[d] = v, t
    out = dict(split)
    out["version"] = 2
    out["val_defect"] = val
    out["test_defect"] = test
    return out


def _load_or_make(path: Path, make: callable, data_dir: Path) -> dict:  # type: ignore[valid-type]
    if path.is_file():
        return json.loads(path.read_text())
    split = make(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split, indent=1) + "\n")
    return split


def neu_split(data_dir: Path) -> dict[str, list[str]]:
    """The kept NEU split (created on first use and written to ``splits/neu_det_split.json``)."""
    split = _load_or_make(NEU_SPLIT_FILE, make_neu_split, data_dir)
    missing = [f for f in split["test"][:5] if not (Path(data_dir) / "neu_det" / f).is_file()]
    if missing:
        raise FileNotFoundError(f"NEU files of the kept split are missing under {data_dir}: {missing}")
    return split


def mt_split(data_dir: Path) -> dict:
    """The kept magnetic tile split (``splits/magnetic_tile_split.json``); a version-1 file (no
    ``val_defect``) is upgraded once and written back."""
    split = _load_or_make(MT_SPLIT_FILE, make_mt_split, data_dir)
    if "val_defect" not in split:
        split = add_mt_val_defects(split, int(split.get("seed", SPLIT_SEED)))
        MT_SPLIT_FILE.write_text(json.dumps(split, indent=1) + "\n")
    return split


# ----------------------------------------------------------------------------------------- images
def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode uploaded bytes to a greyscale (8-bit) PIL image, 16-bit / float images scaled rather than
    clipped (:func:`backbone.service.images.decode_grey_image`). ``ImageTooLarge`` above ``max_pixels``;
    ``ValueError`` with the reason for anything that is not an image of at least 8x8 pixels."""
    return decode_grey_image(data, max_pixels=max_pixels, min_side=8)


def load_grey(path: Path) -> Image.Image:
    """Open an image file as greyscale."""
    with Image.open(path) as img:
        return img.convert("L")


def to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """Resize to ``size`` x ``size`` (bilinear), scale to [0, 1], normalise; shape (1, size, size)."""
    img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy((arr - GREY_MEAN) / GREY_STD).unsqueeze(0)


def load_mask(image_path: Path, size: int) -> torch.Tensor:
    """The magnetic-tile pixel mask next to ``image_path`` (same stem, .png), resized, as {0, 1}."""
    with Image.open(image_path.with_suffix(".png")) as m:
        m = m.convert("L").resize((size, size), Image.NEAREST)
        return torch.from_numpy((np.asarray(m) > 127).astype(np.uint8))


@dataclass
class ImageSet:
    """Preloaded, resized tensors with labels (small data: everything fits in memory)."""

    x: torch.Tensor  # (N, 1, S, S) normalised
    y: torch.Tensor  # (N,) int64
    files: list[str]


def load_neu(
    data_dir: Path, files: Sequence[str], size: int, classes: Sequence[str] = NEU_CLASSES
) -> ImageSet:
    """Load NEU files (relative to ``neu_det/``) into tensors at ``size``."""
    root = Path(data_dir) / "neu_det"
    index = {c: i for i, c in enumerate(classes)}
    xs = [to_tensor(load_grey(root / f), size) for f in files]
    ys = [index[neu_label(f)] for f in files]
    return ImageSet(torch.stack(xs), torch.tensor(ys, dtype=torch.long), list(files))


def load_mt(
    data_dir: Path, files: Sequence[str], size: int, with_masks: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Load magnetic-tile images (relative to ``magnetic_tile/``) and optionally their masks."""
    root = Path(data_dir) / "magnetic_tile"
    x = torch.stack([to_tensor(load_grey(root / f), size) for f in files])
    masks = torch.stack([load_mask(root / f, size) for f in files]) if with_masks else None
    return x, masks


def augment(x: torch.Tensor, generator: torch.Generator | None = None, zoom: float = 1.0) -> torch.Tensor:
    """Batch augmentation for surface images: random flips, 90-degree rotations, brightness/contrast and,
    with ``zoom`` < 1, a random crop of ``zoom``..1 of the image side resized back (random-resized crop;
    reflection padding, so a crop never shows an empty border)."""
    b = x.shape[0]
    g = generator
    out = x.clone()
    if zoom < 1.0:
        side = zoom + (1.0 - zoom) * torch.rand(b, generator=g)  # visible fraction of the side
        shift = (torch.rand(b, 2, generator=g) * 2 - 1) * (1 - side)[:, None]
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = side
        theta[:, 1, 1] = side
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    flip_h = torch.rand(b, generator=g) < 0.5
    flip_v = torch.rand(b, generator=g) < 0.5
    out[flip_h] = out[flip_h].flip(-1)
    out[flip_v] = out[flip_v].flip(-2)
    rot = torch.rand(b, generator=g) < 0.5
    out[rot] = out[rot].transpose(-1, -2)
    scale = 1.0 + (torch.rand(b, 1, 1, 1, generator=g) - 0.5) * 0.3
    shift = (torch.rand(b, 1, 1, 1, generator=g) - 0.5) * 0.3
    return out * scale + shift
