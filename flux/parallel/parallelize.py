"""parallelize_flux: tensor and context parallelism, activation checkpointing,
torch.compile and FSDP/HSDP for FluxModel.

Applied from outside the model, in one order: tensor parallelism (tensor_parallel.py),
context parallelism (context_parallel.py), activation checkpointing, compile, then
FSDP/HSDP (over dp_shard × cp, as torchtitan's fsdp mesh is). The plan is data: every double- and
single-stream block is one FSDP unit (and one checkpointing/compile unit); the embedders
and the final layer go with the root.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from torchtitan.config import TORCH_DTYPE_MAP, JobConfig
from torchtitan.config.job_config import Compile
from torchtitan.distributed import ParallelDims

from flux.model.model import FluxModel
from flux.parallel.context_parallel import apply_context_parallel
from flux.parallel.tensor_parallel import apply_tensor_parallel, strided_on_dim0

BLOCK_LISTS = ("double_blocks", "single_blocks")  # the units of AC, compile and FSDP

# The reshard_after_forward policy apply_fsdp gave each FSDP unit (FSDP2 has no getter).
RESHARD_AFTER_FORWARD: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def compiles_model(compile_config: Compile) -> bool:
    """Whether [compile] asks for the model to be compiled."""
    return compile_config.enable and "model" in compile_config.components


def _blocks(model: nn.Module) -> Iterator[tuple[nn.ModuleList, int, nn.Module]]:
    for name in BLOCK_LISTS:
        blocks = getattr(model, name)
        assert isinstance(blocks, nn.ModuleList)
        for i, block in enumerate(blocks):
            yield blocks, i, block


# What op-level selective checkpointing keeps from a block's forward (torchtitan's llama
# policy, with addmm: every FLUX linear has a bias): the outputs of the matmuls and of
# attention, the bulk of the FLOPs, and of the collectives, so backward never communicates
# twice. Everything else (norms, modulation, GELU, RoPE: cheap, elementwise) is recomputed.
_aten, _c10d = torch.ops.aten, torch.ops._c10d_functional
SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten._scaled_mm.default,  # float8 matmuls
    _aten.max.default,  # float8's scales come from the absolute maximum
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_fused_attention_overrideable.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _c10d.all_reduce.default,  # tensor parallelism's row-parallel sums
    _c10d.all_gather_into_tensor.default,  # context parallelism's keys and values
    _c10d.reduce_scatter_tensor.default,
    torch.ops._c10d_functional_autograd.all_gather_into_tensor.default,
}


def _save_matmuls_and_attention(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _op_level_contexts() -> tuple[Any, Any]:
    return create_selective_checkpoint_contexts(_save_matmuls_and_attention)


def apply_activation_checkpointing(
    model: nn.Module, mode: str, selective_option: str, skip_last_blocks: int = 0
) -> None:
    """Checkpoint the blocks (counting double then single blocks, in the order they run),
    all but the last skip_last_blocks, which keep their activations.

    mode 'full': a checkpointed block recomputes its whole forward in backward.
    'selective' with selective_ac_option 'op': every block keeps its matmul, attention and
    collective outputs (SAVED_OPS) and recomputes the rest. 'selective' with an integer N:
    every N-th block is checkpointed in full."""
    every, contexts = 1, None
    if mode == "selective" and selective_option == "op":
        contexts = _op_level_contexts
    elif mode == "selective":
        if not selective_option.isdigit() or int(selective_option) < 1:
            raise ValueError(
                f"activation_checkpoint.selective_ac_option {selective_option!r}: give 'op' "
                "(op-level checkpointing) or a block interval N >= 1"
            )
        every = int(selective_option)
    elif mode != "full":
        raise ValueError(f"activation_checkpoint.mode {mode!r}: use none, full or selective")
    if skip_last_blocks < 0:
        raise ValueError(
            f"activation_checkpoint.skip_last_blocks = {skip_last_blocks}: use 0 or more"
        )
    blocks = list(_blocks(model))
    for n, (block_list, i, block) in enumerate(blocks[: len(blocks) - skip_last_blocks]):
        if n % every == 0:
            wrapped = (
                checkpoint_wrapper(block, preserve_rng_state=False)
                if contexts is None
                else checkpoint_wrapper(block, preserve_rng_state=False, context_fn=contexts)
            )
            block_list.register_module(str(i), wrapped)


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """Compile each block on its own: blocks of one type share a graph, so compile time does
    not grow with depth. fullgraph: a graph break is an error, not a silent slowdown."""
    for blocks, i, block in _blocks(model):
        compiled = torch.compile(block, fullgraph=True, backend=backend)
        blocks.register_module(str(i), cast(nn.Module, compiled))


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    cpu_offload: bool,
    reshard_after_forward: bool,
) -> None:
    """Shard every block, then the root (embedders, final layer)."""
    config: dict = {
        "mesh": dp_mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
    }
    if cpu_offload:
        config["offload_policy"] = CPUOffloadPolicy()
    # Matrices tensor parallelism split in strided pieces of rows are sharded by column.
    config["shard_placement_fn"] = lambda p: Shard(1) if strided_on_dim0(p) else None
    for _, _, block in _blocks(model):
        fully_shard(block, reshard_after_forward=reshard_after_forward, **config)
        RESHARD_AFTER_FORWARD[block] = reshard_after_forward
    # The root's parameters are needed again first in backward: keep them gathered.
    fully_shard(model, reshard_after_forward=False, **config)
    RESHARD_AFTER_FORWARD[model] = False


def parallelize_flux(
    model: FluxModel, parallel_dims: ParallelDims, job_config: JobConfig
) -> nn.Module:
    """The TrainSpec's parallelize_fn."""
    if parallel_dims.pp_enabled:
        raise ValueError("parallelism.pipeline_parallel_degree > 1 is not supported for flux")

    if parallel_dims.tp_enabled:
        apply_tensor_parallel(model, parallel_dims.get_mesh("tp"))
    if parallel_dims.cp_enabled:
        apply_context_parallel(model, parallel_dims.get_mesh("cp"))
    ac = job_config.activation_checkpoint
    if ac.mode != "none":
        apply_activation_checkpointing(model, ac.mode, ac.selective_ac_option, ac.skip_last_blocks)
    if compiles_model(job_config.compile):
        apply_compile(model, job_config.compile.backend)

    mesh = fsdp_mesh(parallel_dims)
    if mesh is not None:
        policy = job_config.parallelism.fsdp_reshard_after_forward
        if policy not in ("default", "always", "never"):
            raise ValueError(
                f"parallelism.fsdp_reshard_after_forward {policy!r}: use default, always or never"
            )
        apply_fsdp(
            model,
            mesh,
            param_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce],
            cpu_offload=job_config.training.enable_cpu_offload,
            reshard_after_forward=policy != "never",
        )
    return model


