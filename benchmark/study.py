"""One study end to end: data -> per method (build, pre-train, evaluate) -> result records.

This is the only place that wires the pieces together; methods never import it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, StudyConfig, TrainConfig
from .data import catalog
from .data.caption_sets import KARPATHY_FILES, load_karpathy_split
from .data.decode import draft_size
from .data.pipeline import DecodeOptions, load_split_tensors, make_loader
from .data.tokenizer import TextTokenizer, corpus_vocab
from .data.toy import prepare_toy, toy_cache_dir
from .data.transforms import augmentation_record, build_eval_transform, build_view_transform, method_view_specs
from .eval import CAPABILITY_PROTOCOLS, ENCODER_PROTOCOLS, FEATURE_PROTOCOLS, PROTOCOLS
from .eval.features import extract_features
from .fingerprint import fingerprint, like_for_like
from .method import Method, TextSpec
from .models.vit import build_encoder
from .registry import get_method
from .results import ResultRecord, atomic_write_text, record_location, record_path, write_record
from .sources import write_run_info
from .train.checkpoint import export_encoder, load_newest_checkpoint
from .train.distributed import DistInfo, init_distributed
from .train.loop import train
from .train.run_lock import run_lock

@dataclass(frozen=True)
class ToyEvalSet:
    """An evaluation set of the embedded world: its splits and what kind of set it is
    (``classification``: labelled images; ``captions``: images with reference captions;
    ``segmentation``: images with per-pixel masks)."""

    train: str | None
    val: str
    kind: str


TOY_EVAL_SETS = {
    "toy-cls": ToyEvalSet("cls-train", "cls-val", "classification"),
    "toy-caps": ToyEvalSet(None, "caps-val", "captions"),
    "toy-seg": ToyEvalSet("seg-train", "seg-val", "segmentation"),
}
# Real evaluation sets found under the data root (`catalog.EVAL_SETS`), by kind.
REAL_EVAL_SETS = {"imagenet": "classification", "ade20k": "segmentation", "coco-caps": "captions",
                  "flickr30k": "captions"}


@dataclass
class PretrainData:
    """Resolved pre-training shards."""

    name: str
    urls: list[str]
    samples: int
    vocab_cache: Path


def prepare_toy_world(cfg: StudyConfig, cache_dir: Path) -> tuple[Path, dict]:
    """Generate (or find in the cache) the embedded world's shards for this study."""
    d = cfg.data
    root = toy_cache_dir(cache_dir, d.toy_sizes, d.toy_seed, d.toy_native_size, d.toy_shard_size)
    return root, prepare_toy(root, d.toy_sizes, seed=d.toy_seed, native_size=d.toy_native_size,
                             shard_size=d.toy_shard_size)


def resolve_data(cfg: StudyConfig, data_root: Path | None, cache_dir: Path, log=print) -> PretrainData:
    """Find the pre-training shards; ``toy`` is generated on demand, others must exist.

    The epoch length of a shard set is ``data.samples_per_epoch`` when set, else counted
    (`shard_count.count_samples`: img2dataset's stats files, or one cached pass over the tar
    headers); ``log`` says which (`run_study` passes its own, silent on ranks other than 0).
    """
    if cfg.data.name == "toy":
        root, manifest = prepare_toy_world(cfg, cache_dir)
        split = manifest["splits"]["pretrain"]
        return PretrainData("toy", [str(root / s) for s in split["shards"]], split["count"], root / "vocab.json")
    urls = catalog.resolve_pretrain_urls(cfg.data.name, data_root)
    samples, source = cfg.data.samples_per_epoch, "data.samples_per_epoch"
    if not samples and not all(catalog._is_local(u) for u in urls):
        raise catalog.DataNotFoundError(
            f"Pre-training data {cfg.data.name!r} is read from remote shards, whose samples cannot be counted "
            f"before training, so the epoch length is unknown. Set it with --set data.samples_per_epoch=N "
            f"(img2dataset's NNNNN_stats.json files hold each shard's count of successful downloads).")
    if not samples:
        from .data.shard_count import count_samples  # imported here: only resolve_data counts shards

        samples, source = count_samples(urls, cache_dir, log=log)
    log(f"samples per epoch: {samples:,} from {source}")
    key = hashlib.sha1("\n".join(urls).encode()).hexdigest()[:12]
    return PretrainData(cfg.data.name, urls, samples, cache_dir / "vocab" / f"{key}.json")


