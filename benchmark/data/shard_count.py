"""How many samples a local shard set holds, so that ``--data PATTERN`` needs no ``data.samples_per_epoch``.

Two sources, cheapest first:

- img2dataset's stats files: beside each shard ``NNNNN.tar`` it writes ``NNNNN_stats.json``, whose
  ``successes`` is the number of samples it put in that shard. Used when every shard has one.
- one pass over the tar headers (payloads are seeked over, never read or decoded), counting samples
  the way the training pipeline forms them (`pipeline.split_sample_key`: keys may hold dots; only
  keys with an image member count). The result is cached under ``<cache>/shard-counts/``, keyed by
  the shards' paths, sizes and modification times, so it is paid once per shard set.

Remote shards (``pipe:``, ``http://``, ...) cannot be counted without downloading them; the caller
says so and asks for ``data.samples_per_epoch``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..progress import progress_bar
from .catalog import BadDataError, DataNotFoundError, _is_local
from .pipeline import IMAGE_KEYS, split_sample_key

STATS_SOURCE = "img2dataset stats files"
# How far an explicit data.samples_per_epoch may stray from the shards' own count before a run warns:
# wider than the few samples a download's stats and its tars disagree on, narrower than a partial download
# or another set's nominal size (2.8M against a 2.6M download is 8 %).
SAMPLES_MISMATCH = 0.03
CACHE_FOLDER = "shard-counts"
# Part of the cache key: a change to how samples are counted must not reuse old counts.
_COUNT_RULES = "tar-headers-v1"
# webdataset's tar reader skips these members (``__key__``-style metadata), so they start no sample.
_META_MEMBER = re.compile(r"__[^/]*__($|/)")
_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def stats_file(shard: str | os.PathLike) -> Path:
    """img2dataset's stats file of ``shard``: ``dir/00012.tar`` -> ``dir/00012_stats.json``."""
    path = Path(shard)
    stem = next((path.name[:-len(s)] for s in _TAR_SUFFIXES if path.name.endswith(s)), path.stem)
    return path.with_name(f"{stem}_stats.json")


def _stats_total(shards: Sequence[str]) -> tuple[int | None, str]:
    """The sum of ``successes`` over every shard's stats file, or ``(None, why not)``; why not is ''
    when no shard has one (a set not written by img2dataset: nothing worth saying)."""
    total, missing = 0, 0
    for shard in shards:
        path = stats_file(shard)
        if not path.is_file():
            missing += 1
            continue
        try:
            successes = json.loads(path.read_text(encoding="utf-8")).get("successes")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
            return None, f"{path} is unreadable ({exc})"
        if not isinstance(successes, int) or isinstance(successes, bool) or successes < 0:
            return None, f"{path} has no count of successes (got {successes!r})"
        total += successes
    if missing:
        return None, "" if missing == len(shards) else f"{missing:,} of {len(shards):,} shards have none"
    return total, ""


def _member_names(path: str) -> Iterator[str]:
    """Names of the members of one tar that webdataset would hand on, from the headers alone.

    Plain ustar headers (what img2dataset and webdataset write) are read by `_plain_member_names`;
    anything else goes through ``tarfile``, which in random-access mode also seeks from header to
    header, never reading payloads. A member cut off by the end of the file ends the shard (as it
    ends the training pipeline's read).
    """
    names = _plain_member_names(path)
    for name in names if names is not None else _tarfile_member_names(path):
        if not _META_MEMBER.match(name):
            yield name


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR, _NOT_REGULAR = (b"0", b"\0", b"7"), (b"1", b"2", b"3", b"4", b"5", b"6")


def _plain_member_names(path: str) -> list[str] | None:
    """`_member_names` for a tar of plain ustar headers, or None for anything else (long-name and
    pax headers, sparse files, base-256 sizes, a header whose checksum does not add up, compression):
    ``tarfile`` then reads the shard. About four times faster than ``tarfile``, whose header parse
    decodes every field; this one reads the checksum, name, size, type and prefix only."""
    size, names, offset = os.path.getsize(path), [], 0
    with open(path, "rb") as fh:
        while offset + _BLOCK <= size:
            fh.seek(offset)  # within the read buffer for small members: no system call
            header = fh.read(_BLOCK)
            if header == _ZERO_BLOCK:
                break  # end of archive
            try:
                checksum, member_size = _octal(header[148:156]), _octal(header[124:136])
            except ValueError:  # base-256 or garbage
                return None
            if checksum != 256 + sum(header[:148]) + sum(header[156:]) or member_size < 0:
                return None
            kind = header[156:157]
            data_end = offset + _BLOCK + member_size
            if data_end > size:
                break  # cut off inside this member
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if kind in _REGULAR and not (kind == b"\0" and name.endswith("/")):  # V7 marks folders so
                names.append(f"{prefix}/{name}" if prefix else name)
            elif kind not in _NOT_REGULAR and kind != b"\0":
                return None
            offset = data_end + (-member_size % _BLOCK)
    return names


def _octal(field: bytes) -> int:
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _tarfile_member_names(path: str) -> Iterator[str]:
    """`_member_names` by ``tarfile``: every header kind, and compressed shards (read through)."""
    size = os.path.getsize(path)
    try:
        tar, plain = tarfile.open(path, mode="r:"), True
    except tarfile.ReadError:  # compressed (slower: a decompressor cannot seek, so it reads through)
        tar, plain = tarfile.open(path, mode="r:*"), False
    with tar:
        while (info := tar.next()) is not None:
            tar.members.clear()  # tarfile keeps every header read; ours are needed once
            if plain and info.offset_data + info.size > size:
                return
            if info.isreg():
                yield info.name


