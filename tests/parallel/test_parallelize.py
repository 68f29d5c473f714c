"""parallelize_flux's pieces on one process: activation checkpointing and compile keep
the loss and gradients."""

from __future__ import annotations

import copy

import torch

from flux.model.args import flux_configs
from flux.model.model import FluxModel
from flux.parallel.parallelize import apply_activation_checkpointing, apply_compile
from tests.model.helpers import model_inputs


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
