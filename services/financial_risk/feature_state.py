"""Columnar snapshots of per-customer feature state, for the stream worker's partition checkpoints.

A partition's customers become a handful of flat numpy arrays (one per field; variable-length
fields as one concatenated array plus offsets), written with ``np.savez`` and read back with
``np.load(allow_pickle=False)``: no pickle, and about 20x faster than the JSON it replaces (a
checkpoint pauses scoring while it is written).
"""

from __future__ import annotations

import os
import zipfile  # noqa: F401  (np.savez imports it lazily; imported here so a forked writer need not)
from array import array
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from services.financial_risk.features import FeatureEngine

FORMAT_VERSION = 1
NONE = np.iinfo(np.int64).min  # an absent optional time (no previous transaction, no known fraud)
_RAGGED = (  # (field, typecode): per-customer typed arrays
    ("times", "q"),
    ("amounts", "d"),
    ("terminals", "q"),
    ("l_times", "q"),
    ("l_labels", "q"),
    ("l_amounts", "d"),
    ("l_known", "q"),
)


def export_customers(engine: FeatureEngine, ids: set[int]) -> dict[str, np.ndarray]:
    """The state of ``ids`` (one partition's customers) and their pending transactions as arrays."""
    owned = sorted(k for k in ids if k in engine.customers)
    custs = [engine.customers[k] for k in owned]
    ragged = {name: array(tc) for name, tc in _RAGGED}
    lengths = {name: [] for name, _ in _RAGGED}
    for cu in custs:
        for name, _ in _RAGGED:
            values = getattr(cu, name)
            if name in ("times", "amounts", "terminals"):
                values = values[cu.head :]
            ragged[name] += values  # array += array of the same type: one copy (extend iterates: ~10x slower)
            lengths[name].append(len(values))
    pair_term, pair_values = array("q"), array("q")
    for cu in custs:
        pair_term.extend(cu.pairs)
        pair_values.extend(chain.from_iterable(cu.pairs.values()))  # (count, last_ts) per pair
    pair_values_np = (
        np.frombuffer(pair_values, dtype=np.int64).reshape(-1, 2)
        if pair_values
        else np.zeros((0, 2), dtype=np.int64)
    )
    pending_data, pending_get = engine.pending, engine.pending_of.get
    pending = [(t, *pending_data[t]) for k in owned for t in sorted(pending_get(k, ()))]
    out: dict[str, np.ndarray] = {
        "format": np.asarray([FORMAT_VERSION]),
        "watermark": np.asarray([engine.watermark], dtype=np.int64),
        "customer": np.asarray(owned, dtype=np.int64),
        "int_fields": np.asarray(
            [
                [
                    cu.n_total,
                    cu.first_ts,
                    NONE if cu.last_ts is None else cu.last_ts,
                    cu.n_known_fraud,
                    NONE if cu.last_fraud_ts is None else cu.last_fraud_ts,
                ]
                for cu in custs
            ],
            dtype=np.int64,
        ).reshape(len(custs), 5),
        "float_fields": np.asarray(
            [[cu.sum_total, cu.sumsq_total] for cu in custs], dtype=np.float64
        ).reshape(len(custs), 2),
        "pair_terminal": np.frombuffer(pair_term, dtype=np.int64).copy(),
        "pair_count": pair_values_np[:, 0].copy(),
        "pair_ts": pair_values_np[:, 1].copy(),
        "pair_len": np.asarray([len(cu.pairs) for cu in custs], dtype=np.int64),
        "pending_ids": np.asarray([p[0] for p in pending], dtype=np.int64),
        "pending_int": np.asarray([p[1:4] for p in pending], dtype=np.int64).reshape(len(pending), 3),
        "pending_amount": np.asarray([p[4] for p in pending], dtype=np.float64),
    }
    for name, tc in _RAGGED:
        out[name] = np.frombuffer(ragged[name], dtype=np.int64 if tc == "q" else np.float64).copy()
        out[f"{name}_len"] = np.asarray(lengths[name], dtype=np.int64)
    return out


def import_customers(engine: FeatureEngine, arrays: dict[str, np.ndarray]) -> set[int]:
    """Add customers from :func:`export_customers` output to ``engine``; returns their ids."""
    from services.financial_risk.features import _Customer

    if int(arrays["format"][0]) != FORMAT_VERSION:
        raise ValueError(f"checkpoint format {int(arrays['format'][0])}, expected {FORMAT_VERSION}")
    ids = arrays["customer"].tolist()
    ints, floats = arrays["int_fields"].tolist(), arrays["float_fields"].tolist()
    starts = {name: np.concatenate([[0], np.cumsum(arrays[f"{name}_len"])]).tolist() for name, _ in _RAGGED}
    flat = {name: array(tc, arrays[name].tobytes()) for name, tc in _RAGGED}
    p_start = np.concatenate([[0], np.cumsum(arrays["pair_len"])]).tolist()
    p_term, p_count, p_ts = (arrays[k].tolist() for k in ("pair_terminal", "pair_count", "pair_ts"))
    for i, cid in enumerate(ids):
        n_total, first_ts, last_ts, n_known_fraud, last_fraud_ts = ints[i]
        fields = {name: flat[name][starts[name][i] : starts[name][i + 1]] for name, _ in _RAGGED}
        lo, hi = p_start[i], p_start[i + 1]
        pairs = {p_term[j]: [p_count[j], p_ts[j]] for j in range(lo, hi)}
        engine.customers[cid] = _Customer(
            **fields,
            n_total=n_total,
            sum_total=floats[i][0],
            sumsq_total=floats[i][1],
            first_ts=first_ts,
            last_ts=None if last_ts == NONE else last_ts,
            pairs=pairs,
            n_known_fraud=n_known_fraud,
            last_fraud_ts=None if last_fraud_ts == NONE else last_fraud_ts,
            last_use=array("q", sorted(v[1] for v in pairs.values())),
        )
    pending = (arrays[k].tolist() for k in ("pending_ids", "pending_int", "pending_amount"))
    for tx_id, (cust, term, ts), amount in zip(*pending, strict=True):
        engine.add_pending(tx_id, cust, term, ts, amount)
    engine.watermark = max(engine.watermark, int(arrays["watermark"][0]))
    return set(ids)


def save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` atomically (``.npz``, uncompressed)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


def load(path: Path) -> dict[str, np.ndarray]:
    """Read a snapshot written by :func:`save` (no pickle)."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
