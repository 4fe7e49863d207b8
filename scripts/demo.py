"""The demo: the four services on :8001-:8004 against a running Kafka, fed with real data.

``make demo`` runs it inside ``scripts/local_kafka.py run`` (which starts the broker and sets
``KAFKA_BOOTSTRAP_SERVERS``). Steps: start every service (and worker), train a quick model for
any service that has none yet and hot-reload it, print a status table, exercise each service
with real data from ``DATA_DIR`` and print the results. ``--once`` exits afterwards (status 0
only if every step worked); otherwise it keeps running until Ctrl-C and then stops everything.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from backbone.artifacts import list_artifacts
from backbone.service.config import REPO_ROOT, default_data_dir, default_model_dir


@dataclass(frozen=True)
class ServiceSpec:
    """One service of the demo."""

    domain: str
    port: int
    models: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """(artifact name, arguments of ``python -m pipelines.<domain>.train``) the demo needs."""
    workers: tuple[tuple[str, ...], ...] = field(default_factory=tuple)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


QUICK = ("--preset", "quick")
SERVICES = (
    ServiceSpec(
        "medical_imaging",
        8001,
        models=(("pneumoniamnist", QUICK), ("adrenalmnist3d", (*QUICK, "--dataset", "adrenalmnist3d"))),
    ),
    ServiceSpec(
        "manufacturing", 8002, models=(("defect_classifier", QUICK), ("anomaly_magnetic_tile", QUICK))
    ),
    ServiceSpec(
        "financial_risk",
        8003,
        models=(
            ("fraud_lgbm", ("--task", "fraud", "--preset", "quick")),
            ("credit_lgbm", ("--task", "credit", "--preset", "quick")),
        ),
        # a fresh checkpoint folder per run: the demo replays the same events every time
        workers=(
            (
                "services.financial_risk.worker",
                "--warm-until",
                "2018-08-08",
                "--checkpoint-dir",
                "{run_dir}/risk-worker",
            ),
        ),
    ),
    ServiceSpec(
        "forecasting",
        8004,
        models=(("ETTh1_h96", QUICK), ("CSI300_h5", (*QUICK, "--dataset", "CSI300", "--horizon", "5"))),
    ),
)


def say(msg: str = "") -> None:
    print(msg, flush=True)


class Demo:
    """Starts, checks, exercises and stops the services."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.run_dir = Path(tempfile.mkdtemp(prefix="demo-run-", dir=log_dir.parent))
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append((name, proc))

    def start(self) -> None:
        for spec in SERVICES:
            if _port_busy(spec.port):
                raise SystemExit(f"port {spec.port} for {spec.domain} is already in use; stop what holds it")
            self.spawn(
                spec.domain,
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    f"services.{spec.domain}.app.main:app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(spec.port),
                    "--no-access-log",
                ],
            )
        for spec in SERVICES:
            for module, *worker_args in spec.workers:
                if importlib.util.find_spec(module) is not None:
                    args = [a.format(run_dir=self.run_dir) for a in worker_args]
                    name = f"{spec.domain}-{module.rsplit('.', 1)[-1]}"
                    self.spawn(name, [sys.executable, "-m", module, *args])

    def stop(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for name, proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"   {name} did not stop on SIGTERM; killing it")
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def dead(self) -> list[str]:
        return [name for name, proc in self.procs if proc.poll() is not None]


