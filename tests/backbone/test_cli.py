"""Pipelines run as commands: a missing artifact is one line on stderr and exit status 2, not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from backbone.cli import run_cli

REPO = Path(__file__).resolve().parents[2]


def test_run_cli_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    def missing(_argv: list[str] | None) -> int:
        raise FileNotFoundError("no artifact under /nowhere")

    for main, code in ((lambda _a: 3, 3), (lambda _a: {"auc": 0.9}, 0), (missing, 2)):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main)
        assert exit_info.value.code == code
    assert capsys.readouterr().err == "error: no artifact under /nowhere\n"
    with pytest.raises(KeyError):  # an unexpected error keeps its traceback
        run_cli(lambda _a: {}["x"])


def test_evaluate_without_a_trained_model(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pipelines.manufacturing.evaluate",
        "--task",
        "classify",
        "--model-dir",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "error: no artifact under" in done.stderr and "pipelines.manufacturing.train" in done.stderr
