"""`mugbench bench`: runs on the smoke preset and writes well-formed records (speed is never asserted)."""
from __future__ import annotations

from mugbench.cli import main
from mugbench.results import load_records


def test_bench_writes_a_record_per_method_and_the_plain_vit(tmp_path, capsys):
    assert main(["bench", "--preset", "smoke", "--steps", "1", "--warmup", "0", "--methods", "mae,clip",
                 "--device", "cpu", "--results", str(tmp_path)]) == 0
    assert "| mae | 32 |" in capsys.readouterr().out
    records = {r.method: r for r in load_records(tmp_path)}
    assert set(records) == {"timm-vit (all tokens)", "mae", "clip"}
    for r in records.values():
        assert r.protocol == "train-step" and r.dataset == "synthetic" and r.protocol_options["batch"] == 32
        assert r.metrics["step_ms"] > 0 and r.metrics["gflops_per_image"] > 0 and r.metrics["peak_mem_mb"] > 0
    assert records["timm-vit (all tokens)"].metrics["time_ratio_to_plain_vit"] == 1.0
    assert "trainer_overhead" in records["mae"].metrics and "trainer_overhead" not in records["timm-vit (all tokens)"].metrics
    # MAE encodes a quarter of the tokens: fewer FLOPs than the encoder on all of them, decoder included.
    assert records["mae"].metrics["gflops_per_image"] < records["timm-vit (all tokens)"].metrics["gflops_per_image"]
