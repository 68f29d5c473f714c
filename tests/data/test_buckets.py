"""Aspect-ratio buckets: the sizes, which bucket an image goes to, its crop, one bucket per
micro-batch in the data's proportions, and exact resume on 1, 2 and 4 ranks."""

from __future__ import annotations

import io
import itertools
import math
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from flux.data.buckets import Buckets, TooSmall, aspect_sizes, tokens
from flux.data.dataloader import CaptionedImageLoader, bucket_of
from flux.data.dataset import CaptionedImages
from flux.data.skips import IMAGE_TOO_SMALL
from flux.data.transforms import load_image
from tests.data.images import MIX, mixed_folder, mixed_shards


@pytest.mark.parametrize("img_size", [256, 512, 1024])
def test_generated_buckets_hold_about_img_size_squared_pixels_from_1_4_to_4_1(img_size) -> None:
    sizes = aspect_sizes(img_size)
    assert len(sizes) == 17 and (img_size, img_size) in sizes
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in sizes)
    assert all(abs(w * h / img_size**2 - 1) < 0.07 for w, h in sizes), sizes
    ratios = [w / h for w, h in sizes]
    assert ratios == sorted(ratios) and len(set(ratios)) == 17
    assert min(ratios) == pytest.approx(1 / 4, rel=0.05) and max(ratios) == pytest.approx(
        4, rel=0.05
    )
    assert sorted((h, w) for w, h in sizes) == sorted(sizes)  # the tall ones are the wide turned


def test_generated_buckets_can_be_picked_for_context_parallelism() -> None:
    for cp in (2, 4):
        sizes = aspect_sizes(256, cp)
        assert all(tokens(s) % cp == 0 for s in sizes) and len(sizes) == 17, sizes
        assert all(abs(w * h / 256**2 - 1) < 0.1 for w, h in sizes), sizes


def test_an_image_goes_to_the_bucket_nearest_its_aspect_ratio() -> None:
    buckets = Buckets.aspect(256)
    assert buckets.choose(1000, 1000) == (256, 256)
    assert buckets.choose(1920, 1080) == (336, 192)  # 16:9 -> 1.75
    assert buckets.choose(1080, 1920) == (192, 336)
    assert buckets.choose(640, 480) == (304, 208)  # 4:3 -> 1.46 (1.13 is farther on a log scale)
    assert buckets.choose(10_000, 100) == (512, 128)  # beyond 4:1: the widest
    listed = Buckets.aspect(64, [(64, 64), (96, 48)])
    assert listed.sizes == ((64, 64), (96, 48))
    assert listed.choose(100, 40) == (96, 48) and listed.choose(40, 100) == (64, 64)


def stripes(width: int, height: int, band: int) -> Image.Image:
    """Blue, with red bands `band` pixels wide at the left and right edges."""
    image = Image.new("RGB", (width, height), (0, 0, 255))
    for x0 in (0, width - band):
        image.paste((255, 0, 0), (x0, 0, x0 + band, height))
    return image


def test_an_image_is_resized_to_cover_its_bucket_and_centre_cropped() -> None:
    buckets = Buckets.aspect(64, [(96, 48)], max_upscale=4)
    # 300 x 100 covers 96 x 48 at scale 0.48: a crop 200 wide, 50 cut from each side
    inside = buckets.fit(stripes(300, 100, band=45))
    assert inside.size == (96, 48)
    assert max(p[0] for p in inside.getdata()) < 40  # the bands were cut off
    edges = buckets.fit(stripes(300, 100, band=60))
    assert edges.getpixel((0, 24))[0] > 200 and edges.getpixel((95, 24))[0] > 200
    assert edges.getpixel((48, 24)) == (0, 0, 255)
    assert buckets.kept(300, 100) == pytest.approx(200 / 300)
    assert Buckets.square(48).kept(300, 100) == pytest.approx(1 / 3)


def test_no_image_is_enlarged_more_than_max_upscale() -> None:
    image = Image.new("RGB", (100, 60))
    with pytest.raises(TooSmall, match="enlarged 1.60x .* training.max_upscale = 1.0"):
        Buckets.aspect(64, [(160, 96)]).fit(image)
    assert Buckets.aspect(64, [(160, 96)], max_upscale=3).fit(image).size == (160, 96)
    assert Buckets.aspect(64, [(96, 48)]).fit(image).size == (96, 48)  # a reduction


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_its_bucket_allows() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (2048, 1024), (90, 10, 10)).save(buf, "JPEG")
    decoded = load_image(buf.getvalue(), Buckets.aspect(256))  # bucket 368 x 176 (2.09:1)
    assert decoded.size == (512, 256)  # 1/4 in the decoder; 1/8 would be below 368 x 176
    assert Buckets.aspect(256).fit(decoded).size == (368, 176)