def decode_options(cfg: StudyConfig, min_crop_scales: list[float]) -> DecodeOptions:
    """How the pre-training pipeline decodes images for views with these smallest crop scales."""
    d = cfg.data
    draft = draft_size(cfg.encoder.img_size, min_crop_scales) if d.decode_draft else None
    return DecodeOptions(min_size=d.min_image_size, draft_to=draft, repair_modes=d.repair_modes)


def check_sample_stream(cfg: StudyConfig, methods: list[str]) -> None:
    """Refuse a study whose one sample stream cannot serve every method: ``data.require_caption=false``
    keeps caption-less samples, which a method that reads captions cannot train on."""
    if cfg.data.require_caption:
        return
    text = [name for name in methods if get_method(name).needs_text]
    if text:
        raise ConfigError(
            f"data.require_caption=false keeps samples without a caption, but {', '.join(text)} "
            f"{'reads' if len(text) == 1 else 'read'} captions. Every method of a study trains on the same "
            f"samples, so either keep data.require_caption=true (every method then skips caption-less "
            f"samples) or run the image-only methods in a study of their own.")


def pretrain_batches(cfg: StudyConfig, data: PretrainData, method_cls: type, tokenizer: TextTokenizer, *,
                     per_rank: int, steps_per_epoch: int, pin_memory: bool = False):
    """``batches(epoch) -> DataLoader`` of one method's pre-training, as `run_study` trains it.

    The sample filter is the study's (``data.require_caption``, ``data.min_image_size``, the decoder's
    checks), the same for every method, so every method sees the same samples in the same order; only
    the tokenised text (for methods that read captions) and the declared extra views differ. View 0
    is the study's base view (`method_view_specs`), drawn first from each sample's seeded RNG, so it
    is the same crop for every method.
    """
    d = cfg.data
    specs = method_view_specs(method_cls, d.augment)
    transforms = [build_view_transform(v, cfg.encoder.img_size) for v in specs]
    # Decoded at the size the study's base view needs, the same for every method: the decoded image
    # is what every view is cropped from, so a per-method size would give methods different pixels.
    decode = decode_options(cfg, [d.augment.scale[0]])
    text = tokenizer if method_cls.needs_text else None

    def batches(epoch: int):
        return make_loader(data.urls, batch_size=per_rank, image_transforms=transforms, tokenizer=text,
                           need_caption=d.require_caption, shuffle=True, seed=cfg.seed, epoch=epoch,
                           num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer, decode=decode,
                           resampled=d.resampled, batches_per_epoch=steps_per_epoch * cfg.train.accum_steps,
                           pin_memory=pin_memory, prefetch_factor=d.prefetch_factor, tally_tail=True)

    return batches


def build_tokenizer(cfg: StudyConfig, data: PretrainData) -> TextTokenizer:
    """The study's tokenizer: full BPE, or the BPE ids of the training captions (cached)."""
    if cfg.text.vocab == "full":
        return TextTokenizer(cfg.text.context_length)
    if cfg.text.vocab != "corpus":
        raise ValueError(f"text.vocab must be 'full' or 'corpus', not {cfg.text.vocab!r}")
    data.vocab_cache.parent.mkdir(parents=True, exist_ok=True)
    vocab = corpus_vocab(_iter_captions(data.urls), cache=data.vocab_cache)  # lazy: unread on a cache hit
    return TextTokenizer(cfg.text.context_length, vocab)


def _iter_captions(urls: list[str]):
    """Every caption of every shard, whatever this process's rank: the vocabulary must be the
    same on all ranks. Read with the training pipeline's own member grouping."""
    import webdataset as wds

    from .data.pipeline import SkipCounter, TarSamples

    samples = wds.DataPipeline(wds.SimpleShardList(urls), TarSamples(SkipCounter().tar_handler, only=("txt",)))
    for sample in samples:
        if "txt" in sample:
            yield sample["txt"].decode("utf-8", "replace")


def text_spec(cfg: StudyConfig, tok: TextTokenizer) -> TextSpec:
    """What methods are told about text."""
    t = cfg.text
    return TextSpec(vocab_size=tok.vocab_size, context_length=t.context_length, sot_id=tok.sot_id,
                    eot_id=tok.eot_id, pad_id=tok.pad_id, width=t.width, heads=t.heads, layers=t.layers,
                    embed_dim=t.embed_dim)


