"""`mugbench bench`: runs on the smoke preset and writes well-formed records (speed is never asserted)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mugbench.bench.train_step import measure, record_dataset
from mugbench.cli import main
from mugbench.config import ConfigError, TrainConfig
from mugbench.results import load_records
from mugbench.runs import build_method
from mugbench.train.loop import CompiledOrEager, build_optimizer

from conftest import make_batch


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


def test_variants_measure_each_fast_path_before_and_after(tmp_path, capsys):
    assert main(["bench", "--preset", "smoke", "--steps", "1", "--warmup", "0", "--methods", "clip",
                 "--device", "cpu", "--results", str(tmp_path),
                 "--variants", "math-attention,loop-adamw,full-context-text,grad-checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "Before/after" in out and "- loop-adamw: AdamW one parameter at a time" in out
    records = {r.method: r for r in load_records(tmp_path)}
    clip, plain = records["clip"].metrics, records["timm-vit (all tokens)"].metrics
    for name in ("math_attention", "loop_adamw", "full_context_text", "grad_checkpointing"):
        assert clip[f"time_ratio_{name}"] > 0
    assert "time_ratio_full_context_text" not in plain  # no text: the variant does not apply
    assert records["clip"].protocol_options["variants"] == ["math-attention", "loop-adamw", "full-context-text",
                                                            "grad-checkpointing"]


def test_unknown_variant_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "--preset", "smoke", "--variants", "turbo", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no variant 'turbo'" in err and "math-attention" in err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_records_of_cuda_and_compiled_steps_do_not_replace_the_cpu_eager_ones(tmp_path, capsys):
    assert record_dataset(torch.device("cpu"), compiled=False) == "synthetic"
    assert record_dataset(torch.device("cuda"), compiled=False) == "synthetic-cuda"
    assert record_dataset(torch.device("cuda"), compiled=True) == "synthetic-cuda-compiled"
    assert main(["bench", "--preset", "smoke", "--rounds", "0", "--results", str(tmp_path)]) == 2
    assert "--rounds must be at least 1" in capsys.readouterr().err


def test_compile_failure_falls_back_to_eager(capsys):
    module = torch.nn.Linear(4, 2)
    warnings = []
    step = CompiledOrEager(lambda batch: module(batch), backend="no-such-backend", warn=warnings.append)
    x = torch.randn(3, 4)
    torch.testing.assert_close(step(x), module(x))
    assert len(warnings) == 1 and "torch.compile failed" in warnings[0] and "eager" in warnings[0]
    step(x)
    assert len(warnings) == 1  # one warning, then eager for good


def test_optimizer_implementations_take_the_same_step():
    cfg = TrainConfig(blr=1e-2, batch_size=256, weight_decay=0.05)
    updated = []
    for impl in ("loop", "foreach"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
        opt = build_optimizer(model, dataclasses.replace(cfg, optimizer_impl=impl))
        for _ in range(3):
            model(torch.ones(2, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
        updated.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(updated[0], updated[1])
    with pytest.raises(ConfigError, match="optimizer_impl"):
        build_optimizer(model, dataclasses.replace(cfg, optimizer_impl="turbo"))


def test_bench_step_runs_the_methods_after_step(smoke_cfg, spec, toy_samples, tokenizer):
    """The bench's bare loop takes the trainer's step, ``after_step`` included."""
    method = build_method("clip", smoke_cfg, spec)
    calls = []
    method.after_step = lambda: calls.append(1)
    batch = make_batch(type(method), toy_samples[:4], tokenizer, smoke_cfg.encoder.img_size)
    measure("clip", method, batch, smoke_cfg, torch.device("cpu"), steps=2, warmup=1, count_flops=False)
    assert len(calls) == 3


def test_accumulation_bench_times_one_global_batch_in_one_and_in_two_micro_batches(smoke_cfg):
    from mugbench.bench.accumulation import format_table, run

    rows = run(smoke_cfg, ["clip"], device=torch.device("cpu"), accum=(1, 2), steps=2, warmup=1, rounds=1)
    assert [(r.method, r.global_batch, r.accum_steps, r.micro_batch) for r in rows] == [("clip", 32, 1, 32),
                                                                                         ("clip", 32, 2, 16)]
    assert all(r.step_ms > 0 and len(r.rounds_ms) == 1 for r in rows)
    assert rows[0].time_ratio == 1.0 and rows[1].time_ratio == rows[1].step_ms / rows[0].step_ms
    assert [r.accumulation for r in rows] == ["none (one batch)", "two passes"]  # clip couples rows
    table = format_table(rows, torch.device("cpu"), "smoke")
    assert "| clip | 32 | 1 | 32 |" in table and "| clip | 32 | 2 | 16 |" in table
    assert "time vs accum 1" in table and f"| {rows[1].time_ratio:.2f}x |" in table
    assert "one extra forward of the features per micro-batch" in table and "torch threads" in table


def test_accumulation_bench_cuts_consecutive_rows_and_trims_each_micro_batch(smoke_cfg):
    from mugbench.data.streams import split_rows
    from mugbench.bench.train_step import synthetic_batch
    from mugbench.data.tokenizer import TextTokenizer
    from mugbench.registry import get_method

    tok = TextTokenizer(smoke_cfg.text.context_length)
    whole = synthetic_batch(smoke_cfg, get_method("simclr"), tok, 8, "cpu")  # the base view and simclr's two
    text = torch.full((8, 32), tok.pad_id)
    text[:4], text[4:, :3] = 5, 6  # long captions in the first micro-batch, three tokens in the second
    whole["text"] = text
    micro = split_rows(whole, 2, tok.pad_id)
    assert [m["image"].shape[0] for m in micro] == [4, 4] and micro[1]["caption"] == whole["caption"][4:]
    torch.testing.assert_close(torch.cat([m["image"] for m in micro]), whole["image"])
    assert len(whole["image_views"]) == 3
    for i in range(3):
        torch.testing.assert_close(torch.cat([m["image_views"][i] for m in micro]), whole["image_views"][i])
    assert micro[0]["text"].shape == (4, 32) and micro[1]["text"].shape == (4, 8)  # trimmed to a multiple of 8


def test_accumulation_bench_cli_writes_the_rows_as_json(tmp_path, capsys):
    import json

    path = tmp_path / "accum.json"
    assert main(["bench", "accumulation", "--preset", "smoke", "--methods", "clip", "--accum", "1,2", "--steps", "2",
                 "--warmup", "1", "--rounds", "1", "--device", "cpu", "--json", str(path)]) == 0
    assert "| clip | 32 | 2 | 16 |" in capsys.readouterr().out
    saved = json.loads(path.read_text())
    assert saved["device"] == "cpu" and saved["threads"] >= 1
    assert [(r["accum_steps"], r["micro_batch"]) for r in saved["rows"]] == [(1, 32), (2, 16)]
    assert all(r["step_ms"] > 0 for r in saved["rows"])


def test_accumulation_bench_refuses_a_global_batch_its_counts_do_not_split(tmp_path, capsys):
    path = tmp_path / "accum.json"
    assert main(["bench", "accumulation", "--preset", "smoke", "--methods", "clip", "--accum", "1,3",
                 "--json", str(path)]) == 2
    err = capsys.readouterr().err
    assert "global batch of 32 rows does not split into 3 micro-batches" in err and "--batch-size" in err
    assert not path.exists()
    assert main(["bench", "accumulation", "--preset", "smoke", "--accum", "1,four"]) == 2
    assert "whole numbers" in capsys.readouterr().err
