import io
import itertools
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from flux.data.dataset import CaptionedImages


def _image_bytes(i: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20 + i % 5, 18), (10 * i % 255, 40, 0)).save(buf, format=fmt)
    return buf.getvalue()


def write_shard(path: Path, keys: range, fmt: str = "PNG", caption: str = "txt") -> Path:
    ext = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[fmt]
    with tarfile.open(path, "w") as tar:
        for i in keys:
            files = {f"{i:05d}.{ext}": _image_bytes(i, fmt)}
            if caption == "txt":
                files[f"{i:05d}.txt"] = f"caption {i}".encode()
            elif caption == "json":
                files[f"{i:05d}.json"] = json.dumps({"caption": f"caption {i}"}).encode()
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def make_shards(root: Path, shards: int, per_shard: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        write_shard(root / f"shard-{s:03d}.tar", range(s * per_shard, (s + 1) * per_shard))
    return root


def captions(dataset: CaptionedImages, n: int) -> list[str]:
    return [s.caption for s in itertools.islice(iter(dataset), n)]


@pytest.mark.parametrize(
    "fmt, caption", [("JPEG", "txt"), ("PNG", "json"), ("WEBP", "txt")], ids=["jpg", "png", "webp"]
)
def test_reads_jpg_png_webp_with_txt_or_json_captions(
    tmp_path: Path, fmt: str, caption: str
) -> None:
    write_shard(tmp_path / "a.tar", range(0, 3), fmt, caption)
    write_shard(tmp_path / "b.tar", range(3, 6), fmt, caption)
    dataset = CaptionedImages("webdataset", 16, path=tmp_path)
    samples = list(itertools.islice(iter(dataset), 6))
    assert sorted(s.caption for s in samples) == [f"caption {i}" for i in range(6)]
    assert all(s.image.shape == (3, 16, 16) for s in samples)


@pytest.mark.parametrize("shards", [4, 1], ids=["shard-per-rank", "fewer-shards-than-ranks"])
def test_ranks_read_disjoint_samples(tmp_path: Path, shards: int) -> None:
    make_shards(tmp_path, shards, 8 // shards)
    seen = [captions(CaptionedImages("webdataset", 8, r, 2, path=tmp_path), 4) for r in range(2)]
    flat = seen[0] + seen[1]
    assert len(set(flat)) == len(flat) == 8


def test_resume_continues_with_the_same_samples(tmp_path: Path) -> None:
    make_shards(tmp_path, 3, 3)
    unbroken = captions(CaptionedImages("webdataset", 8, path=tmp_path, seed=4), 14)
    first = CaptionedImages("webdataset", 8, path=tmp_path, seed=4)
    head = captions(first, 5)
    resumed = CaptionedImages("webdataset", 8, path=tmp_path, seed=4)
    resumed.load_state_dict(first.state_dict())
    assert head + captions(resumed, 9) == unbroken


def test_bad_records_and_a_truncated_shard_are_skipped_and_reported(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        for name, data in {
            "00000.png": b"not an image",
            "00000.txt": b"broken image",
            "00001.png": _image_bytes(1, "PNG"),
            "00001.txt": b"   ",  # empty caption
            "00002.png": _image_bytes(2, "PNG"),
            "00002.txt": b"good",
        }.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    whole = write_shard(tmp_path / "trunc.tar", range(10, 14)).read_bytes()
    (tmp_path / "trunc.tar").write_bytes(whole[: len(whole) // 2 + 100])
    dataset = CaptionedImages("webdataset", 8, path=tmp_path)
    got = captions(dataset, 6)
    assert "good" in got and "broken image" not in got
    report = dataset.skip_report()
    assert "undecodable image" in report and "missing or empty caption" in report
    assert "unreadable shards" in report and "trunc.tar" in report


def test_a_shard_whose_records_differ_is_skipped_at_start_and_named(tmp_path: Path) -> None:
    make_shards(tmp_path, 1, 3)
    with tarfile.open(tmp_path / "odd.tar", "w") as tar:
        for name, data in {
            "00100.png": _image_bytes(1, "PNG"),
            "00101.png": b"x",
            "00101.txt": b"y",
        }.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dataset = CaptionedImages("webdataset", 8, path=tmp_path)
    assert sorted(captions(dataset, 3)) == ["caption 0", "caption 1", "caption 2"]
    assert "odd.tar: record 00101 has ['png', 'txt'] but 00100 has ['png']" in dataset.skip_report()


def test_a_folder_without_shards_names_its_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"no .tar shards under {tmp_path}"):
        CaptionedImages("webdataset", 8, path=tmp_path)


def test_cc12m_without_the_hub_says_what_to_use_instead() -> None:
    with pytest.raises(ConnectionError, match="cannot stream .*use dataset = 'webdataset'"):
        CaptionedImages("cc12m-wds", 8)
