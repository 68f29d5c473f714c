"""Runs the planner is checked on, and their real measurement.

flux-mid is a mid-size model of the FLUX architecture (hidden 512, 4 double and 8 single
blocks, 69M parameters) at 256 px: activations, not the encoders, make its peak.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from flux.config import parse_config
from flux.model.args import flux_configs
from flux.plan.step import build_run, profile_step
from flux.plan.world import parallel_dims_of

MID = "flux-mid"
MID_ARGS = dataclasses.replace(
    flux_configs["flux-debug"],
    hidden_size=512,
    num_heads=8,
    depth=4,
    depth_single_blocks=8,
    axes_dim=(8, 28, 28),
)
DEBUG_CONFIG = "flux/train_configs/debug_model.toml"
RUNS: dict[str, list[str]] = {
    # T5, CLIP and the autoencoder run every step
    "debug": ["--job.config_file", DEBUG_CONFIG, "--training.local_batch_size", "4"],
    # the transformer's own step: a precomputed cache stands in for the encoders
    "mid": [
        *("--job.config_file", DEBUG_CONFIG, "--model.flavor", MID),
        *("--training.img_size", "256", "--training.local_batch_size", "2"),
        *("--training.dataset", "precomputed", "--validation.no-enable"),
    ],
}

# Two processes also split the debug model's heads (tensor parallel) or tokens (context
# parallel, with FSDP over the two)
TWO_PROCESS_RUNS = {
    **RUNS,
    "debug tp2": [*RUNS["debug"], "--parallelism.tensor_parallel_degree", "2"],
    "debug cp2": [*RUNS["debug"], "--parallelism.context_parallel_degree", "2"],
}


def register_mid() -> None:
    flux_configs[MID] = MID_ARGS


# torch.distributed's collectives FSDP calls, and the tensor each moves: all-gather's
# output, reduce-scatter's input, all-reduce's tensor
CALLED = {
    "all_gather_single": ("all-gather", "output_tensor"),
    "reduce_scatter_single": ("reduce-scatter", "input"),
    "all_reduce": ("all-reduce", "tensor"),
}


@contextmanager
def collectives_called() -> Iterator[dict[str, list[int]]]:
    """Calls and bytes of the collectives torch.distributed's API is called with, by kind
    (what a run moves, counted where FSDP asks for it, not where the planner looks)."""
    called: dict[str, list[int]] = {}
    originals = {name: getattr(dist, name) for name in CALLED}

    def counting(name: str) -> Any:
        original = originals[name]
        signature = inspect.signature(original)
        kind, tensor = CALLED[name]

        def call(*args: Any, **kwargs: Any) -> Any:
            t = signature.bind(*args, **kwargs).arguments[tensor]
            entry = called.setdefault(kind, [0, 0])
            entry[0] += 1
            entry[1] += t.numel() * t.element_size()
            return original(*args, **kwargs)

        return call

    for name in CALLED:
        setattr(dist, name, counting(name))
    try:
        yield called
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def allocator_rise(allocator: profile) -> int:
    """How far the CPU allocator's allocated bytes rose above where the step began, from
    the profiler's record of every allocation and free."""
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in allocator.profiler.kineto_results.events()  # type: ignore[union-attr]
        if e.name() == "[memory]"
    )
    now = rise = 0
    for _, nbytes in events:
        now += nbytes
        rise = max(rise, now)
    return rise


def measure(run_name: str, world_size: int) -> dict[str, Any]:
    """A real training step of a run on this process group, under the planner's counters
    and torch's FlopCounterMode (counting the CPU's flash attention as the GPU's) and
    CommDebugMode."""
    job = parse_config(TWO_PROCESS_RUNS[run_name])
    dims = parallel_dims_of(job.parallelism, world_size)
    torch.manual_seed(0)
    run = build_run(job, dims, torch.device("cpu"), job.training.dataset != "precomputed")
    aten = torch.ops.aten
    cpu_flash = {  # torch's counts of the GPU's attention kernels, for the CPU's
        aten._scaled_dot_product_flash_attention_for_cpu: (
            lambda q, k, v, *_, out_shape=None, **__: sdpa_flop_count(q, k, v)
        ),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: (
            lambda g, q, k, v, *_, out_shape=None, **__: sdpa_backward_flop_count(g, q, k, v)
        ),
    }
    flop_counter = FlopCounterMode(display=False, custom_mapping=cpu_flash)
    allocator = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with collectives_called() as called:
        step = profile_step(run, also=(flop_counter, allocator))
    return {
        "peak_bytes": step.peak_bytes,
        "at_peak": step.at_peak,
        "tracked_rise_bytes": step.peak_bytes - step.start_bytes,
        "allocator_rise_bytes": allocator_rise(allocator),
        "flops": sum(step.flops.values()),
        "flop_counter_mode": flop_counter.get_total_flops(),
        "traffic": {f"{t.kind} {t.group}": [t.calls, t.bytes] for t in step.traffic},
        "called": called,
        "rank": dist.get_rank(),
    }
