"""flux.data.shards: tar shards read record by record, locally and through the hub's file
system; every kind of bad record and shard costs itself only."""

from __future__ import annotations

import gzip
import io
import itertools
import logging
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from flux.data.dataset import CaptionedImages
from flux.data.shards import Shard, read_records
from tests.data.tars import image_bytes, make_shards, record, write_shard, write_tar


def one_pass(root: Path | str, source: str = "webdataset", **kwargs) -> CaptionedImages:
    """A reader of root that has read one epoch; its samples in .samples."""
    dataset = CaptionedImages(source, 16, path=root, **kwargs)
    dataset.samples = list(dataset.one_pass())  # type: ignore[attr-defined]
    return dataset


def jpeg(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 100, 0)).save(buf, "JPEG")
    return buf.getvalue()


def dirty_records() -> list[tuple[str, bytes]]:
    """12 good records (png/jpg/jpeg/webp with .txt, .caption or .json captions), a 2000x20
    strip (good), and one record of each kind of bad one between them."""
    exts, captions = ("png", "jpg", "jpeg", "webp"), ("txt", "caption", "json")
    good = [record(i, exts[i % 4], captions[i % 3]) for i in range(12)]
    png = image_bytes(1)
    bad = [
        [("bad01.jpg", jpeg((64, 64))[:300]), ("bad01.txt", b"cut off")],
        [("bad02.jpg", b"this is not an image"), ("bad02.txt", b"not an image")],
        [("bad03.png", png)],
        [("bad04.png", png), ("bad04.txt", b"  \n")],
        [("bad05.png", png), ("bad05.txt", "caf\xe9".encode("latin-1"))],
        [("bad06.gif", b"GIF89a..."), ("bad06.txt", b"a gif")],
        [("bad07.txt", b"a caption without its image")],
        [("bad08.png", png), ("bad08.json", b'{"url": "http://x"}')],
        [("strip.jpg", jpeg((2000, 20))), ("strip.txt", b"a strip")],
    ]
    mixed = [r for pair in zip(good, bad + [[]] * 3) for r in pair]
    return [f for r in mixed for f in r]


DIRTY_SKIPS = {
    "undecodable image": 2,
    "missing caption": 2,
    "empty caption": 1,
    "caption not UTF-8": 1,
    "unknown file kind": 1,
    "missing image": 1,
}


def test_each_kind_of_bad_record_costs_only_itself(tmp_path: Path) -> None:
    write_tar(tmp_path / "dirty.tar", dirty_records())
    dataset = one_pass(tmp_path)
    captions = sorted(s.caption for s in dataset.samples)
    assert captions == sorted([f"caption {i}" for i in range(12)] + ["a strip"])
    assert all(s.image.shape == (3, 16, 16) for s in dataset.samples)
    assert dict(dataset.skipped) == DIRTY_SKIPS
    report = dataset.skip_report()
    assert "dirty.tar:bad08: missing caption: .json has no caption or text field" in report
    assert "dirty.tar:bad05: caption not UTF-8" in str(list(dataset.skip_examples))


