"""How much the tile detector's nearest-neighbour search should weigh patch positions: a validation sweep.

    python -m pipelines.manufacturing.position_sweep [--weights 0,10,30,60,120] [--coreset 16000]
        [--bank-input 200000] [--quantiles 0,0.5] [--preset full]

On the newest self-supervised base model under ``--model-dir``, with the preset's tile-detector settings, the
patch features of ``train_good``, ``calib_good`` and ``val_defect`` are extracted once; for each position
weight (``PatchCoreConfig.position_weight``; 0 = PatchCore's position-free search) a bank is built from the
``train_good`` features (a ``--coreset`` coreset of a ``--bank-input`` sample: smaller and faster than the
served bank, the same for every weight) and image AUROC is reported per level quantile of the image score
(the level term fitted on ``calib_good`` as ``train`` fits it) on ``calib_good`` + ``val_defect``. The test
part is never read. Writes ``position_sweep.json`` and a PNG of AUROC against the weight to the report dir;
last stdout line: JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from backbone.artifacts import latest_artifact  # noqa: E402
from backbone.cli import run_cli  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pipelines.manufacturing.common import (  # noqa: E402
    BASE,
    DOMAIN,
    PRESETS,
    default_data_dir,
    default_model_dir,
    default_report_dir,
    extract,
    parse_study_args,
    save_plot,
    write_study,
)
from pipelines.manufacturing.data import load_mt, mt_split  # noqa: E402
from pipelines.manufacturing.score_sweep import sweep  # noqa: E402
from pipelines.manufacturing.train import anomaly_config  # noqa: E402
from services.manufacturing.app.anomaly_net import load_base  # noqa: E402
from services.manufacturing.app.patchcore import MemoryBank, make_extractor  # noqa: E402


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def _plot(path: Path, result: dict[str, Any]) -> None:
    weights = [float(w) for w in result["weights"]]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for q in result["quantiles"]:
        key = f"q{q:g}"
        label = "maximum alone" if q == 0 else f"maximum + level (q = {q:g})"
        ax.plot(weights, [r[key]["image_auroc"] for r in result["weights"].values()], "o-", label=label)
    ax.set_xscale("symlog", linthresh=10)
    save_plot(fig, ax, path, "position weight (0: position-free search)", "image AUROC (val)",
              f"tile detector: {result['coreset']}-patch banks")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="0,10,30,60,120", help="position weights, comma-separated")
    p.add_argument("--quantiles", default="0,0.5", help="level quantiles of the image score (0: the maximum)")
    p.add_argument("--coreset", type=int, default=16_000, help="bank size (the served full bank: 32,000)")
    p.add_argument("--bank-input", type=int, default=200_000, help="patches sampled before the coreset")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full", help="tile-detector settings")
    args = parse_study_args(p, argv)
    weights, quantiles = _floats(args.weights), _floats(args.quantiles)
    if any(w < 0 for w in weights) or any(not 0 <= q < 1 for q in quantiles):
        raise ValueError(f"weights must be >= 0 and quantiles in [0, 1): {weights} {quantiles}")
    preset = PRESETS[args.preset]
    data_dir = args.data_dir or default_data_dir()
    base = latest_artifact(args.model_dir or default_model_dir(), DOMAIN, BASE)
    pc = dataclasses.replace(anomaly_config(preset, base), coreset_max=args.coreset,
                             max_bank_input=args.bank_input)  # fmt: skip
    extractor = make_extractor(pc, None, load_base(base))
    split = mt_split(data_dir)
    defects = split["val_defect"]
    kinds = [k for k in sorted(defects) for _ in defects[k]]
    parts = {"train": split["train_good"][: preset.anomaly_train_limit or None], "calib": split["calib_good"],
             "defect": [f for k in sorted(defects) for f in defects[k]]}  # fmt: skip
    feats = {}
    for name, files in tqdm(parts.items(), desc="features", disable=args.no_progress, file=sys.stderr):
        feats[name] = extract(extractor, load_mt(data_dir, files, pc.image_size)[0])
    rows: dict[str, Any] = {}
    for w in tqdm(weights, desc="position weights", disable=args.no_progress, file=sys.stderr):
        t0 = time.perf_counter()
        bank = MemoryBank.fit(feats["train"], dataclasses.replace(pc, position_weight=w))
        inner = {name: bank.inspected_maps(feats[name])[0] for name in ("calib", "defect")}
        inner["good"] = inner["calib"]
        seconds = round(time.perf_counter() - t0, 1)
        rows[f"{w:g}"] = sweep(bank, inner, kinds, quantiles) | {"seconds": seconds}
    result = {"split": "val", "base_version": base.version, "preset": args.preset, "coreset": len(bank.bank),
              "bank_input": args.bank_input, "border": pc.border, "quantiles": quantiles,
              "n_train": len(parts["train"]), "n_good": len(parts["calib"]), "n_defect": len(kinds),
              "weights": rows}  # fmt: skip
    write_study(args.report_dir or default_report_dir(), "position_sweep", result, _plot)
    return 0


if __name__ == "__main__":
    run_cli(main)
