import itertools
import multiprocessing
import os
import signal
import time

import pytest
import torch

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


def test_batches_are_uint8_images_in_pinned_memory_when_asked() -> None:
    batch = next(iter(CaptionedImageLoader("shapes", 16, batch_size=2)))
    assert batch["images"].dtype == torch.uint8 and not batch["images"].is_pinned()
    if torch.cuda.is_available():
        loader = CaptionedImageLoader("shapes", 16, batch_size=2, pin_memory=True)
        assert next(iter(loader))["images"].is_pinned()


def test_a_dcp_checkpoint_of_two_ranks_resumes_on_one_and_on_four(tmp_path) -> None:
    """What torchtitan's checkpoint does with the loaders' states, in one process: DCP saves
    each rank's entry; a load asks DCP for the entries expect_saved_ranks chose."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    def loaders(world: int) -> list[CaptionedImageLoader]:
        return [
            CaptionedImageLoader("shapes", 16, 8 // world, rank, world, data_streams=4)
            for rank in range(world)
        ]

    def steps(ranks: list[CaptionedImageLoader], n: int) -> list[list[str]]:
        its = [iter(r) for r in ranks]
        return [sorted(k for it in its for k in next(it)["keys"]) for _ in range(n)]

    unbroken = steps(loaders(1), 5)
    two = loaders(2)
    assert steps(two, 2) == unbroken[:2]
    entries = {k: v for loader in two for k, v in loader.state_dict().items()}
    dcp.save({"dataloader": entries}, checkpoint_id=tmp_path, no_dist=True)
    metadata = FileSystemReader(str(tmp_path)).read_metadata()
    saved = [k.split(".", 1)[1] for k in metadata.state_dict_metadata if k.startswith("dataloader")]
    for world in (1, 4):
        ranks = loaders(world)
        for loader in ranks:
            loader.expect_saved_ranks(saved)
            dcp.load({"dataloader": loader}, checkpoint_id=tmp_path, no_dist=True)
        assert steps(ranks, 3) == unbroken[2:], world


def test_workers_outlive_the_stop_signals_sent_to_every_process_of_a_job() -> None:
    """SLURM signals every process; the training process stops after its step, with data."""
    before = set(multiprocessing.active_children())
    it = iter(CaptionedImageLoader("shapes", 16, batch_size=2, num_workers=2))
    first = next(it)
    workers = [p for p in multiprocessing.active_children() if p not in before]
    assert len(workers) == 2
    for worker in workers:
        os.kill(worker.pid, signal.SIGUSR1)
        os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert all(worker.is_alive() for worker in workers)
    assert next(it)["keys"] != first["keys"]
