"""Context parallelism for FluxModel: every sample's joint text+image sequence split across
the ranks of a context-parallel group.

Rank r of cp holds chunk r of the text tokens and chunk r of the image tokens
(shard_sequence), and runs every token-wise part of the model on them alone: embedders,
modulation, norms, MLPs, projections, the final layer. Attention is the one place tokens
meet: each rank rotates its queries and keys by their own positions, gathers the rotated
keys and values of the whole sequence from the group (an all-gather, whose gradient goes
back by reduce-scatter), and attends its queries to all of them. Softmax attention does
not depend on the order of the keys, so the gathered order (rank by rank, text then image
within each) needs no undoing.

The loss is the mean over a rank's own image tokens. FSDP spans the context-parallel ranks
(torchtitan's fsdp mesh is dp_shard × cp) and averages their gradients; every chunk has
the same size, so that is the gradient of the mean over the whole sequence.

Validation and sampling see whole sequences: they run inside whole_sequence, which gives
the blocks back their plain attention.

Activation memory per rank falls with cp except for the gathered keys and values (one
block's at a time); the all-gather moves 2 · L · D values per block and sample.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from flux.model.layers import DoubleStreamBlock, SingleStreamBlock, apply_rope

SEQUENCE_INPUTS = ("img", "img_ids", "txt", "txt_ids")  # FluxModel inputs split by token


def gathered_attention(
    q: Tensor, k: Tensor, v: Tensor, pe: Tensor, group: dist.ProcessGroup
) -> Tensor:
    """Attention of this rank's tokens to the whole sequence: q, k, v (B, H, L_local, K)
    and pe of the local tokens -> (B, L_local, H·K)."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    k = funcol.all_gather_single_autograd(k.contiguous(), 2, group)
    v = funcol.all_gather_single_autograd(v.contiguous(), 2, group)
    out = F.scaled_dot_product_attention(q, k, v)
    return rearrange(out, "b h l k -> b l (h k)")


def _blocks(model: nn.Module) -> Iterator[DoubleStreamBlock | SingleStreamBlock]:
    for module in model.modules():
        if isinstance(module, DoubleStreamBlock | SingleStreamBlock):
            yield module


def apply_context_parallel(model: nn.Module, mesh: DeviceMesh) -> None:
    """Every block attends across the group of `mesh` (in place)."""
    attend = functools.partial(gathered_attention, group=mesh.get_group())
    for block in _blocks(model):
        block.attend = attend


@contextmanager
def whole_sequence(model: nn.Module) -> Iterator[None]:
    """For the duration, the blocks attend within their own (whole) sequences."""
    blocks = [b for b in _blocks(model) if "attend" in vars(b)]
    saved = [vars(b)["attend"] for b in blocks]
    for block in blocks:
        del block.attend  # the class's plain attention
    try:
        yield
    finally:
        for block, attend in zip(blocks, saved):
            block.attend = attend


def shard_sequence(
    inputs: dict[str, Tensor], target: Tensor, rank: int, size: int
) -> tuple[dict[str, Tensor], Tensor]:
    """This rank's chunk of every sample's text and image tokens (FluxModel's inputs), and
    of the target (B, L_img, C)."""

    def chunk(t: Tensor, name: str) -> Tensor:
        if t.shape[1] % size:
            raise ValueError(
                f"{name} has {t.shape[1]} tokens, which do not split into "
                f"parallelism.context_parallel_degree = {size} equal parts"
            )
        return t.chunk(size, dim=1)[rank]

    local = {
        name: chunk(value, name) if name in SEQUENCE_INPUTS else value
        for name, value in inputs.items()
    }
    return local, chunk(target, "the target")
