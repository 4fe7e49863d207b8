"""The replay tool's command line: bad arguments, an empty date range and an unreachable broker end with the
reason and exit status 2, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.financial_risk import replay


def test_replay_refuses_bad_arguments_with_the_reason(
    fr_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--bootstrap", "127.0.0.1:1", "--data-dir", str(fr_data_dir)]
    for argv, reason in (
        (["--start", "2018-08-14", "--end", "2018-08-01"], "before --start"),
        (["--start", "banana"], "not a date"),
        (["--rate", "-5"], "--rate must be"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            replay.main([*argv, *common])
        assert exit_info.value.code == 2 and reason in capsys.readouterr().err
    assert replay.main(["--start", "2030-01-01", "--end", "2030-01-02", *common]) == 2
    assert "no transactions from 2030-01-01" in capsys.readouterr().err
    assert replay.main(["--start", "2018-08-01", "--end", "2018-08-01", "--limit", "5", *common]) == 2
    assert "Kafka at 127.0.0.1:1" in capsys.readouterr().err
