"""Checks that run before any work: the run fits together, its output folders take files, and the
disk holds a checkpoint.

`mugbench run` calls `check_run` after the configuration and the method options validated and
before anything is trained, `mugbench eval` calls `check_folders`; a refusal costs seconds, not a
pre-training run whose records then cannot be written; `run_study` repeats `check_study` for callers
of the Python API. Cheap on purpose: no model built (the checkpoint size is estimated from the encoder
and text-tower sizes), no data read beyond a few stats.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from .config import ConfigError, StudyConfig

FULL_BPE_VOCAB = 49408  # open_clip's tokenizer (text.vocab: full)
_BYTES_PER_PARAM = 4 * 3  # fp32 weights plus AdamW's two moments


class OutputError(Exception):
    """An output folder that cannot be written, a disk too full for the run's files, or a failed
    checkpoint write; the message names the folder or file and what to do."""


def world_size() -> int:
    """Processes of this job as the launcher (torchrun) announces them; 1 without one."""
    from .train.distributed import launched_rank_and_world

    return launched_rank_and_world()[1]


def pretrain_samples(cfg: StudyConfig) -> int | None:
    """Samples per pre-training epoch known from the configuration alone (None: known only once the
    shard set is resolved, which then says so itself)."""
    if cfg.data.name == "toy":
        return cfg.data.toy_sizes.get("pretrain")
    return cfg.data.samples_per_epoch


def check_batch_split(cfg: StudyConfig, world: int, samples: int | None) -> None:
    """The global batch splits evenly over ranks and accumulation steps, and an epoch holds a batch."""
    t = cfg.train
    if t.batch_size % (world * t.accum_steps):
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by world size x train.accum_steps = {world} x "
            f"{t.accum_steps} = {world * t.accum_steps}: every process must get the same whole number of samples "
            f"per accumulation step. Use a batch size that is a multiple of {world * t.accum_steps}.")
    if samples is not None and samples < t.batch_size:
        raise ConfigError(
            f"The pre-training set has {samples} samples per epoch, fewer than one batch of "
            f"train.batch_size={t.batch_size}, so an epoch would have no step. Lower train.batch_size or use more "
            f"data (data.samples_per_epoch, or data.toy_sizes.pretrain for the embedded set).")


def pretrain_shards(cfg: StudyConfig) -> int | None:
    """Pre-training shards known from the configuration alone: the embedded set's (None: known once the
    shard set is resolved, which then checks them itself)."""
    if cfg.data.name == "toy" and "pretrain" in cfg.data.toy_sizes:
        return -(-cfg.data.toy_sizes["pretrain"] // cfg.data.toy_shard_size)
    return None


def check_stream_split(cfg: StudyConfig, world: int, shards: int | None = None) -> None:
    """``data.streams`` makes this job's global batches (`data.streams.check_streams`): it divides the batch,
    every rank gets whole streams and, unless resampled, each of the ``shards`` (when known) feeds one."""
    from .data.streams import check_streams

    d, t = cfg.data, cfg.train
    problems = check_streams(d.streams, t.batch_size, world, t.accum_steps, None if d.resampled else shards)
    if not problems:
        return
    fits = [s for s in range(world, t.batch_size + 1, world)
            if t.batch_size % s == 0 and (d.resampled or shards is None or s <= shards)]
    example = f" (e.g. data.streams={min(fits, key=lambda s: (abs(s - d.streams), s))})" if fits else \
        f" (none fits {shards} shards on {world} processes: use data with more shards, or data.resampled=true)"
    raise ConfigError(
        f"data.streams={d.streams} does not fit this job of {world} process{'es' if world != 1 else ''} "
        f"(train.batch_size={t.batch_size}, train.accum_steps={t.accum_steps}): {' '.join(problems)} The global batch "
        f"is made of data.streams virtual sample streams, train.batch_size / data.streams samples of each, and every "
        f"process reads data.streams / world size of them, so that the batches are the same on any number of "
        f"processes. Set data.streams to a divisor of train.batch_size that is a multiple of the world size"
        f"{example}, or change train.batch_size; data.streams is a condition of the study (it decides the sample "
        f"order), so compare only runs with the same value.")


def encoder_params(cfg: StudyConfig) -> int:
    """Parameters of the shared ViT (patch embedding, class and position tokens, blocks, final norm)."""
    e = cfg.encoder
    d, hidden = e.embed_dim, int(e.embed_dim * e.mlp_ratio)
    block = 4 * d * d + 4 * d + 2 * d * hidden + hidden + d + 4 * d  # attention, MLP, two LayerNorms
    return 3 * e.patch_size ** 2 * d + d + (e.num_patches + 2) * d + e.depth * block + 2 * d


def text_params(cfg: StudyConfig) -> int:
    """Parameters of the text tower, at least: a corpus vocabulary's size is known only from the data,
    so it is left out of the estimate."""
    t = cfg.text
    w = t.width
    vocab = FULL_BPE_VOCAB if t.vocab == "full" else 0
    block = 4 * w * w + 4 * w + 8 * w * w + 4 * w + w + 4 * w
    return (vocab + t.context_length) * w + t.layers * block + 2 * w + w * t.embed_dim


def checkpoint_bytes(cfg: StudyConfig, needs_text: bool) -> int:
    """Estimated size of a run's first checkpoint: weights and AdamW moments of the encoder (and the
    text tower when a method reads captions). Method heads and decoders add to it, so this is a floor."""
    params = encoder_params(cfg) + (text_params(cfg) if needs_text else 0)
    return params * _BYTES_PER_PARAM


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_free_space(workdir: Path, need: int) -> None:
    """Refuse to start when the disk holding ``workdir`` has less free space than ``need`` bytes."""
    where = _existing_ancestor(workdir)
    free = shutil.disk_usage(where).free
    if free < need:
        raise OutputError(
            f"The disk holding the work folder {workdir} has {free / 1e6:.1f} MB free, but the first checkpoint "
            f"of this study needs about {need / 1e6:.1f} MB (weights and AdamW moments, 12 bytes per parameter; "
            f"more for method heads and the checkpoints kept). Free space there or pass --workdir on a larger "
            f"disk; nothing was started.")


def _probe(folder: Path) -> None:
    """Create and delete a file in ``folder``: the only test that holds for every user (root ignores
    permission bits) and every file system (read-only mounts, quotas)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".mugbench-probe-")
    try:
        os.write(fd, b"probe")
    finally:
        os.close(fd)
        os.unlink(tmp)


