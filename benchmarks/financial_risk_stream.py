"""End-to-end stream throughput and latency of the fraud worker with the real broker.

    python scripts/local_kafka.py run -- python -m benchmarks.financial_risk_stream [--events 20000]

1. pass-through: a StreamProcessor that only copies each record to an output topic (no features,
   no model) drains ``--events`` pre-produced transactions -> ``passthrough_eps`` (the ratio's
   denominator); the same with ``pipeline=True`` -> ``passthrough_pipelined_eps``;
2. scored: the risk worker (feature state warmed from the dataset up to 2018-08-01) drains the same
   number of real transactions, and their labels from ``risk-feedback`` -> ``scored_eps``; ``ratio`` =
   scored / pass-through; both clocks stop when the last batch is committed; ``*_cpu_us_per_event``
   is the process CPU time per event; ``scored_us_per_event_by_phase`` splits the scored worker's wall time
   per event (labels, scoring, handler, outside it); ``checkpoint_s`` the final checkpoint of the whole state;
3. latency: a replay process offers transactions at ``--rate`` (2,000/s) once a fresh worker owns its
   partitions; each score record carries produced -> scored milliseconds -> ``p50_ms``, ``p99_ms``
   over the events after the first ``--latency-warmup-events`` (``p99_ms_with_warmup``: all of them).
   That worker starts a snapshot round every ``--checkpoint-every-s`` (5 s), so the run includes
   snapshots (``latency_checkpoints`` rounds completed, ``latency_snapshot_chunks`` files written);
   ``latency_batch_phases`` breaks that worker's batches down (events, snapshot step, labels, scoring,
   handler, and the time outside the handler: delivery, commit, poll) as [p50, p99, max].
Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from backbone.kafka import StreamProcessor, read_topic

from pipelines.financial_risk.data import default_data_dir
from pipelines.financial_risk.replay import replay
from services.financial_risk.app.core.config import Settings
from services.financial_risk.worker import CHECKPOINT_STEP_MS, RiskWorker, batch_phases


def _read(bootstrap: str, topic: str, expected: int, timeout_s: float = 120.0) -> list[dict]:
    return read_topic(bootstrap, topic, want=expected, timeout_s=timeout_s)


def _drain(proc: StreamProcessor, n: int) -> tuple[float, float]:
    """(events/s, process CPU µs per event) of a processor draining ``n`` records. The clock starts at
    the first record and stops when the last batch is delivered and committed; shutdown (the worker's
    final checkpoint, leaving the group) is not part of the rate."""
    first: list[float] = []
    orig = proc.handler

    def timed(msgs):  # type: ignore[no-untyped-def]
        if not first:
            first.extend((time.perf_counter(), time.process_time()))
        return orig(msgs)

    proc.handler = timed
    proc.run(max_records=n, idle_timeout_s=30, close=False)
    if not first:
        proc.close()
        return 0.0, 0.0
    wall, cpu = time.perf_counter() - first[0], time.process_time() - first[1]
    proc.close()
    return n / wall, 1e6 * cpu / n


def phase_us_per_event(timings: list) -> dict[str, float]:
    """Wall µs per event of the throughput worker's batch phases (``RiskWorker.batch_timings``): snapshot
    step, labels (draining ``risk-feedback``, threshold changes), scoring (features, model, reason codes), the
    whole handler, and the rest of the cycle (poll, delivery, commit)."""
    if not timings:
        return {}
    a = np.array(timings)
    n = a[:, 1].sum()
    wall = a[-1, 0] + a[-1, 5] - a[0, 0]
    names = ("snapshot", "labels", "scoring", "handler")
    parts = {name: a[:, col].sum() for name, col in zip(names, (2, 3, 4, 5), strict=True)}
    out = {k: round(1e6 * v / n, 1) for k, v in parts.items()}
    out["outside_handler"] = round(1e6 * (wall - a[:, 5].sum()) / n, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=20000)
    p.add_argument("--rate", type=float, default=2000.0)
    p.add_argument("--latency-events", type=int, default=20000)
    p.add_argument(
        "--latency-warmup-events", type=int, default=4000,
        help="first offered events left out of p50/p99 (2 s at 2,000/s: connections, metadata)",
    )  # fmt: skip
    p.add_argument(
        "--pipeline", action="store_true",
        help="the scored workers acknowledge batch k while batch k + 1 is scored (the worker's --pipeline)",
    )  # fmt: skip
    p.add_argument(
        "--timings-out",
        type=Path,
        default=None,
        help="write the latency run's per-batch timings and per-event latencies here (JSON)",
    )
    p.add_argument("--max-batch", type=int, default=200, help="the scored workers' largest micro-batch")
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--warm-from", default="2018-04-01")
    p.add_argument("--warm-until", default="2018-08-01")
    p.add_argument(
        "--checkpoint-every-s", type=float, default=5.0,
        help="periodic checkpoints of the latency run's worker (the service default is 30 s)",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint-step-ms",
        type=float,
        default=CHECKPOINT_STEP_MS,
        help="time budget of one snapshot step before a batch (the worker's default)",
    )
    args = p.parse_args(argv)
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        print(
            "KAFKA_BOOTSTRAP_SERVERS is not set (run through scripts/local_kafka.py run --)", file=sys.stderr
        )
        return 2
    tag = uuid.uuid4().hex[:8]
    scratch = Path(tempfile.mkdtemp(prefix=f"bench-risk-{tag}-"))  # worker snapshots, removed at the end
    try:
        return _run(args, bootstrap, tag, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(args: argparse.Namespace, bootstrap: str, tag: str, scratch: Path) -> int:
    topics = {k: f"bench-{k}-{tag}" for k in ("tx", "fb", "scores", "alerts", "pass-in", "pass-out", "lat")}
    # 1. pass-through
    days = ("2018-08-01", "2018-08-14")
    replay(bootstrap, args.data_dir, *days, limit=args.events, transactions_topic=topics["pass-in"],
           feedback_topic=topics["fb"] + "-p", progress=False)  # fmt: skip
    passthrough = StreamProcessor(
        bootstrap, topics["pass-in"], f"bench-pass-{tag}", None,
        lambda msgs: [(topics["pass-out"], m.key, m.raw) for m in msgs], max_batch_size=200,
        async_commits=True,  # as the scored worker commits
    )  # fmt: skip
    passthrough_eps, passthrough_cpu = _drain(passthrough, args.events)
    # the same with delivery overlapped (StreamProcessor(pipeline=True), the worker's --pipeline):
    # reported next to the plain pass-through, which stays the ratio's denominator
    passthrough_pl = StreamProcessor(
        bootstrap, topics["pass-in"], f"bench-pass-pl-{tag}", None,
        lambda msgs: [(topics["pass-out"] + "-pl", m.key, m.raw) for m in msgs], max_batch_size=200,
        pipeline=True,
    )  # fmt: skip
    passthrough_pl_eps, _ = _drain(passthrough_pl, args.events)
    # 2. scored
    settings = Settings(
        kafka_bootstrap_servers=bootstrap, transactions_topic=topics["tx"], feedback_topic=topics["fb"],
        scores_topic=topics["scores"], alerts_topic=topics["alerts"], worker_group_id=f"bench-risk-{tag}",
    )  # fmt: skip
    replay(bootstrap, args.data_dir, *days, limit=args.events,
           transactions_topic=topics["tx"], feedback_topic=topics["fb"], progress=False)  # fmt: skip
    worker = RiskWorker(
        settings,
        bootstrap,
        checkpoint_dir=scratch / "throughput",
        pipeline=args.pipeline,
        max_batch_size=args.max_batch,
    )
    warm = worker.scorer.warm_from_dataset(args.data_dir, args.warm_from, args.warm_until)
    checkpoints: list[float] = []
    write_checkpoint = worker.checkpoint

    def timed_checkpoint(partitions: set[int] | None = None) -> None:
        t0 = time.perf_counter()
        write_checkpoint(partitions)
        checkpoints.append(time.perf_counter() - t0)

    worker.checkpoint = timed_checkpoint  # type: ignore[method-assign]
    customers = len(worker.engine.customers)
    worker.start()  # as RiskWorker.run before its first poll: topics assigned, threshold changes applied
    scored_eps, scored_cpu = _drain(worker.processor, args.events)  # closing writes the final checkpoint
    worker.close_readers()
    # 3. latency at the offered rate (a fresh worker and group on a fresh topic)
    upd = {"transactions_topic": topics["lat"], "worker_group_id": f"bench-lat-{tag}",
           "scores_topic": topics["scores"] + "-lat"}  # fmt: skip
    s2 = settings.model_copy(update=upd)
    lat_dir = scratch / "latency"
    w2 = RiskWorker(
        s2, bootstrap, checkpoint_dir=lat_dir, checkpoint_every_s=args.checkpoint_every_s,
        checkpoint_step_ms=args.checkpoint_step_ms, pipeline=args.pipeline, max_batch_size=args.max_batch,
    )  # fmt: skip
    w2.scorer.warm_from_dataset(args.data_dir, args.warm_from, args.warm_until)
    t = threading.Thread(target=w2.run, kwargs={"idle_timeout_s": 20}, daemon=True)
    t.start()
    deadline = time.monotonic() + 120
    while not w2.processor.consumer.assignment() and time.monotonic() < deadline:
        time.sleep(0.2)  # measure once the worker owns its partitions, not the group join
    time.sleep(1.0)
    # the load comes from another process, so the offered rate does not share this process's GIL
    cmd = [sys.executable, "-m", "pipelines.financial_risk.replay", "--start", days[0], "--end", days[1],
           "--rate", str(args.rate), "--limit", str(args.latency_events), "--bootstrap", bootstrap,
           "--data-dir", str(args.data_dir), "--transactions-topic", topics["lat"],
           "--feedback-topic", topics["fb"] + "-lat"]  # fmt: skip
    t_offer = time.perf_counter()
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    sent = json.loads(proc.stdout.strip().splitlines()[-1])
    t.join(timeout=300)
    scores = _read(bootstrap, s2.scores_topic, sent["transactions"])
    # in the order the replay sent them (transaction ids ascend with time); the first
    # --latency-warmup-events are the producer's and consumer's start-up (connections, metadata)
    timed = [s for s in scores if s.get("latency_ms") is not None]
    ordered = sorted(timed, key=lambda s: s["transaction_id"])
    lat_all = np.array([s["latency_ms"] for s in ordered])
    lat = lat_all[args.latency_warmup_events :]
    if args.timings_out:
        args.timings_out.write_text(json.dumps({
            "offer_start": t_offer, "batches": list(w2.batch_timings),
            "events": [[s["transaction_id"], s["latency_ms"], s["partition"], s["offset"]] for s in ordered],
        }))  # fmt: skip
    out = {
        "events": args.events,
        "passthrough_eps": round(passthrough_eps, 1),
        "scored_eps": round(scored_eps, 1),
        "ratio": round(scored_eps / passthrough_eps, 3) if passthrough_eps else None,
        "passthrough_cpu_us_per_event": round(passthrough_cpu, 1),
        "passthrough_pipelined_eps": round(passthrough_pl_eps, 1),
        "ratio_vs_pipelined_passthrough": (
            round(scored_eps / passthrough_pl_eps, 3) if passthrough_pl_eps else None
        ),
        "scored_cpu_us_per_event": round(scored_cpu, 1),
        "scored_us_per_event_by_phase": phase_us_per_event(list(worker.batch_timings)),
        "offered_eps": sent["events_per_s"],
        "latency_events": len(lat),
        "latency_warmup_events": min(args.latency_warmup_events, len(lat_all)),
        "p99_ms_with_warmup": round(float(np.percentile(lat_all, 99)), 2) if len(lat_all) else None,
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
        "warm_events": warm.events,
        "checkpoint_s": round(max(checkpoints), 3) if checkpoints else None,
        "latency_checkpoints": w2.checkpoints_written,
        "latency_checkpoint_every_s": args.checkpoint_every_s,
        "latency_checkpoint_step_ms": args.checkpoint_step_ms,
        "latency_snapshot_chunks": w2.snapshot_chunks,
        "latency_snapshot_chunk_max_s": round(w2.snapshot_max_s, 4),
        "latency_snapshot_steps_deferred": w2.snapshot_steps_deferred,
        "checkpoint_customers": customers,
        # the latency run's batches after the warm-up: [p50, p99, max] of each phase
        "latency_batch_phases": batch_phases(
            list(w2.batch_timings), t_offer + args.latency_warmup_events / args.rate
        ),
        "model_version": worker.models.fraud.version,
        "pipeline": args.pipeline,
        "max_batch": args.max_batch,
        "cpu_count": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
