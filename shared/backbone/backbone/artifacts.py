"""Model artifacts: ``<MODEL_DIR>/<domain>/<name>/<version>/`` directories.

Each artifact directory holds the weights (safetensors, or LightGBM's text format; never
pickle), ``config.json``, ``metrics.json`` and ``manifest.json`` with the data fingerprint
(sha256 of every input file), the code version and the list of files. Versions are UTC
timestamps, so the newest sorts last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprint(paths: Iterable[Path]) -> dict[str, str]:
    """``{file name: sha256}`` for every input file (directories are walked)."""
    result: dict[str, str] = {}
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            result[str(f.resolve())] = file_sha256(f)
    return result


def code_version() -> str:
    """The git commit of the code (``CODE_VERSION`` env var first, e.g. inside Docker images)."""
    if env := os.environ.get("CODE_VERSION"):
        return env
    try:
        here = Path(__file__).resolve().parent
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def new_version() -> str:
    """A sortable version string: the current UTC time to the microsecond."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


@dataclass(frozen=True)
class Artifact:
    """A saved model directory and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    def read_json(self, filename: str) -> Any:
        """Load one of the artifact's JSON files."""
        return json.loads((self.path / filename).read_text())

    @property
    def config(self) -> dict[str, Any]:
        return self.read_json("config.json")

    @property
    def metrics(self) -> dict[str, Any]:
        return self.read_json("metrics.json")

    def load_tensors(self, filename: str = WEIGHTS) -> dict[str, torch.Tensor]:
        """Weights saved with safetensors (no pickle involved)."""
        return load_file(str(self.path / filename))


def save_artifact(
    model_dir: Path,
    domain: str,
    name: str,
    *,
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    data_files: Iterable[Path] = (),
    tensors: Mapping[str, torch.Tensor] | None = None,
    text_files: Mapping[str, str] | None = None,
    binary_files: Mapping[str, bytes] | None = None,
    version: str | None = None,
) -> Artifact:
    """Write a new artifact version atomically (temp dir, then rename) and return it."""
    version = version or new_version()
    target = Path(model_dir) / domain / name / version
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
    try:
        files: list[str] = []
        if tensors is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS))
            files.append(WEIGHTS)
        for fname, text in (text_files or {}).items():
            (tmp / fname).write_text(text)
            files.append(fname)
        for fname, blob in (binary_files or {}).items():
            (tmp / fname).write_bytes(blob)
            files.append(fname)
        (tmp / "config.json").write_text(json.dumps(dict(config), indent=2, default=str))
        (tmp / "metrics.json").write_text(json.dumps(dict(metrics), indent=2, default=str))
        manifest = {
            "domain": domain,
            "name": name,
            "version": version,
            "created_at": datetime.now(UTC).isoformat(),
            "code_version": code_version(),
            "data_fingerprint": data_fingerprint(data_files),
            "files": sorted(files + ["config.json", "metrics.json"]),
            "file_sha256": {f: file_sha256(tmp / f) for f in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Artifact(target, manifest)


def list_artifacts(model_dir: Path, domain: str, name: str) -> list[Artifact]:
    """All complete versions of a model, oldest first."""
    root = Path(model_dir) / domain / name
    if not root.is_dir():
        return []
    found = []
    for child in sorted(root.iterdir()):
        manifest = child / MANIFEST
        if child.is_dir() and not child.name.startswith(".") and manifest.is_file():
            found.append(Artifact(child, json.loads(manifest.read_text())))
    return sorted(found, key=lambda a: a.version)


def load_artifact(path: Path) -> Artifact:
    """The artifact in directory ``path`` (FileNotFoundError if it has no manifest)."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{path} is not an artifact directory (no {MANIFEST})")
    return Artifact(Path(path), json.loads(manifest.read_text()))


def latest_artifact(model_dir: Path, domain: str, name: str) -> Artifact:
    """The newest version of a model; FileNotFoundError naming the pipeline to run if none."""
    found = list_artifacts(model_dir, domain, name)
    if not found:
        raise FileNotFoundError(
            f"no artifact under {Path(model_dir) / domain / name}; run `python -m pipelines.{domain}.train`"
        )
    return found[-1]


def verify_artifact(artifact: Artifact) -> None:
    """Check every weight file against the sha256 in its manifest (ValueError if tampered)."""
    for fname, expected in artifact.manifest.get("file_sha256", {}).items():
        actual = file_sha256(artifact.path / fname)
        if actual != expected:
            raise ValueError(f"{artifact.path / fname}: sha256 {actual} != manifest {expected}")