def build_method(name: str, cfg: StudyConfig, spec: TextSpec) -> Method:
    """The method around a freshly built shared encoder; the encoder init depends only on the seed."""
    encoder = build_encoder(cfg.encoder, seed=cfg.seed)
    torch.manual_seed(cfg.seed + 1)  # heads: same per seed, independent of the encoder's draws
    return get_method(name).build(encoder, spec, cfg.methods.get(name))


def run_dir_for(workdir: Path, cfg: StudyConfig, name: str) -> Path:
    """Run directory keyed by everything that changes training, so a rerun resumes the same run."""
    key = {k: v for k, v in cfg.to_dict().items() if k not in ("eval", "preset")}
    key["train"] = {k: v for k, v in key["train"].items() if k not in TrainConfig.PERFORMANCE_ONLY}
    key["method"] = name
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return workdir / _safe(cfg.data.name) / cfg.preset / f"{name}-seed{cfg.seed}-{digest}"


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]


def check_evaluation(cfg: StudyConfig) -> None:
    """Reject unknown protocols and evaluation sets before any training starts."""
    for kind, names, known in (("protocol", cfg.eval.protocols, PROTOCOLS),
                               ("evaluation dataset", cfg.eval.datasets, {**TOY_EVAL_SETS, **REAL_EVAL_SETS})):
        for name in names:
            if name not in known:
                raise ConfigError(f"Unknown {kind} {name!r} in eval settings. Available: {', '.join(known)}.")


class EvalSets:
    """Evaluation splits as tensors at the study's resolution, loaded once per process."""

    def __init__(self, cfg: StudyConfig, cache_dir: Path, data_root: Path | None = None):
        self.cfg, self.cache_dir, self.data_root, self._loaded = cfg, cache_dir, data_root, {}

    def get(self, dataset: str) -> dict:
        """A named evaluation set, loaded on first use.

        Classification and caption sets: ``{"train": {...}, "val": {...}}`` tensors from
        `load_split_tensors` (no ``train`` for caption sets), ``train_urls`` / ``train_count`` (the
        labelled shards, for protocols that augment), ``num_classes``, ``classes``, ``name``.
        ``imagenet`` (ImageFolder) gives lazy `FolderImages` for ``image`` and ``train_batches``
        for protocols that augment. Segmentation sets: the mmseg folder layout of
        `segmentation_data`. ``imagenet``, ``ade20k``, ``coco-caps`` and ``flickr30k`` are found
        under the data root (Karpathy's test split for the caption sets).
        """
        if dataset == "ade20k" and dataset not in self._loaded:
            self._loaded[dataset] = {"name": dataset, "root": catalog.resolve_eval_root(dataset, self.data_root),
                                     "classes": [], "reduce_zero_label": True, "ignore_index": 255,
                                     "dataset_type": "ade20k"}
        if dataset == "imagenet" and dataset not in self._loaded:
            self._loaded[dataset] = self._image_folder(dataset)
        if dataset in KARPATHY_FILES and dataset not in self._loaded:
            root = catalog.resolve_eval_root(dataset, self.data_root)
            val = load_karpathy_split(root, KARPATHY_FILES[dataset], build_eval_transform(self.cfg.encoder.img_size))
            self._loaded[dataset] = {"val": val, "name": dataset, "classes": [], "num_classes": 0}
        if dataset not in self._loaded:
            root, manifest = prepare_toy_world(self.cfg, self.cache_dir)
            spec = TOY_EVAL_SETS[dataset]
            if spec.kind == "segmentation":
                self._loaded[dataset] = segmentation_data(dataset, root, manifest, self.cache_dir)
                return self._loaded[dataset]
            transform = build_eval_transform(self.cfg.encoder.img_size)
            splits = {}
            for role, split in (("train", spec.train), ("val", spec.val)):
                if split is None:
                    continue
                urls = [str(root / s) for s in manifest["splits"][split]["shards"]]
                splits[role] = load_split_tensors(urls, transform)
                splits[f"{role}_urls"], splits[f"{role}_count"] = urls, manifest["splits"][split]["count"]
            splits["num_classes"] = len(manifest["classes"])
            splits["classes"], splits["name"] = list(manifest["classes"]), dataset
            self._loaded[dataset] = splits
        return self._loaded[dataset]


    def _image_folder(self, dataset: str) -> dict:
        """An ImageFolder set (``train/`` and ``val/`` class folders), read lazily."""
        from .data.image_folder import FolderTrainBatches, load_folder_split

        root, size = catalog.resolve_eval_root(dataset, self.data_root), self.cfg.encoder.img_size
        threads = max(2, self.cfg.data.num_workers)
        splits = {role: load_folder_split(root / role, build_eval_transform(size), size, threads)
                  for role in ("train", "val")}
        if splits["train"]["classes"] != splits["val"]["classes"]:
            raise catalog.DataNotFoundError(
                f"Evaluation set '{dataset}' at {root}: train/ and val/ hold different class folders "
                f"({len(splits['train']['classes'])} and {len(splits['val']['classes'])}); both need the same ones.")
        train_samples = splits["train"]["image"].samples
        return {**splits, "name": dataset, "classes": splits["train"]["classes"],
                "num_classes": len(splits["train"]["classes"]), "train_count": len(train_samples),
                "train_batches": FolderTrainBatches(train_samples, self.cfg.data.num_workers)}


