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

The modules keep their attributes (heads, widths) as the model's args say: blocks find a
rank's share of heads from the head size, and split a single-stream block's fused
projection in the proportions of its parts. Checkpoints cannot hold the strided layout
(flux.checkpoint saves plain copies); `_load_strided` puts loaded weights back in it.

Why not torch's `parallelize_module` with Colwise/RowwiseParallel: its column split gives
rank r a contiguous block of a fused matrix's rows, which for qkv is part of q (or of q
and k), not its heads of each of q, k and v; keeping FLUX.1's file layout needs the
strided split above. And DTensor dispatch inserts its own redistributions where a plan
misses one, where these modules' collectives are explicit and each is traced by compile.
"""

from __future__ import annotations

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

from flux.model.layers import DoubleStreamBlock, RMSNorm, SingleStreamBlock
from flux.model.model import FluxModel
from flux.seam import StridedShard, float8_matmul


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
    return Shard(dim) if pieces == 1 else StridedShard(dim, split_factor=pieces)


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
    return float8_matmul(x, weight, config, module.config)


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


_CLASSES: dict[tuple[type, str], type] = {}


def _parallel_class(cls: type, kind: str) -> type:
    """The module's class with the forward of `kind`, which reads the module's
    `tensor_parallel` split: one class per (class, kind). torch.compile then traces the same
    forward in every block, so blocks of one type share a graph; a forward set on each
    module would be guarded by its id, a recompile per block, and FLUX.1's 57 blocks are
    past torch's limit of 8 (with fullgraph, an error)."""
    if (cls, kind) not in _CLASSES:
        compute = FORWARDS[kind]

        def forward(self: nn.Module, x: Tensor) -> Tensor:
            return compute(self, self.tensor_parallel, x)

        name = f"{kind.capitalize()}Parallel{cls.__name__}"
        _CLASSES[cls, kind] = type(name, (cls,), {"forward": forward, "__module__": __name__})
    return _CLASSES[cls, kind]


def _parallelize(module: nn.Module, mesh: DeviceMesh, kind: str, pieces: int = 1) -> None:
    """Distribute the parameters of one module (a Linear, or an RMSNorm for 'norm') and
    give it the forward of its kind (its class becomes a subclass with that forward)."""
    if kind in ("column", "row"):
        _distribute(module, "weight", mesh, _split(0 if kind == "column" else 1, pieces))
    for name, param in list(module.named_parameters(recurse=False)):
        if not isinstance(param, DTensor):
            _distribute(module, name, mesh, Replicate())
    split = _Split(mesh.get_group(), mesh.get_local_rank(), mesh.size(), pieces)
    module.tensor_parallel = split  # type: ignore[assignment]
    module.__class__ = _parallel_class(type(module), kind)
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
            parallelize(mlp_layers[0], "column")
            parallelize(mlp_layers[2], "row")
    for single in model.single_blocks:
        assert isinstance(single, SingleStreamBlock)
        parallelize(single.linear1, "column", 3 + mlp_pieces)
        parallelize(single.linear2, "row", 1 + mlp_pieces)
        parallelize(single.norm.query_norm, "norm")
        parallelize(single.norm.key_norm, "norm")
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
        and any(isinstance(p, StridedShard) and p.dim == 0 for p in param.placements)
    )
