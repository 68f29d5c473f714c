"""The trainer end to end, through ./run_train.sh (torchrun; gloo on the CPU).

Two reference runs of 4 steps are made once per session: one process (local batch 4), and
FSDP over two processes (local batch 4, global 8). Both validate at steps 2 and 4 and
save a checkpoint at step 2, right after that validation. Other runs are compared to them.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from flux.generate import grid_tiles
from tests.launch import Run, run_train

COMMON = ("--debug.seed", "0", "--training.steps", "4", "--training.local_batch_size")
VALIDATE = (
    "--validation.enable",
    "--validation.freq",
    "2",
    "--validation.steps",
    "1",
    "--validation.local_batch_size",
    "2",
    "--validation.sampling_steps",
    "2",
)
CHECKPOINT = ("--checkpoint.enable", "--checkpoint.interval", "2")


def assert_same_losses(run: Run, reference: Run, steps: list[int], rel: float = 1e-5) -> None:
    assert run.returncode == 0, run.output[-3000:]
    got = {s: run.losses[s] for s in steps}
    want = {s: reference.losses[s] for s in steps}
    assert got == pytest.approx(want, rel=rel), (got, want)


def checkpoint_at(reference: Path, step: int, dump: Path) -> None:
    """A dump folder holding only the reference's checkpoint of `step`."""
    (dump / "checkpoint").mkdir(parents=True)
    shutil.copytree(reference / "checkpoint" / f"step-{step}", dump / "checkpoint" / f"step-{step}")


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Run, Path]:
    dump = tmp_path_factory.mktemp("single")
    args = (*COMMON, "4", *VALIDATE, *CHECKPOINT, "--metrics.enable_tensorboard")
    return run_train(dump, *args), dump


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory) -> tuple[Run, Path]:
    dump = tmp_path_factory.mktemp("fsdp")
    args = (*COMMON, "4", *VALIDATE, *CHECKPOINT, "--parallelism.data_parallel_shard_degree", "2")
    return run_train(dump, *args, nproc=2), dump


def test_debug_training_runs_through_run_train_sh(single) -> None:
    run, dump = single
    assert run.returncode == 0, run.output[-3000:]
    assert "Training completed" in run.output
    assert sorted(run.losses) == [1, 2, 3, 4]
    assert all(math.isfinite(v) and v > 0 for v in run.losses.values())
    assert sorted(run.validation_losses) == [1, 2, 4]
    assert (dump / "checkpoint" / "step-2").is_dir()


def test_validation_saves_one_grid_per_step_with_its_prompts(single) -> None:
    _, dump = single
    grids = sorted(p.name for p in (dump / "validation").glob("*.png"))
    assert grids == ["step_000001.png", "step_000002.png", "step_000004.png"]
    tiles = grid_tiles(str(dump / "validation" / "step_000004.png"))
    assert [prompt for prompt, _ in tiles][0] == (
        "a large red circle at the center on a white background"
    )
    assert all(image.size == (64, 64) for _, image in tiles)


def test_metrics_reach_tensorboard(single) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, dump = single
    (events,) = {p.parent for p in (dump / "tb").rglob("events.out.tfevents.*")}
    tags = set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    for tag in (
        "loss_metrics/global_avg_loss",
        "grad_norm",
        "lr",
        "images_per_s_per_rank",
        "throughput(tps)",
        "mfu(%)",
        "validation_metrics/loss",
        "validation_metrics/loss_t0.06",
    ):
        assert tag in tags, sorted(tags)


def test_resumed_run_ends_with_the_same_losses(single, tmp_path) -> None:
    reference, dump = single
    checkpoint_at(dump, 2, tmp_path)
    run = run_train(tmp_path, *COMMON, "4", *CHECKPOINT)
    assert "Training starts at step 3" in run.output
    assert sorted(run.losses) == [3, 4]
    assert_same_losses(run, reference, [3, 4])


def test_activation_checkpointing_leaves_the_loss_unchanged(single, tmp_path) -> None:
    reference, _ = single
    run = run_train(tmp_path, *COMMON, "4", "--activation_checkpoint.mode", "full")
    assert_same_losses(run, reference, [1, 2, 3, 4])


def test_gradient_accumulation_2x2_equals_batch_4(single, tmp_path) -> None:
    reference, _ = single
    run = run_train(tmp_path, *COMMON, "2", "--training.global_batch_size", "4")
    assert "gradient accumulation steps 2" in run.output
    assert_same_losses(run, reference, [1, 2, 3, 4])


def test_fsdp_over_two_processes_trains_validates_and_checkpoints(fsdp) -> None:
    run, dump = fsdp
    assert run.returncode == 0, run.output[-3000:]
    assert "dp_shard=2" in run.output
    assert sorted(run.losses) == [1, 2, 3, 4]
    assert sorted(run.validation_losses) == [1, 2, 4]
    # step 2 was saved right after validation (FSDP units resharded by forward_only)
    assert (dump / "checkpoint" / "step-2").is_dir()


def test_two_process_checkpoint_resumes_on_one_process(fsdp, tmp_path) -> None:
    reference, dump = fsdp
    checkpoint_at(dump, 2, tmp_path)
    # the same global batch of 8: one process, two micro-batches of 4
    run = run_train(tmp_path, *COMMON, "4", "--training.global_batch_size", "8", *CHECKPOINT)
    assert "Training starts at step 3" in run.output
    assert_same_losses(run, reference, [3, 4], rel=1e-4)


def test_two_process_checkpoint_resumes_on_four_as_hsdp_2x2(fsdp, tmp_path) -> None:
    reference, dump = fsdp
    checkpoint_at(dump, 2, tmp_path)
    run = run_train(
        tmp_path,
        *COMMON,
        "2",
        "--parallelism.data_parallel_replicate_degree",
        "2",
        "--parallelism.data_parallel_shard_degree",
        "2",
        *CHECKPOINT,
        nproc=4,
        timeout=600,
    )
    assert "dp_replicate=2" in run.output and "dp_shard=2" in run.output
    assert "Training starts at step 3" in run.output
    assert_same_losses(run, reference, [3, 4], rel=1e-4)


def test_a_model_only_checkpoint_is_refused_in_one_line(tmp_path) -> None:
    from flux.model.args import flux_configs
    from flux.model.model import FluxModel
    from flux.weights import save_dcp

    save_dcp(FluxModel(flux_configs["flux-debug"]).state_dict(), tmp_path / "checkpoint" / "step-2")
    run = run_train(tmp_path, "--training.steps", "4", *CHECKPOINT)
    assert run.returncode != 0
    lines = [line for line in run.output.splitlines() if "flux: error:" in line]
    assert len(lines) == 1 and "holds the model only" in lines[0], run.output[-2000:]
    assert "initial_load_path" in lines[0]


def test_a_data_set_too_small_for_two_processes_stops_in_one_line(tmp_path) -> None:
    """One record for two ranks: the rank without one says so; none waits forever."""
    from tests.data.tars import make_shards

    data = make_shards(tmp_path / "data", 1, 1)
    args = ("--training.dataset", "webdataset", "--training.dataset_path", str(data))
    run = run_train(tmp_path / "run", "--training.steps", "2", *args, nproc=2)
    assert run.returncode != 0
    lines = [line for line in run.output.splitlines() if "flux: error:" in line]
    assert len(lines) == 1 and "is too small for 2 readers" in lines[0], run.output[-3000:]
