"""DDP on the CPU: two real torchrun processes over gloo run the smoke study (slow tier)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    env = dict(os.environ, MUGBENCH_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mugbench.cli", "run", "--preset", "smoke", "--set", "eval.protocols=[knn]"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(p.read_text()) for p in (tmp_path / "results").rglob("*.json")]
    assert sorted(r["method"] for r in records) == ["clip", "mae", "mug", "simclr"]  # rank 0 writes, once
    for r in records:
        # the global batch of 32 is split 16 + 16 over the ranks: same 8 steps as one process
        assert r["steps"] == 8 and r["metrics"]["top1"] >= 0
    for log in (tmp_path / "runs").rglob("metrics.jsonl"):
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        assert rows[-1]["step"] == 8 and all(row["loss"] == row["loss"] for row in rows)
    assert proc.stdout.count("| mae |") == 1  # the table is printed by rank 0 only
