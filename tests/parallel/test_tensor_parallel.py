"""Tensor and context parallelism: the same loss and gradients as one process, alone, with
each other and with FSDP, and checkpoints that move between TP, FSDP and one process
(CPU processes on gloo); and compiled TP blocks that share one graph per block type."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from flux.model.args import flux_configs
from flux.model.model import FluxModel
from flux.parallel.parallelize import apply_compile
from flux.parallel.tensor_parallel import apply_tensor_parallel
from tests.launch import (
    REFERENCE,
    REFERENCE_RUNS,
    Ahead,
    Job,
    Run,
    Training,
    average_at,
    start_worker,
    worker_report,
)
from tests.model.helpers import model_inputs, randomize
from tests.parallel.tp_worker import LAYOUTS

FP32 = 1e-6  # fp32 rounding of sums taken in another order (the row-parallel all-reduce)


def start_layouts(nproc: int) -> Job:
    """One torchrun launch of tests.parallel.tp_worker checks every layout of `nproc`
    processes; the job is wanted when a selected test checks one of them."""

    def start(factory: pytest.TempPathFactory) -> tuple[subprocess.Popen, Path]:
        names = [name for name, layout in LAYOUTS.items() if layout.processes == nproc]
        folder = factory.mktemp(f"{nproc}-processes")
        report = str(folder / "out.json")
        return start_worker(folder, nproc, "tests.parallel.tp_worker", report, str(folder), *names)

    def wanted(items: list[pytest.Item]) -> bool:
        return any(
            item.module.__name__ == __name__
            and LAYOUTS[item.callspec.params["layout"]].processes == nproc
            for item in items
            if "layout" in getattr(getattr(item, "callspec", None), "params", {})
        )

    return Job(start, wanted=wanted)


CP2 = ("--parallelism.context_parallel_degree", "2")


def start_cp_resume(factory: pytest.TempPathFactory) -> Training:
    """The TP reference's step-2 checkpoint resumed with the tokens split over two processes
    (CP, with FSDP over them)."""
    dump = factory.mktemp("cp") / "run"
    tp_checkpoint = REFERENCE_RUNS["tp"].dump_folder / "checkpoint" / "step-2"
    shutil.copytree(tp_checkpoint, dump / "checkpoint" / "step-2")
    return Training(dump, *REFERENCE, *CP2, nproc=2)


AHEAD = Ahead(  # started in the background (conftest)
    layouts_of_2=start_layouts(2),
    layouts_of_4=start_layouts(4),
    cp_resumed=Job(start_cp_resume, after=("tp",)),
)


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict]:
    """What tests.parallel.tp_worker reports of a layout (from the launch of its number of
    processes, started ahead)."""
    results: dict[str, dict] = {}

    def of(layout: str) -> dict:
        if layout not in results:
            nproc = LAYOUTS[layout].processes
            started = AHEAD.take(f"layouts_of_{nproc}", tmp_path_factory)
            results.update(worker_report(started, started[1] / "out.json"))
        return results[layout]

    return of


@pytest.fixture
def group_of_one() -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_compiled_tensor_parallel_blocks_share_one_graph_per_block_type(group_of_one) -> None:
    """FLUX.1 has 57 blocks, torch recompiles a frame at most 8 times (with fullgraph, the
    ninth is an error): the split modules' forwards must not differ from block to block.
    12 blocks here, on a mesh of one; the modules stay what they were, their names too."""
    args = dataclasses.replace(flux_configs["flux-debug"], depth=2, depth_single_blocks=10)
    torch.manual_seed(0)
    model = FluxModel(args)
    randomize(model)
    names = list(model.state_dict())
    inputs = model_inputs(args)
    eager = model(**inputs)
    apply_tensor_parallel(model, init_device_mesh("cpu", (1,)))
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    apply_compile(model, backend=backend)  # type: ignore[arg-type]
    out = model(**inputs)
    out.square().mean().backward()
    assert len(graphs) == 2  # one double-stream, one single-stream
    torch.testing.assert_close(out, eager)
    block = model.single_blocks[5]._orig_mod
    assert isinstance(block.linear1, nn.Linear) and isinstance(block.linear2, nn.Linear)
    assert [n.replace("._orig_mod", "") for n in model.state_dict()] == names


@pytest.mark.e2e
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_parallel_layout_gives_one_process_loss_gradients_and_checkpoints(
    checked, layout: str
) -> None:
    result = checked(layout)
    tp = 2 if "tp2" in layout else 1
    assert result["linear1_local_rows"] == (3 * 64 + 256) // tp  # each TP rank holds 1/tp
    fp32 = not layout.endswith("float8")
    if not fp32:
        # Tensorwise float8 scales come from each rank's shard (of the weight, and of the
        # output gradient): as far from one process's float8 as that is from float32.
        assert 0 < result["float8_grads_relative"] < 0.2
        assert result["grads_relative"] <= 1.5 * result["float8_grads_relative"]
        assert result["loss"] <= 1e-2 * result["loss_value"]
    else:
        assert result["loss"] <= FP32 * result["loss_value"]
        assert result["grads"] <= 1e-6
    assert result["saved"] == 0.0  # the checkpoint holds the global tensors, exactly
    assert result["loaded"] == 0.0 and result["loaded_layout_kept"]
    assert result["loss_after_load"] <= (1e-6 if fp32 else 1e-2)
    assert result["init"] == 0.0  # a fresh model starts from one process's weights
    # the average of each rank's shards is one process's average; it moves both ways
    assert result["ema"] <= 1e-7
    assert result["ema_swapped_loss"] <= (1e-6 if fp32 else 1e-2)
    assert result["ema_swap_restored"]
    assert result["ema_saved"] <= 1e-7 and result["ema_saved_updates"]
    assert result["ema_loaded"] == 0.0 and result["ema_loaded_updates"]
    # T5/CLIP: each rank holds its FSDP share, encodes its share of its group's captions
    fsdp = LAYOUTS[layout].processes // tp
    assert result["text_encoder_shard"] == pytest.approx(1 / fsdp, rel=0.05)
    assert result["text_encoders"] <= 1e-5


@pytest.fixture(scope="module")
def cp_resumed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Path]:
    training = AHEAD.take("cp_resumed", tmp_path_factory)
    return training.finish(), training.dump_folder


@pytest.mark.e2e
def test_training_with_tp_follows_one_process_and_resumes_under_cp(single, tp, cp_resumed) -> None:
    """The reference run of one process (tests/conftest.py) against the same run with its
    heads split over two processes (TP); then TP's step-2 checkpoint resumed with the tokens
    split over two processes instead (CP, with FSDP over them), which goes on as the
    reference went on. (Each layout's loss and gradients from the start: tp_worker.)"""
    (reference, _), (tp_run, tp_dump), (cp, dump) = single, tp, cp_resumed
    for run, steps in ((reference, [1, 2, 3, 4]), (tp_run, [1, 2, 3, 4]), (cp, [3, 4])):
        assert run.returncode == 0, run.output[-3000:]
        assert sorted(run.losses) == steps
        assert run.losses == pytest.approx({s: reference.losses[s] for s in steps}, rel=1e-5)
        validated = [s for s in (1, 2, 4) if s in steps]
        assert sorted(run.ema_validation_losses) == validated
        for losses, expected in (
            (run.validation_losses, reference.validation_losses),
            (run.ema_validation_losses, reference.ema_validation_losses),
        ):
            assert losses == pytest.approx({s: expected[s] for s in validated}, rel=1e-4)
    assert "Training starts at step 3" in cp.output
    # the average, saved from TP's strided shards, resumed under CP and FSDP
    averages = [average_at(path, 4) for path in (single[1], tp_dump, dump)]
    for average in averages[1:]:
        for name, value in averages[0].items():
            torch.testing.assert_close(average[name], value, rtol=1e-4, atol=1e-5, msg=name)
