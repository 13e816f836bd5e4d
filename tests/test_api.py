"""The README's Python API example runs as written, and the API gives what the command line gives."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_api_example() -> str:
    """The python block of the README's "Python API" section."""
    section = (REPO / "README.md").read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_api_example_runs(tmp_path):
    env = dict(os.environ, MUGBENCH_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", readme_api_example()], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "VisionTransformer" in proc.stdout
    # the pivot printed one row per method with the protocols' metrics
    assert re.search(r"^mae\s+\d", proc.stdout, re.M) and re.search(r"^random\s+\d", proc.stdout, re.M)
    assert len(list((tmp_path / "results").rglob("*.json"))) == 4


def test_load_results_matches_the_records_and_the_report(tmp_path):
    import mugbench
    from mugbench.results import write_record

    from test_results import make_record

    for seed, value in enumerate((40.0, 44.0)):
        record = make_record("mae", protocol="linear", seed=seed, preset="toy", top1=value)
        record.git_commit = f"{seed}" * 40
        write_record(record, tmp_path)
    rows = mugbench.load_results(tmp_path)
    assert list(rows.columns) == mugbench.api.RESULT_COLUMNS
    assert sorted(zip(rows["seed"], rows["value"], rows["git_commit"].str[:1])) == [(0, 40.0, "0"), (1, 44.0, "1")]
    summary = mugbench.load_results(tmp_path, summary=True)
    (row,) = summary.itertuples()
    assert (row.method, row.metric, row.mean, row.n) == ("mae", "top1", pytest.approx(42.0), 2)


def test_bad_input_raises_what_the_command_reports(tmp_path):
    import mugbench
    from mugbench.config import ConfigError
    from mugbench.registry import UnknownMethodError

    with pytest.raises(UnknownMethodError, match="nosuch"):
        mugbench.run(["nosuch"], preset="smoke", results=tmp_path / "r", workdir=tmp_path / "w")
    with pytest.raises(ConfigError):
        mugbench.run(["mae"], preset="smoke", set={"train.epochs": -1}, results=tmp_path / "r")
    assert not (tmp_path / "r").exists()
