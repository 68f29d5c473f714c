"""Ranks of the tensor-parallel checks, run by tests/parallel/test_tensor_parallel.py under
torchrun:

    torchrun --nproc_per_node N -m tests.parallel.tp_worker OUT.json FOLDER LAYOUT [LAYOUT ...]

For each LAYOUT (a name in LAYOUTS, all of N processes, one after the other in this process
group): the debug model parallelized with TP and CP (and FSDP over the other N / TP ranks,
the context-parallel ones included, as torchtitan's fsdp mesh does), against the same model
on one process in this one: loss and gradients on the same batch (each data-parallel
rank takes its share of the samples, each context-parallel rank its share of every
sample's tokens), then checkpoints both ways through torchtitan's
ModelWrapper and DCP; and the average of the weights (flux.ema) each rank keeps of its
shards, its swap into the model and its checkpoints both ways. With `compile`, every
block is compiled (aot_eager: no C++ compiler needed) between TP and FSDP, as
parallelize_flux does, and with `op_ac` checkpointed op by op before that. Last, the frozen
text encoders spread as the trainer spreads them. Rank 0 writes the largest differences of
each layout to OUT.json ({layout: {check: difference}}).
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torchtitan.components.checkpoint import ModelWrapper
from torchtitan.distributed import ParallelDims
from torchtitan.protocols.model_converter import build_model_converters

from flux.checkpoint import plain_layout
from flux.config import DEBUG_CONFIG, PACKAGE_ROOT, parse_config
from flux.ema import EMA, EmaSettings, WeightAverage
from flux.flow import build_text_encoders
from flux.model.args import flux_configs
from flux.model.model import FluxModel
from flux.parallel.context_parallel import apply_context_parallel, shard_sequence
from flux.parallel.frozen import SplitTextEncoder, shard_text_encoder
from flux.parallel.parallelize import (
    apply_activation_checkpointing,
    apply_compile,
    apply_fsdp,
    flux_named_parameters,
)
from flux.parallel.tensor_parallel import apply_tensor_parallel
from flux.sampling import image_ids, text_ids
from flux.train_spec import FluxTrainModel, encoder_settings

BATCH, IMG_TOKENS, TXT_TOKENS = 4, 16, 8


@dataclass(frozen=True)
class Layout:
    processes: int
    tp: int = 1
    cp: int = 1
    compile: bool = False
    op_ac: bool = False  # op-level selective activation checkpointing
    float8: bool = False  # torchtitan's converter, emulated


LAYOUTS = {
    "tp2": Layout(2, tp=2),
    "tp2-fsdp2": Layout(4, tp=2),
    "cp2": Layout(2, cp=2),
    # FSDP over cp too; op-level checkpointing keeps the collectives' outputs
    "cp2-tp2-compiled-op-ac": Layout(4, cp=2, tp=2, compile=True, op_ac=True),
    "tp2-float8": Layout(2, tp=2, float8=True),  # against one process's float8 model
}
SCHNELL = str(PACKAGE_ROOT / "flux" / "train_configs" / "flux_schnell_model.toml")
FLOAT8 = ("--model.converters", "quantize.linear.float8", "--quantize.linear.float8.emulate")


def model_and_batch() -> tuple[FluxModel, dict[str, torch.Tensor]]:
    """The debug model with every weight random (modulations included), and a batch."""
    args = flux_configs["flux-debug"]
    torch.manual_seed(0)
    model = FluxModel(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    batch = {
        "img": torch.randn(BATCH, IMG_TOKENS, args.in_channels, generator=g),
        "img_ids": image_ids(BATCH, 8, 8, "cpu"),  # latent 8 × 8: 16 patches
        "txt": torch.randn(BATCH, TXT_TOKENS, args.context_in_dim, generator=g),
        "txt_ids": text_ids(BATCH, TXT_TOKENS, "cpu"),
        "timesteps": torch.rand(BATCH, generator=g),
        "y": torch.randn(BATCH, args.vec_in_dim, generator=g),
    }
    if args.guidance_embed:
        batch["guidance"] = torch.full((BATCH,), 3.5)
    return model, batch


def converted(model: nn.Module, *args: str) -> nn.Module:
    """The model after torchtitan's converters of the debug config with these arguments,
    and the full-size configs' filter (which layers stay in high precision)."""
    shipped = parse_config(["--job.config_file", SCHNELL]).quantize.linear.float8.filter_fqns
    job = parse_config(["--job.config_file", str(DEBUG_CONFIG), *FLOAT8, *args])
    job.quantize.linear.float8.filter_fqns = shipped
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    build_model_converters(job, dims).convert(model)
    return model