def segmentation_data(dataset: str, toy_root: Path, manifest: dict, cache_dir: Path) -> dict:
    """The toy world's segmentation splits written once in mmseg's folder layout."""
    from .data.toy_seg import prepare_toy_seg

    root = prepare_toy_seg(toy_root, manifest, cache_dir / "seg" / toy_root.name)
    return {"name": dataset, "root": root, "classes": ["background", *manifest["classes"]],
            "reduce_zero_label": False, "ignore_index": 255, "dataset_type": "toy"}


def _emit(out: list, result: tuple, on_result) -> None:
    out.append(result)
    if on_result is not None:
        on_result(result)


def evaluate(encoder: torch.nn.Module, cfg: StudyConfig, eval_sets: EvalSets, device,
             workdir: Path | None = None, *, done: frozenset = frozenset(),
             on_result=None) -> list[tuple[str, str, dict, dict, float]]:
    """Run every configured feature and encoder protocol on every set of the matching kind.

    Feature protocols share one pass of frozen features per set; encoder protocols train copies
    of ``encoder`` and keep their checkpoints and logs under ``workdir`` (a temporary folder when
    None). Returns ``(protocol, dataset, metrics, protocol_options, seconds)`` tuples, each also
    handed to ``on_result`` as soon as it exists; ``(protocol, dataset)`` pairs in ``done`` are skipped.
    """
    out = []
    for dataset in cfg.eval.datasets:
        protocols = [p for p in cfg.eval.protocols if p in FEATURE_PROTOCOLS and (p, dataset) not in done]
        if not protocols or _kind(dataset) != "classification":
            continue
        data = eval_sets.get(dataset)
        t0 = time.perf_counter()
        feats = {role: extract_features(encoder, data[role]["image"], pool=cfg.eval.pool,
                                        batch_size=cfg.eval.batch_size, device=device) for role in ("train", "val")}
        feat_s = time.perf_counter() - t0
        for protocol in protocols:
            t1 = time.perf_counter()
            metrics, options = FEATURE_PROTOCOLS[protocol](feats, data, cfg.eval, cfg.seed)
            _emit(out, (protocol, dataset, metrics, dict(options, pool=cfg.eval.pool),
                        time.perf_counter() - t1 + feat_s), on_result)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mugbench-eval-")))
        for name in cfg.eval.protocols:
            protocol = ENCODER_PROTOCOLS.get(name)
            for dataset in cfg.eval.datasets if protocol else ():
                if _kind(dataset) != protocol.kind or (name, dataset) in done:
                    continue
                t0 = time.perf_counter()
                metrics, options = protocol.fn(encoder, eval_sets.get(dataset), cfg.eval, cfg.seed, device=device,
                                               workdir=Path(workdir) / f"{name}-{dataset}")
                _emit(out, (name, dataset, metrics, options, time.perf_counter() - t0), on_result)
    return out


