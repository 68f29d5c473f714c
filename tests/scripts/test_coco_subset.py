"""The MLPerf validation subset: the TSV's rows become the cache's samples, in order."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from flux.data.dataset import CaptionedImages
from flux.scripts import coco_subset
from tests.caches import make_cache

IDS = [391895, 7, 522418]  # the TSV's order, not the ids'


def coco(tmp: Path) -> tuple[Path, Path]:
    """A val2014 folder of three photos (not square) and a TSV of its subset."""
    images = tmp / "val2014"
    images.mkdir()
    for n, image_id in enumerate(IDS):
        photo = Image.new("RGB", (96, 64), (80 * n, 0, 0))
        photo.save(images / f"COCO_val2014_{image_id:012d}.jpg")
    tsv = tmp / "val2014_30k.tsv"
    rows = [f"{n}\t{image_id}\tcaption of row {n}" for n, image_id in enumerate(IDS)]
    tsv.write_text("id\timage_id\tcaption\n" + "\n".join(rows) + "\n")
    return tsv, images


def test_row_i_of_the_tsv_is_sample_i_of_the_validation_cache(tmp_path) -> None:
    tsv, images = coco(tmp_path)
    folder = tmp_path / "coco_images"
    coco_subset.main(["--tsv", str(tsv), "--images", str(images), "--output", str(folder)])
    assert sorted(p.name for p in folder.iterdir())[:2] == ["00000.jpg", "00000.txt"]
    cache = make_cache(
        tmp_path / "coco_cache",
        100,  # at most: the folder's 3
        *("--split", "validation", "--validation.enable"),
        *("--validation.dataset", "imagefolder", "--validation.dataset_path", str(folder)),
    )
    cached = CaptionedImages("precomputed", 64, path=cache)
    assert cached.size() == 3
    assert [cached.sample(i).caption for i in range(3)] == [f"caption of row {n}" for n in range(3)]


def test_a_missing_image_is_refused_in_one_line(tmp_path, capsys) -> None:
    tsv, images = coco(tmp_path)
    (images / f"COCO_val2014_{IDS[1]:012d}.jpg").unlink()
    args = ["--tsv", str(tsv), "--images", str(images), "--output", str(tmp_path / "o")]
    with pytest.raises(SystemExit):
        coco_subset.main(args)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "row 1:" in err and "not found" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"image_id\tcaption\n7\tcaf\xe9\n", "is not a UTF-8 TSV"),
        (b"id\timage_id\tcaption\n0\t7\n", "row 0 has no image_id or caption column"),
    ],
)
def test_a_tsv_that_is_not_the_subsets_is_refused_in_one_line(
    tmp_path, capsys, content: bytes, expected: str
) -> None:
    _, images = coco(tmp_path)
    tsv = tmp_path / "bad.tsv"
    tsv.write_bytes(content)
    args = ["--tsv", str(tsv), "--images", str(images), "--output", str(tmp_path / "o")]
    with pytest.raises(SystemExit):
        coco_subset.main(args)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "o").exists()
