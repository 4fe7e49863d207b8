"""Columnar snapshots of per-customer feature state, for the stream worker's partition checkpoints.

A partition's customers become a handful of flat numpy arrays (one per field; variable-length
fields as one concatenated array plus lengths, copied out of the engine's arenas in one compiled
pass), written with ``np.savez`` and read back with
``np.load(allow_pickle=False)``: no pickle, and about 20x faster than the JSON it replaces (a
checkpoint pauses scoring while it is written).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from services.financial_risk import feature_kernel as fk

if TYPE_CHECKING:
    from services.financial_risk.features import FeatureEngine

FORMAT_VERSION = 1
NONE = fk.NONE  # an absent optional time (no previous transaction, no known fraud)


def export_customers(engine: FeatureEngine, ids: set[int]) -> dict[str, np.ndarray]:
    """The state of ``ids`` (one partition's customers) and their pending transactions as arrays."""
    owned = sorted(k for k in ids if k in engine.customers)
    slots = np.asarray([engine.customers[k] for k in owned], dtype=np.int64)
    tx_i, tx_f, tx_len = engine._tx.gather(slots)
    cl_i, cl_f, cl_len = engine._clabels.gather(slots)
    pr_i, _, pr_len = engine._pairs.gather(slots)
    cust = engine._cust[slots]
    pending_data, pending_get = engine.pending, engine.pending_of.get
    pending = [(t, *pending_data[t]) for k in owned for t in sorted(pending_get(k, ()))]
    return {
        "format": np.asarray([FORMAT_VERSION]),
        "watermark": np.asarray([engine.watermark], dtype=np.int64),
        "customer": np.asarray(owned, dtype=np.int64),
        "int_fields": cust[:, [fk.C_NTOT, fk.C_FIRST, fk.C_LAST, fk.C_NKF, fk.C_LASTF]].copy(),
        "float_fields": engine._custf[slots].copy(),
        "times": tx_i[:, fk.TX_T].copy(),
        "amounts": tx_f[:, 0].copy(),
        "terminals": tx_i[:, fk.TX_TERM].copy(),
        "l_times": cl_i[:, fk.L_T].copy(),
        "l_labels": cl_i[:, fk.L_Y].copy(),
        "l_amounts": cl_f[:, 0].copy(),
        "l_known": cl_i[:, fk.L_K].copy(),
        **{f"{name}_len": tx_len for name in ("times", "amounts", "terminals")},
        **{f"{name}_len": cl_len for name in ("l_times", "l_labels", "l_amounts", "l_known")},
        "pair_terminal": pr_i[:, fk.P_TERM].copy(),
        "pair_count": pr_i[:, fk.P_COUNT].copy(),
        "pair_ts": pr_i[:, fk.P_LAST].copy(),
        "pair_len": pr_len,
        "pending_ids": np.asarray([p[0] for p in pending], dtype=np.int64),
        "pending_int": np.asarray([p[1:4] for p in pending], dtype=np.int64).reshape(len(pending), 3),
        "pending_amount": np.asarray([p[4] for p in pending], dtype=np.float64),
    }


def import_customers(engine: FeatureEngine, arrays: dict[str, np.ndarray]) -> set[int]:
    """Add customers from :func:`export_customers` output to ``engine`` (replacing any it has); returns
    their ids."""
    if int(arrays["format"][0]) != FORMAT_VERSION:
        raise ValueError(f"checkpoint format {int(arrays['format'][0])}, expected {FORMAT_VERSION}")
    ids = arrays["customer"].tolist()
    engine.drop_customers(set(ids) & set(engine.customers))
    ints = arrays["int_fields"]
    slots = np.asarray([engine._new_slot(0) for _ in ids], dtype=np.int64)
    for cid, slot in zip(ids, slots.tolist(), strict=True):
        engine.customers[cid] = slot
    cols = [fk.C_NTOT, fk.C_FIRST, fk.C_LAST, fk.C_NKF, fk.C_LASTF]
    engine._cust[slots[:, None], np.asarray(cols)[None, :]] = ints
    engine._custf[slots] = arrays["float_fields"]
    n_tx = len(arrays["times"])
    tx_rows = np.column_stack([arrays["times"], arrays["terminals"], np.zeros(n_tx, dtype=np.int64)])
    engine._tx.scatter(slots, tx_rows, _column(arrays["amounts"]), arrays["times_len"])
    fk.mark_superseded(engine._tx.ints, engine._tx.slots, slots)
    l_rows = np.column_stack([arrays["l_times"], arrays["l_labels"], arrays["l_known"]]).astype(np.int64)
    engine._clabels.scatter(slots, l_rows, _column(arrays["l_amounts"]), arrays["l_times_len"])
    p_rows = np.column_stack([arrays["pair_terminal"], arrays["pair_count"], arrays["pair_ts"]]).astype(
        np.int64
    )
    engine._pairs.scatter(slots, p_rows, np.zeros((len(p_rows), 0)), arrays["pair_len"])
    pending = (arrays[k].tolist() for k in ("pending_ids", "pending_int", "pending_amount"))
    for tx_id, (cust, term, ts), amount in zip(*pending, strict=True):
        engine.add_pending(tx_id, cust, term, ts, amount)
    engine.watermark = max(engine.watermark, int(arrays["watermark"][0]))
    return set(ids)


def _column(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float64).reshape(-1, 1)


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