def evaluate_capabilities(method: Method, cfg: StudyConfig, eval_sets: EvalSets, tokenizer: TextTokenizer,
                          device, artifact_stem, *, done: frozenset = frozenset(),
                          on_result=None) -> list[tuple[str, str, dict, dict, float, list]]:
    """Run every configured capability protocol the method supports on every image-caption set.

    ``artifact_stem(protocol, dataset)`` gives the path stem for a protocol's figures. Returns
    ``(protocol, dataset, metrics, protocol_options, seconds, examples)`` tuples; ``done`` and
    ``on_result`` as in `evaluate`.
    """
    out = []
    for name in cfg.eval.protocols:
        protocol = CAPABILITY_PROTOCOLS.get(name)
        if protocol is None or not protocol.applies_to(method):
            continue
        for dataset in cfg.eval.datasets:
            if _kind(dataset) != protocol.kind or (name, dataset) in done:
                continue
            t0 = time.perf_counter()
            metrics, options, examples = protocol.fn(
                method, eval_sets.get(dataset), cfg.eval, cfg.seed, tokenizer=tokenizer, device=device,
                artifact=artifact_stem(name, dataset))
            _emit(out, (name, dataset, metrics, options, time.perf_counter() - t0, examples), on_result)
    return out


class EvalProgress:
    """Which evaluations of a run already have their record, so a rerun after a kill goes on from
    the protocol it reached instead of starting the evaluation over.

    Kept in ``run_dir/eval/progress.json`` and tied to the evaluation settings: a rerun with other
    ``eval.*`` settings or overrides evaluates everything again. An evaluation counts as done only
    where its record lies in ``results_dir``, the folder this run writes to: a rerun with another
    ``--results`` evaluates again and fills that folder too.
    """

    def __init__(self, path: Path, cfg: StudyConfig, overrides=(), *, results_dir: Path):
        self.path, self.results_dir = path, Path(results_dir)
        self.key = hashlib.sha1(json.dumps([cfg.to_dict()["eval"], list(overrides)], sort_keys=True,
                                           default=str).encode()).hexdigest()[:12]
        saved = json.loads(path.read_text()) if path.exists() else {}
        entries = {}
        if saved.get("key") == self.key:  # {record file: run id}
            entries = saved.get("records") or {}
        self._entries: dict[str, str] = {}  # the records of this run still on disk, in any results folder
        self._done: dict[tuple[str, str], ResultRecord] = {}  # those in results_dir, by (protocol, dataset)
        for record_file, run_id in entries.items():
            try:
                record = ResultRecord.from_dict(json.loads(Path(record_file).read_text()))
            except (OSError, ValueError):
                continue
            if record.run_id == run_id:  # still this run's, not overwritten by another
                self._entries[str(Path(record_file).resolve())] = run_id
                if Path(record_file).resolve() == record_path(self.results_dir, record).resolve():
                    self._done[(record.protocol, record.dataset)] = record

    @property
    def done(self) -> frozenset:
        """``(protocol, dataset)`` pairs whose records exist in the results folder."""
        return frozenset(self._done)

    def records(self) -> list[ResultRecord]:
        """The records of the evaluations already done."""
        return list(self._done.values())

    def mark(self, record: ResultRecord, record_file: Path) -> None:
        """Note one more evaluation as recorded, in ``record_file``."""
        self._done[(record.protocol, record.dataset)] = record
        self._entries[str(Path(record_file).resolve())] = record.run_id  # absolute: the cwd may differ next time
        atomic_write_text(self.path, json.dumps({"key": self.key, "records": dict(sorted(self._entries.items()))},
                                                indent=1))


def _kind(dataset: str) -> str:
    """What kind of evaluation set ``dataset`` is: classification, captions or segmentation."""
    return REAL_EVAL_SETS[dataset] if dataset in REAL_EVAL_SETS else TOY_EVAL_SETS[dataset].kind


