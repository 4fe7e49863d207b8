"""Replay real handbook transactions into Kafka.

    python -m pipelines.financial_risk.replay --start 2018-08-01 --end 2018-08-14 --rate 2000

Streams the transactions of [start, end] (days inclusive, stream order) into ``transactions``
(key: customer id; each record stamped with ``produced_at_ms`` for latency) and each label into
``risk-feedback`` 7 days later in event time (interleaved in event-time order, as the handbook's
delay assumes; labels of transactions from the 7 days before ``start`` are included). ``--rate``
is transactions per second (0 = as fast as possible). The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from backbone.kafka import JsonProducer
from kafka.errors import KafkaError
from tqdm import tqdm

from pipelines.financial_risk.data import DAY, LABEL_DELAY_S, default_data_dir, epoch, load_transactions


def _iso(ts: int) -> str:
    """``2018-08-01T00:00:31+00:00`` (what ``pd.Timestamp(ts, unit="s", tz="UTC").isoformat()`` gives,
    at a tenth of its cost)."""
    return datetime.fromtimestamp(ts, tz=UTC).isoformat()


PACE_TICK_S = 0.002  # a throttled replay sends what is due, then sleeps at least this long


def replay(
    bootstrap: str,
    data_dir: Path,
    start: str,
    end: str,
    rate: float = 0.0,
    limit: int | None = None,
    transactions_topic: str = "transactions",
    feedback_topic: str = "risk-feedback",
    customers: set[int] | None = None,
    progress: bool = True,
) -> dict:
    """Produce the slice; returns counts and the achieved rate."""
    lo, hi = epoch(start), epoch(end) + DAY
    df = load_transactions(data_dir, end=(pd.Timestamp(end) + pd.Timedelta(days=1)).strftime("%Y-%m-%d"))
    df = df[df["ts"] >= lo - LABEL_DELAY_S]
    if customers is not None:
        df = df[df["CUSTOMER_ID"].isin(customers)]
    df = df.reset_index(drop=True)
    ts = df["ts"].to_numpy()
    n_tx_total = int(((ts >= lo) & (ts < hi)).sum())
    if n_tx_total == 0:
        covered = "the handbook's data runs from 2018-04-01 to 2018-09-30"
        raise ValueError(f"no transactions from {start} to {end} in {data_dir} ({covered})")
    if limit is not None:
        n_tx_total = min(n_tx_total, limit)
    sent_tx = sent_fb = 0
    j = 0
    names = ("TRANSACTION_ID", "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT", "TX_FRAUD")
    cols = [df[c].to_numpy() for c in names]
    ids, cust, term, amt, fraud = cols
    with JsonProducer(bootstrap, "risk-replay") as producer:
        # both topics known (where the broker creates topics on first use: created) before the pacing clock
        # starts: the first label used to wait about 0.4 s for `risk-feedback` to be created, and the pacing
        # then sent the transactions due meanwhile in one burst
        producer.prepare_topics([transactions_topic, feedback_topic])
        t0 = time.perf_counter()
        bar = tqdm(total=n_tx_total, desc="replay", unit="tx", disable=not progress, mininterval=1.0)
        for i in range(len(df)):
            t = int(ts[i])
            if t < lo:
                continue
            if t >= hi or sent_tx >= n_tx_total:
                break
            while j < i and int(ts[j]) + LABEL_DELAY_S <= t:
                producer.send(
                    feedback_topic,
                    {
                        "transaction_id": int(ids[j]),
                        "label": int(fraud[j]),
                        "known_at": _iso(int(ts[j]) + LABEL_DELAY_S),
                        "customer_id": int(cust[j]),
                        "terminal_id": int(term[j]),
                        "tx_timestamp": _iso(int(ts[j])),
                        "amount": float(amt[j]),
                    },
                    key=str(int(cust[j])),
                )
                sent_fb += 1
                j += 1
            if rate > 0:
                # paced in ticks: whatever is due goes out, then one sleep until the next event is due
                # (at least PACE_TICK_S), instead of a sleep and a wake-up per event
                delay = t0 + sent_tx / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(max(delay, PACE_TICK_S))
            producer.send(
                transactions_topic,
                {
                    "transaction_id": int(ids[i]),
                    "customer_id": int(cust[i]),
                    "terminal_id": int(term[i]),
                    "timestamp": _iso(t),
                    "amount": float(amt[i]),
                    "produced_at_ms": int(time.time() * 1000),
                },
                key=str(int(cust[i])),
            )
            sent_tx += 1
            bar.update(1)
        producer.flush()
        bar.close()
    elapsed = time.perf_counter() - t0
    return {
        "transactions": sent_tx,
        "feedback": sent_fb,
        "seconds": round(elapsed, 2),
        "events_per_s": round(sent_tx / elapsed, 1) if elapsed > 0 else None,
        "start": start,
        "end": end,
    }


def _day(value: str) -> str:
    """An argparse type: a calendar day (``YYYY-MM-DD``)."""
    try:
        return pd.Timestamp(value).strftime("%Y-%m-%d")
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"not a date: {value!r}") from exc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--start", type=_day, default="2018-08-01")
    p.add_argument("--end", type=_day, default="2018-08-14")
    p.add_argument("--rate", type=float, default=0.0, help="transactions per second (0 = unthrottled)")
    p.add_argument("--limit", type=int, default=None, help="stop after this many transactions")
    p.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"))
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--transactions-topic", default="transactions")
    p.add_argument("--feedback-topic", default="risk-feedback")
    args = p.parse_args(argv)
    if args.end < args.start:
        p.error(f"--end {args.end} is before --start {args.start}")
    if args.rate < 0 or (args.limit is not None and args.limit < 1):
        p.error("--rate must be >= 0 and --limit >= 1")
    if not args.bootstrap:
        print("set KAFKA_BOOTSTRAP_SERVERS or --bootstrap", file=sys.stderr)
        return 2
    try:
        out = replay(
            args.bootstrap, args.data_dir, args.start, args.end, args.rate, args.limit,
            args.transactions_topic, args.feedback_topic,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KafkaError as exc:
        print(f"error: Kafka at {args.bootstrap}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
