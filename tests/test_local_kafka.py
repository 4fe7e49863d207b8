"""The broker launcher (scripts/local_kafka.py): a second broker next to the test broker, exit codes,
SIGTERM cleanup and a broker that cannot start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from backbone.kafka import kafka_reachable

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = [sys.executable, str(REPO / "scripts" / "local_kafka.py")]


def alive(pid: int) -> bool:
    """True while ``pid`` runs (zombies count as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_run_passes_env_and_exit_code_then_sigterm_stops_everything(tmp_path: Path) -> None:
    """A second broker runs beside the test broker; SIGTERM to `run` stops CMD and both JVMs."""
    state, marker = tmp_path / "state", tmp_path / "child.env"
    child = (f"import os, time; open({str(marker)!r}, 'w').write(os.environ['KAFKA_BOOTSTRAP_SERVERS']); "
             "time.sleep(300)")
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    run = subprocess.Popen([*LAUNCHER, "run", "--state-dir", str(state), "--", sys.executable, "-c", child],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: marker.exists() and marker.read_text() or run.poll() is not None, 120, "the child")
        assert run.poll() is None, run.stdout.read().decode() if run.stdout else ""
        info = json.loads((state / "broker.json").read_text())
        assert marker.read_text() == info["bootstrap"]
        ok, reason = kafka_reachable(info["bootstrap"], timeout_s=5.0)
        assert ok, reason
        pids = [info["kafka_pid"], info["zookeeper_pid"]]
        assert all(alive(pid) for pid in pids)
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == 128 + signal.SIGTERM
        assert not any(alive(pid) for pid in pids), "JVMs left behind"
        assert not (state / "broker.json").exists()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        subprocess.run([*LAUNCHER, "stop", "--state-dir", str(state)], check=False, timeout=60)


def test_run_returns_the_command_exit_code(tmp_path: Path) -> None:
    code = "import os, sys; sys.exit(7 if os.environ['KAFKA_API_VERSION'] == '0.9' else 1)"
    proc = subprocess.run([*LAUNCHER, "run", "--", sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 7, proc.stderr
    assert "stopped kafka" in proc.stderr and "stopped zookeeper" in proc.stderr


def test_run_fails_without_running_the_command_if_the_broker_cannot_start(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    proc = subprocess.run(
        [*LAUNCHER, "run", "--state-dir", str(tmp_path / "state"), "--timeout", "0.5", "--",
         sys.executable, "-c", f"open({str(marker)!r}, 'w')"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "cannot start the broker" in proc.stderr
    assert not marker.exists()
    assert not (tmp_path / "state" / "broker.json").exists()
