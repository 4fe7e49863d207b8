"""How the tile detector's image score should read its anomaly map: a sweep on the validation part.

    python -m pipelines.manufacturing.score_sweep [--quantiles 0,0.5,0.7,0.8,0.9] [--split val]

On the served tile bank (the newest anomaly artifact), each image's inspected anomaly map is computed once
(``MemoryBank.inspected_maps``: one nearest-neighbour search per image); for each quantile q its maximum and
q-quantile give the image statistics (``map_stats``), the level term is fitted on the held-out good tiles
(``calib_good``) exactly as ``train --task anomaly`` fits it (``MemoryBank.fit_level``), and image AUROC is
reported overall and per defect type on ``calib_good`` + ``val_defect`` (``--split test``: ``test_good`` +
``test_defect``; select on val only). q = 0 is the maximum alone. Writes ``score_sweep_<split>.json`` and a
PNG of AUROC against q to the report dir; last stdout line: JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from backbone.cli import run_cli
from tqdm import tqdm

from pipelines.manufacturing.common import (
    default_data_dir,
    default_model_dir,
    default_report_dir,
    parse_study_args,
    save_plot,
    write_study,
)
from pipelines.manufacturing.data import load_grey, mt_split
from services.manufacturing.app.core.config import Settings
from services.manufacturing.app.model import load_inspection_model
from services.manufacturing.app.patchcore import MemoryBank, auroc, map_stats


def sweep(bank: MemoryBank, inner: dict[str, torch.Tensor], kinds: list[str], quantiles: list[float]) -> dict:
    """AUROC per quantile: ``inner`` holds the inspected maps (``MemoryBank.inspected_maps``, one search per
    image) of ``calib`` (the level term is fitted on them), ``good`` and ``defect`` (scored; ``kinds`` = the
    defect type of each ``defect`` row)."""
    kind_arr = np.array(kinds)
    out: dict[str, Any] = {}
    for q in quantiles:
        cfg = dataclasses.replace(bank.config, level_quantile=q)
        b = MemoryBank(bank.bank, cfg, None, bank.mean, bank.std, bank.position)
        b.fit_level(*map_stats(inner["calib"], q))
        good = b.combine(*map_stats(inner["good"], q)).numpy()
        bad = b.combine(*map_stats(inner["defect"], q)).numpy()
        y = np.r_[np.zeros(len(good)), np.ones(len(bad))]
        per = {k: round(auroc(np.r_[np.zeros(len(good)), np.ones(int((kind_arr == k).sum()))],
                              np.r_[good, bad[kind_arr == k]]), 4) for k in sorted(set(kinds))}  # fmt: skip
        out[f"q{q:g}"] = {"image_auroc": round(auroc(y, np.r_[good, bad]), 4), "per_defect_image_auroc": per,
                          "level_weight": b.level[1] if b.level else None}  # fmt: skip
    return out


def _plot(path: Path, result: dict[str, Any]) -> None:
    rows = result["quantiles"]
    labels = list(rows)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(labels, [r["image_auroc"] for r in rows.values()], "o-", color="k", lw=2, label="all defects")
    for kind in next(iter(rows.values()))["per_defect_image_auroc"]:
        ax.plot(labels, [r["per_defect_image_auroc"][kind] for r in rows.values()], ".--", label=kind)
    save_plot(fig, ax, path, "level quantile of the image score (q0: the map's maximum alone)",
              f"image AUROC ({result['split']})", "tile detector: maximum + level term")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quantiles", default="0,0.5,0.7,0.8,0.9", help="level-term map quantiles (0: off)")
    p.add_argument("--split", choices=["val", "test"], default="val")
    args = parse_study_args(p, argv)
    quantiles = [float(x) for x in args.quantiles.split(",")]
    if any(not 0 <= q < 1 for q in quantiles):
        raise ValueError(f"quantiles must lie in [0, 1): {quantiles}")
    data_dir = args.data_dir or default_data_dir()
    root = data_dir / "magnetic_tile"
    split = mt_split(data_dir)
    model = load_inspection_model(Settings(model_dir=args.model_dir or default_model_dir(), lines_dir=None))
    bank = model.lines["magnetic_tile"].bank
    assert bank is not None
    good_files = split["calib_good"] if args.split == "val" else split["test_good"]
    defects = split["val_defect"] if args.split == "val" else split["test_defect"]
    defect_files = [(k, f) for k in sorted(defects) for f in defects[k]]
    parts = {"calib": split["calib_good"], "good": good_files, "defect": [f for _, f in defect_files]}
    if args.split == "val":  # the validation good tiles are the calibration tiles
        del parts["good"]
    inner: dict[str, torch.Tensor] = {}
    for name, files in tqdm(parts.items(), desc="anomaly maps", disable=args.no_progress, file=sys.stderr):
        chunks = [files[i : i + 32] for i in range(0, len(files), 32)]
        inner[name] = torch.cat([bank.inspected_maps(model.features([load_grey(root / f) for f in c]))[0]
                                 for c in chunks])  # fmt: skip
    inner.setdefault("good", inner["calib"])
    result = {"split": args.split, "model_version": model.info.version, "n_good": len(good_files),
              "n_defect": len(defect_files), "n_calib": len(split["calib_good"]),
              "quantiles": sweep(bank, inner, [k for k, _ in defect_files], quantiles)}  # fmt: skip
    write_study(args.report_dir or default_report_dir(), f"score_sweep_{args.split}", result, _plot)
    return 0


if __name__ == "__main__":
    run_cli(main)
