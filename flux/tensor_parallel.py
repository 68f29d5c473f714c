"""Tensor parallelism for FluxModel: attention heads and MLP units split across a mesh.

Megatron-style, with the residual stream replicated on every rank of the mesh: in each
block the input projections are column-parallel (each rank computes its heads' q, k, v and
its share of the MLP units) and the output projections row-parallel (partial sums, added
by one all-reduce). A double-stream block all-reduces twice per stream in forward and
backward, a single-stream block once.

The fused projections keep FLUX.1's layout, so checkpoints load as they are. A rank's
rows of img_attn.qkv ((3·D) × D: q, k, v) are its heads of each of q, k and v, and of the
single-stream linear1 ((3·D + M) × D) its heads of q, k, v and its share of every D rows
of the MLP: a DTensor `_StridedShard(0, split_factor)` over that many equal pieces.
linear2's columns (attention D, then MLP M) are split the same way. Every other parameter
is replicated on the mesh (a DTensor too, so FSDP and gradient clipping see one mesh).

Each module computes on its local tensors and names its collectives (no DTensor
dispatch, so no hidden gathers): `_copy_in` is the identity whose backward all-reduces
(a replicated input or parameter read by one rank's share of the work), `_reduce_out`
the all-reduce whose backward is the identity.

DCP cannot save a `_StridedShard` layout (its chunks are not boxes), so checkpoints get
plain copies in the `Shard` layout of the same dimension (keep_checkpoint_layout), and
loaded values go back to the strided layout: a checkpoint holds the global tensors, and
moves between TP, FSDP and single-process layouts like any other. The model's own
state_dict keeps the live (strided) parameters, which torchtitan's checkpointer caches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from flux.model.layers import DoubleStreamBlock, RMSNorm, SingleStreamBlock
from flux.model.model import FluxModel


def _all_reduce(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Sum across the group, out of place (functional: torch.compile traces it)."""
    return funcol.wait_tensor(funcol.all_reduce(x, "sum", group))


class _CopyIn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _all_reduce(grad.contiguous(), ctx.group), None