def _port_busy(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def ready_state(spec: ServiceSpec) -> tuple[bool, str, str]:
    """(ready, reason, model version) from the service's /ready."""
    try:
        resp = httpx.get(spec.url + "/ready", timeout=5)
    except httpx.HTTPError as exc:
        return False, f"no answer ({type(exc).__name__})", "-"
    body = resp.json()
    model = body.get("model") or {}
    version = f"{model.get('name', '-')} {model.get('version', '')}".strip()
    if resp.status_code == 200:
        return True, "ready", version
    reasons = "; ".join(
        f"{k}: {v}" for k, v in body.get("checks", {}).items() if v != "ok" and not v.startswith("ok")
    )
    return False, reasons or "not ready", version


def wait_until_answering(spec: ServiceSpec, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(spec.url + "/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def wait_ready(spec: ServiceSpec, timeout_s: float) -> tuple[bool, str, str]:
    deadline = time.monotonic() + timeout_s
    state = ready_state(spec)
    while not state[0] and time.monotonic() < deadline:
        time.sleep(1)
        state = ready_state(spec)
    return state


def ensure_models(spec: ServiceSpec, env: dict[str, str]) -> list[str]:
    """Train (quick preset, real data) every model the service needs that MODEL_DIR lacks; failures."""
    failures = []
    for name, train_args in spec.models:
        if list_artifacts(Path(env["MODEL_DIR"]), spec.domain, name):
            continue
        say(f">> {spec.domain}/{name}: no model yet - training it on real data ({' '.join(train_args)})")
        argv = [sys.executable, "-m", f"pipelines.{spec.domain}.train", *train_args]
        if subprocess.run(argv, cwd=REPO_ROOT, env=env).returncode != 0:
            failures.append(f"{spec.domain}: training {name} failed")
    return failures


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    headers = ("service", "url", "status", "model version")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    say(line)
    say("-" * len(line))
    for row in rows:
        say("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--once", action="store_true", help="exercise every service once, then exit")
    parser.add_argument("--ready-timeout", type=float, default=180.0)
    args = parser.parse_args(argv)

    env = dict(os.environ)
    env.setdefault("DATA_DIR", str(default_data_dir()))
    env.setdefault("MODEL_DIR", str(default_model_dir()))
    env.setdefault("API_KEY", "demo-" + secrets.token_hex(8))
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    os.environ.update({k: env[k] for k in ("DATA_DIR", "MODEL_DIR", "API_KEY")})
    if not env.get("KAFKA_BOOTSTRAP_SERVERS"):
        say("!! KAFKA_BOOTSTRAP_SERVERS is not set: run this through `make demo`")
        return 2
    log_dir = REPO_ROOT / ".cache" / "demo-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    say(
        f"== Demo: Kafka at {env['KAFKA_BOOTSTRAP_SERVERS']}, data {env['DATA_DIR']}, "
        f"models {env['MODEL_DIR']}"
    )
    say(f"   service logs (JSON) in {log_dir}; admin API key for this run: {env['API_KEY']}")

    demo = Demo(env, log_dir)
    stop_requested = False

    def _on_signal(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _on_signal)
    failures: list[str] = []
    try:
        for spec in SERVICES:
            failures += ensure_models(spec, env)
        demo.start()
        for spec in SERVICES:
            if not wait_until_answering(spec, args.ready_timeout):
                failures.append(f"{spec.domain}: did not start (see {log_dir / spec.domain}.log)")
        rows = []
        for spec in SERVICES:
            ok, reason, version = wait_ready(spec, args.ready_timeout)
            rows.append((spec.domain, spec.url, reason, version))
            if not ok:
                failures.append(f"{spec.domain}: not ready ({reason})")
        say()
        print_table(rows)
        say()
        for spec in SERVICES:
            say(f"== {spec.domain}: exercising {spec.url} with real data")
            try:
                module = importlib.import_module(f"services.{spec.domain}.demo")
                for line in module.exercise(spec.url, Path(env["DATA_DIR"])):
                    say("   " + line)
                say(f"   {spec.domain}: OK")
            except Exception as exc:  # report every failing step, keep going with the others
                failures.append(f"{spec.domain}: {type(exc).__name__}: {exc}")
                say(f"   {spec.domain}: FAILED - {type(exc).__name__}: {exc}")
        if dead := demo.dead():
            failures.append(f"processes exited early: {', '.join(dead)} (logs in {log_dir})")
        say()
        if failures:
            say("== Demo finished with failures:")
            for failure in failures:
                say("   - " + failure)
        else:
            say("== Every service is up and answered real data correctly.")
        if not args.once:
            say(
                "== Running. Swagger UIs: " + ", ".join(s.url + "/docs" for s in SERVICES) + ". Ctrl-C stops."
            )
            while not stop_requested:
                time.sleep(1)
                if dead := demo.dead():
                    say(f"!! exited: {', '.join(dead)} (logs in {log_dir})")
                    break
    except KeyboardInterrupt:
        say("\n== Stopping")
    finally:
        # a second Ctrl-C / SIGTERM must not interrupt the shutdown and leave orphans behind
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        demo.stop()
        say("== All services stopped.")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
