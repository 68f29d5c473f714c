"""The world a plan runs in: rank 0 of a process group that moves no data, and fake tensors.

torch's "fake" backend answers every collective without sending anything, so one process
builds and steps rank 0 of any world size; FakeTensorMode gives tensors shapes, dtypes and
storages but no memory, so a 12B model on 64 ranks fits on a laptop. The device meshes are
built on the CPU (fake tensors stand in for the GPU's: the same shapes and bytes).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist
from torchtitan.distributed import ParallelDims

from flux.seam import meshes_on_cpu


def parallel_dims_of(parallelism: Any, world_size: int) -> ParallelDims:
    """ParallelDims as torchtitan's trainer makes them, with its meshes built."""
    dims = ParallelDims(
        dp_shard=parallelism.data_parallel_shard_degree,
        dp_replicate=parallelism.data_parallel_replicate_degree,
        cp=parallelism.context_parallel_degree,
        tp=parallelism.tensor_parallel_degree,
        pp=parallelism.pipeline_parallel_degree,
        ep=parallelism.expert_parallel_degree,
        etp=parallelism.expert_tensor_parallel_degree,
        world_size=world_size,
    )
    with meshes_on_cpu():
        dims.build_mesh()
    return dims


@contextmanager
def fake_world(parallelism: Any, world_size: int) -> Iterator[ParallelDims]:
    """Rank 0 of world_size processes on the fake backend, and its meshes."""
    if dist.is_initialized():
        raise RuntimeError("a plan needs a process of its own: a process group is already set up")
    dist.init_process_group("fake", rank=0, world_size=world_size)
    try:
        yield parallel_dims_of(parallelism, world_size)
    finally:
        dist.destroy_process_group()