def fsdp_mesh(parallel_dims: ParallelDims) -> DeviceMesh | None:
    """The mesh FSDP shards over (dp_shard × cp), with dp_replicate first for HSDP; None
    without data or context parallelism."""
    if not (parallel_dims.fsdp_enabled or parallel_dims.dp_replicate_enabled):
        return None
    names = ["fsdp"]
    if parallel_dims.dp_replicate_enabled:
        names = ["dp_replicate", "fsdp"] if parallel_dims.fsdp_enabled else ["dp_replicate"]
    return parallel_dims.get_mesh(names)


@torch.no_grad()
def init_as_one_process(model: FluxModel, init: Callable[[], None]) -> None:
    """Initialize a model's weights (init: its plain init_weights) so that, distributed
    on the CPU, every layout starts from the weights one process would.

    On the CPU, DTensor draws every rank's shard from the same generator state, so the
    shards of a freshly initialized matrix would repeat each other. Instead a plain copy
    (built on meta, as torchtitan builds the model, so the generator is at the same state)
    is initialized and each rank keeps its part. On GPUs DTensor's own random-number
    tracker gives each shard its numbers, and init runs as it is (also when FSDP
    offloads parameters to the CPU: the mesh, not the parameters, says where it runs)."""
    params = dict(flux_named_parameters(model))
    if not any(
        isinstance(p, DTensor) and p.device_mesh.device_type == "cpu" for p in params.values()
    ):
        init()
        return
    with torch.device("meta"):
        plain = FluxModel(model.args)
    plain.to_empty(device="cpu")
    plain.init_weights()
    for name, full in plain.named_parameters():
        param = params[name]
        if isinstance(param, DTensor):
            part = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(part.to_local())
        else:
            param.copy_(full)


def flux_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters by their FluxModel names (without the wrappers' prefixes)."""
    for name, param in model.named_parameters():
        for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod."):
            name = name.replace(wrapper, "")
        yield name, param


@contextmanager
def forward_only(model: nn.Module) -> Iterator[None]:
    """Evaluation runs forward only: no backward comes to reshard FSDP units whose
    reshard_after_forward is off (the root), so turn it on for the duration, and restore
    the training policy after. A checkpoint saved right after evaluation then sees sharded
    parameters as usual."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    saved = [RESHARD_AFTER_FORWARD.get(m, True) for m in units]
    for unit in units:
        unit.set_reshard_after_forward(True, recurse=False)
    try:
        yield
    finally:
        for unit, value in zip(units, saved):
            unit.set_reshard_after_forward(value, recurse=False)
        for unit in units:
            unit.reshard()