def run_study(cfg: StudyConfig, methods: list[str], *, workdir: Path, results_dir: Path, cache_dir: Path,
              data_root: Path | None = None, overrides: list[str] = (), log=print) -> list[ResultRecord]:
    """Pre-train and evaluate each method like-for-like; write and return the result records."""
    check_evaluation(cfg)
    check_sample_stream(cfg, methods)
    for dataset in cfg.eval.datasets:  # a missing evaluation set fails now, not after hours of training
        if dataset in REAL_EVAL_SETS:
            catalog.resolve_eval_root(dataset, data_root)
    info: DistInfo = init_distributed(cfg.train.device)
    if not info.is_main:
        log = lambda *args, **kwargs: None  # noqa: E731  (one voice per job)
    # Rank 0 generates the embedded data and the vocabulary cache; the others then find them cached.
    for turn in (True, False):
        if info.is_main == turn:
            data = resolve_data(cfg, data_root, cache_dir, log=log)
            tokenizer = build_tokenizer(cfg, data)
        if info.world_size > 1:
            torch.distributed.barrier()
    spec = text_spec(cfg, tokenizer)
    eval_sets = EvalSets(cfg, cache_dir, data_root)
    world = info.world_size * cfg.train.accum_steps
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by world size x accum_steps = {world}")
    per_rank = cfg.train.batch_size // world
    steps_per_epoch = data.samples // cfg.train.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"{data.samples} samples make no full batch of {cfg.train.batch_size}")
    records = []
    for name in methods:
        method = build_method(name, cfg, spec)
        batches = pretrain_batches(cfg, data, type(method), tokenizer, per_rank=per_rank,
                                   steps_per_epoch=steps_per_epoch,
                                   pin_memory=cfg.data.pin_memory and info.device.type == "cuda")
        # The views actually applied and where view 0 came from, in every record of the method.
        augmentation = dict(augmentation_record(type(method), cfg.data.augment),
                            require_caption=cfg.data.require_caption)

        run_dir = run_dir_for(workdir, cfg, name)
        # One run per folder at a time, held through training and evaluation (a second identical
        # command stops here instead of training into the same checkpoints and log).
        with run_lock(run_dir, info):
            log(f"[{name}] pre-training on {data.name} ({data.samples} samples, {cfg.train.epochs} epochs) in {run_dir}")
            summary = train(method, batches, cfg.train, steps_per_epoch=steps_per_epoch, workdir=run_dir, info=info,
                            seed=cfg.seed, desc=name, max_bad_fraction=cfg.data.max_bad_fraction)
            if not info.is_main:
                continue
            if cfg.train.strategy == "fsdp" and info.world_size > 1:
                # Sharded weights cannot be exported or evaluated on one rank: rebuild the method whole
                # from the final checkpoint (written at the last step, always).
                method = build_method(name, cfg, spec)
                method.load_state_dict(load_newest_checkpoint(run_dir)[0]["model"])
                method.to(info.device)
            export_encoder(run_dir / "encoder.safetensors", method.encoder, cfg.encoder)
            # The like-for-like conditions every record of this run carries (and `mugbench eval` reads back).
            conditions = like_for_like(cfg, device=info.device, world_size=info.world_size)
            # Makes checkpoint.pt self-describing.
            write_run_info(run_dir, name, cfg, summary=summary, tokenizer=tokenizer, conditions=conditions)
            log(f"[{name}] {summary.steps} steps, {summary.images_per_s:.0f} img/s, final loss {summary.final_loss:.4f}")
            def artifact_stem(protocol, dataset, name=name):
                return record_location(results_dir, data.name, cfg.preset, name, protocol, dataset,
                                       cfg.seed).with_suffix("")

            progress = EvalProgress(run_dir / "eval" / "progress.json", cfg, overrides,
                                    results_dir=results_dir)
            records += progress.records()
            for protocol, dataset in progress.done:
                log(f"[{name}] {protocol} on {dataset}: recorded before the interruption, not run again")

            def write_result(result, name=name, method=method, summary=summary, progress=progress):
                protocol, dataset, metrics, options, seconds, *rest = result
                rec = ResultRecord(
                    method=name, protocol=protocol, dataset=dataset, pretrain_data=data.name, preset=cfg.preset,
                    seed=cfg.seed, metrics=metrics, method_options=dataclasses.asdict(method.options),
                    protocol_options=options, encoder=dataclasses.asdict(cfg.encoder), epochs=summary.epochs,
                    steps=summary.steps,
                    timings={"pretrain_s": summary.seconds, "images_per_s": summary.images_per_s, "eval_s": seconds,
                             "peak_memory_mb": summary.peak_memory_mb, "data_share": summary.data_share},
                    loss_curve=summary.loss_curve, paradigm=type(method).paradigm,
                    skipped_samples=summary.skipped, repaired_samples=summary.repaired, overrides=list(overrides),
                    examples=rest[0] if rest else [], augmentation=augmentation,
                    fingerprint=fingerprint(conditions), conditions=conditions,
                )
                progress.mark(rec, write_record(rec, results_dir))  # a rerun skips it now
                records.append(rec)
                log(f"[{name}] {protocol} on {dataset}: " + ", ".join(f"{k}={v:.2f}" for k, v in metrics.items()))

            evaluate(method.encoder, cfg, eval_sets, info.device, run_dir / "eval", done=progress.done,
                     on_result=write_result)
            evaluate_capabilities(method, cfg, eval_sets, tokenizer, info.device, artifact_stem, done=progress.done,
                                  on_result=write_result)
    return records
