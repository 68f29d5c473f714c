"""The MLPerf FLUX.1 benchmark's validation set as an image folder, in the reference's order.

    python -m flux.scripts.coco_subset --tsv val2014_30k.tsv --images coco2014/val2014 \
        --output data/mlperf/coco_images

The reference publishes its subset of COCO-2014 validation as a TSV (columns image_id and
caption, one row per sample: 29,696). Row i becomes NNNNN.jpg, a link to COCO's
COCO_val2014_<image_id, 12 digits>.jpg, and NNNNN.txt, its caption: the `imagefolder`
source reads them in that order, so `precompute --split validation` stores row i as sample
i, and the mlperf metric evaluates it at timestep (i mod 8)/8. Images are resized when
they are read (short side's centre square, bicubic, to validation.img_size).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from flux.scripts.cli import Parser, fail


class SubsetError(ValueError):
    """A TSV or image folder that cannot make the subset; one line saying what is wrong."""


def read_rows(tsv: Path) -> list[tuple[str, str]]:
    """(image_id, caption) of every row of the subset's TSV, in order."""
    try:
        with open(tsv, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except OSError as e:
        raise SubsetError(f"--tsv {tsv}: {e.strerror}") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise SubsetError(f"--tsv {tsv} is not a UTF-8 TSV ({e}): give val2014_30k.tsv") from None
    if not rows or not {"image_id", "caption"} <= set(rows[0]):
        raise SubsetError(f"--tsv {tsv}: expected tab-separated columns image_id and caption")
    for i, row in enumerate(rows):
        if row["image_id"] is None or row["caption"] is None:  # a row cut short
            raise SubsetError(f"--tsv {tsv}: row {i} has no image_id or caption column")
    return [(row["image_id"], row["caption"]) for row in rows]


def write_subset(rows: list[tuple[str, str]], images: Path, output: Path) -> int:
    """Links and captions for the rows; returns how many were written. Run again, it
    rewrites them (an interrupted run finishes)."""
    width = max(5, len(str(len(rows) - 1)))
    sources = []
    for i, (image_id, _) in enumerate(rows):
        if not image_id.isdigit():
            raise SubsetError(f"row {i}: image_id {image_id!r} is not a number")
        source = images / f"COCO_val2014_{int(image_id):012d}.jpg"
        if not source.is_file():
            raise SubsetError(f"row {i}: {source} not found: give COCO-2014's val2014 folder")
        sources.append(source.resolve())
    output.mkdir(parents=True, exist_ok=True)
    for i, (source, (_, caption)) in enumerate(zip(sources, rows)):
        link = output / f"{i:0{width}d}.jpg"
        link.unlink(missing_ok=True)
        os.symlink(source, link)
        (output / f"{i:0{width}d}.txt").write_text(caption.strip() + "\n", encoding="utf-8")
    return len(rows)


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tsv", type=Path, required=True, help="the reference's val2014_30k.tsv")
    p.add_argument("--images", type=Path, required=True, help="COCO-2014's val2014 folder")
    p.add_argument("--output", type=Path, required=True, help="the image folder to write")
    args: argparse.Namespace = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        count = write_subset(read_rows(args.tsv), args.images, args.output)
    except (SubsetError, OSError) as e:  # OSError: the output cannot be written
        fail(p.prog, e)
    print(f"{args.output}: {count} images and captions, in the TSV's order")


if __name__ == "__main__":
    main()
