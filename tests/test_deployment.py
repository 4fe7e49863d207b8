"""The repository's deployment files: layout, pinned dependencies, Dockerfiles, docker-compose."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVICES = {"medical_imaging": 8001, "manufacturing": 8002, "financial_risk": 8003, "forecasting": 8004}


def test_layout() -> None:
    required = [
        "shared/backbone/pyproject.toml", "shared/backbone/backbone/__init__.py", "pipelines", "benchmarks",
        "tests", "docs", "docker-compose.yml", "pyproject.toml", "Makefile", ".ci/run", "README.md",
    ]
    for rel in required:
        assert (ROOT / rel).exists(), rel
    for service in SERVICES:
        assert (ROOT / "services" / service / "app" / "main.py").is_file(), service
        assert (ROOT / "services" / service / "Dockerfile").is_file(), service


def test_dependencies_are_pinned() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["dev"]
    unpinned = [d for d in deps if d != "backbone" and "==" not in d]
    assert not unpinned, f"unpinned dependencies: {unpinned}"
    names = {re.split(r"[=<>]", d)[0].lower() for d in deps}
    for needed in ("torch", "torchvision", "timm", "monai", "lightgbm", "kafka-python", "fastapi", "uvicorn"):
        assert needed in names
    kafka_pin = next(d for d in deps if d.startswith("kafka-python"))
    assert int(kafka_pin.split("==")[1].split(".")[0]) < 3, "Kafka 0.9 needs kafka-python < 3"
    lock = (ROOT / "requirements.lock").read_text().splitlines()
    assert all("==" in line for line in lock if line and not line.startswith("#"))


def test_virtualenv_and_caches_are_git_ignored() -> None:
    ignored = (ROOT / ".gitignore").read_text().split()
    for path in (".venv/", ".cache/", "models/"):
        assert path in ignored


@pytest.mark.parametrize("service,port", sorted(SERVICES.items()))
def test_dockerfile_runs_its_service(service: str, port: int) -> None:
    text = (ROOT / "services" / service / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM python:3.11" in text
    assert f"services.{service}.app.main:app" in text
    assert f'"--port", "{port}"' in text and f"EXPOSE {port}" in text
    assert "HEALTHCHECK" in text and "USER app" in text
    assert "pip install -c requirements.lock" in text


def _compose_config() -> dict:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose (Debian package, v1.29) is installed by `make test`'s system-deps"
    result = subprocess.run(
        [exe, "-f", str(ROOT / "docker-compose.yml"), "config"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_docker_compose_config_is_valid() -> None:
    config = _compose_config()
    services = config["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller", "KRaft single node"
    assert "healthcheck" in kafka and kafka["healthcheck"]["test"]
    for service, port in SERVICES.items():
        spec = services[service]
        assert spec["build"]["dockerfile"] == f"services/{service}/Dockerfile"
        assert spec["depends_on"]["kafka"]["condition"] == "service_healthy"
        assert spec["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
        assert any(str(p).startswith(f"{port}:") or p.get("published") == port for p in _ports(spec))
        assert spec["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert f"{port}/ready" in " ".join(spec["healthcheck"]["test"])
    trainer = services["trainer"]
    for domain in SERVICES:
        assert f"pipelines.{domain}.train" in " ".join(_as_list(trainer["command"]))
    replay = services["replay"]
    assert "pipelines.financial_risk.replay" in " ".join(_as_list(replay["command"]))
    assert replay["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert "models" in config["volumes"]


def _ports(spec: dict) -> list:
    ports = spec.get("ports", [])
    return [p if isinstance(p, dict) else {"published": int(str(p).split(":")[0])} for p in ports]


def _as_list(command: str | list[str]) -> list[str]:
    return command if isinstance(command, list) else [command]


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme


def test_ruff_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-3000:]
