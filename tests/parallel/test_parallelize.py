"""parallelize_flux's pieces on one process: activation checkpointing and compile keep
the loss and gradients."""

from __future__ import annotations

import copy

import torch

from flux.model.args import flux_configs
from flux.model.model import FluxModel
from flux.parallel.parallelize import apply_activation_checkpointing, apply_compile
from flux.scripts.benchmark import SavedActivations
from tests.model.helpers import compiled_debug_model, model_inputs


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
    blocks = ["double_blocks.0", "double_blocks.1", "single_blocks.0", "single_blocks.1"]
    # (mode, option, blocks left out at the end, the blocks checkpointed)
    for mode, option, skip, wrapped in (
        ("full", "", 0, blocks),
        ("selective", "2", 0, blocks[::2]),
        ("selective", "op", 0, blocks),
        ("full", "", 1, blocks[:3]),
        ("selective", "op", 3, blocks[:1]),
    ):
        checkpointed = copy.deepcopy(model)
        apply_activation_checkpointing(checkpointed, mode, option, skip_last_blocks=skip)
        names = [
            n.removesuffix("._checkpoint_wrapped_module")
            for n, _ in checkpointed.named_modules()
            if n.endswith("_checkpoint_wrapped_module")
        ]
        assert names == wrapped
        loss, grads = loss_and_grads(checkpointed, inputs)
        assert loss == reference[0]
        for a, b in zip(grads, reference[1]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_op_level_checkpointing_keeps_less_than_none_and_more_than_full() -> None:
    args = flux_configs["flux-debug"]
    torch.manual_seed(0)
    model = FluxModel(args)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    inputs = model_inputs(args)
    saved = {}
    for mode, option in (("none", ""), ("selective", "op"), ("full", "")):
        checkpointed = copy.deepcopy(model)
        if mode != "none":
            apply_activation_checkpointing(checkpointed, mode, option)
        with SavedActivations() as activations:
            loss = checkpointed(**inputs).pow(2).mean()
        saved[mode] = activations.live_bytes()
        loss.backward()
    # op-level keeps the matmul and attention outputs: about half of what no AC keeps
    assert saved["full"] < saved["selective"] < 0.7 * saved["none"], saved


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


def test_compiled_blocks_take_every_bucket_after_one_recompile() -> None:
    """Aspect buckets give micro-batches of many token counts: a block's graph compiled for
    the first is recompiled once, with the sequence length symbolic, and then serves every
    other bucket (torch's cap of 8 recompiles per frame would send 17 buckets to eager)."""
    args = flux_configs["flux-debug"]
    model, graphs = compiled_debug_model()
    compiled_after = []
    for h, w in ((4, 4), (3, 5), (2, 7), (6, 2)):  # latent patches of four buckets
        model(**model_inputs(args, h=h, w=w)).square().mean().backward()
        compiled_after.append(len(graphs))
    first = compiled_after[0]
    assert compiled_after[1] > first  # the second shape: one recompile, symbolic
    assert compiled_after[2:] == [compiled_after[1]] * 2, compiled_after
