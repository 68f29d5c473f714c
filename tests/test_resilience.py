"""A run keeps its work: preemption signals, killed processes, half-written or corrupted
checkpoints, non-finite steps, data that goes missing, a checkpoint of another model.
What needs processes (signals, kills, FSDP's checkpoints) through ./run_train.sh with two
processes (FSDP on gloo), against one unbroken run of the same 16 steps made once per
session; refusals and non-finite steps through flux.train.main in this process
(tests.launch.train_here); the accounting itself in this process."""

from __future__ import annotations

import itertools
import math
import os
import shutil
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from flux.checkpoint import checkpoint_problem, latest_complete_step
from flux.data.dataset import CaptionedImages
from flux.resilience import (
    MIN_SAMPLES_JUDGED,
    LastStepNotAppliedError,
    NonFiniteLossError,
    NonFiniteSteps,
    Skips,
    TooManySkipsError,
)
from tests.data.images import folder_with_bad_files
from tests.launch import Ahead, Run, Training, train_here

STEPS = 16
ARGS = (
    "--debug.seed",
    "0",
    "--training.steps",
    str(STEPS),
    "--training.local_batch_size",
    "4",
    "--validation.freq",
    "100",  # validates once, at step 1
    "--validation.steps",
    "1",
    "--validation.sampling_steps",
    "2",
    "--checkpoint.enable",
)
EVERY_4 = ("--checkpoint.interval", "4")


def final_loss(run: Run) -> float:
    assert run.returncode == 0, run.output[-3000:]
    assert max(run.losses) == STEPS
    return run.losses[STEPS]


def saved(dump: Path) -> list[str]:
    return sorted(p.name for p in (dump / "checkpoint").iterdir())


def start_unbroken(factory: pytest.TempPathFactory) -> Training:
    """16 steps on two processes, a checkpoint every 4."""
    return Training(factory.mktemp("unbroken") / "run", *ARGS, *EVERY_4, nproc=2)


def preempt(factory: pytest.TempPathFactory) -> tuple[Run, list[str], Run, int]:
    """A run with no checkpoint but the one a signal asks for, stopped by SIGTERM after
    step 2 (the run, and what it saved), then the same command again, with torchrun
    allowed one restart: one of its processes is killed two steps after it resumed (the
    rerun, and the last step logged before the kill)."""
    dump = factory.mktemp("preempted") / "run"
    args = (*ARGS, "--checkpoint.interval", "1000")
    training = Training(dump, *args, nproc=2)
    training.wait_until(lambda: "step:  2 " in training.output)
    training.process.send_signal(signal.SIGTERM)  # to run_train.sh, as a scheduler would
    stopped = training.finish()
    kept = saved(dump)
    if stopped.returncode != 75 or not stopped.losses:
        return stopped, kept, stopped, -1  # the tests say what went wrong
    resume_at = max(stopped.losses) + 1
    rerun = Training(dump, *args, nproc=2, env={"MAX_RESTARTS": "1"})
    rerun.wait_until(lambda: 1 in rerun.worker_pids())
    rank_1 = rerun.worker_pids()[1]
    rerun.wait_until(lambda: max(Run(0, rerun.output).losses, default=0) >= resume_at + 1)
    os.kill(rank_1, signal.SIGKILL)
    killed_at = max(Run(0, rerun.output).losses)  # the kill came after this step at the latest
    return stopped, kept, rerun.finish(), killed_at


AHEAD = Ahead(unbroken_training=start_unbroken, preempted=preempt)  # in the background (conftest)


@pytest.fixture(scope="module")
def unbroken_training(tmp_path_factory) -> Iterator[Training]:
    """The unbroken run, started (see `unbroken`)."""
    training = AHEAD.take("unbroken_training", tmp_path_factory)
    yield training
    training.process.wait(timeout=300)


@pytest.fixture(scope="module")
def unbroken(unbroken_training) -> tuple[Run, Path]:
    """The unbroken run, finished."""
    return unbroken_training.finish(), unbroken_training.dump_folder


