"""Pre-training's virtual sample streams (`mugbench.data.streams`): the same global batches for any number
of ranks, loader workers and accumulation steps; the epoch ends at the first step a stream cannot fill;
the streams' settings are refused before any work when they do not fit the job."""
from __future__ import annotations

import io
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mugbench.config import ConfigError, load_config
from mugbench.data.streams import _checked, check_streams, stream_batches, stream_shards
from mugbench.data.tokenizer import TextTokenizer, corpus_vocab, trim_padding
from mugbench.data.transforms import ViewSpec, build_view_transform, sample_seed
from mugbench.preflight import check_stream_split, pretrain_shards

CAPTIONS = ["a red square", "a small blue circle on the left of a green star", "two rings"]


def _png(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _write(root: Path, sizes: list[int], bad) -> list[str]:
    """Shards of ``sizes`` samples; ``bad(i)`` says what is wrong with sample ``i`` of a shard (None: nothing)."""
    rng, urls = np.random.default_rng(0), []
    root.mkdir()
    for shard, size in enumerate(sizes):
        path = root / f"{shard:05d}.tar"
        with wds.TarWriter(str(path), encoder=False) as sink:
            for i in range(size):
                sample = {"__key__": f"s{shard}-{i:02d}", "png": _png(rng), "txt": CAPTIONS[i % 3].encode()}
                fault = bad(i)
                if fault == "missing_caption":
                    del sample["txt"]
                elif fault == "undecodable_image":
                    sample["png"] = b"\x89PNG not really"
                sink.write(sample)
        urls.append(str(path))
    return urls


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """Four shards of 12 samples, two of them skipped per shard (a missing caption, an undecodable image)."""
    faults = {3: "missing_caption", 8: "undecodable_image"}
    return _write(tmp_path_factory.mktemp("equal") / "shards", [12] * 4, faults.get)


@pytest.fixture(scope="module")
def unequal(tmp_path_factory) -> list[str]:
    """Three shards of 9 samples whose last sample has no caption: on two streams, one stream gets one shard."""
    return _write(tmp_path_factory.mktemp("unequal") / "shards", [9] * 3,
                  lambda i: "missing_caption" if i == 8 else None)


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer(16, corpus_vocab(CAPTIONS))


VIEWS = [build_view_transform(ViewSpec(scale=(0.5, 1.0)), 16), build_view_transform(ViewSpec(hflip=False), 16)]


def _epoch(urls, tokenizer, *, world=1, workers=0, accum=1, streams=4, batch=8, steps=100, **kw):
    """One epoch read the way ``world`` ranks would (each rank's micro-batches of a step concatenated,
    then the ranks'): ``(steps, counts, last)``. ``steps``: per global batch ``(keys, [view tensors])``;
    ``counts``: skips summed over every step up to where the job stops (the first rank without data);
    ``last``: the summed counts of the step that could not be filled, or None."""
    options = dict(streams=streams, world_size=world, accum_steps=accum, global_batch=batch, steps_per_epoch=steps,
                   image_transforms=VIEWS, tokenizer=tokenizer, need_caption=True, need_label=False, seed=3,
                   epoch=0, num_workers=workers, shuffle_buffer=kw.pop("shuffle_buffer", 5), **kw)
    ranks = [_by_step(list(stream_batches(urls, rank=r, **options)), accum, tokenizer) for r in range(world)]
    out, counts, last = [], Counter(), None
    for t in range(min(len(r) for r in ranks)):
        step = [r[t] for r in ranks]
        for part in step:
            counts.update(part["skipped"])
        if any("key" not in part for part in step):
            last = dict(sum((Counter(part["skipped"]) for part in step), Counter()))
            break
        out.append(([k for part in step for k in part["key"]],
                    [torch.cat([part["views"][v] for part in step]) for v in range(len(VIEWS))]))
    return out, dict(counts), last


def _by_step(micro: list[dict], accum: int, tokenizer) -> list[dict]:
    """A rank's micro-batches grouped by step: its rows of the step (keys, views) and the step's counts,
    or the final image-less dict as it came. Checks the micro-batch format on the way."""
    steps, i = [], 0
    while i < len(micro):
        if "image" not in micro[i]:
            assert set(micro[i]) == {"skipped", "repaired"} and i == len(micro) - 1
            steps.append(micro[i])
            break
        group = micro[i:i + accum]
        assert all(m["skipped"] == {} == m["repaired"] for m in group[1:])  # the counts ride on the first
        for m in group:
            assert m["image"] is m["image_views"][0] and len(m["key"]) == len(m["caption"]) == len(m["image"])
            assert torch.equal(m["text"], trim_padding(tokenizer(m["caption"]), tokenizer.pad_id))
        steps.append({"key": [k for m in group for k in m["key"]], "skipped": group[0]["skipped"],
                      "views": [torch.cat([m["image_views"][v] for m in group]) for v in range(len(VIEWS))]})
        i += accum
    return steps


def _assert_same(a, b) -> None:
    assert [keys for keys, _ in a] == [keys for keys, _ in b]
    for (_, views_a), (_, views_b) in zip(a, b):
        assert all(torch.equal(x, y) for x, y in zip(views_a, views_b))  # bitwise


def test_global_batches_do_not_depend_on_ranks_workers_or_accumulation(shards, tokenizer):
    reference, counts, last = _epoch(shards, tokenizer)
    # 4 streams of one shard: 10 good samples each, 2 rows per step: 5 full steps, the 6th cannot be filled.
    assert len(reference) == 5 and all(len(keys) == 8 for keys, _ in reference)
    assert counts == {"missing_caption": 4, "undecodable_image": 4} and last is not None
    # Rows 2s, 2s+1 of every batch are stream s's, which reads exactly one shard.
    assert all(len({k.split("-")[0] for k in keys[2 * s:2 * s + 2]}) == 1 for keys, _ in reference for s in range(4))
    for setting in (dict(workers=2), dict(world=2, workers=1), dict(accum=2), dict(world=2, accum=2, workers=2)):
        batches, their_counts, their_last = _epoch(shards, tokenizer, **setting)
        _assert_same(reference, batches)
        assert (their_counts, their_last) == (counts, last), setting


def test_steps_per_epoch_ends_the_epoch_first(shards, tokenizer):
    reference, counts, last = _epoch(shards, tokenizer, steps=3)
    assert len(reference) == 3 and last is None and sum(counts.values()) <= 8
    batches, their_counts, _ = _epoch(shards, tokenizer, steps=3, world=2, workers=1)
    _assert_same(reference, batches)
    assert their_counts == counts
    _assert_same(reference, _epoch(shards, tokenizer)[0][:3])  # the cap only ends the epoch earlier


def test_epoch_ends_at_the_first_step_the_short_stream_cannot_fill(unequal, tokenizer):
    layout = stream_shards(unequal, 2, seed=3, epoch=0)
    assert sorted(map(len, layout)) == [1, 2]
    long, short = sorted(range(2), key=lambda s: -len(layout[s]))
    # Unshuffled: the short stream's 8 good samples fill steps 0-3 (2 rows each); at step 4 it reads its
    # last sample (no caption, skipped) and runs dry, while the long stream skips its first shard's last.
    for setting in (dict(), dict(workers=2), dict(world=2, workers=1), dict(accum=2)):
        batches, counts, last = _epoch(unequal, tokenizer, streams=2, batch=4, shuffle_buffer=0, **setting)
        assert len(batches) == 4, setting
        assert last == counts == {"missing_caption": 2}, setting
        alone = int(Path(layout[short][0]).stem)
        assert [keys[2 * short:2 * short + 2] for keys, _ in batches] == \
            [[f"s{alone}-{i:02d}" for i in (2 * t, 2 * t + 1)] for t in range(4)]
        assert all(k.startswith("s") for keys, _ in batches for k in keys[2 * long:2 * long + 2])
    # The last image-less dict of one process carries every stream's counts of that step, full parts too.
    micro = list(stream_batches(unequal, streams=2, rank=0, world_size=1, accum_steps=1, global_batch=4,
                                steps_per_epoch=100, image_transforms=VIEWS, tokenizer=None, need_caption=True,
                                need_label=False, seed=3, epoch=0, num_workers=2, shuffle_buffer=0))
    assert len(micro) == 5 and micro[-1] == {"skipped": {"missing_caption": 2}, "repaired": {}}


def test_resampled_streams_give_the_same_batches_for_exactly_steps_per_epoch(unequal, tokenizer):
    reference, counts, last = _epoch(unequal, tokenizer, streams=2, batch=4, steps=7, resampled=True)
    assert len(reference) == 7 and last is None and len({k for keys, _ in reference for k in keys}) > 4
    for setting in (dict(world=2, workers=1), dict(workers=2, accum=2)):
        batches, their_counts, their_last = _epoch(unequal, tokenizer, streams=2, batch=4, steps=7, resampled=True,
                                                   **setting)
        _assert_same(reference, batches)
        assert (their_counts, their_last) == (counts, None)
    # Unshuffled, stream s starts with the first shard its own seeded draws pick.
    first, _, _ = _epoch(unequal, tokenizer, streams=2, batch=4, steps=1, resampled=True, shuffle_buffer=0)
    for s in range(2):
        shard = int(Path(random.Random(sample_seed(3, 0, f"resample/{s}")).choice(unequal)).stem)
        assert first[0][0][2 * s:2 * s + 2] == [f"s{shard}-00", f"s{shard}-01"]


def test_check_streams_names_each_problem():
    assert check_streams(4, 8, 2, 2, shards=4) == []
    assert check_streams(3, 8, 1, 1) == ["data.streams=3 does not divide train.batch_size=8: every stream gives "
                                         "each global batch the same number of samples."]
    assert check_streams(2, 8, 4, 1) == ["data.streams=2 is not a multiple of the world size 4: every rank reads "
                                         "the same number of whole streams."]
    (accum,) = check_streams(4, 8, 2, 3)
    assert accum.startswith("train.batch_size=8 is not divisible by world size x train.accum_steps = 2 x 3")
    (few,) = check_streams(4, 8, 1, 1, shards=3)
    assert few.startswith("The pre-training data has 3 shards, fewer than data.streams=4") and \
        "Lower data.streams to at most 3" in few
    assert len(check_streams(3, 8, 2, 1, shards=2)) == 3


def test_stream_batches_refuses_before_reading(unequal):
    common = dict(rank=0, world_size=1, accum_steps=1, global_batch=8, steps_per_epoch=2, image_transforms=VIEWS,
                  tokenizer=None, need_caption=True, need_label=False, seed=0, epoch=0, num_workers=0,
                  shuffle_buffer=0)
    with pytest.raises(ValueError, match="has 3 shards, fewer than data.streams=4"):
        stream_batches(unequal, streams=4, **common)
    with pytest.raises(ValueError, match="has 3 shards"):
        stream_shards(unequal, 4, seed=0, epoch=0)
    stream_batches(unequal, streams=4, **{**common, "resampled": True})  # draws from every shard: fine
    with pytest.raises(ValueError, match="rank 1 is not one of the 1 ranks"):
        stream_batches(unequal, streams=2, **{**common, "rank": 1})
    with pytest.raises(RuntimeError, match="step 1 of streams \\(0, 2\\) where step 0 of streams \\(0, 2\\)"):
        _checked({"step": 1, "streams": (0, 2)}, 0, (0, 2))


def test_preflight_refuses_streams_that_do_not_fit_the_job():
    smoke = load_config("smoke")
    assert smoke.data.streams == 4 and pretrain_shards(smoke) == 4
    check_stream_split(smoke, 1, pretrain_shards(smoke))
    check_stream_split(smoke, 4, pretrain_shards(smoke))
    with pytest.raises(ConfigError, match="data.streams=4 does not fit this job of 8 processes") as err:
        check_stream_split(smoke, 8)
    assert "is not a multiple of the world size 8" in str(err.value) and "e.g. data.streams=8" in str(err.value)
    with pytest.raises(ConfigError, match="none fits 4 shards on 8 processes"):
        check_stream_split(smoke, 8, pretrain_shards(smoke))
    odd = load_config("smoke", ["data.streams=3"])
    with pytest.raises(ConfigError, match="does not divide train.batch_size=32") as err:
        check_stream_split(odd, 1, pretrain_shards(odd))
    assert "Set data.streams to a divisor of train.batch_size" in str(err.value)
    assert "e.g. data.streams=2" in str(err.value)
    many = load_config("smoke", ["data.streams=8"])
    with pytest.raises(ConfigError, match="has 4 shards, fewer than data.streams=8"):
        check_stream_split(many, 1, pretrain_shards(many))
    check_stream_split(load_config("smoke", ["data.streams=8", "data.resampled=true"]), 1, 4)
    assert load_config("toy").data.streams == 2 and load_config("paper").data.streams == 64


def test_parts_joined_ahead_in_a_thread_keep_their_order_errors_and_stop_with_the_consumer():
    import threading

    from mugbench.data.streams import _ahead_in_thread

    assert list(_ahead_in_thread(iter(range(50)), depth=3)) == list(range(50))

    def broken():
        yield 1
        raise RuntimeError("shard 7 is unreadable")

    ahead = _ahead_in_thread(broken(), depth=2)
    assert next(ahead) == 1
    with pytest.raises(RuntimeError, match="shard 7"):
        next(ahead)
    endless = _ahead_in_thread((i for i in iter(int, 1)), depth=2)  # never ends by itself
    assert next(endless) == 0
    endless.close()  # what the trainer does at an epoch's last step
    assert not any(t.name == "mugbench-stream-join" for t in threading.enumerate())
