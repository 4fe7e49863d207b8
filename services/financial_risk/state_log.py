"""Incremental snapshots of one ``transactions`` partition's customer state (the stream worker's).

A partition's state is a directory of numbered chunk files (``<seq>.npz``, the columnar format of
:mod:`services.financial_risk.feature_state`). A chunk holds some customers' complete state, and for
each of them the input offset it reflects: every event of that customer before the offset is in the
state, none after it. A customer's latest chunk wins; a chunk whose customers were all written again
later is deleted. Each chunk also records the partition's *floor*: every event before it is reflected
in some chunk (the oldest event whose customer changed without being written since).

So a snapshot never needs the whole state at once: the worker writes a bounded number of changed
("dirty") customers now and then (oldest change first, so the floor moves on), plus the customers of the
oldest chunk, so that old files die. It writes only state whose outputs Kafka acknowledged, so no
customer's offset is beyond what was delivered. Each chunk also keeps an *anchor*, the offset and transaction
id of the partition's newest event in the state, so a restore can tell whether the topic it reads is the one
the chunks came from. Restoring (see ``RiskWorker``) loads the chunks, seeks
the partition to the floor and re-reads from there: an event of customer ``c`` below ``c``'s offset is
already in the state and skipped; below the group's committed offset it updates the state without any
output (its score was delivered before the crash); from the committed offset on it is scored as usual.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from services.financial_risk import feature_state

if TYPE_CHECKING:
    from services.financial_risk.features import FeatureEngine

log = logging.getLogger(__name__)
_CHUNK = re.compile(r"^(\d{12})\.npz$")


class PartitionLog:
    """Chunk files of one partition and which customer's latest state lives in which chunk."""

    def __init__(self, directory: Path, partition: int) -> None:
        self.dir = directory
        self.partition = partition
        self.seq = 0  # number of the newest chunk
        self.chunk_of: dict[int, int] = {}  # customer -> chunk holding its latest state
        self.members: dict[int, set[int]] = {}  # chunk -> customers whose latest state it holds
        self.offset_of: dict[int, int] = {}  # customer -> next input offset its latest chunk reflects
        # customer -> offset of its first event not in a chunk yet; insertion order = offset order
        self.dirty: dict[int, int] = {}
        self.floor = 0
        # (offset, transaction id) of the partition's newest event in the state when the newest chunk was
        # written: checked against the topic on restore (Kafka 0.9 has no topic ids), see ``RiskWorker``
        self.anchor: tuple[int, int] | None = None
        self.chunks_written = 0

    # ------------------------------------------------------------------ files
    def chunk_files(self) -> list[tuple[int, Path]]:
        if not self.dir.is_dir():
            return []
        found = [
            (int(m.group(1)), self.dir / name) for name in os.listdir(self.dir) if (m := _CHUNK.match(name))
        ]
        return sorted(found)

    def _path(self, seq: int) -> Path:
        return self.dir / f"{seq:012d}.npz"

    def newest_anchor(self) -> tuple[int, int] | None:
        """The newest chunk's anchor: (offset, transaction id) of the last event it reflects; None without
        chunks or for chunks written before anchors existed."""
        files = self.chunk_files()
        if not files:
            return None
        with np.load(files[-1][1], allow_pickle=False) as data:
            if "anchor" not in data.files:
                return None
            offset, tx_id = data["anchor"].tolist()
        return int(offset), int(tx_id)

    def restore(self, engine: FeatureEngine) -> bool:
        """Load every chunk into ``engine`` (latest state per customer); False if there is none."""
        files = self.chunk_files()
        for seq, path in files:
            arrays = feature_state.load(path)
            ids = arrays["customer"].tolist()
            engine.drop_customers(set(ids))  # an older state of theirs (earlier chunk or warm-up)
            engine.import_customers(arrays)
            for c, off in zip(ids, arrays["offsets"].tolist(), strict=True):
                old = self.chunk_of.get(c)
                if old is not None:
                    self.members[old].discard(c)
                self.chunk_of[c] = seq
                self.offset_of[c] = off
            self.members[seq] = set(ids)
            self.floor = int(arrays["floor"][0])
            if "anchor" in arrays:
                offset, tx_id = arrays["anchor"].tolist()
                self.anchor = int(offset), int(tx_id)
            self.seq = seq
        self._delete_dead()
        return bool(files)

    def mark(self, customer: int, offset: int) -> None:
        """Customer ``customer``'s state changed with the event at ``offset``."""
        if customer not in self.dirty:
            self.dirty[customer] = offset

    def oldest_chunk_members(self) -> list[int]:
        """Customers whose latest state is in the oldest live chunk (rewritten to retire it)."""
        if len(self.members) < 2:
            return []
        return sorted(self.members[min(self.members)])

    def write(
        self,
        engine: FeatureEngine,
        customers: list[int],
        next_offset: int,
        anchor: tuple[int, int] | None = None,
    ) -> int:
        """Write ``customers``' current state as a new chunk; their events before ``next_offset`` (or their
        restored offset, if later) are all in it. ``anchor``: (offset, transaction id) of the partition's
        newest event in the state (default: the restored one). Returns the number of customers written."""
        for c in customers:
            self.dirty.pop(c, None)  # one without state (never added) has nothing to write
        ids = [c for c in customers if c in engine.customers]
        if not ids:
            return 0
        offsets = [max(next_offset, self.offset_of.get(c, 0)) for c in ids]
        floor = next(iter(self.dirty.values()), next_offset)
        arrays = engine.export_customers(set(ids))
        order = arrays["customer"].tolist()  # sorted ids
        by_id = dict(zip(ids, offsets, strict=True))
        arrays["offsets"] = np.asarray([by_id[c] for c in order], dtype=np.int64)
        arrays["floor"] = np.asarray([floor], dtype=np.int64)
        arrays["partition"] = np.asarray([self.partition], dtype=np.int64)
        self.anchor = anchor or self.anchor
        if self.anchor is not None:
            arrays["anchor"] = np.asarray(self.anchor, dtype=np.int64)
        self.dir.mkdir(parents=True, exist_ok=True)
        seq = self.seq + 1
        feature_state.save(self._path(seq), arrays)
        self.seq = seq
        self.floor = floor
        for c in order:
            old = self.chunk_of.get(c)
            if old is not None:
                self.members[old].discard(c)
            self.chunk_of[c] = seq
            self.offset_of[c] = by_id[c]
        self.members[seq] = set(order)
        self.chunks_written += 1
        self._delete_dead()
        return len(order)

    def _delete_dead(self) -> None:
        """Remove chunks none of whose customers' latest state they hold (never the newest: its floor)."""
        for seq in [s for s, m in self.members.items() if not m and s != self.seq]:
            del self.members[seq]
            try:
                self._path(seq).unlink()
            except FileNotFoundError:
                pass
