"""REST latency of ``POST /v1/score`` under concurrent clients.

    python -m benchmarks.financial_risk_rest [--base-url URL] [--clients 16] [--requests 3000] [--warmup 300]

Without ``--base-url`` a service is started (uvicorn, newest artifacts in MODEL_DIR, feature state
warmed from the dataset up to 2018-08-08). Real transactions after the state's watermark are sent
in stream order, split by customer over the clients (each customer's events stay in order). The first
``--warmup`` transactions are sent the same way but not measured (first calls fill caches: stacked MoE
weights, numpy / torch kernels); ``errors`` counts both phases.
Last stdout line: one JSON object with ``p50_ms``, ``p99_ms``, ``rps``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.loadgen import encode_post, run_closed_loop
from pipelines.financial_risk.data import default_data_dir, epoch, load_transactions


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait(base: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            r = httpx.get(base + "/ready", timeout=5)
            if r.status_code == 200:
                return httpx.get(base + "/v1/model", timeout=5).json()
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"service at {base} not ready after {timeout_s}s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=None)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument(
        "--warmup", type=int, default=300, help="requests sent first and not measured (first-call caches)"
    )
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--warm-customers", type=int, default=None, help="warm (and send) only a customer sample")
    args = p.parse_args(argv)
    proc = None
    base = args.base_url
    if base is None:
        port = _free_port()
        env = dict(os.environ, API_KEY="bench", LOG_LEVEL="WARNING")
        if args.warm_customers:
            env["WARM_CUSTOMERS"] = str(args.warm_customers)
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "services.financial_risk.app.main:app", "--port", str(port),
             "--log-level", "warning", "--no-access-log"],
            env=env,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
    try:
        info = _wait(base, 900)
        wm = info["feature_state"]["watermark"]
        start = max(
            epoch("2018-08-08"), int(np.datetime64(wm.replace("+00:00", ""), "s").astype(np.int64)) + 1
        )
        scorer_customers = None
        df = load_transactions(args.data_dir, end="2018-08-15")
        df = df[df["ts"] >= start]
        if args.warm_customers:
            rng = np.random.default_rng(0)
            full = load_transactions(args.data_dir, end="2018-08-08")
            full = full[full["ts"] >= epoch("2018-04-01")]
            scorer_customers = rng.choice(
                np.sort(full["CUSTOMER_ID"].unique()), args.warm_customers, replace=False
            )
            df = df[df["CUSTOMER_ID"].isin(scorer_customers)]
        df = df.head(args.warmup + args.requests)
        url = httpx.URL(base)
        host, port = url.host, url.port or 80
        per_client: list[list[bytes]] = [[] for _ in range(args.clients)]
        warm: list[list[bytes]] = [[] for _ in range(args.clients)]
        for i, r in enumerate(df.itertuples()):
            row = {
                "transaction_id": int(r.TRANSACTION_ID),
                "customer_id": int(r.CUSTOMER_ID),
                "terminal_id": int(r.TERMINAL_ID),
                "timestamp": r.TX_DATETIME.isoformat(),
                "amount": float(r.TX_AMOUNT),
            }
            target = warm if i < args.warmup else per_client
            target[int(r.CUSTOMER_ID) % args.clients].append(encode_post(host, "/v1/score", row))
        print(f"warm-up: {args.warmup} transactions", file=sys.stderr, flush=True)
        warm_res = run_closed_loop(host, port, warm)
        print(f"sending {len(df) - args.warmup} transactions from {args.clients} clients", file=sys.stderr)
        cpu0 = _process_cpu_s(proc.pid) if proc is not None else None
        res = run_closed_loop(host, port, per_client)
        cpu1 = _process_cpu_s(proc.pid) if proc is not None else None
        a = np.array(res.latencies_ms)
        failed = sum(1 for st in res.statuses if st != 200)
        out = {
            "endpoint": "/v1/score",
            "clients": args.clients,
            "requests": len(a),
            "errors": failed + sum(1 for st in warm_res.statuses if st != 200),
            "warmup_requests": len(warm_res.latencies_ms),
            "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2),
            "rps": round(len(a) / res.elapsed_s, 1),
            "server_cpu_ms_per_request": (
                round((cpu1 - cpu0) / len(a) * 1000, 3) if cpu0 is not None and cpu1 is not None else None
            ),
            "client": "benchmarks.loadgen (keep-alive HTTP/1.1, uvloop + httptools)",
            "cpu_count": os.cpu_count(),
        }
        if res.errors:
            out["first_errors"] = res.errors[:3]
        print(json.dumps(out))
        return 0
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