def loss_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).pow(2).mean()


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def named(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters by their FluxModel names (compiled blocks add `_orig_mod.`)."""
    return dict(flux_named_parameters(model))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((full(a[k]) - full(b[k])).abs().max().item() for k in a)


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """|a - b| / |b| over all tensors together."""
    diff = sum((full(a[k]) - full(b[k])).pow(2).sum() for k in b)
    return (diff / sum(full(b[k]).pow(2).sum() for k in b)).sqrt().item()


def float8_error(model, float32, grads, batch) -> float:
    """How far the reference's gradients are from float32's (0 when it is float32)."""
    if model is float32 or not any("Float8" in type(m).__name__ for m in model.modules()):
        return 0.0
    loss_of(float32, batch).backward()
    return relative_difference(grads, {n: p.grad for n, p in named(float32).items()})


def ema_checks(
    parallel: nn.Module,
    reference: nn.Module,
    local: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    folder: Path,
) -> dict[str, float | bool]:
    """The average each rank keeps of its shards against one process's, as the models
    (equal at the start) take the same steps; its swap for validation; checkpoints of it
    from the layout to one process and back."""
    settings = EmaSettings(decay=0.9, update_every=1)
    averages = [WeightAverage(m, settings) for m in (parallel, reference)]
    for step in (1, 2, 3):
        with torch.no_grad():
            for model in (parallel, reference):
                for p in model.parameters():
                    p.mul_(0.9).add_(0.01 * step)  # elementwise: the same on every shard
        for average in averages:
            average.update(step)
    parallel_average = averages[0].state_dict()  # global tensors, as DCP sees them
    reference_average = averages[1].state_dict()
    result: dict[str, float | bool] = {
        "ema": max_difference(
            {n: parallel_average[n] for n in named(parallel)},
            {n: reference_average[n] for n in named(reference)},
        )
    }
    before = {n: full(p).clone() for n, p in named(parallel).items()}
    with averages[0].swapped_in(), averages[1].swapped_in():
        swapped = loss_of(parallel, local).detach()
        dist.all_reduce(swapped)
        expected = loss_of(reference, batch).item()
    result["ema_swapped_loss"] = abs(swapped.item() / dist.get_world_size() - expected) / expected
    result["ema_swap_restored"] = max_difference(named(parallel), before) == 0.0

    dcp.save({EMA: averages[0]}, checkpoint_id=str(folder / "ema-parallel"))
    one = WeightAverage(FluxModel(flux_configs["flux-debug"]), settings)
    dcp.load({EMA: one}, checkpoint_id=str(folder / "ema-parallel"))
    result["ema_saved"] = max_difference(one.average, averages[1].average)
    result["ema_saved_updates"] = one.updates == 3
    averages[1].update(4)
    dcp.save({EMA: averages[1]}, checkpoint_id=str(folder / "ema-single"))
    dcp.load({EMA: averages[0]}, checkpoint_id=str(folder / "ema-single"))
    loaded = averages[0].state_dict()
    result["ema_loaded"] = max_difference(
        {n: loaded[n] for n in named(parallel)}, averages[1].average
    )
    result["ema_loaded_updates"] = averages[0].updates == 4
    return result


def check(layout: Layout, folder: Path) -> dict:
    """Every check of one layout, on this process group; the differences rank 0 reports."""
    tp, cp = layout.tp, layout.cp
    world = dist.get_world_size()
    assert world == layout.processes
    fsdp = world // tp  # data-parallel × context-parallel ranks
    dp = fsdp // cp
    assert cp == 1 or dp == 1, "context parallelism is checked without data parallelism"
    mesh = init_device_mesh("cpu", (fsdp, tp), mesh_dim_names=("fsdp", "tp"))

    def parallelize(model: FluxModel) -> None:
        if tp > 1:
            apply_tensor_parallel(model, mesh["tp"])
        if cp > 1:
            apply_context_parallel(model, mesh["fsdp"])
        if layout.op_ac:
            apply_activation_checkpointing(model, "selective", "op")
        if layout.compile:
            apply_compile(model, "aot_eager")
        if fsdp > 1:
            apply_fsdp(model, mesh["fsdp"], torch.float32, torch.float32, False, True)

    reference, batch = model_and_batch()
    float32 = copy.deepcopy(reference)
    if layout.float8:
        converted(reference)  # the parallel copy is of the float8 model
    parallel = copy.deepcopy(reference)
    parallelize(parallel)

    placements = [p.placements for p in parallel.parameters()]
    ref_loss = loss_of(reference, batch)
    ref_loss.backward()
    share = BATCH // dp
    fsdp_rank = mesh["fsdp"].get_local_rank()
    if cp > 1:
        local, _ = shard_sequence(batch, batch["img"], fsdp_rank, cp)
    else:
        local = {k: v[fsdp_rank * share : (fsdp_rank + 1) * share] for k, v in batch.items()}
    loss = loss_of(parallel, local)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world  # every TP rank holds the loss of its share (samples or tokens)

    ref_grads = {n: p.grad for n, p in named(reference).items()}
    grads = {n: p.grad for n, p in named(parallel).items()}
    local_weight = full(named(parallel)["single_blocks.0.linear1.weight"])
    if tp > 1:
        local_weight = named(parallel)["single_blocks.0.linear1.weight"].to_local()
    result = {
        "loss": abs(mean_loss.item() - ref_loss.item()),
        "loss_value": ref_loss.item(),
        "grads": max_difference(grads, ref_grads),
        "grads_relative": relative_difference(grads, ref_grads),
        "float8_grads_relative": float8_error(reference, float32, ref_grads, batch),
        "linear1_local_rows": local_weight.shape[0],
    }

    # Checkpoints as the trainer's checkpointer makes them: its model state dict is made
    # once, at the start, and holds the live parameters; DCP gets plain copies.
    wrapper = ModelWrapper(parallel)
    with torch.no_grad():
        for model in (parallel, reference):
            for p in model.parameters():
                p.add_(0.01)  # as an optimizer step would, after the wrapper was made
    dcp.save(plain_layout(wrapper.state_dict()), checkpoint_id=str(folder / "parallel"))
    plain = FluxModel(flux_configs["flux-debug"])
    state = plain.state_dict()
    dcp.load(state, checkpoint_id=str(folder / "parallel"))
    result["saved"] = max_difference(state, reference.state_dict())
    # ... and a single process's checkpoint loads into the parallel layout.
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01)
    dcp.save(reference.state_dict(), checkpoint_id=str(folder / "single"))
    state = plain_layout(wrapper.state_dict())
    dcp.load(state, checkpoint_id=str(folder / "single"))
    wrapper.load_state_dict(state)
    parameters = named(parallel)
    result["loaded"] = max_difference(parameters, named(reference))
    result["loaded_layout_kept"] = all(
        p.placements == before for p, before in zip(parameters.values(), placements)
    )
    loss_after = loss_of(parallel, local).detach()
    dist.all_reduce(loss_after)
    ref_after = loss_of(reference, batch).item()
    result["loss_after_load"] = abs(loss_after.item() / world - ref_after) / ref_after

    # A model built on meta and initialized after it is distributed, as torchtitan does,
    # starts from the weights one process would.
    torch.manual_seed(0)
    with torch.device("meta"):
        fresh = FluxTrainModel(flux_configs["flux-debug"])
    parallelize(fresh)
    fresh.to_empty(device="cpu")
    fresh.init_weights()
    torch.manual_seed(0)
    with torch.device("meta"):
        one = FluxModel(flux_configs["flux-debug"])
    one.to_empty(device="cpu")
    one.init_weights()
    result["init"] = max_difference(named(fresh), named(one))

    result |= ema_checks(parallel, reference, local, batch, folder)
    result |= text_encoders(mesh, tp, cp)
    return result


def text_encoders(mesh, tp: int, cp: int) -> dict[str, float]:
    """T5 and CLIP as the trainer spreads them (flux.parallel.frozen): sharded over the fsdp
    mesh, each rank of a TP/CP group encoding its share of the group's captions, against
    the whole encoders on this process. Each data-parallel rank has captions of its own."""
    settings = encoder_settings(parse_config(["--job.config_file", str(DEBUG_CONFIG)]))
    whole = build_text_encoders(settings, torch.device("cpu"))
    spread = build_text_encoders(settings, torch.device("cpu"))
    groups = [m for m, size in ((mesh["fsdp"], cp), (mesh["tp"], tp)) if size > 1]
    dp_rank = mesh["fsdp"].get_local_rank() // cp
    captions = [f"{n} red circles on a white background, rank {dp_rank}" for n in range(5)]
    differences, fractions = [], []
    for reference, encoder in zip(whole, spread):
        if mesh["fsdp"].size() > 1:
            shard_text_encoder(encoder, mesh["fsdp"])
        sharded = [p for p in encoder.parameters() if isinstance(p, DTensor)]
        fractions.append(
            sum(p.to_local().numel() for p in sharded) / sum(p.numel() for p in sharded)
            if sharded
            else 1.0
        )
        got = SplitTextEncoder(encoder, groups)(captions)
        differences.append((got - reference(captions)).abs().max())
    worst = torch.stack(differences).max()
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return {"text_encoders": worst.item(), "text_encoder_shard": max(fractions)}


def main() -> None:
    out, folder, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    dist.init_process_group("gloo")
    results = {name: check(LAYOUTS[name], folder / name) for name in names}
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
