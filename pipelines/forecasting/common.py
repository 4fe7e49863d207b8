"""Shared CLI plumbing of the forecasting pipelines: dataset selection and default locations."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backbone.cli import run_cli as backbone_run_cli

from services.forecasting.ml.data import (
    ETT_DATASETS,
    DataError,
    SeriesSplit,
    default_period,
    load_csi300,
    load_csv,
    load_ett,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    return Path(os.environ.get("DATA_DIR", REPO_ROOT / ".." / "shared" / "data")).resolve()


def model_dir() -> Path:
    return Path(os.environ.get("MODEL_DIR", REPO_ROOT / "models"))


def add_data_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", default=None, help=f"one of {ETT_DATASETS + ('CSI300',)} (default ETTh1)")
    src.add_argument("--csv", type=Path, default=None, help="any CSV with a time column")
    p.add_argument("--date-col", default="date", help="time column of --csv")
    p.add_argument(
        "--target",
        default=None,
        help="column(s) of --csv to forecast, comma-separated (default: all numeric)",
    )
    p.add_argument("--horizon", type=int, default=96)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--name", default=None, help="artifact name (default <dataset>_h<horizon>)")


def dataset_label(args: argparse.Namespace) -> str:
    if args.csv is not None:
        return Path(args.csv).stem
    return args.dataset or "ETTh1"


def artifact_name(args: argparse.Namespace) -> str:
    return args.name or f"{dataset_label(args)}_h{args.horizon}"


def load_split(args: argparse.Namespace, lookback: int) -> SeriesSplit:
    """The dataset the arguments name, under its protocol."""
    root = args.data_dir or data_dir()
    if args.csv is not None:
        target = args.target.split(",") if args.target else None
        return load_csv(args.csv, lookback, args.date_col, target, min_part_rows=args.horizon)
    ds = args.dataset or "ETTh1"
    if ds.upper() == "CSI300":
        return load_csi300(root, lookback)
    return load_ett(root, ds, lookback)


def seasonal_period(split: SeriesSplit, lookback: int) -> int:
    """The seasonal-naive period of a split (CSI 300: 1, the last-value baseline)."""
    if split.name == "CSI300":
        return 1
    return default_period(split.freq, lookback, business_days=split.calendar == "B")


def run_cli(main: Callable[[list[str] | None], Any]) -> None:
    """``backbone.cli.run_cli`` with unusable data (``DataError``) among the expected errors."""
    backbone_run_cli(main, (DataError, FileNotFoundError))