def _make(folder: Path, created: list[Path]) -> None:
    """``mkdir -p folder``, noting every folder it created (outermost first)."""
    missing = []
    path = Path(os.path.abspath(folder))
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    created.extend(reversed(missing))


def remove_if_empty(created: list[Path]) -> None:
    """Remove the folders `check_folders` created (``created``) that are still empty, innermost first: a run
    that failed before writing anything leaves no new folder behind; one that something filled stays."""
    for path in reversed(created):  # innermost first; a folder something else filled meanwhile stays
        try:
            path.rmdir()
        except OSError:
            pass


def check_folders(folders: dict[str, Path]) -> list[Path]:
    """Create each output folder if missing and write a file into it, so an unusable one is found now.

    ``folders`` maps the option that names a folder (``--results``) to the folder. Returns the
    folders created. On a failure the folders created here are removed again and `OutputError`
    names the folder, the option and the reason.
    """
    created: list[Path] = []
    for option, folder in folders.items():
        folder = Path(folder)
        try:
            _make(folder, created)
            _probe(folder)
        except OSError as exc:
            remove_if_empty(created)
            raise OutputError(_unwritable(option, folder, exc)) from None
    return created


def _unwritable(option: str, folder: Path, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOTDIR, errno.EEXIST) or (folder.exists() and not folder.is_dir()):
        reason = f"{reason} (a file stands where the folder or one of its parents should be)"
    elif exc.errno == errno.ENOSPC:
        reason = f"{reason} (the disk is full)"
    return (f"The folder {folder} ({option}) cannot be written: {reason}. mugbench writes there, so it stopped "
            f"before any work. Make the folder writable, or pass {option} with a folder you can write to.")


def check_study(cfg: StudyConfig, methods: list[str], data_root: Path | None) -> None:
    """What about a study's methods and evaluation can be refused before any training: a sample stream
    some method cannot read, unknown protocols and sets, a method a protocol could not evaluate, and
    evaluation sets missing under the data root (all named at once)."""
    from .data.pretrain import check_sample_stream
    from .eval.harness import check_evaluation, locate_eval_sets
    from .registry import get_method

    check_sample_stream(cfg, methods)
    check_evaluation(cfg, [get_method(name) for name in methods], world_size())
    locate_eval_sets(cfg, data_root)


def check_run(cfg: StudyConfig, *, data_root: Path | None, needs_text: bool, workdir: Path, results: Path,
              reports: Path, cache: Path, methods: list[str] = (), report_to: tuple[str, ...] = ()) -> list[Path]:
    """Everything `mugbench run` can know to be wrong before training: the experiment trackers of
    ``--report-to`` (known, and their package installed), the study (`check_study`), the batch split, the
    sample streams (`check_stream_split`), the free space for the first checkpoint, and the four output
    folders (created if missing, only after everything else passed). Returns the folders it created."""
    from .trackers import check_report_to

    check_report_to(report_to)
    check_study(cfg, list(methods), data_root)
    check_batch_split(cfg, world_size(), pretrain_samples(cfg))
    check_stream_split(cfg, world_size(), pretrain_shards(cfg))
    check_free_space(workdir, checkpoint_bytes(cfg, needs_text))
    return check_folders({"--workdir": workdir, "--results": results, "--reports": reports, "--cache-dir": cache})