def test_each_micro_batch_holds_one_bucket_in_the_data_s_proportions(tmp_path) -> None:
    """24 images, 8/4/6/4/2 of five shapes, batch 2: the first epoch's 12 batches hold one
    bucket each, 4/2/3/2/1 of them; another seed draws another order of them."""
    folder = mixed_folder(tmp_path / "images")
    buckets = Buckets.aspect(48, max_upscale=4)
    expected = Counter({buckets.choose(*size): count // 2 for size, count in MIX.items()})
    orders = []
    for seed in (0, 1):
        loader = CaptionedImageLoader("imagefolder", 48, 2, seed=seed, path=folder, buckets=buckets)
        epoch = list(itertools.islice(loader, 12))
        shapes = [{tuple(image.shape) for image in batch["images"]} for batch in epoch]
        assert all(len(s) == 1 for s in shapes), shapes
        counts = Counter(bucket_of_images(batch) for batch in epoch)
        assert counts == expected, counts
        keys = [k for batch in epoch for k in batch["keys"]]
        assert len(set(keys)) == 24  # the whole epoch, once
        orders.append([bucket_of_images(batch) for batch in epoch])
    assert orders[0] != orders[1]


def bucket_of_images(batch) -> tuple[int, int]:
    return batch["images"].shape[3], batch["images"].shape[2]


def test_too_small_images_are_skipped_and_counted(tmp_path) -> None:
    folder = mixed_folder(tmp_path / "images", {(64, 64): 3, (16, 16): 2})
    loader = CaptionedImageLoader(
        "imagefolder", 48, 3, path=folder, buckets=Buckets.aspect(48, max_upscale=1.0)
    )
    batch = next(iter(loader))
    assert bucket_of_images(batch) == (48, 48)
    assert loader.dataset.skipped[IMAGE_TOO_SMALL] == 2


def global_order(root: Path, streams: int, buckets: Buckets, count: int) -> list[str]:
    """The first `count` samples of the global order (one rank reads every stream)."""
    reader = CaptionedImages("webdataset", 48, path=root, streams=streams, buckets=buckets)
    return [s.key for s in itertools.islice(reader, count)]


def run(loaders: list[CaptionedImageLoader], steps: int) -> list[list[list[str]]]:
    """steps × rank × the batch's keys."""
    its = [iter(loader) for loader in loaders]
    return [[next(it)["keys"] for it in its] for _ in range(steps)]


def ranks(root: Path, world: int, buckets: Buckets) -> list[CaptionedImageLoader]:
    return [
        CaptionedImageLoader(
            "webdataset",
            48,
            2,
            rank,
            world,
            path=root,
            data_streams=4,
            shards_open=2,
            buckets=buckets,
        )  # fmt: skip
        for rank in range(world)
    ]


def resumed(
    states: dict[str, bytes], root: Path, world: int, buckets: Buckets
) -> list[CaptionedImageLoader]:
    loaders = ranks(root, world, buckets)
    for loader in loaders:
        loader.expect_saved_ranks(list(states))
        loader.load_state_dict({key: states[key] for key in loader.state_dict()})
    return loaders


def taken_keys(
    loaders: list[CaptionedImageLoader], order: list[str], streams: int = 4
) -> list[str]:
    """The samples the ranks have taken: of each stream k, its first n (global samples
    k, k + S, ...), n the count the rank that reads it now keeps."""
    return [
        order[k + m * streams]
        for loader in loaders
        for k, n in loader.dataset.taken.items()
        for m in range(n)
    ]


def pending_keys(loaders: list[CaptionedImageLoader]) -> list[str]:
    return [
        loader.dataset.reread(ref).key for loader in loaders for _, ref in loader.dataset.pending
    ]


@pytest.mark.parametrize("before", [1, 2, 4])
def test_aspect_buckets_resume_on_1_2_and_4_ranks_with_the_unbroken_run_s_samples(
    tmp_path, before
) -> None:
    """Saved on `before` ranks mid-epoch, with samples waiting in partly filled buckets.
    On as many ranks, the resumed run's batches are the unbroken run's. On any number, every
    sample taken is trained on or waits, once: the samples trained and waiting are exactly
    those the ranks took of the global order, nothing lost, nothing twice."""
    root = mixed_shards(tmp_path / "shards")
    buckets = Buckets.aspect(48, max_upscale=4)
    unbroken = run(ranks(root, before, buckets), 6)
    first = ranks(root, before, buckets)
    head = run(first, 3)
    assert head == unbroken[:3]
    assert any(loader.dataset.pending for loader in first)  # the state holds waiting samples
    states = {k: v for loader in first for k, v in loader.state_dict().items()}
    order = global_order(root, 4, buckets, 124)  # one epoch: no key twice
    for world in (1, 2, 4):
        again = resumed(states, root, world, buckets)
        tail = run(again, 3 if world == before else 2)
        if world == before:
            assert head + tail == unbroken, world
        trained = [k for step in head + tail for batch in step for k in batch]
        assert len(set(trained)) == len(trained), world
        assert sorted(trained + pending_keys(again)) == sorted(taken_keys(again, order)), world


def test_waiting_samples_resume_at_another_image_size(tmp_path) -> None:
    """A run that continues at a larger img_size reads its waiting samples again, at the
    new size's buckets."""
    root = mixed_shards(tmp_path / "shards")
    small, large = Buckets.aspect(48, max_upscale=4), Buckets.aspect(96, max_upscale=8)
    first = ranks(root, 1, small)
    run(first, 3)
    waiting = pending_keys(first)
    assert waiting
    again = resumed(first[0].state_dict(), root, 1, large)
    batches = list(itertools.islice(iter(again[0]), 4))
    assert all(bucket_of_images(b) in large.sizes for b in batches)
    seen = [k for b in batches for k in b["keys"]]
    assert set(waiting) <= set(seen + pending_keys(again))


def test_bucket_of_a_cached_sample_is_its_latents_size_times_8() -> None:
    import torch

    from flux.data.precomputed import CachedSample

    sample = CachedSample(torch.zeros(2, 4), torch.zeros(3), torch.zeros(8, 6, 10), "c", "k")
    assert bucket_of(sample) == (80, 48)
    assert math.prod(bucket_of(sample)) == 80 * 48
