"""The frozen encoders across ranks, applied by the trainer to its FluxPreprocessor.

T5 and CLIP: sharded by FSDP over the data-parallel ranks (the model's FSDP mesh; HSDP
replicates across nodes), each layer gathered for its forward and freed after, so a rank
holds its share of T5-XXL's 9.5 GB instead of all of it. The ranks of a tensor- or
context-parallel group hold the same captions: each encodes its share of them, and the
group all-gathers the encodings (SplitTextEncoder), so none encodes the whole batch.

The autoencoder's encoder: compiled when the model is (its training shapes are fixed).

Every rank of the FSDP mesh must run the encoders as often as the others, as it runs the
model: one call per micro-batch, and validation's, are the same on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torchtitan.distributed import ParallelDims

from flux.flow import FluxPreprocessor
from flux.model.text_encoders import TextEncoder
from flux.parallel.parallelize import fsdp_mesh


def shard_text_encoder(encoder: TextEncoder, mesh: DeviceMesh) -> None:
    """FSDP over mesh: every layer of the encoder's stack (the outermost module lists: T5's
    blocks, CLIP's layers) a unit, the rest (embeddings, final norm) the root; every unit
    frees its gathered weights after its forward."""
    stacks: list[str] = []
    for name, module in list(encoder.model.named_modules()):
        if isinstance(module, nn.ModuleList) and not any(
            name.startswith(f"{stack}.") for stack in stacks
        ):
            stacks.append(name)
            for layer in module:
                fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(encoder.model, mesh=mesh, reshard_after_forward=True)


class SplitTextEncoder(nn.Module):
    """A text encoder whose work the ranks of one or more groups holding the same captions
    share (the tensor- and context-parallel groups): each encodes its share of the
    captions, and the groups all-gather the encodings. captions -> what the encoder gives,
    as if one rank had encoded them all."""

    def __init__(self, encoder: TextEncoder, groups: Sequence[DeviceMesh]):
        super().__init__()
        self.encoder = encoder
        self.groups = list(groups)

    @torch.no_grad()
    def forward(self, captions: list[str]) -> Tensor:
        return self._encode(captions, self.groups)

    def _encode(self, captions: list[str], groups: list[DeviceMesh]) -> Tensor:
        if not groups:
            return self.encoder(captions)
        group, size = groups[0], groups[0].size()
        rank, count = group.get_local_rank(), len(captions)
        per = -(-count // size)
        # every rank encodes `per` captions (the last shares padded with empty ones), so
        # every rank runs the same FSDP gathers and the all-gather's pieces match
        share = captions[rank * per : (rank + 1) * per]
        share += [""] * (per - len(share))
        encoded = self._encode(share, groups[1:]).contiguous()
        gathered = funcol.wait_tensor(funcol.all_gather_tensor(encoded, 0, group))
        return gathered[:count]


def parallelize_frozen(
    preprocess: FluxPreprocessor, parallel_dims: ParallelDims, compile_backend: str | None
) -> None:
    """Spread the frozen encoders of preprocess over the ranks, and compile the
    autoencoder's encoder with compile_backend (None: not compiled); in place."""
    groups = [
        parallel_dims.get_mesh(name)
        for name, on in (("cp", parallel_dims.cp_enabled), ("tp", parallel_dims.tp_enabled))
        if on
    ]
    mesh = fsdp_mesh(parallel_dims)
    for kind in ("t5", "clip"):
        encoder = getattr(preprocess, kind)
        if encoder is None:
            continue
        if mesh is not None:
            shard_text_encoder(encoder, mesh)
        if groups:
            setattr(preprocess, kind, SplitTextEncoder(encoder, groups))
    if compile_backend is not None and preprocess.encodes_images:
        assert preprocess.autoencoder is not None
        preprocess.autoencoder.encoder.compile(backend=compile_backend, fullgraph=True)
