import itertools

import pytest

from flux.data.dataloader import CaptionedImageLoader


def batches(loader: CaptionedImageLoader, n: int) -> list[list[str]]:
    return [b["keys"] for b in itertools.islice(iter(loader), n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_with_the_same_batches(workers: int) -> None:
    make = lambda: CaptionedImageLoader("shapes", 16, batch_size=3, num_workers=workers)  # noqa: E731
    unbroken = batches(make(), 5)

    first = make()
    it = iter(first)
    head = [next(it)["keys"] for _ in range(2)]
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    assert head + batches(resumed, 3) == unbroken
    flat = [k for b in unbroken for k in b]
    assert len(set(flat)) == len(flat)


def test_batches_hold_images_and_captions() -> None:
    batch = next(iter(CaptionedImageLoader("shapes", 16, batch_size=4)))
    assert batch["images"].shape == (4, 3, 16, 16)
    assert len(batch["captions"]) == 4 and all(batch["captions"])
