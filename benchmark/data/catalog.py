"""Where data lives: named pre-training shard sets, the data root and the cache folder.

Named sets are webdataset shards in the img2dataset layout under a data root
(``--data-root`` or ``MUGBENCH_DATA``): each ``NNNNN.tar`` holds, per sample,
``KEY.jpg`` (the image), ``KEY.txt`` (the caption) and ``KEY.json`` (URL, size,
status), exactly as ``img2dataset --output_format webdataset`` writes them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from braceexpand import braceexpand


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Expand a shard spec into URLs/paths: ``::``-separated patterns, each brace-expanded
    (``data/{00000..00009}.tar``); a list is expanded element-wise. Kept free of torch so that
    a missing data set is reported before the heavy imports."""
    if isinstance(spec, (list, tuple)):
        return [url for item in spec for url in expand_urls(str(item))]
    return [url for part in str(spec).split("::") if part for url in braceexpand(part)]


# Shard patterns relative to the data root, as img2dataset names them for each set.
PRETRAIN_SETS: dict[str, str] = {
    "cc3m": "cc3m/{00000..00331}.tar",
    "cc12m": "cc12m/{00000..01242}.tar",
    "laion400m": "laion400m/{00000..41407}.tar",
}

# Schemes webdataset opens itself; we cannot cheaply check that those shards exist.
_REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://", "pipe:", "ais://", "hf://")


class DataNotFoundError(Exception):
    """A pre-training shard set could not be found; the message says how to build it."""


class BadDataError(Exception):
    """Too many samples of a shard set are unusable; the message gives the counts by kind."""


def default_cache_dir() -> Path:
    """``$MUGBENCH_CACHE``, else the user cache folder (``~/.cache/mugbench`` on Linux)."""
    if os.environ.get("MUGBENCH_CACHE"):
        return Path(os.environ["MUGBENCH_CACHE"]).expanduser()
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        base = Path(os.environ["LOCALAPPDATA"])
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mugbench"


def default_data_root() -> Path | None:
    """``$MUGBENCH_DATA`` if set, else None."""
    value = os.environ.get("MUGBENCH_DATA")
    return Path(value).expanduser() if value else None


def _img2dataset_hint(name: str, folder: str) -> str:
    """How to build a named set with img2dataset."""
    # LAION-400M ships parquet files with URL/TEXT columns; CC3M/CC12M are TSV URL/caption lists.
    listing, fmt, url_col, cap_col = ((f"{name}-meta/", "parquet", "URL", "TEXT") if name == "laion400m" else
                                      (f"{name}.tsv", "tsv", "url", "caption"))
    return (f"To build it, download the {name} URL/caption list ({listing} with '{url_col}' and '{cap_col}' "
            f"columns) and run: img2dataset --url_list {listing} --input_format {fmt} --url_col {url_col} "
            f"--caption_col {cap_col} --output_format webdataset --output_folder {folder} "
            f"--image_size 256 --resize_mode keep_ratio --processes_count 16 --thread_count 64 "
            f"--enable_wandb False. Any other shard set works too: pass a pattern such as "
            f"--data '/path/{{00000..00099}}.tar'.")


def _is_local(url: str) -> bool:
    """True for plain file paths (the ones we can check with a stat)."""
    return not url.startswith(_REMOTE_PREFIXES) and "://" not in url


def _resolve_named(name: str, data_root: Path | None) -> list[str]:
    """Expand a named set under ``data_root`` and check its first and last shards."""
    pattern = PRETRAIN_SETS[name]
    if data_root is None:
        raise DataNotFoundError(
            f"Pre-training set '{name}' is looked up under a data root, and none is set: pass --data-root DIR "
            f"or set MUGBENCH_DATA=DIR, with the shards at DIR/{pattern}. "
            + _img2dataset_hint(name, f"$MUGBENCH_DATA/{name}"))
    urls = expand_urls(str(Path(data_root) / pattern))
    # Only the ends are stat'ed: a full listing of laion400m (41k files) on a network
    # file system would be slow, and a partial download nearly always lacks the last shard.
    missing = [u for u in (urls[0], urls[-1]) if not os.path.exists(u)]
    if missing:
        raise DataNotFoundError(
            f"Pre-training set '{name}' was not found: looked for {len(urls)} shards "
            f"{Path(data_root) / pattern}, and {' and '.join(missing)} "
            f"{'does' if len(missing) == 1 else 'do'} not exist. The data root comes from --data-root or "
            f"MUGBENCH_DATA (now {data_root}). " + _img2dataset_hint(name, str(Path(data_root) / name)))
    return urls


def _resolve_pattern(pattern: str, data_root: Path | None) -> list[str]:
    """Expand an explicit shard pattern; local shards must all exist."""
    urls = expand_urls(pattern)
    local = [u for u in urls if _is_local(u)]
    if not local:
        return urls
    missing = [u for u in local if not os.path.exists(u)]
    if missing and data_root is not None and not Path(pattern).is_absolute():
        # A relative pattern may also be meant relative to the data root.
        rooted = expand_urls(str(Path(data_root) / pattern))
        if all(os.path.exists(u) for u in rooted):
            return rooted
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataNotFoundError(
            f"Shard pattern '{pattern}' expands to {len(urls)} shards, but {len(missing)} of them "
            f"do not exist: {shown}. Relative patterns are resolved from the current directory"
            f"{' and then from the data root ' + str(data_root) if data_root else ''}. "
            f"Shards must be webdataset tars in the img2dataset layout (KEY.jpg + KEY.txt per sample), "
            f"e.g. written by img2dataset --output_format webdataset.")
    return urls


def resolve_pretrain_urls(data: str, data_root: Path | None) -> list[str]:
    """Shard URLs for ``--data``: a named set (``cc3m``, ``cc12m``, ``laion400m``) under
    ``data_root``, or an explicit pattern (contains ``{`` or ``::``, or ends in ``.tar``).

    ``toy`` is generated by the caller (``prepare_toy``), so it is rejected here. Raises
    ``DataNotFoundError`` with a one-paragraph explanation when shards are missing or the
    name is unknown; the check is a few stats, so it fails fast.
    """
    if data == "toy":
        raise ValueError("'toy' is generated by mugbench.data.toy.prepare_toy, not resolved from shards")
    if data in PRETRAIN_SETS:
        return _resolve_named(data, data_root)
    if "{" in data or "::" in data or data.endswith(".tar") or data.endswith(".tar.gz") or not _is_local(data):
        return _resolve_pattern(data, data_root)
    raise DataNotFoundError(
        f"Unknown pre-training data '{data}'. Named sets are: toy (embedded, generated on first use), "
        f"{', '.join(PRETRAIN_SETS)} (webdataset shards under --data-root / MUGBENCH_DATA). A shard "
        f"pattern is also accepted, e.g. --data '/path/to/shards/{{00000..00099}}.tar'.")