class _ReduceOut(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        return _all_reduce(x.contiguous(), group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _copy_in(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    return _CopyIn.apply(x, group)


def _reduce_out(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    return _ReduceOut.apply(x, group)


def _split(dim: int, pieces: int) -> Placement:
    return Shard(dim) if pieces == 1 else _StridedShard(dim, split_factor=pieces)


def _distribute(module: nn.Module, name: str, mesh: DeviceMesh, placement: Placement) -> None:
    param = getattr(module, name)
    module.register_parameter(
        name, nn.Parameter(distribute_tensor(param.data, mesh, [placement]), param.requires_grad)
    )


@dataclass(frozen=True)
class _Split:
    """How one module is split: the mesh's group, this rank, the mesh size, and how many
    equal pieces its fused rows or columns hold (1: not fused)."""

    group: dist.ProcessGroup
    rank: int
    size: int
    pieces: int

    def piece(self, full: Tensor) -> Tensor:
        """This rank's part of each of the pieces of a 1-D tensor."""
        return full.view(self.pieces, self.size, -1)[:, self.rank].reshape(-1)


def _local(t: Tensor | None) -> Tensor | None:
    return t.to_local() if isinstance(t, DTensor) else t


# -- forwards on local tensors -------------------------------------------------------------
def _matmul(module: nn.Linear, x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight.T as the module computes it: in float8 for a torchao Float8Linear (its
    tensorwise scales then come from this rank's shard of the weight), else as is."""
    config = getattr(module, "linear_mm_config", None)
    if config is None:
        return F.linear(x, weight)
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

    return matmul_with_hp_or_float8_args.apply(x, weight.t(), config, module.config)


def _add_bias(out: Tensor, bias: Tensor | None) -> Tensor:
    return out if bias is None else out + bias.to(out.dtype)


def _replicated_linear(module: nn.Linear, split: _Split, x: Tensor) -> Tensor:
    out = _matmul(module, x, _local(module.weight))  # type: ignore[arg-type]
    return _add_bias(out, _local(module.bias))


def _column_linear(module: nn.Linear, split: _Split, x: Tensor) -> Tensor:
    """x (replicated) -> this rank's output features; the bias is kept whole (replicated)
    and sliced, each rank's slice's gradient summed across the mesh."""
    bias = _local(module.bias)
    if bias is not None:
        bias = split.piece(_copy_in(bias, split.group))
    out = _matmul(module, _copy_in(x, split.group), _local(module.weight))  # type: ignore[arg-type]
    return _add_bias(out, bias)


def _row_linear(module: nn.Linear, split: _Split, x: Tensor) -> Tensor:
    """x (this rank's input features) -> the whole output, summed across the mesh."""
    out = _reduce_out(_matmul(module, x, _local(module.weight)), split.group)  # type: ignore[arg-type]
    return _add_bias(out, _local(module.bias))


def _head_norm(module: RMSNorm, split: _Split, x: Tensor) -> Tensor:
    """RMSNorm over this rank's heads: its scale's gradient is summed across the mesh."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=1e-6)
    return normed.to(x.dtype) * _copy_in(_local(module.scale), split.group)  # type: ignore[arg-type]


# -- state dicts in DCP's layouts ----------------------------------------------------------
def _strided_by_tp(t: Any) -> bool:
    names = t.device_mesh.mesh_dim_names if isinstance(t, DTensor) else None
    return (
        names is not None
        and "tp" in names
        and isinstance(t.placements[names.index("tp")], _StridedShard)
    )


def _plain(t: DTensor) -> DTensor:
    """The same tensor with tensor parallelism's _StridedShard as a Shard of its dimension."""
    placements = [Shard(p.dim) if isinstance(p, _StridedShard) else p for p in t.placements]
    return t.redistribute(t.device_mesh, placements)


def plain_layout(state: dict[str, Any]) -> dict[str, Any]:
    """A flat state dict with the strided tensors in plain layouts DCP can save."""
    return {k: _plain(v.detach()) if _strided_by_tp(v) else v for k, v in state.items()}


def restore_layout(state: dict[str, Any], like: dict[str, Any]) -> dict[str, Any]:
    """plain_layout undone: each tensor back in the layout of its entry in `like`."""
    restored = dict(state)
    for key, value in state.items():
        target = like.get(key)
        if isinstance(target, DTensor) and _strided_by_tp(target) and isinstance(value, DTensor):
            restored[key] = value.redistribute(target.device_mesh, target.placements)
    return restored


def keep_checkpoint_layout(checkpointer: Any, optimizers: Any) -> None:
    """Checkpoints in plain layouts: torchtitan's checkpointer saves and loads plain copies
    of the strided tensors (its model state dict holds the live parameters); the
    optimizer's state dict (moments in the parameters' layouts) is given plain and taken
    back; the modules put loaded parameters back in their layouts (_load_strided)."""
    save, load = checkpointer.dcp_save, checkpointer.dcp_load
    state_dict, load_state_dict = optimizers.state_dict, optimizers.load_state_dict

    def dcp_save(state: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        return save(plain_layout(state), *args, **kwargs)

    def dcp_load(state: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        load(plain_layout(state), *args, **kwargs)

    def plain_state_dict() -> dict[str, Any]:
        return plain_layout(state_dict())

    def load_plain_state_dict(state: dict[str, Any]) -> None:
        load_state_dict(restore_layout(state, state_dict()))

    checkpointer.dcp_save, checkpointer.dcp_load = dcp_save, dcp_load
    optimizers.state_dict, optimizers.load_state_dict = plain_state_dict, load_plain_state_dict


def _load_strided(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """A loaded weight (plain layout) back in the module's strided layout."""
    key, param = prefix + "weight", module.weight
    value = state_dict.get(key)
    if isinstance(value, DTensor) and isinstance(param, DTensor):
        if value.placements != param.placements:
            state_dict[key] = value.redistribute(param.device_mesh, param.placements)


FORWARDS: dict[str, Callable[..., Tensor]] = {
    "column": _column_linear,
    "row": _row_linear,
    "norm": _head_norm,  # an RMSNorm of this rank's heads
    "replicated": _replicated_linear,
}


def _parallelize(module: nn.Module, mesh: DeviceMesh, kind: str, pieces: int = 1) -> None:
    """Distribute the parameters of one module (a Linear, or an RMSNorm for 'norm') and
    give it the forward of its kind."""
    if kind in ("column", "row"):
        _distribute(module, "weight", mesh, _split(0 if kind == "column" else 1, pieces))
    for name, param in list(module.named_parameters(recurse=False)):
        if not isinstance(param, DTensor):
            _distribute(module, name, mesh, Replicate())
    split = _Split(mesh.get_group(), mesh.get_local_rank(), mesh.size(), pieces)
    module.forward = functools.partial(FORWARDS[kind], module, split)  # type: ignore[method-assign]
    if pieces > 1:
        module.register_load_state_dict_pre_hook(_load_strided)


def apply_tensor_parallel(model: FluxModel, mesh: DeviceMesh) -> None:
    """Split every block's heads and MLP units across `mesh` (in place); replicate the rest."""
    tp, args = mesh.size(), model.args
    hidden, mlp = args.hidden_size, int(args.hidden_size * args.mlp_ratio)
    if args.num_heads % tp or mlp % hidden:
        raise ValueError(
            f"parallelism.tensor_parallel_degree = {tp}: it must divide num_heads "
            f"({args.num_heads}), and the MLP width ({mlp}) must be a multiple of the "
            f"hidden size ({hidden})"
        )
    mlp_pieces = mlp // hidden
    done: set[nn.Module] = set()

    def parallelize(module: nn.Module, kind: str, pieces: int = 1) -> None:
        _parallelize(module, mesh, kind, pieces)
        done.add(module)

    for block in model.double_blocks:
        assert isinstance(block, DoubleStreamBlock)
        for attn, mlp_layers in ((block.img_attn, block.img_mlp), (block.txt_attn, block.txt_mlp)):
            parallelize(attn.qkv, "column", 3)
            parallelize(attn.proj, "row")
            parallelize(attn.norm.query_norm, "norm")
            parallelize(attn.norm.key_norm, "norm")
            attn.num_heads //= tp
            parallelize(mlp_layers[0], "column")
            parallelize(mlp_layers[2], "row")
    for single in model.single_blocks:
        assert isinstance(single, SingleStreamBlock)
        parallelize(single.linear1, "column", 3 + mlp_pieces)
        parallelize(single.linear2, "row", 1 + mlp_pieces)
        parallelize(single.norm.query_norm, "norm")
        parallelize(single.norm.key_norm, "norm")
        single.num_heads //= tp
        single.hidden_size //= tp
        single.mlp_hidden_dim //= tp
    for module in model.modules():
        if module in done or not list(module.parameters(recurse=False)):
            continue
        if not isinstance(module, nn.Linear):
            raise TypeError(f"tensor parallelism does not know {type(module).__name__}")
        parallelize(module, "replicated")


def strided_on_dim0(param: nn.Parameter) -> bool:
    """Whether tensor parallelism split a matrix's rows into strided pieces; FSDP shards
    such a matrix along its columns instead (two strided splits of one dimension are a
    layout DTensor cannot convert correctly)."""
    return (
        isinstance(param, DTensor)
        and param.ndim == 2
        and any(isinstance(p, _StridedShard) and p.dim == 0 for p in param.placements)
    )