@pytest.fixture(scope="module")
def preempted(tmp_path_factory) -> tuple[Run, list[str], Run, int]:
    """See preempt: the scenario, played in the background (or here, when it has not)."""
    return AHEAD.take("preempted", tmp_path_factory)


@pytest.mark.e2e
def test_sigterm_stops_after_the_step_with_a_checkpoint(preempted) -> None:
    stopped, kept, _, _ = preempted
    assert stopped.returncode == 75, stopped.output[-3000:]
    last = max(stopped.losses)
    assert 2 <= last < STEPS
    assert kept == [f"step-{last}"]
    assert f"preempted after step {last}" in stopped.output
    assert "run the same command again" in stopped.output


@pytest.mark.e2e
def test_the_rerun_after_sigterm_resumes_at_the_next_step_and_ends_unbroken(
    preempted, unbroken
) -> None:
    stopped, _, rerun, _ = preempted
    assert stopped.returncode == 75, stopped.output[-3000:]
    assert min(rerun.losses) == max(stopped.losses) + 1
    assert final_loss(rerun) == pytest.approx(final_loss(unbroken[0]), rel=1e-5)


@pytest.mark.e2e
def test_a_killed_process_restarts_from_the_last_checkpoint_and_ends_unbroken(
    preempted, unbroken
) -> None:
    """The rerun above: torchrun restarts its processes after one is killed, and they
    resume from the newest checkpoint (the one SIGTERM left)."""
    stopped, _, rerun, killed_at = preempted
    assert stopped.returncode == 75, stopped.output[-3000:]
    assert "exitcode: -9" in rerun.output, rerun.output[-3000:]  # torchrun saw the kill
    assert killed_at < STEPS, "the run ended before the kill"
    assert rerun.output.count(f"Training starts at step {max(stopped.losses) + 1}") == 2
    assert final_loss(rerun) == pytest.approx(final_loss(unbroken[0]), rel=1e-5)