def test_a_folder_of_a_dirty_shard_and_its_cut_copy_gives_every_good_sample(
    tmp_path: Path,
) -> None:
    """The folder of the issue: it stopped the run at start-up."""
    whole = write_tar(tmp_path / "a.tar", dirty_records()).read_bytes()
    (tmp_path / "b.tar").write_bytes(whole[: len(whole) // 2])
    dataset = one_pass(tmp_path)
    keys = [s.key for s in dataset.samples]
    before_cut = [k.split(":")[1] for k in keys if k.startswith("b.tar")]
    assert len(keys) == 13 + len(before_cut) and len(before_cut) >= 4
    assert dataset.skipped["truncated shard"] == 1


def members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


@pytest.mark.parametrize(
    "where",
    ["image data", "caption header", "between a record's files", "record boundary", "padding"],
)
def test_a_truncated_shard_yields_exactly_the_records_before_its_cut(
    tmp_path: Path, where: str
) -> None:
    path = write_shard(tmp_path / "cut.tar", range(6))
    m = members(path)  # record i: m[2i] image, m[2i + 1] caption
    cut = {
        "image data": m[6].offset_data + 10,
        "caption header": m[7].offset + 100,
        "between a record's files": m[7].offset,
        "record boundary": m[8].offset,
        "padding": m[7].offset_data + m[7].size + 1,
    }[where]
    complete = [i for i in range(6) if m[2 * i + 1].offset_data + m[2 * i + 1].size <= cut]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cut.tar").write_bytes(path.read_bytes()[:cut])
    dataset = one_pass(tmp_path / "data")
    assert sorted(s.caption for s in dataset.samples) == [f"caption {i}" for i in complete]
    assert dict(dataset.skipped) == {"truncated shard": 1}


def test_a_cut_gzip_shard_yields_the_records_before_the_cut(tmp_path: Path) -> None:
    whole = write_shard(tmp_path / "whole.tar", range(40)).read_bytes()
    (tmp_path / "data").mkdir()
    packed = gzip.compress(whole)
    (tmp_path / "data" / "cut.tar.gz").write_bytes(packed[: len(packed) * 2 // 3])
    dataset = one_pass(tmp_path / "data", shards_open=1)
    captions = [s.caption for s in dataset.samples]
    assert 0 < len(captions) < 40 and captions == [f"caption {i}" for i in range(len(captions))]
    assert dict(dataset.skipped) == {"truncated shard": 1}


def test_a_file_that_is_not_a_tar_is_skipped_with_one_line(tmp_path: Path, caplog) -> None:
    from torchtitan.tools.logging import logger

    make_shards(tmp_path, 1, 3)
    (tmp_path / "junk.tar").write_text("<html>rate limited</html>")
    (tmp_path / "empty.tar.gz").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        dataset = one_pass(tmp_path)
    assert sorted(s.caption for s in dataset.samples) == ["caption 0", "caption 1", "caption 2"]
    assert dict(dataset.skipped) == {"not a tar": 2}
    lines = [r.getMessage() for r in caplog.records]
    assert sum("junk.tar: not a tar" in line for line in lines) == 1
    assert sum("empty.tar.gz: not a tar" in line for line in lines) == 1


def test_tar_and_tar_gz_shards_are_read_side_by_side(tmp_path: Path) -> None:
    write_shard(tmp_path / "a.tar", range(0, 3), "jpg")
    (tmp_path / "sub").mkdir()
    write_shard(tmp_path / "sub" / "b.tar.gz", range(3, 6), "webp", "json")
    dataset = one_pass(tmp_path)
    assert sorted(s.key for s in dataset.samples) == [
        *(f"a.tar:{i:05d}" for i in range(3)),
        *(f"sub/b.tar.gz:{i:05d}" for i in range(3, 6)),
    ]


@pytest.mark.parametrize("name", ["s.tar", "s.tar.gz"])
def test_reading_from_a_records_end_gives_the_rest(tmp_path: Path, name: str) -> None:
    path = write_shard(tmp_path / name, range(7))
    shard = Shard(str(path), name, path.stat().st_size)
    records = list(read_records(shard))
    assert [r.key for r in records] == [f"{i:05d}" for i in range(7)]
    rest = list(read_records(shard, records[2].index + 1, records[2].end))
    assert [(r.key, r.files) for r in rest] == [(r.key, r.files) for r in records[3:]]
    odd = list(read_records(shard, 2, records[1].end, lambda i: i % 2 == 1))
    assert [r.key for r in odd] == ["00003", "00005"]


def test_hub_shards_are_read_and_resumed_by_the_same_reader(hub: Path) -> None:
    data = hub / "someone" / "cc-like"
    make_shards(data, 2, 4)
    write_shard(data / "shard-002.tar.gz", range(8, 12))
    unbroken = one_pass("someone/cc-like", "cc12m-wds", shards_open=2)
    keys = [s.key for s in unbroken.samples]
    expected = [f"shard-{i // 4:03d}.tar{'.gz' if i >= 8 else ''}:{i:05d}" for i in range(12)]
    assert sorted(keys) == expected

    first = CaptionedImages("cc12m-wds", 16, path="hf://datasets/someone/cc-like", shards_open=2)
    head = [s.key for s in itertools.islice(first.one_pass(), 5)]
    resumed = CaptionedImages("cc12m-wds", 16, path="someone/cc-like", shards_open=2)
    resumed.load_state_dict(first.state_dict())
    assert head + [s.key for s in resumed.one_pass()] == keys


def test_cc12m_without_the_hub_says_what_to_use_instead() -> None:
    with pytest.raises(ConnectionError, match="cannot stream .*use dataset = 'webdataset'"):
        CaptionedImages("cc12m-wds", 8)


def test_a_folder_without_shards_names_its_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"no .tar shards under {tmp_path}"):
        CaptionedImages("webdataset", 8, path=tmp_path)
