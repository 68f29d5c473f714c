"""The pieces of the training step that need no processes: random streams, AC."""

from __future__ import annotations

import copy

import torch

from flux.data.dataloader import CaptionedImageLoader
from flux.model.args import flux_configs
from flux.model.model import FluxModel
from flux.parallelize import apply_activation_checkpointing, apply_compile
from flux.sampling import Streams
from tests.model.helpers import model_inputs


def first_keys(rank: int, world_size: int) -> list[str]:
    loader = CaptionedImageLoader("shapes", 32, 4, dp_rank=rank, dp_world_size=world_size)
    return next(iter(loader))["keys"]


def noise(streams: Streams) -> torch.Tensor:
    return streams.randn((4, 2, 2), torch.device("cpu"))


def test_data_parallel_ranks_draw_different_noise_and_timesteps() -> None:
    rank0 = Streams.of(0, 1, first_keys(0, 2), torch.device("cpu"))
    rank1 = Streams.of(0, 1, first_keys(1, 2), torch.device("cpu"))
    assert not torch.equal(noise(rank0), noise(rank1))
    t0 = [torch.rand(1, generator=g).item() for g in rank0.cpu]
    t1 = [torch.rand(1, generator=g).item() for g in rank1.cpu]
    assert set(t0).isdisjoint(t1)


def test_streams_are_per_sample_and_per_step() -> None:
    keys = ["0", "1", "2", "3"]
    full = noise(Streams.of(0, 5, keys, torch.device("cpu")))
    halves = [noise(Streams.of(0, 5, k, torch.device("cpu"))) for k in (keys[:2], keys[2:])]
    assert torch.equal(full, torch.cat(halves))  # micro-batches draw what one batch would
    assert not torch.equal(full, noise(Streams.of(0, 6, keys, torch.device("cpu"))))
    assert not torch.equal(full, noise(Streams.of(1, 5, keys, torch.device("cpu"))))


def loss_and_grads(model: torch.nn.Module, inputs: dict) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    loss = model(**inputs).pow(2).mean()
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def test_activation_checkpointing_full_and_selective_keep_loss_and_gradients() -> None:
    args = flux_configs["flux-debug"]
    torch.manual_seed(0)
    model = FluxModel(args)
    model.init_weights()
    for p in model.parameters():  # init_weights zeroes the output: give it signal
        p.data.add_(torch.randn_like(p) * 0.02)
    inputs = model_inputs(args)
    reference = loss_and_grads(model, inputs)
    for mode, option, wrapped in (("full", "", 4), ("selective", "2", 2)):
        checkpointed = copy.deepcopy(model)
        apply_activation_checkpointing(checkpointed, mode, option)
        names = [
            n for n, _ in checkpointed.named_modules() if n.endswith("_checkpoint_wrapped_module")
        ]
        assert len(names) == wrapped
        loss, grads = loss_and_grads(checkpointed, inputs)
        assert loss == reference[0]
        for a, b in zip(grads, reference[1]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_every_block_compiles_without_graph_breaks_and_keeps_its_output() -> None:
    args = flux_configs["flux-debug"]
    torch.manual_seed(0)
    model = FluxModel(args)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    inputs = model_inputs(args)
    with torch.no_grad():
        reference = model(**inputs)
        apply_activation_checkpointing(model, "full", "")
        apply_compile(model, backend="eager")  # dynamo's full-graph capture, no codegen
        torch.testing.assert_close(model(**inputs), reference)
    compiled = [m for m in model.modules() if type(m).__name__ == "OptimizedModule"]
    assert len(compiled) == args.depth + args.depth_single_blocks
