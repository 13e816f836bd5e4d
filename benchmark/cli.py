"""The `mugbench` command line: run, report, methods, protocols, data, eval, export.

Heavy imports (torch, timm, open_clip) happen inside the commands, after cheap checks, so
that a wrong name or a missing data set is reported within seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_METHODS = "simclr,mae,clip,mug"  # the paper's four paradigms
# A study's default rows: the paper's four plus the baselines (mugbench.methods.baselines) that bound them,
# the untrained floor and the label-supervised ceiling (skipped, with a line, on data without labels).
DEFAULT_STUDY_METHODS = DEFAULT_METHODS + ",random,supervised"


def _add_study_args(p: argparse.ArgumentParser, preset_default: str | None = "toy",
                    preset_help: str = "default: toy") -> None:
    p.add_argument("--preset", default=preset_default, help=f"smoke | toy | paper | path to a study YAML ({preset_help})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a study setting, e.g. --set train.epochs=2 --set methods.mae.mask_ratio=0.6")
    p.add_argument("--cache-dir", type=Path, default=None, help="generated data (default: $MUGBENCH_CACHE or ~/.cache/mugbench)")
    p.add_argument("--data-root", type=Path, default=None, help="root of named shard sets (default: $MUGBENCH_DATA)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mugbench", description="Like-for-like benchmark of self-supervised vision pre-training.")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="pre-train each method, evaluate it, record results, print the table")
    run.add_argument("--methods", default=DEFAULT_STUDY_METHODS,
                     help=f"comma-separated (default: {DEFAULT_STUDY_METHODS})")
    run.add_argument("--data", default=None, help="toy | cc3m | cc12m | laion400m | shard pattern (default: the preset's)")
    run.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's seed)")
    run.add_argument("--workdir", type=Path, default=Path("runs"), help="checkpoints and logs (default: ./runs)")
    run.add_argument("--results", type=Path, default=Path("results"), help="result records (default: ./results)")
    run.add_argument("--reports", type=Path, default=Path("reports"), help="tables and plots (default: ./reports)")
    run.add_argument("--fresh", action="store_true", help="start each run over instead of resuming it: its old "
                     "folder's files are moved aside to RUN_DIR.old-TIME (never deleted) and its records rewritten")
    run.add_argument("--evals", default=None, metavar="P1,P2", help="protocols, e.g. knn,linear "
                     "(shorthand for --set eval.protocols=[...]; default: the preset's)")
    run.add_argument("--report-to", default="", metavar="TRACKER[,TRACKER]",
                     help="also write each run's training curves (loss and its parts, lr, images/s at every "
                     "logged step) and each protocol's headline metrics for an experiment tracker, into the run's "
                     "folder under --workdir: tensorboard (RUN_DIR/tensorboard/; `tensorboard --logdir WORKDIR` "
                     "shows every run; needs the tensorboard package) or wandb (offline, RUN_DIR/wandb/; needs the "
                     "wandb package)")
    # No fixed default: `_run_preset` picks paper for the web-scale sets and toy otherwise, and says so.
    _add_study_args(run, preset_default=None,
                    preset_help="default: paper with --data cc3m, cc12m or laion400m, else toy")

    rep = sub.add_parser("report", help="rebuild reports/ (tables, figures, index) from results/ alone")
    rep.add_argument("--results", type=Path, default=Path("results"))
    rep.add_argument("--reports", type=Path, default=Path("reports"))
    rep.add_argument("--study", default="", metavar="PRESET[,PRESET]", help="only these studies (preset names)")
    rep.add_argument("--data", default="", metavar="SET[,SET]", help="only these pre-training sets, e.g. cc3m")
    rep.add_argument("--protocols", default="", metavar="P1,P2", help="only these protocols, e.g. knn,linear")
    rep.add_argument("--methods", default="", metavar="M1,M2", help="only these methods")
    rep.add_argument("--by", default="method", choices=("method", "seed", "preset"),
                     help="one row per method (mean ± std over seeds; default), per seed, or per preset")
    rep.add_argument("--no-figures", action="store_true",
                     help="tables only (faster): the figures and README.md are left as they are")

    sub.add_parser("methods", help="list registered methods with their needs and capabilities")
    sub.add_parser("protocols", help="list registered evaluation protocols (what they read, options) and evaluation sets")

    data = sub.add_parser("data", help="prepare the embedded data or check a shard set")
    dsub = data.add_subparsers(dest="data_command")
    prep = dsub.add_parser("prepare", help="generate the embedded `toy` shards into the cache")
    prep.add_argument("name", choices=["toy"])
    _add_study_args(prep)
    check = dsub.add_parser("check", help="read every sample of a shard set: bad samples by kind, caption and "
                            "image-size statistics, a JSON summary")
    check.add_argument("urls", help="shard pattern, e.g. 'cc3m/{00000..00331}.tar', or a named set")
    check.add_argument("--data-root", type=Path, default=None, help="root of named shard sets (default: $MUGBENCH_DATA)")
    check.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="shards read in parallel (default: all cores)")
    check.add_argument("--json", type=Path, default=Path("data-check.json"), help="summary file (default: ./data-check.json)")
    check.add_argument("--fix-list", action="store_true", help="print the bad samples, one 'shard<TAB>key<TAB>kind' "
                       "line each, on stdout (the summary then goes to stderr)")
    check.add_argument("--images-only", action="store_true", help="captions are not required (image-only data)")
    check.add_argument("--min-image-size", type=int, default=None, help="shorter side below which an image is "
                       "tiny (default: the training default, data.min_image_size)")
    check.add_argument("--max-bad-fraction", type=float, default=None, help="exit 1 above this bad fraction "
                       "(default: the training default, data.max_bad_fraction)")

    ev = sub.add_parser("eval", help="run the evaluation harness on a run's encoder or any timm ViT; record the results")
    which = ev.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", type=Path, help="a run directory, its checkpoint.pt or encoder.safetensors, "
                       "or a folder written by `mugbench export`")
    which.add_argument("--timm-model", metavar="NAME", help="a timm ViT as timm names it: ARCH (random init "
                       "unless --weights), ARCH.TAG (timm's pretrained weights), hf-hub:REPO or local-dir:FOLDER; tags "
                       "and hub repositories are read from the local Hugging Face cache, never downloaded")
    ev.add_argument("--weights", type=Path, default=None, help="with --timm-model: a .safetensors or .pth state dict "
                    "(default: random init)")
    ev.add_argument("--model-args", default=None, metavar="JSON", help="with --timm-model: timm.create_model "
                    "arguments, e.g. '{\"img_size\": 32, \"patch_size\": 8}'")
    ev.add_argument("--evals", default=None, metavar="P1,P2", help="protocols, e.g. knn,linear (default: the study's)")
    ev.add_argument("--datasets", default=None, metavar="D1,D2", help="evaluation sets, e.g. toy-cls (default: the study's)")
    ev.add_argument("--results", type=Path, default=Path("results"), help="result records (default: ./results)")
    _add_study_args(ev, preset_default=None, preset_help="default: the run's own study, else toy")

    bench = sub.add_parser("bench", help="train-step speed, FLOPs and memory of each method beside a plain ViT step "
                           "(or: bench input-pipeline, bench accumulation)")
    bench.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default: {DEFAULT_METHODS})")
    bench.add_argument("--preset", default="toy", help="smoke | toy | paper | path to a study YAML (default: toy)")
    bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    bench.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    bench.add_argument("--steps", type=int, default=10, help="timed steps per method (default: 10)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    bench.add_argument("--rounds", type=int, default=3, help="alternations of bare loop and trainer behind the "
                       "trainer-overhead figure, whose median is kept (default: 3)")
    bench.add_argument("--batch-size", type=int, default=None, help="per-device batch (default: the preset's)")
    bench.add_argument("--results", type=Path, default=Path("results"), help="where the records go (default: ./results)")
    bench.add_argument("--variants", default="", metavar="V1,V2", help="also measure each step changed: "
                       "math-attention, loop-adamw, full-context-text (fast paths off), compiled, grad-checkpointing")
    bench.add_argument("--compile", action="store_true", help="torch.compile every measured step (falls back to eager)")
    bsub = bench.add_subparsers(dest="bench_command")
    inp = bsub.add_parser("input-pipeline", help="images/s of one loader worker decoding + augmenting JPEG shards, "
                          "against plain PIL full decode")
    inp.add_argument("--images", type=int, default=384, help="images timed per pipeline and size mix (default: 384)")
    inp.add_argument("--repeats", type=int, default=3, help="round-robin repeats; the median is reported (default: 3)")
    inp.add_argument("--image-size", type=int, default=224)
    inp.add_argument("--workers", type=int, default=0, help="loader workers (default: 0 = one worker's throughput)")
    inp.add_argument("--workdir", type=Path, default=None, help="where the generated shards go (default: the cache)")
    inp.add_argument("--json", type=Path, default=None, help="also write the figures here")
    acc = bsub.add_parser("accumulation", help="ms per optimiser step and peak step memory of the shared trainer at "
                          "one global batch, in one piece and in accum_steps micro-batches (exact accumulation: two "
                          "passes for batch-coupled methods, plain for per-sample ones)")
    acc.add_argument("--methods", default="clip,simclr", help="comma-separated (default: clip,simclr)")
    acc.add_argument("--accum", default="1,4", metavar="K1,K2", help="accumulation counts, each dividing the global "
                     "batch (default: 1,4)")
    acc.add_argument("--preset", default="toy", help="smoke | toy | paper | path to a study YAML (default: toy)")
    acc.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    acc.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    acc.add_argument("--batch-size", type=int, default=None, metavar="GLOBAL",
                     help="global batch of every configuration (default: the preset's train.batch_size)")
    acc.add_argument("--steps", type=int, default=6, help="timed optimiser steps per configuration (default: 6)")
    acc.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    acc.add_argument("--rounds", type=int, default=2, help="alternations of the configurations; the median of the "
                     "rounds is reported (default: 2)")
    acc.add_argument("--json", type=Path, default=None, help="also write the rows here")

    exp = sub.add_parser("export", help="write a run's encoder as a timm Hugging Face folder (config.json + model.safetensors) "
                                         "that timm and transformers load; clip, slip and flip runs also get an open_clip model")
    exp.add_argument("source", type=Path, help="a run directory, its checkpoint.pt or encoder.safetensors")
    exp.add_argument("out_dir", type=Path, help="folder to write; load it with timm.create_model('local-dir:OUT_DIR', pretrained=True)")
    exp.add_argument("--force", action="store_true",
                     help="write into OUT_DIR even if it is not empty (a run folder is always refused)")
    exp.add_argument("--results", type=Path, default=Path("results"),
                     help="results folder whose records of this run fill the model card's results table (default: results)")
    return parser


def _list_override(key: str, value: str | None) -> list[str]:
    """``--evals knn,linear`` -> ``["eval.protocols=[knn, linear]"]`` (nothing when not given)."""
    if value is None:
        return []
    return [f"{key}=[{', '.join(v.strip() for v in value.split(',') if v.strip())}]"]


def _run_preset(preset: str | None, data: str | None) -> tuple[str, str]:
    """The preset `mugbench run` uses and why, for its first log line: ``--preset`` when given, else
    ``paper`` for a named web-scale set (``--data cc3m|cc12m|laion400m``, `catalog.PRETRAIN_SETS`) and
    ``toy`` for the embedded world, no ``--data`` or a shard pattern."""
    from .data.catalog import PRETRAIN_SETS

    if preset is not None:
        return preset, "given with --preset"
    if data in PRETRAIN_SETS:
        # The named sets are the paper's data: the toy model (96 wide, 32 px) on them measures nothing
        # the study is about, while a download that large is only fetched to train at the paper's scale.
        return "paper", f"the default for the web-scale set {data}; --preset toy for a quick look"
    if data and data != "toy":
        # A pattern's size is unknown here (a 64-sample test set or a full download): the cheap preset.
        return "toy", "the default for a shard pattern; --preset paper for the paper's ViT-B/16 setting"
    return "toy", "the default for the embedded world; --preset paper with --data cc3m for the paper's setting"


def _cmd_run(args) -> int:
    # Redirected, stdout is block-buffered: its phase lines would reach a log long after the progress lines
    # (stderr, line-buffered) that follow them.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    from .config import load_config
    from .data.catalog import default_cache_dir, default_data_root, resolve_pretrain_urls

    preset, why = _run_preset(args.preset, args.data)
    if os.environ.get("RANK", "0") in ("", "0"):  # one voice per torchrun job; torch is not imported yet
        print(f"preset: {preset} ({why})")
    overrides = list(args.overrides) + ([f"data.name={args.data}"] if args.data else [])
    overrides += _list_override("eval.protocols", args.evals)
    cfg = load_config(preset, overrides)
    seeds = _parse_seeds(args.seeds, cfg.seed)
    data_root = args.data_root or default_data_root()
    if cfg.data.name != "toy":  # fail fast, before the heavy imports
        resolve_pretrain_urls(cfg.data.name, data_root)
    from .registry import get_method, parse_method_list

    methods = parse_method_list(args.methods)
    for name in methods:  # option errors before any training starts
        get_method(name).parse_options(cfg.methods.get(name))
    from .preflight import check_run, remove_if_empty

    cache_dir = args.cache_dir or default_cache_dir()
    report_to = tuple(name.strip() for name in args.report_to.split(",") if name.strip())
    # The last check before work: nothing is created on disk until every setting above passed.
    created = check_run(cfg, data_root=data_root, needs_text=any(get_method(n).needs_text for n in methods),
                        workdir=args.workdir, results=args.results, reports=args.reports, cache=cache_dir,
                        methods=methods, report_to=report_to)
    from .report import build_report, write_report
    from .study import run_study
    from .study_plan import StudyPlan

    plan = StudyPlan(cfg, methods, seeds)  # one plan over every seed: places and time left for the whole command
    try:
        for seed in seeds:
            cfg.seed = seed
            run_study(cfg, methods, workdir=args.workdir, results_dir=args.results,
                      cache_dir=cache_dir, data_root=data_root, overrides=overrides, fresh=args.fresh,
                      report_to=report_to, plan=plan)
    except BaseException:
        # A run that stops before writing a record leaves no new folder but its run folder (and the cache it
        # filled): the results and reports folders it made for records that never came go again.
        remove_if_empty(created)
        raise
    if _is_main_process():
        report = build_report(args.results)
        write_report(args.results, args.reports, report=report)
        # The headline table of this study; the full report (every metric, margins, claims) is on disk.
        table = report.headline([(cfg.data.name, cfg.preset)]) or report.headline()  # a shard pattern's study name differs
        print("\n" + (table or "no results recorded\n")
              + f"\nfull report: {args.reports / 'README.md'} (every table: {args.reports / 'summary.md'})")
    return 0


def _parse_seeds(text: str | None, default: int) -> list[int]:
    """``--seeds 0,1,2`` -> ``[0, 1, 2]`` (``[default]`` when not given); a `ConfigError` names a seed
    that is not a whole number in range."""
    from .config import SEED, ConfigError, check_range

    if not text:
        return [default]
    seeds = []
    for part in (p.strip() for p in text.split(",")):
        try:
            seed = int(part)
        except ValueError:
            raise ConfigError(f"--seeds {text}: {part!r} is not a seed: each seed must be {SEED}, and seeds are "
                              f"separated by commas, e.g. --seeds 0,1,2.") from None
        seeds.append(check_range(f"--seeds {text}: seed", seed, SEED))
    return seeds


def _where_this_rank_is() -> str:
    """In a job of several processes: ``rank 1 of 2, in [mae 2/6 · finetune 3/4]`` (the phase when one was
    running); '' in a single process, whose errors need no place."""
    from .progress import phase
    from .train.distributed import rank_and_world

    rank, world = rank_and_world()
    if world == 1:
        return ""
    return f"rank {rank} of {world}" + (f", in [{phase()}]" if phase() else "")


def _is_main_process() -> bool:
    from .train.distributed import rank_and_world

    return rank_and_world()[0] == 0


def _cmd_report(args) -> int:
    from .report import Selection, write_report

    def names(text: str) -> tuple[str, ...]:
        return tuple(x.strip() for x in text.split(",") if x.strip())

    selection = Selection(studies=names(args.study), data=names(args.data), protocols=names(args.protocols),
                          methods=names(args.methods))
    print(write_report(args.results, args.reports, selection=selection, by=args.by, figures=not args.no_figures))
    print(f"\nwritten under {args.reports}: summary.md, summary.csv, summary.tex"
          + ("" if args.no_figures else ", figures/, README.md (start here)"))
    return 0


def _cmd_methods(args) -> int:
    from .config import AugmentConfig
    from .data.transforms import method_view_specs
    from .registry import registered_methods

    for name, cls in registered_methods().items():
        extra = len(method_view_specs(cls, AugmentConfig())) - 1
        views = ("study base view" if cls.base_view is None else f"own base view ({cls.base_view_reason})") \
            + (f" + {extra} extra" if extra else "")
        text = "image+text" if cls.needs_text else "image only"
        caps = ", ".join(cls.capabilities()) or "-"
        opts = ", ".join(f"{k}={v}" for k, v in cls.option_defaults().items()) or "-"
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:8s} {cls.paradigm or 'paradigm not declared'}; views: {views}; needs {text:10s}  "
              f"capabilities: {caps}\n         {doc}\n         options: {opts}")
    return 0


def _cmd_protocols(args) -> int:
    from .registry import registered_eval_sets, registered_protocols

    print("protocols (in report order; `--set eval.<name>.<option>=...` sets an option):")
    for name, cls in sorted(registered_protocols().items(), key=lambda kv: (kv[1].order, kv[0])):
        needs = f", needs {' or '.join(cls.needs)}" if cls.needs else ""
        role = "transfer (ranked)" if cls.transfer else "capability"
        opts = ", ".join(f"{k}={v}" for k, v in cls.option_defaults().items()) or "-"
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())  # the summary, unwrapped
        print(f"{name:14s} \"{cls.display_label()}\": reads {cls.reads}, {cls.set_kind} set{needs}; "
              f"headline {', '.join(cls.headline) or 'every metric'}; {role}\n{'':15s}{doc}\n{'':15s}options: {opts}")
    print("\nevaluation sets (folders are under the data root: --data-root or MUGBENCH_DATA):")
    for name, src in registered_eval_sets().items():
        print(f"{name:14s} {src.kind:14s} {'generated' if src.folder is None else src.folder}")
    return 0


def _cmd_data(args) -> int:
    if args.data_command == "prepare":
        from .config import load_config
        from .data.catalog import default_cache_dir
        from .data.toy import prepare_toy_world

        cfg = load_config(args.preset, args.overrides)
        root, manifest = prepare_toy_world(cfg.data, args.cache_dir or default_cache_dir(), log=print)
        counts = ", ".join(f"{k}={v['count']}" for k, v in manifest["splits"].items())
        print(f"toy world ready in {root}: {counts}")
        return 0
    if args.data_command == "check":
        return _cmd_data_check(args)
    print("usage: mugbench data {prepare,check} ...", file=sys.stderr)
    return 2


def _cmd_data_check(args) -> int:
    from .config import DataConfig
    from .data.catalog import default_data_root, resolve_pretrain_urls
    from .files import atomic_write_text

    defaults = DataConfig()
    min_size = defaults.min_image_size if args.min_image_size is None else args.min_image_size
    limit = defaults.max_bad_fraction if args.max_bad_fraction is None else args.max_bad_fraction
    # The catalog tells named sets from shard patterns, and says clearly when shards are missing.
    urls = resolve_pretrain_urls(args.urls, args.data_root or default_data_root())
    from .data.check import check_shard_set, format_report
    from .data.pipeline import DecodeOptions

    report = check_shard_set(urls, workers=args.workers, need_caption=not args.images_only,
                             decode=DecodeOptions(min_size=min_size))
    report.update(data=args.urls, min_image_size=min_size, captions_required=not args.images_only)
    atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")
    out = sys.stderr if args.fix_list else sys.stdout
    print(format_report(report), file=out)
    print(f"summary written to {args.json}", file=out)
    if args.fix_list:
        for shard, key, kind in report["bad_keys"]:
            print(f"{shard}\t{key}\t{kind}")
    if report["bad_fraction"] > limit:
        print(f"mugbench: bad fraction {report['bad_fraction']:.4f} is above {limit}: training on this set would "
              f"stop (data.max_bad_fraction)", file=sys.stderr)
        return 1
    return 0


def _cmd_eval(args) -> int:
    from .sources import EncoderSourceError, load_source, load_timm_source

    if args.timm_model is None and (args.weights or args.model_args):
        raise EncoderSourceError("--weights and --model-args describe a --timm-model; a --checkpoint knows its own.")
    overrides = list(args.overrides) + _list_override("eval.protocols", args.evals)
    overrides += _list_override("eval.datasets", args.datasets)
    if args.checkpoint is not None:
        source = load_source(args.checkpoint)
    else:
        source = load_timm_source(args.timm_model, args.weights, args.model_args)
    from .data.catalog import default_cache_dir, default_data_root
    from .encoder_eval import eval_config, evaluate_source
    from .preflight import check_folders

    cfg = eval_config(source, args.preset, overrides)
    cache_dir = args.cache_dir or default_cache_dir()
    check_folders({"--results": args.results, "--cache-dir": cache_dir})  # before any evaluation runs
    records = evaluate_source(source, cfg, results_dir=args.results, cache_dir=cache_dir,
                              data_root=args.data_root or default_data_root(), overrides=overrides)
    if _is_main_process():
        print(f"written: {len(records)} record(s) under {args.results} (`mugbench report` puts them in the table)")
    return 0


def _cmd_export(args) -> int:
    from .sources import load_source

    from .export import check_destination, export_timm

    check_destination(args.out_dir, args.force)  # before loading the source: a refusal costs nothing
    source = load_source(args.source)
    out = export_timm(source, args.out_dir, force=args.force, results=args.results)
    files = ", ".join(sorted(p.name for p in out.iterdir() if p.is_file()))
    print(f"exported the {source.method or source.timm_name} encoder ({source.timm_name}, {source.img_size} px) "
          f"to {out}: {files}\nload it with: timm.create_model('local-dir:{out}', pretrained=True) or "
          f"transformers.AutoModel.from_pretrained('{out}')")
    if (out / "open_clip_config.json").is_file():
        print(f"and both towers with: open_clip.create_model_and_transforms('local-dir:{out}')")
    return 0


def _cmd_bench(args) -> int:
    if args.bench_command is None:
        return _cmd_bench_train_step(args)
    if args.bench_command == "accumulation":
        return _cmd_bench_accumulation(args)
    from .bench.input_pipeline import format_table, run
    from .data.catalog import default_cache_dir

    workdir = args.workdir or default_cache_dir() / "bench" / "input-pipeline"
    workdir.mkdir(parents=True, exist_ok=True)
    results = run(workdir, images=args.images, image_size=args.image_size, workers=args.workers,
                  repeats=args.repeats)
    print(format_table(results, args.image_size, args.workers))
    if args.json:
        from .files import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=1) + "\n")
    return 0


def _cmd_bench_accumulation(args) -> int:
    from .config import ConfigError, load_config

    cfg = load_config(args.preset, args.overrides)
    try:
        accum = [int(k) for k in args.accum.split(",") if k.strip()]
    except ValueError:
        raise ConfigError(f"mugbench bench accumulation --accum {args.accum}: give whole numbers separated by "
                          f"commas, e.g. --accum 1,4.") from None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    import torch

    from .bench.accumulation import format_table, run

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    rows = run(cfg, methods, device=device, accum=accum, steps=args.steps, warmup=args.warmup, rounds=args.rounds,
               global_batch=args.batch_size)
    print(format_table(rows, device, cfg.preset))
    if args.json:
        import dataclasses

        from .files import atomic_write_text

        machine = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "threads": torch.get_num_threads(), "preset": cfg.preset, "overrides": list(args.overrides)}
        atomic_write_text(args.json, json.dumps({**machine, "rows": [dataclasses.asdict(r) for r in rows]},
                                                indent=1) + "\n")
    return 0


def _cmd_bench_train_step(args) -> int:
    from .config import ConfigError, load_config
    from .registry import get_method, registered_methods

    cfg = load_config(args.preset, args.overrides + (["train.compile=true"] if args.compile else []))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in methods:  # an unknown or untrained method fails before anything is measured
        if not get_method(name).pretrains:
            raise ConfigError(f"mugbench bench times pre-training steps, and {name!r} has none (it is evaluated "
                              f"as initialised): leave it out of --methods.")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    from .bench.train_step import VARIANTS

    for v in variants:
        if v not in VARIANTS:
            raise ConfigError(f"mugbench bench has no variant {v!r}. Variants: "
                              + "; ".join(f"{k} ({d.doc})" for k, d in VARIANTS.items()) + ".")
    if args.rounds < 1:
        raise ConfigError(f"mugbench bench --rounds must be at least 1, not {args.rounds}.")
    import dataclasses

    import torch

    from .bench.train_step import format_table, record_dataset, run
    from .results import ResultRecord, write_record

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    rows = run(cfg, methods, device=device, steps=args.steps, warmup=args.warmup, batch_size=args.batch_size,
               variants=variants, rounds=args.rounds)
    print(format_table(rows, device, cfg.preset))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for row in rows:
        write_record(ResultRecord(
            method=row.name, protocol="train-step", dataset=record_dataset(device, cfg.train.compile),
            pretrain_data="none", preset=cfg.preset,
            seed=0, metrics=row.metrics(), encoder=dataclasses.asdict(cfg.encoder), overrides=list(args.overrides),
            paradigm=getattr(registered_methods().get(row.name), "paradigm", ""),
            protocol_options={"device": device_name, "batch": row.batch, "steps": args.steps, "warmup": args.warmup,
                              "rounds": args.rounds,
                              "precision": cfg.train.precision, "threads": torch.get_num_threads(),
                              "compile": cfg.train.compile, "variants": list(row.variant_ms)}), args.results)
    print(f"written: {len(rows)} record(s) under {args.results}")
    return 0


COMMANDS = {"run": _cmd_run, "report": _cmd_report, "methods": _cmd_methods, "protocols": _cmd_protocols,
            "data": _cmd_data, "eval": _cmd_eval, "export": _cmd_export, "bench": _cmd_bench}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mugbench` console script; with no command it runs the default study."""
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args = parser.parse_args(argv or ["run"])
    if args.command is None:
        args = parser.parse_args(["run", *argv])
    from .errors import user_errors

    try:
        return COMMANDS[args.command](args)
    except Exception as exc:
        where = _where_this_rank_is()
        if not isinstance(exc, user_errors()):
            if where:  # torchrun prints the traceback; say which rank failed, and where in the study
                print(f"mugbench: {where} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            raise
        print(f"mugbench: error{f' ({where})' if where else ''}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mugbench: interrupted; rerun the same command to resume from the last checkpoint.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