@pytest.mark.e2e
def test_half_written_checkpoints_are_skipped_and_named(unbroken, tmp_path) -> None:
    reference = unbroken[1] / "checkpoint"
    dump = tmp_path / "run"
    for step in (4, 8, 12, 16):
        shutil.copytree(reference / f"step-{step}", dump / "checkpoint" / f"step-{step}")
    data = dump / "checkpoint" / "step-16" / "__1_0.distcp"
    with open(data, "r+b") as f:  # a disk that corrupted data in place: the size is right
        f.seek(data.stat().st_size // 2)
        f.write(bytes(64))
    (dump / "checkpoint" / "step-12" / ".metadata").unlink()  # killed before DCP's last write
    data = sorted((dump / "checkpoint" / "step-8").glob("*.distcp"))[-1]
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # a disk that lost data
    assert "does not match its checksum" in (checkpoint_problem(data.parents[1] / "step-16") or "")
    assert "no .metadata" in (checkpoint_problem(dump / "checkpoint" / "step-12") or "")
    assert "cut short" in (checkpoint_problem(dump / "checkpoint" / "step-8") or "")
    assert checkpoint_problem(reference / "step-4") is None
    assert latest_complete_step(dump / "checkpoint") == 4

    # one process (the same global batch of 8) resumes the two processes' checkpoints
    run = train_here(dump, *ARGS, *EVERY_4, "--training.local_batch_size", "8")
    assert "step-16 is corrupted (__1_0.distcp does not match its checksum)" in run.output
    assert "step-12 is incomplete (no .metadata" in run.output
    assert "step-8 is incomplete" in run.output and "cut short" in run.output
    assert "resuming from step-4, the newest complete checkpoint" in run.output
    assert min(run.losses) == 5
    assert final_loss(run) == pytest.approx(final_loss(unbroken[0]), rel=1e-5)


@pytest.mark.e2e
def test_an_explicit_load_of_a_half_written_checkpoint_is_refused_in_one_line(
    unbroken, tmp_path
) -> None:
    dump = tmp_path / "run"
    shutil.copytree(unbroken[1] / "checkpoint" / "step-4", dump / "checkpoint" / "step-4")
    (dump / "checkpoint" / "step-4" / ".metadata").unlink()
    run = train_here(dump, *ARGS, "--checkpoint.load_step", "4")
    lines = [line for line in run.output.splitlines() if "flux: error:" in line]
    assert run.returncode != 0 and len(lines) == 1, run.output[-3000:]
    assert "step-4 is incomplete (no .metadata" in lines[0]


@pytest.fixture(scope="module")
def diverged(tmp_path_factory) -> tuple[Run, Path, Path]:
    """4 steps at lr 1e30 on a folder of 6 images and 3 bad files: step 1 throws the
    weights to ~1e30, so every later loss overflows and steps 2-4 are not applied."""
    folder = folder_with_bad_files(tmp_path_factory.mktemp("data") / "images", good=6)
    dump = tmp_path_factory.mktemp("diverged")
    args = (
        *("--debug.seed", "0", "--training.steps", "4", "--training.local_batch_size", "4"),
        *("--validation.freq", "100", "--validation.steps", "1"),
        *("--validation.sampling_steps", "1", "--checkpoint.enable"),
        *("--optimizer.lr", "1e30", "--checkpoint.interval", "1"),
        *("--training.dataset", "imagefolder", "--training.dataset_path", str(folder)),
    )
    return train_here(dump, *args), dump, folder


@pytest.mark.e2e
def test_a_run_whose_last_step_was_not_applied_fails_naming_the_steps(diverged) -> None:
    run, dump, _ = diverged
    assert run.returncode == 1, run.output[-3000:]
    for step in (2, 3, 4):
        assert f"step {step}: loss nan / gradient norm nan not finite" in run.output
    assert "3 steps not applied (loss or gradients not finite): 2, 3, 4" in run.output
    lines = [line for line in run.output.splitlines() if "flux: error:" in line]
    assert len(lines) == 1 and "the last step (4) was not applied" in lines[0], run.output
    assert "Training completed" not in run.output
    assert saved(dump) == ["step-1"]  # nothing saved after the last good step
    assert checkpoint_problem(dump / "checkpoint" / "step-1") is None
    assert math.isfinite(run.losses[1]) and math.isnan(run.losses[2])


@pytest.mark.e2e
def test_the_skip_totals_at_the_end_of_a_run_count_every_bad_file_read(diverged) -> None:
    run, _, folder = diverged
    (line,) = [line for line in run.output.splitlines() if "data: 16 samples used" in line]
    # the same reader, in this process: the 16 samples of the run and the files it skipped
    reader = CaptionedImages("imagefolder", 64, path=folder)
    assert len(list(itertools.islice(iter(reader), 16))) == 16
    skipped = sum(reader.skipped.values())
    assert skipped >= 2 * 3  # 16 of 6 good images: every bad file was met twice or more
    assert f"data: 16 samples used, {skipped} skipped (" in line
    assert "undecodable image" in line
    (last_step,) = [line for line in run.output.splitlines() if "step:  4  loss" in line]
    assert f"skipped: {skipped} (" in last_step  # the periodic line carries the counts


def test_non_finite_steps_in_a_row_stop_the_run_and_the_last_one_is_named() -> None:
    steps = NonFiniteSteps(limit=3)
    steps.record(1, True, 1.0, 1.0)
    steps.record(2, False, float("nan"), float("nan"))
    steps.record(3, True, 1.0, 1.0)
    steps.check_last_step(3)
    with pytest.raises(LastStepNotAppliedError, match=r"last step \(4\) was not applied"):
        steps.record(4, False, float("nan"), 1.0)
        steps.check_last_step(4)
    steps.record(5, False, float("inf"), 1.0)
    with pytest.raises(NonFiniteLossError, match="not finite for 3 steps in a row"):
        steps.record(6, False, float("nan"), 1.0)
    assert steps.summary() == "4 steps not applied (loss or gradients not finite): 2, 4, 5, 6"


def test_too_many_skipped_samples_stop_the_run_once_enough_were_read() -> None:
    few = Skips(Counter({"undecodable image": 50}), used=MIN_SAMPLES_JUDGED - 51)
    few.check(max_fraction=0.01)  # too few read to judge
    many = Skips(Counter({"undecodable image": 150, "empty caption": 50}), used=1800)
    many.check(max_fraction=0.1)  # 10% exactly is allowed
    with pytest.raises(TooManySkipsError) as error:
        many.check(max_fraction=0.05)
    message = str(error.value)
    assert "200 of the 2000 samples read so far were skipped (10.0%" in message
    assert "150 undecodable image, 50 empty caption" in message and "\n" not in message
    assert many.metrics("data/")["data/skipped/undecodable_image"] == 150


@pytest.mark.e2e
def test_a_checkpoint_of_another_model_is_refused_in_one_line(tmp_path) -> None:
    import dataclasses

    from flux.model.args import flux_configs
    from flux.model.model import FluxModel
    from flux.weights import save_dcp

    wider = dataclasses.replace(flux_configs["flux-debug"], hidden_size=128, num_heads=8)
    save_dcp(FluxModel(wider).state_dict(), tmp_path / "checkpoint" / "step-2")
    run = train_here(tmp_path, *ARGS)
    lines = [line for line in run.output.splitlines() if "flux: error:" in line]
    assert run.returncode != 0 and len(lines) == 1, run.output[-3000:]
    assert "was written by another model" in lines[0] and "model.flavor" in lines[0]
    assert "step:" not in run.output  # refused before any step


@pytest.mark.e2e
def test_a_non_finite_step_changes_no_weight_nor_the_average_and_training_goes_on(
    tmp_path,
) -> None:
    from safetensors.torch import load_file

    from flux.data.dataset import CaptionedImages
    from flux.data.precomputed import shard_metadata, write_shard
    from tests.caches import make_cache

    # One sample of a cache made NaN: the step that reads it (step 3 of batches of 4 in the
    # source's shuffled order) gets a NaN loss; the validation loss, measured after every
    # step on clean held-out data, must not move across that step and must move across others;
    # and so must the validation loss of the average of the weights ([ema]).
    cache = make_cache(tmp_path / "cache", 20, "--shard_size", "20")
    order = [s.key for s, _ in zip(CaptionedImages("precomputed", 64, path=cache), range(9))]
    shard = cache / "shard-000000.safetensors"
    meta, tensors = shard_metadata(shard), load_file(str(shard))
    tensors["moments"][meta["keys"].index(order[8])] = float("nan")
    write_shard(shard, tensors, meta)

    args = (
        *("--debug.seed", "0", "--training.steps", "5", "--training.local_batch_size", "4"),
        *("--training.dataset", "precomputed", "--training.dataset_path", str(cache)),
        *("--lr_scheduler.warmup_steps", "1", "--training.max_nonfinite_steps", "2"),
        *("--validation.freq", "1", "--validation.steps", "1", "--validation.sampling_steps", "1"),
        *("--ema.enable", "--ema.decay", "0.5"),
    )
    run = train_here(tmp_path / "run", *args)
    assert run.returncode == 0, run.output[-3000:]
    assert "step 3: loss nan / gradient norm nan not finite" in run.output
    assert "1 step not applied (loss or gradients not finite): 3" in run.output
    assert "Training completed" in run.output  # its last step was applied
    assert [s for s, v in run.losses.items() if not math.isfinite(v)] == [3]
    for val in (run.validation_losses, run.ema_validation_losses):
        assert sorted(val) == [1, 2, 3, 4, 5] and all(math.isfinite(v) for v in val.values())
        assert val[3] == val[2]  # step 3 was not applied
        assert val[2] != val[1] and val[4] != val[3] and val[5] != val[4]  # the others were
