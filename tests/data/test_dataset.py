import itertools
from pathlib import Path

import pytest
from PIL import Image

from flux.data.dataset import CaptionedImages


def take(dataset: CaptionedImages, n: int) -> list[str]:
    return [sample.key for sample in itertools.islice(iter(dataset), n)]


def make_folder(root: Path, n: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (24 + i, 20), (10 * i, 0, 0)).save(root / f"img{i:03d}.png")
        (root / f"img{i:03d}.txt").write_text(f"caption {i}\n")
    return root


@pytest.mark.parametrize("source", ["shapes", "imagefolder"])
def test_ranks_read_disjoint_samples(source: str, tmp_path: Path) -> None:
    path = make_folder(tmp_path / "data", 12) if source == "imagefolder" else None
    ranks = [CaptionedImages(source, 16, rank=r, world_size=3, path=path) for r in range(3)]
    seen = [take(d, 4) for d in ranks]
    flat = [i for s in seen for i in s]
    assert len(set(flat)) == len(flat) == 12


@pytest.mark.parametrize("source", ["shapes", "imagefolder"])
def test_resume_continues_with_the_same_samples(source: str, tmp_path: Path) -> None:
    path = make_folder(tmp_path / "data", 5) if source == "imagefolder" else None
    unbroken = take(CaptionedImages(source, 16, rank=1, world_size=2, path=path), 9)

    first = CaptionedImages(source, 16, rank=1, world_size=2, path=path)
    head = take(first, 4)
    resumed = CaptionedImages(source, 16, rank=1, world_size=2, path=path)
    resumed.load_state_dict(first.state_dict())
    assert head + take(resumed, 5) == unbroken


def test_imagefolder_epochs_cover_every_file_in_a_new_order(tmp_path: Path) -> None:
    path = make_folder(tmp_path / "data", 6)
    indices = take(CaptionedImages("imagefolder", 16, path=path), 12)
    assert (
        sorted(indices[:6])
        == sorted(indices[6:])
        == [str(path / f"img{i:03d}.png") for i in range(6)]
    )
    assert indices[:6] != indices[6:]


def test_bad_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    path = make_folder(tmp_path / "data", 4)
    (path / "img000.png").write_bytes(b"not a png")  # undecodable
    good = (path / "img001.png").read_bytes()
    (path / "img001.png").write_bytes(good[: len(good) // 2])  # truncated
    (path / "img002.txt").write_text("   \n")  # empty caption
    (path / "img004.png").write_bytes(good)  # no caption at all
    dataset = CaptionedImages("imagefolder", 16, path=path)
    samples = list(itertools.islice(iter(dataset), 3))
    assert {s.caption for s in samples} == {"caption 3"}
    reasons = " ".join(dataset.skip_examples)
    for expected in ("img000.png: undecodable", "img001.png: undecodable", "empty caption"):
        assert expected in reasons
    assert "no readable caption img004.txt" in reasons
    assert dataset.skipped["undecodable image"] >= 2
    report = dataset.skip_report()
    assert "undecodable image" in report and "img000.png" in report


def test_a_folder_with_no_usable_sample_names_its_path(tmp_path: Path) -> None:
    path = tmp_path / "broken"
    path.mkdir()
    (path / "a.png").write_bytes(b"junk")
    (path / "a.txt").write_text("a caption")
    with pytest.raises(ValueError, match=f"no usable sample in {path}"):
        take(CaptionedImages("imagefolder", 16, path=path), 1)


def test_missing_folder_and_unknown_source_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        CaptionedImages("imagefolder", 16, path=tmp_path / "absent")
    with pytest.raises(ValueError, match="unknown dataset 'laion'"):
        CaptionedImages("laion", 16)


def test_resume_on_another_world_size_repeats_nothing() -> None:
    before = [CaptionedImages("shapes", 8, rank=r, world_size=2) for r in range(2)]
    seen = {int(i) for d in before for i in take(d, 3)}
    after = [CaptionedImages("shapes", 8, rank=r, world_size=3) for r in range(3)]
    for d in after:
        d.load_state_dict(before[0].state_dict())
    later = [int(i) for d in after for i in take(d, 2)]
    assert not seen & set(later) and len(set(later)) == 6
    assert min(later) == max(seen) + 1


def test_skips_are_logged_periodically_with_where(tmp_path: Path, caplog) -> None:
    import logging

    from torchtitan.tools.logging import logger

    path = make_folder(tmp_path / "data", 3)
    (path / "img001.png").write_bytes(b"junk")
    dataset = CaptionedImages("imagefolder", 16, path=path, report_every_s=0.0)
    with caplog.at_level(logging.WARNING, logger=logger.name):
        take(dataset, 6)
    reports = [r.getMessage() for r in caplog.records if "skipped samples" in r.getMessage()]
    assert reports and "img001.png" in reports[0] and "undecodable image" in reports[0]
    # Only when something new was skipped: one report per skip here, not one per sample.
    assert 1 <= len(reports) <= dataset.skipped["undecodable image"] < 6


def test_a_state_saved_before_per_stream_counts_resumes_as_it_did(tmp_path: Path) -> None:
    """A checkpoint of an earlier flux holds no per-stream counts nor waiting samples: its
    ranks had taken equal numbers of samples, each stream in turn; on 2 ranks after 3, and
    on 3 after 3, it continues with the samples a current state gives."""
    before = [CaptionedImages("shapes", 8, rank=r, world_size=3, streams=6) for r in range(3)]
    for d in before:
        take(d, 5)  # 5 samples of each rank's two streams: 3 of one, 2 of the other
    states = [d.state_dict() for d in before]
    old = [{k: v for k, v in s.items() if k not in ("taken", "pending")} for s in states]
    from flux.data.dataset import merge_states

    for world in (2, 3):
        now, then = [], []
        for r in range(world):
            current = CaptionedImages("shapes", 8, rank=r, world_size=world, streams=6)
            current.load_state_dict(merge_states(states))
            earlier = CaptionedImages("shapes", 8, rank=r, world_size=world, streams=6)
            earlier.load_state_dict(merge_states(old))
            assert earlier.taken == current.taken, (world, r)
            now.append(take(current, 4))
            then.append(take(earlier, 4))
        assert now == then, world