def count_shard(path: str, log: Callable[[str], None] = print) -> int:
    """Samples with an image in one shard, grouped as `pipeline.TarSamples` groups members: consecutive
    members of one key (by `split_sample_key`) form a sample; members of unknown suffixes are ignored.

    A shard that breaks mid-way counts what came before the break (the pipeline trains on just that).
    """
    samples, key, has_image = 0, None, False
    try:
        for name in _member_names(path):
            member_key, suffix = split_sample_key(name)
            if member_key is None:
                continue
            if member_key != key:
                samples += has_image
                key, has_image = member_key, False
            has_image = has_image or suffix in IMAGE_KEYS
    except (tarfile.TarError, OSError, EOFError) as exc:
        log(f"shard {path} is unreadable after {samples + has_image:,} samples ({exc}); counting those")
    return samples + has_image


def _cache_path(shards: Sequence[str], cache_dir: Path) -> Path:
    """The cache file of this exact shard set: any shard renamed, rewritten or touched gives a new one."""
    identity = [_COUNT_RULES]
    for shard in shards:
        stat = os.stat(shard)
        identity.append([os.path.abspath(shard), stat.st_size, stat.st_mtime_ns])
    digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]
    return Path(cache_dir) / CACHE_FOLDER / f"{digest}.json"


def _read_cache(path: Path, shards: int) -> int | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # absent or damaged: count again
    samples = data.get("samples") if isinstance(data, dict) else None
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0 or data.get("shards") != shards:
        return None
    return samples


def header_pass(shards: Sequence[str], log: Callable[[str], None] = print) -> list[int]:
    """`count_shard` for every shard, with a progress bar (plain lines in a log: `progress.progress_bar`)."""
    counts = []
    with progress_bar(len(shards), desc="counting samples", unit="shard") as bar:
        for shard in shards:
            counts.append(count_shard(shard, log))
            bar.update()
    return counts


def count_samples(urls: Sequence[str], cache_dir: str | os.PathLike,
                  log: Callable[[str], None] = print) -> tuple[int, str]:
    """The number of samples in the local shards ``urls``, and where it came from (for the run's log):
    ``img2dataset stats files``, or ``a header pass over N shards`` (``... (cached)`` when read from
    the cache under ``cache_dir``).

    Raises `DataNotFoundError` for remote shards (they cannot be counted before training) and
    `BadDataError` when the shards hold no sample with an image.
    """
    urls = list(urls)
    remote = [u for u in urls if not _is_local(u)]
    if remote:
        raise DataNotFoundError(f"Only local shard files can be counted, and {remote[0]} is remote.")
    total, why_not = _stats_total(urls)
    source = STATS_SOURCE
    if total is None:
        if why_not:
            log(f"not using img2dataset stats files: {why_not}")
        total, source = _cached_header_count(urls, Path(cache_dir), log)
    if total == 0:
        raise BadDataError(
            f"The shards {urls[0]} ... ({len(urls):,} in all) hold no sample with an image (members named KEY.jpg, "
            f"KEY.jpeg, KEY.png or KEY.webp), counted from {source}: there is nothing to train on. Check the "
            f"set with `mugbench data check`.")
    return total, source


def _cached_header_count(urls: list[str], cache_dir: Path, log: Callable[[str], None]) -> tuple[int, str]:
    """The header-pass count of ``urls``, from the cache when these exact files were counted before."""
    from ..files import atomic_write_text

    source = f"a header pass over {len(urls):,} shard{'s' if len(urls) != 1 else ''}"
    cache = _cache_path(urls, cache_dir)
    cached = _read_cache(cache, len(urls))
    if cached is not None:
        return cached, f"{source} (cached)"
    counts = header_pass(urls, log)
    total = sum(counts)
    atomic_write_text(cache, json.dumps({"samples": total, "shards": len(urls), "first_shard": urls[0],
                                         "per_shard": counts}) + "\n")
    return total, source


def explicit_count_warning(urls: Sequence[str], samples: int, cache_dir: str | os.PathLike, name: str,
                           log: Callable[[str], None] = print) -> str | None:
    """What is wrong with an explicit ``data.samples_per_epoch`` of ``samples`` for the local shards ``urls``
    (the set ``name``), as one warning line without its ``warning:`` prefix, or None when it is within
    `SAMPLES_MISMATCH` of their count (`count_samples`). Advisory: a count that fails is reported the same
    way, never raised, since the explicit value needs no count to train."""
    try:
        counted, source = count_samples(urls, cache_dir, log=log)
    except (BadDataError, DataNotFoundError, OSError) as exc:
        return f"data.samples_per_epoch={samples:,} could not be checked against the shards of {name}: {exc}"
    if abs(samples - counted) <= SAMPLES_MISMATCH * counted:
        return None
    return (f"data.samples_per_epoch={samples:,} differs from the {counted:,} samples the shards of {name} hold "
            f"(counted from {source}) by {abs(samples - counted) / counted:.0%}; the explicit {samples:,} is used, "
            f"so every epoch is {samples:,} samples long. Leave data.samples_per_epoch unset (null) to train on "
            f"the {counted:,} counted.")
