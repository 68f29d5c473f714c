"""flux.data.streams (through the dataset and loader that use them): one global order of
samples, split among any number of ranks and workers, mixed across shards, resumed exactly."""

from __future__ import annotations

import itertools
import pickle
from collections import Counter
from pathlib import Path

import pytest

from flux.data.dataloader import CaptionedImageLoader
from flux.data.dataset import CaptionedImages
from flux.data.streams import DataError
from tests.data.tars import keys_of, make_shards, record, write_shard, write_tar


@pytest.mark.parametrize(
    "shards, per_shard",
    [(7, [5, 3, 4, 6, 2, 5, 1]), (2, [9, 4]), (1, [13])],
    ids=["more-shards-than-readers", "fewer-shards", "one-shard"],
)
def test_one_epoch_over_3_ranks_x_2_workers_reads_every_record_once(
    tmp_path: Path, shards: int, per_shard: list[int]
) -> None:
    root = make_shards(tmp_path, shards, per_shard)
    keys = []
    for rank in range(3):
        dataset = CaptionedImages("webdataset", 8, rank, 3, path=root, streams=6)
        for worker in range(2):
            keys += [item.sample.key for item in dataset.items(worker, 2, once=True)]  # type: ignore[union-attr]
    assert sorted(keys) == keys_of(root, shards, per_shard)


def test_consecutive_samples_come_from_different_shards(tmp_path: Path) -> None:
    root = make_shards(tmp_path, 4, 12)
    dataset = CaptionedImages("webdataset", 8, path=root, shards_open=4)
    shards = [s.key.split(":")[0] for s in itertools.islice(iter(dataset), 48)]
    assert Counter(shards) == {f"shard-{s:03d}.tar": 12 for s in range(4)}  # one epoch
    runs = sum(a == b for a, b in zip(shards, shards[1:]))
    assert runs < 20  # stored order: 44 of 47 neighbours share a shard
    assert len(set(shards[:8])) >= 3


def rank_loaders(root: Path, world: int, batch: int, workers: int = 0, streams: int = 4) -> list:
    return [
        CaptionedImageLoader(
            "webdataset",
            8,
            batch,
            rank,
            world,
            seed=3,
            path=root,
            num_workers=workers,
            shards_open=2,
            data_streams=streams,
        )  # fmt: skip
        for rank in range(world)
    ]


def global_steps(loaders: list, steps: int) -> list[list[str]]:
    """The keys of each global step (every rank's batch), sorted."""
    iterators = [iter(loader) for loader in loaders]
    return [sorted(k for it in iterators for k in next(it)["keys"]) for _ in range(steps)]


def resumed(saved: dict[str, bytes], loaders: list) -> list:
    """Load a checkpoint's data entries into loaders as the checkpoint code does: tell each
    which entries exist, give it those it asks for."""
    for loader in loaders:
        loader.expect_saved_ranks(list(saved))
        request = loader.state_dict()
        loader.load_state_dict({key: saved[key] for key in request})
    return loaders


@pytest.fixture
def mixed_shards(tmp_path: Path) -> Path:
    """5 shards of uneven sizes (one gzip-compressed, one with a bad record): 25 samples."""
    make_shards(tmp_path, 4, [7, 3, 5, 4])
    files = record(100) + [("bad.png", b"junk"), ("bad.txt", b"x")] + record(101)
    write_tar(tmp_path / "shard-004.tar", files)
    write_shard(tmp_path / "shard-005.tar.gz", range(200, 204))
    return tmp_path


