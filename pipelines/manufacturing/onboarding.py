"""How well a line onboarded from a handful of good images is calibrated (``POST /v1/lines``'s build).

    python -m pipelines.manufacturing.onboarding [--n 6,10,20,40] [--draws 10] [--position-weight W]

For each ``n`` and each of ``--draws`` random draws of ``n`` defect-free magnetic tiles from the train part,
the line is built twice on the served anomaly model, once with the threshold from a held-out quarter of the
images and once with K-fold cross-fitting (``InspectionModel.build_line``), and both are measured on the test
part (190 defect-free tiles, 262 defects): false-reject rate and defect recall at the line's threshold, and
image AUROC. Writes ``onboarding.json`` and ``onboarding.png`` to the report dir; last stdout line: JSON.
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
from backbone.cli import run_cli  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pipelines.manufacturing.common import (  # noqa: E402
    default_data_dir,
    default_model_dir,
    default_report_dir,
    parse_study_args,
    save_plot,
)
from pipelines.manufacturing.data import load_grey, mt_split  # noqa: E402
from services.manufacturing.app.core.config import Settings  # noqa: E402
from services.manufacturing.app.model import Line, load_inspection_model  # noqa: E402
from services.manufacturing.app.patchcore import auroc  # noqa: E402

SCHEMES = {"hold_out": 0, "cross_fit": sys.maxsize}  # scheme -> build_line's cross_fit_max


def _summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for n in sorted({r["n"] for r in rows}):
        for scheme in SCHEMES:
            rs = [r for r in rows if r["n"] == n and r["scheme"] == scheme]
            frr = np.array([r["false_reject_rate"] for r in rs])
            out[f"n{n}_{scheme}"] = {
                "false_reject_rate_mean": round(float(frr.mean()), 4),
                "false_reject_rate_max": round(float(frr.max()), 4),
                "false_reject_rate_sd": round(float(frr.std()), 4),
                "defect_recall_mean": round(float(np.mean([r["defect_recall"] for r in rs])), 4),
                "image_auroc_mean": round(float(np.mean([r["image_auroc"] for r in rs])), 4),
                "build_s_mean": round(float(np.mean([r["build_s"] for r in rs])), 2),
            }
    return out


def _plot(path: Path, rows: list[dict[str, Any]]) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ns = sorted({r["n"] for r in rows})
    for k, scheme in enumerate(SCHEMES):
        for i, n in enumerate(ns):
            frr = [r["false_reject_rate"] for r in rows if r["n"] == n and r["scheme"] == scheme]
            x = np.full(len(frr), i + (k - 0.5) * 0.3)
            ax.scatter(x, frr, s=14, color=f"C{k}", label=scheme if i == 0 else None)
    ax.set_xticks(range(len(ns)), [str(n) for n in ns])
    save_plot(fig, ax, path, "good images uploaded for the line", "false-reject rate on 190 test tiles",
              "line threshold: held-out quarter vs K-fold cross-fitting")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="6,10,20,40", help="numbers of good images per line, comma-separated")
    p.add_argument("--draws", type=int, default=10, help="random draws of the good images per n")
    p.add_argument("--position-weight", type=float, default=0.0,
                   help="the lines' position weight (POST /v1/lines' field; default 0, as there)")
    args = parse_study_args(p, argv)
    data_dir = args.data_dir or default_data_dir()
    root = data_dir / "magnetic_tile"
    split = mt_split(data_dir)
    model = load_inspection_model(Settings(model_dir=args.model_dir or default_model_dir(), lines_dir=None))
    test_good = [load_grey(root / f) for f in split["test_good"]]
    test_defect = [load_grey(root / f) for files in split["test_defect"].values() for f in files]
    feats_good, feats_defect = model.features(test_good), model.features(test_defect)
    labels = [0] * len(test_good) + [1] * len(test_defect)
    ns = [int(x) for x in args.n.split(",")]
    rows: list[dict[str, Any]] = []
    bar = tqdm(
        total=len(ns) * args.draws * len(SCHEMES), desc="lines", disable=args.no_progress, file=sys.stderr
    )
    for n in ns:
        for draw in range(args.draws):
            pick = np.random.default_rng(1000 * n + draw).choice(len(split["train_good"]), n, replace=False)
            good = [load_grey(root / split["train_good"][i]) for i in pick]
            for scheme, cross_fit_max in SCHEMES.items():
                line = Line(line_id=f"onboard-{n}-{draw}-{scheme}")
                t0 = time.perf_counter()
                pw = args.position_weight
                model.build_line(line, good, cross_fit_max=cross_fit_max, position_weight=pw)
                if line.state != "ready" or line.bank is None or line.bank.calibration is None:
                    raise RuntimeError(f"line build failed: {line.message}")
                build_s = time.perf_counter() - t0
                sg, sd = line.bank.score(feats_good)[0], line.bank.score(feats_defect)[0]
                thr = line.bank.calibration.threshold
                rows.append({
                    "n": n, "draw": draw, "scheme": scheme, "threshold": round(thr, 4),
                    "false_reject_rate": round(float((sg > thr).float().mean()), 4),
                    "defect_recall": round(float((sd > thr).float().mean()), 4),
                    "image_auroc": round(auroc(labels, torch.cat([sg, sd]).numpy()), 4),
                    "build_s": round(build_s, 3),
                })  # fmt: skip
                bar.update()
    bar.close()
    report_dir = args.report_dir or default_report_dir()
    report_dir.mkdir(parents=True, exist_ok=True)
    summary = {"model_version": model.info.version, "position_weight": args.position_weight,
               "test_good": len(test_good), "test_defect": len(test_defect), "draws": args.draws,
               "summary": _summary(rows)}  # fmt: skip
    (report_dir / "onboarding.json").write_text(json.dumps({**summary, "lines": rows}, indent=1))
    _plot(report_dir / "onboarding.png", rows)
    print(json.dumps({**summary, "plot": str(report_dir / "onboarding.png")}))
    return 0


if __name__ == "__main__":
    run_cli(main)
