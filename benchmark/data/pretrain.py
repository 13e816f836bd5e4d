"""Pre-training data of a study, as every method reads it: the shards, the tokenizer, and the one
sample stream and base view that make the comparison like-for-like (DESIGN.md "Like-for-like rules")."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, StudyConfig
from ..method import TextSpec
from ..registry import get_method
from . import catalog
from .decode import draft_size
from .pipeline import DecodeOptions
from .streams import stream_batches, too_few_shards
from .tokenizer import TextTokenizer, corpus_vocab
from .toy import TOY_CLASSES, prepare_toy_world
from .transforms import build_view_transform, method_view_specs


@dataclass
class PretrainData:
    """Resolved pre-training shards."""

    name: str
    urls: list[str]
    samples: int
    vocab_cache: Path
    # Classes of the samples' labels (``.cls``): the toy world's class list; 0 for shard sets, whose
    # samples carry no labels mugbench knows of (image-text web data).
    num_classes: int = 0


def resolve_data(cfg: StudyConfig, data_root: Path | None, cache_dir: Path, log=print, warn=None) -> PretrainData:
    """Find the pre-training shards; ``toy`` is generated on demand, others must exist.

    The epoch length of a shard set is ``data.samples_per_epoch`` when set, else counted
    (`shard_count.count_samples`: img2dataset's stats files, or one cached pass over the tar
    headers); ``log`` says which (`run_study` passes its own, silent on ranks other than 0). An
    explicit value is checked against that count when the shards are local and not resampled, and
    ``warn`` (default: a ``warning:`` line on stderr, from rank 0 only) names both when they differ by
    more than `shard_count.SAMPLES_MISMATCH`; the explicit value is still used.
    """

    def _warn_on_rank0(message: str) -> None:
        # Every rank resolves the data (run_study: rank 0 first); one of them says it.
        import sys

        from ..train.distributed import rank_and_world

        if rank_and_world()[0] == 0:
            print(f"warning: {message}", file=sys.stderr)

    if cfg.data.name == "toy":
        root, manifest = prepare_toy_world(cfg.data, cache_dir, log=log)
        split = manifest["splits"]["pretrain"]
        _check_shard_count(cfg, len(split["shards"]))
        return PretrainData("toy", [str(root / s) for s in split["shards"]], split["count"], root / "vocab.json",
                            num_classes=len(manifest["classes"]))
    urls = catalog.resolve_pretrain_urls(cfg.data.name, data_root)
    samples, source = cfg.data.samples_per_epoch, "data.samples_per_epoch"
    local = all(catalog._is_local(u) for u in urls)
    if not samples and not local:
        raise catalog.DataNotFoundError(
            f"Pre-training data {cfg.data.name!r} is read from remote shards, whose samples cannot be counted "
            f"before training, so the epoch length is unknown. Set it with --set data.samples_per_epoch=N "
            f"(img2dataset's NNNNN_stats.json files hold each shard's count of successful downloads).")
    _check_shard_count(cfg, len(urls))  # before a header pass, which may take minutes
    if not samples:
        from .shard_count import count_samples  # imported here: only resolve_data counts shards

        samples, source = count_samples(urls, cache_dir, log=log)
    elif local and not cfg.data.resampled:
        # An explicit value wins, but one sized for another download (or a preset's nominal size) trains
        # epochs of the wrong length: said, never corrected. Resampled data is left alone: its epoch is
        # deliberately N draws from a larger set.
        from .shard_count import explicit_count_warning

        warning = explicit_count_warning(urls, samples, cache_dir, cfg.data.name, log=log)
        if warning:
            (warn or _warn_on_rank0)(warning)
    log(f"samples per epoch: {samples:,} from {source}")
    key = hashlib.sha1("\n".join(urls).encode()).hexdigest()[:12]
    return PretrainData(cfg.data.name, urls, samples, cache_dir / "vocab" / f"{key}.json")


def _check_shard_count(cfg: StudyConfig, shards: int) -> None:
    """Refuse shards too few for ``data.streams`` (each stream reads whole shards) before anything is
    counted or trained; resampled streams draw from the whole set, so any count will do."""
    if not cfg.data.resampled and shards < cfg.data.streams:
        toy = cfg.data.name == "toy"
        hint = " For the embedded set, a smaller data.toy_shard_size gives more shards." if toy else ""
        raise ConfigError(too_few_shards(shards, cfg.data.streams) + hint)


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
                     rank: int = 0, world_size: int = 1, steps_per_epoch: int, pin_memory: bool = False):
    """``batches(epoch)``: rank ``rank`` of ``world_size``'s micro-batches of one method's pre-training epoch,
    as `run_study` trains it (`streams.stream_batches`, ``train.accum_steps`` per step).

    The global batches are the study's alone (``data.streams``, the seed, the data), whatever the ranks,
    loader workers and accumulation steps. The sample filter is the study's (``data.require_caption``,
    ``data.min_image_size``, the decoder's checks), the same for every method, so every method sees the same
    samples in the same order; only the tokenised text (for methods that read captions) and the declared
    extra views differ. View 0 is the study's base view (`method_view_specs`), drawn first from each
    sample's seeded RNG, so it is the same crop for every method. Methods that declare ``needs_labels``
    also get ``label`` (the shard's ``.cls``); the loader would skip a sample without one, so they only run
    on data whose every sample has a label (``data.num_classes > 0``: the toy world), where the stream
    stays the same.
    """
    d, t = cfg.data, cfg.train
    reason = not_applicable(method_cls, data)
    if reason:
        raise ConfigError(f"Method {method_cls.name!r} trains on class labels, but {reason}: leave it out of "
                          f"this study (run_study skips it).")
    specs = method_view_specs(method_cls, d.augment)
    transforms = [build_view_transform(v, cfg.encoder.img_size) for v in specs]
    # Decoded at the size the study's base view needs, the same for every method: the decoded image
    # is what every view is cropped from, so a per-method size would give methods different pixels.
    decode = decode_options(cfg, [d.augment.scale[0]])
    text = tokenizer if method_cls.needs_text else None

    def batches(epoch: int):
        return stream_batches(data.urls, streams=d.streams, rank=rank, world_size=world_size,
                              accum_steps=t.accum_steps, global_batch=t.batch_size, steps_per_epoch=steps_per_epoch,
                              image_transforms=transforms, tokenizer=text, need_caption=d.require_caption,
                              need_label=method_cls.needs_labels, seed=cfg.seed, epoch=epoch,
                              num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer, decode=decode,
                              resampled=d.resampled, pin_memory=pin_memory, prefetch_factor=d.prefetch_factor)

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

    from .pipeline import SkipCounter, TarSamples

    samples = wds.DataPipeline(wds.SimpleShardList(urls), TarSamples(SkipCounter().tar_handler, only=("txt",)))
    for sample in samples:
        if "txt" in sample:
            yield sample["txt"].decode("utf-8", "replace")


def text_spec(cfg: StudyConfig, tok: TextTokenizer, data: PretrainData | None = None) -> TextSpec:
    """What methods are told about text, and the pre-training labels' class count: ``data``'s, else (a
    method rebuilt from its run, a test) what `pretrain_num_classes` knows from the study alone."""
    t = cfg.text
    classes = data.num_classes if data is not None else pretrain_num_classes(cfg)
    return TextSpec(vocab_size=tok.vocab_size, context_length=t.context_length, sot_id=tok.sot_id,
                    eot_id=tok.eot_id, pad_id=tok.pad_id, width=t.width, heads=t.heads, layers=t.layers,
                    embed_dim=t.embed_dim, num_classes=classes)


def pretrain_num_classes(cfg: StudyConfig) -> int:
    """The class count of the pre-training labels without reading the data: the toy world's generator
    has a fixed class list (its manifest's ``classes``); other sets have no labels (0)."""
    return len(TOY_CLASSES) if cfg.data.name == "toy" else 0


def not_applicable(method_cls: type, data: PretrainData) -> str | None:
    """Why ``method_cls`` cannot pre-train on ``data`` (one line), or None: a method that trains on class
    labels, on a set without them."""
    if method_cls.needs_labels and not data.num_classes:
        return f"{data.name} has no class labels"
    return None