def test_resume_at_step_k_on_1_2_and_4_ranks_gives_the_unbroken_runs_samples(
    mixed_shards: Path,
) -> None:
    """Global batch 8, 4 streams; the run crosses epochs (25 samples each)."""
    unbroken = global_steps(rank_loaders(mixed_shards, 1, 8), 8)
    assert {k.split(":")[1] for step in unbroken for k in step} == {
        *(f"{i:05d}" for i in range(19)),
        "00100",
        "00101",
        *(f"{i:05d}" for i in range(200, 204)),
    }

    before = rank_loaders(mixed_shards, 2, 4)
    assert global_steps(before, 3) == unbroken[:3]
    saved = {k: v for loader in before for k, v in loader.state_dict().items()}
    assert sorted(saved) == ["dp_rank_0", "dp_rank_1"]
    for world, workers in ((1, 0), (2, 2), (4, 0), (2, 0)):
        after = resumed(saved, rank_loaders(mixed_shards, world, 8 // world, workers))
        assert global_steps(after, 5) == unbroken[3:], (world, workers)

    # A checkpoint of 4 ranks, read by 2 (each rank asks for two entries) and by 1.
    four = rank_loaders(mixed_shards, 4, 2)
    assert global_steps(four, 5) == unbroken[:5]
    saved = {k: v for loader in four for k, v in loader.state_dict().items()}
    two = rank_loaders(mixed_shards, 2, 4)
    two[1].expect_saved_ranks(list(saved))
    assert two[1].state_dict().keys() == {"dp_rank_1", "dp_rank_3"}
    assert global_steps(resumed(saved, two), 3) == unbroken[5:]
    assert global_steps(resumed(saved, rank_loaders(mixed_shards, 1, 8)), 3) == unbroken[5:]


def test_a_resume_on_a_degree_that_does_not_divide_the_streams_is_refused_in_one_line(
    mixed_shards: Path,
) -> None:
    before = rank_loaders(mixed_shards, 2, 4)
    global_steps(before, 1)
    saved = {k: v for loader in before for k, v in loader.state_dict().items()}
    with pytest.raises(DataError, match=r"read as 4 streams .* among 1, 2, 4$"):
        resumed(saved, rank_loaders(mixed_shards, 3, 4, streams=0)[:1])


def test_skips_in_workers_are_counted_in_the_training_process(tmp_path: Path) -> None:
    make_shards(tmp_path, 2, 6)
    files = [f for i in range(20, 26) for f in record(i)] + [("bad.png", b"junk")]
    write_tar(tmp_path / "shard-002.tar", [("bad.png", b"junk"), ("bad.txt", b"x"), *files])
    (tmp_path / "shard-003.tar").write_bytes(b"not a tar at all")
    loader = CaptionedImageLoader("webdataset", 8, 6, path=tmp_path, num_workers=2)
    batches = list(itertools.islice(iter(loader), 6))  # 36 samples: past the first epoch
    assert all(b["images"].shape == (6, 3, 8, 8) for b in batches)
    skipped = loader.dataset.skipped
    assert skipped["undecodable image"] >= 1 and skipped["missing caption"] >= 1
    assert skipped["not a tar"] == 1  # counted (and logged) once, read every epoch
    state = pickle.loads(loader.state_dict()["dp_rank_0"])
    assert state["consumed"] == 36 and state["streams"] == 2


def test_a_data_set_too_small_for_its_readers_is_refused_at_start_in_one_line(
    tmp_path: Path,
) -> None:
    make_shards(tmp_path, 2, [2, 3])  # 4 streams per shard, every 4th record: 4 needed
    for rank in range(2):  # every rank alike
        with pytest.raises(DataError, match="too small for 8 readers: 5 records in 2 shards") as e:
            CaptionedImages("webdataset", 8, rank, 2, path=tmp_path, streams=8)
        assert "\n" not in str(e.value)
    make_shards(tmp_path / "more", 2, [2, 4])
    CaptionedImages("webdataset", 8, 1, 2, path=tmp_path / "more", streams=8)


def test_a_stream_that_finds_nothing_on_the_hub_stops_the_run(hub: Path) -> None:
    """Hub shards are not counted at start: the stream without a record says so."""
    make_shards(hub / "someone" / "tiny", 1, 3)  # 3 records for 4 streams: stream 3 has none
    ranks = [
        CaptionedImages("cc12m-wds", 8, r, 2, path="someone/tiny", streams=4) for r in range(2)
    ]
    assert len(list(itertools.islice(iter(ranks[0]), 10))) == 10
    with pytest.raises(DataError, match="is too small for 4 readers: stream 3 found no record"):
        list(itertools.islice(iter(ranks[1]), 2))  # its streams 1 and 3


def test_a_data_set_without_a_usable_record_is_refused(tmp_path: Path) -> None:
    write_tar(tmp_path / "a.tar", [("x.png", b"junk"), ("x.txt", b"a"), ("y.txt", b"b")])
    with pytest.raises(DataError, match="no usable sample in .*all skipped"):
        next(iter(CaptionedImages("webdataset", 8, path=tmp_path)))
