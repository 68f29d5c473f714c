"""The planner against reality: real training steps on the CPU, in one process and in two
gloo processes with FSDP, measured with the same tracker, torch's FlopCounterMode, the CPU
allocator and torch.distributed's own collective calls."""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from flux.config import parse_config
from flux.model.args import flux_configs, training_flops_per_sample
from flux.model.model import FluxModel
from flux.plan.planner import Plan, PlanSettings, plan
from flux.plan.step import EMA, GRADIENTS, OPTIMIZER, PARAMETERS
from flux.seam import use_cpu_if_no_accelerator
from tests.launch import Ahead, start_worker, worker_report
from tests.plan.helpers import MID, RUNS, TWO_PROCESS_RUNS, measure, register_mid

TOLERANCE = 0.15


@pytest.fixture(scope="module", autouse=True)
def mid_flavor() -> Iterator[None]:
    register_mid()
    yield
    flux_configs.pop(MID, None)


@functools.cache
def planned(name: str, ngpu: int) -> Plan:
    """The plan of a run (each is made once: a plan traces a step, about a second)."""
    return plan(parse_config(TWO_PROCESS_RUNS[name]), PlanSettings(ngpu=ngpu))[0]


@pytest.fixture(scope="module")
def one_process() -> dict:
    """Both runs stepped for real in this process (a gloo group of one)."""
    use_cpu_if_no_accelerator()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return {name: measure(name, 1) for name in RUNS}
    finally:
        dist.destroy_process_group()


def start_measuring(factory: pytest.TempPathFactory) -> tuple[subprocess.Popen, Path]:
    """tests.plan.measure_worker on two gloo processes, writing two.json in its folder."""
    folder = factory.mktemp("measured")
    return start_worker(folder, 2, "tests.plan.measure_worker", str(folder / "two.json"))


AHEAD = Ahead(two_processes=start_measuring)  # started in the background (conftest)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The runs stepped for real by two gloo processes (rank 0's view): FSDP over both, and
    the debug flavor with tensor and with context parallelism (torchrun: e2e tests)."""
    started = AHEAD.take("two_processes", tmp_path_factory)
    return worker_report(started, started[1] / "two.json")


@pytest.mark.parametrize("name", list(RUNS))
def test_planned_peak_is_within_15_percent_of_a_real_step_on_one_process(
    one_process: dict, name: str
) -> None:
    measured = one_process[name]
    assert abs(planned(name, 1).memory.peak_bytes - measured["peak_bytes"]) <= (
        TOLERANCE * measured["peak_bytes"]
    )


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(TWO_PROCESS_RUNS))
def test_planned_peak_is_within_15_percent_of_a_real_two_process_step(
    two_processes: dict, name: str
) -> None:
    measured, planned_two = two_processes[name], planned(name, 2)
    assert abs(planned_two.memory.peak_bytes - measured["peak_bytes"]) <= (
        TOLERANCE * measured["peak_bytes"]
    )
    for category, nbytes in measured["at_peak"].items():
        assert abs(planned_two.memory.at_peak[category] - nbytes) <= TOLERANCE * max(
            nbytes, 2**20
        ), category
    # FSDP halves what each rank holds of the parameters; tensor parallelism splits the
    # blocks' projections but keeps the embedders, modulations and final layer whole
    share = 0.75 if "tp2" in name else 0.55
    whole = planned(name.split()[0], 1).memory.at_peak[PARAMETERS]
    assert measured["at_peak"][PARAMETERS] < share * whole


def test_the_tracker_counts_what_the_cpu_allocator_allocates(one_process: dict) -> None:
    """The transformer's step (flux-mid, no encoders): what the tracker saw rise above the
    step's start against the allocator's own record of every allocation."""
    measured = one_process["mid"]
    assert abs(measured["tracked_rise_bytes"] - measured["allocator_rise_bytes"]) <= (
        0.05 * measured["allocator_rise_bytes"]
    )


@pytest.mark.parametrize(
    "processes", ["one_process", pytest.param("two_processes", marks=pytest.mark.e2e)]
)
def test_planned_flops_equal_flop_counter_mode_on_the_real_step(
    request: pytest.FixtureRequest, processes: str
) -> None:
    measured = request.getfixturevalue(processes)
    ngpu = 1 if processes == "one_process" else 2
    for name in measured:
        counted = planned(name, ngpu).flops
        total = counted["counted_model"] + counted["counted_encoders"]
        assert total == measured[name]["flop_counter_mode"] == measured[name]["flops"]


def test_counted_flops_are_the_trainers_count_plus_flash_attentions_recomputation() -> None:
    """Without activation checkpointing the model's counted FLOPs are the trainer's count
    (the MFU numerator) and the scores flash attention recomputes in backward: 2·B·L²·D
    per block."""
    p = planned("mid", 1)
    args = flux_configs[MID]
    tokens = (256 // 16) ** 2 + 16
    blocks = args.depth + args.depth_single_blocks
    recomputed = 2 * p.local_batch * tokens**2 * args.hidden_size * blocks
    trainers = p.local_batch * training_flops_per_sample(args, (256 // 16) ** 2, 16)
    assert p.flops["model"] == trainers
    assert p.flops["counted_model"] == trainers + recomputed
    assert p.flops["counted_encoders"] == 0  # a precomputed cache


@pytest.mark.e2e
def test_planned_traffic_is_what_two_gloo_processes_move(two_processes: dict) -> None:
    assert {"all-reduce tp", "all-gather cp", "reduce-scatter cp"} <= {
        key for name in two_processes for key in two_processes[name]["traffic"]
    }
    for name, measured in two_processes.items():
        traffic = {
            f"{t['kind']} {t['group']}": [t["calls"], t["bytes"]] for t in planned(name, 2).traffic
        }
        assert traffic == measured["traffic"]
        # FSDP's all-gathers and reduce-scatters, as torch.distributed was asked for them
        # (DTensor's and tensor/context parallelism's collectives do not use this API)
        for kind in ("all-gather", "reduce-scatter"):
            assert traffic.get(f"{kind} fsdp") == measured["called"].get(kind), (name, kind)


def test_every_rank_holds_its_share_of_parameters_gradients_and_adamw_state() -> None:
    """At 64 ranks (where torch's FSDPMemTracker reported AdamW's state of flux-dev as
    135 GiB): fp32 parameters, and two fp32 moments per parameter, of 1/64 of the model."""
    p = planned("debug", 64)
    with torch.device("meta"):
        weights = list(FluxModel(flux_configs["flux-debug"]).parameters())
    nparams = sum(w.numel() for w in weights)
    held = p.memory.at_peak
    assert nparams * 4 / 64 <= held[PARAMETERS] <= nparams * 4 / 64 * 1.1  # FSDP pads shards
    assert held[OPTIMIZER] == 2 * held[PARAMETERS] + 4 * len(weights)  # and a step count each
    assert held[GRADIENTS] <= held[PARAMETERS]


def test_the_ema_adds_a_float32_copy_of_each_ranks_shards() -> None:
    """[ema] holds flux.ema's average (float32, of each rank's shards) on the GPU for the
    whole step, or in host memory with cpu_offload; a device update is timed with the
    optimizer's."""
    debug = TWO_PROCESS_RUNS["debug"]
    without = planned("debug", 2)
    on_gpu, on_host = (
        plan(parse_config([*debug, "--ema.enable", *offload]), PlanSettings(ngpu=2))[0]
        for offload in ([], ["--ema.cpu_offload"])
    )
    with torch.device("meta"):
        nparams = sum(w.numel() for w in FluxModel(flux_configs["flux-debug"]).parameters())
    average = on_gpu.memory.at_peak[EMA]
    assert nparams * 4 / 2 <= average <= without.memory.at_peak[PARAMETERS]  # FSDP pads those
    assert on_gpu.memory.peak_bytes == without.memory.peak_bytes + average
    assert on_host.memory.peak_bytes == without.memory.peak_bytes
    assert EMA not in on_host.memory.at_peak and on_host.memory.host_bytes == average
    assert on_gpu.time.optimizer_s > without.time.optimizer_s == on_host.time.optimizer_s
