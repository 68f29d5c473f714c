"""Progressive resolution on the debug flavor, in this process: a run trained at 32 px goes
on at 64 px from its checkpoint, either by resuming its folder with a changed img_size (the
optimizer, the learning-rate schedule, the average of the weights and the data order carried;
this run's optimizer settings where they changed) or from another run's checkpoint with
checkpoint.initial_load_path (the weights only, from step 1)."""

from __future__ import annotations

import logging
import math
import shutil
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor
from torchtitan.components.lr_scheduler import build_lr_schedulers

from flux.config import DEBUG_CONFIG, check_config, parse_config
from flux.train import FluxTrainer, one_process

LR = 1e-3
# warm-up over steps 1-2, then constant, decaying over the last 3 of 6 steps: a restarted
# schedule (0.5 lr at its first step) differs from a continued one
SCHEDULE = (
    *("--optimizer.lr", str(LR), "--lr_scheduler.warmup_steps", "2"),
    *("--lr_scheduler.total_steps", "6", "--lr_scheduler.decay_ratio", "0.5"),
    *("--lr_scheduler.decay_type", "linear", "--lr_scheduler.min_lr_factor", "0"),
)


@dataclass
class Steps:
    """What each step of a run saw: its learning rate, loss, samples and image side."""

    steps: list[int] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    sides: set[int] = field(default_factory=set)


def stage(dump: Path, size: int, steps: int, *more: str) -> AbstractContextManager[FluxTrainer]:
    """A debug trainer at size px up to step `steps`, checkpointing into dump."""
    job = parse_config(
        [
            *("--job.config_file", str(DEBUG_CONFIG), "--job.dump_folder", str(dump)),
            *("--training.img_size", str(size), "--training.steps", str(steps)),
            *("--training.local_batch_size", "2", "--metrics.log_freq", "1"),
            *("--validation.no-enable", "--metrics.no-enable-tensorboard", "--ema.enable"),
            *("--checkpoint.enable", "--checkpoint.interval", "2", *SCHEDULE, *more),
        ]
    )
    check_config(job, world_size=1)
    return one_process(job)


def train(trainer: FluxTrainer) -> Steps:
    """trainer.train(), recording each step."""
    seen = Steps()
    optimize, flow_batch = trainer.optimize, trainer.flow_batch

    def recorded_optimize(data_iterator: Any) -> Any:
        seen.steps.append(trainer.step)
        seen.lrs.append(trainer.lr_schedulers.schedulers[0].get_last_lr()[0])
        loss, grad_norm = optimize(data_iterator)
        seen.losses.append(loss.item())
        return loss, grad_norm

    def recorded_flow_batch(batch: dict[str, Any]) -> Any:
        seen.keys += batch["keys"]
        seen.sides.add(batch["images"].shape[-1])
        return flow_batch(batch)

    trainer.optimize = recorded_optimize  # type: ignore[method-assign]
    trainer.flow_batch = recorded_flow_batch  # type: ignore[method-assign]
    trainer.train()
    return seen


def weights(trainer: FluxTrainer) -> dict[str, torch.Tensor]:
    state = trainer.model_parts[0].state_dict()
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).clone() for k, v in state.items()}


def optimizer_steps(trainer: FluxTrainer) -> set[float]:
    return {s["step"].item() for s in trainer.optimizers.optimizers[0].state.values()}


def unbroken_lrs(steps: int, lr: float = LR) -> list[float]:
    """The schedule's learning rate at steps 1..steps of one unbroken run."""
    job = parse_config(["--job.config_file", str(DEBUG_CONFIG), *SCHEDULE])
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    schedule = build_lr_schedulers([optimizer], job.lr_scheduler, steps)  # type: ignore[arg-type]
    lrs = []
    for _ in range(steps):
        lrs.append(schedule.schedulers[0].get_last_lr()[0])
        optimizer.step()
        schedule.step()
    return lrs


@dataclass
class FirstStage:
    dump: Path
    seen: Steps
    weights: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory) -> FirstStage:
    """Two steps at 32 px, checkpointed at step 2."""
    dump = tmp_path_factory.mktemp("progressive") / "run"
    with stage(dump, 32, 2) as trainer:
        seen = train(trainer)
        assert optimizer_steps(trainer) == {2.0}
        return FirstStage(dump, seen, weights(trainer))


def resumed_copy(first: FirstStage, tmp_path: Path) -> Path:
    dump = tmp_path / "run"
    shutil.copytree(first.dump, dump)
    return dump


def test_a_run_goes_on_at_twice_the_size_with_its_optimizer_schedule_average_and_data(
    first_stage, tmp_path
) -> None:
    dump = resumed_copy(first_stage, tmp_path)
    with stage(dump, 64, 4, "--training.local_batch_size", "3") as trainer:
        seen = train(trainer)
        assert seen.steps == [3, 4] and trainer.step == 4
        assert optimizer_steps(trainer) == {4.0}  # Adam's step count (its bias correction)
        assert trainer.ema is not None and trainer.ema.updates == 4
    first = first_stage.seen
    assert first.sides == {32} and seen.sides == {64}
    assert all(math.isfinite(v) and v > 0 for v in first.losses + seen.losses)
    assert first.lrs + seen.lrs == pytest.approx(unbroken_lrs(4), rel=1e-12)
    assert seen.lrs[0] == LR  # a restarted schedule would warm up again (LR / 2)
    assert len(seen.keys) == 6 and not set(seen.keys) & set(first.keys)  # the data goes on


def test_a_resume_trains_with_this_runs_optimizer_settings_and_says_so(
    first_stage, tmp_path, caplog
) -> None:
    caplog.set_level(logging.WARNING)  # whatever level an earlier test left the root logger at
    dump = resumed_copy(first_stage, tmp_path)
    changed = ("--optimizer.lr", str(LR / 2), "--optimizer.weight_decay", "0.01")
    with stage(dump, 64, 3, *changed) as trainer:
        seen = train(trainer)
        groups = trainer.optimizers.optimizers[0].param_groups
        assert {g["weight_decay"] for g in groups} == {0.01}
        assert optimizer_steps(trainer) == {3.0}  # the moments were carried
    assert seen.lrs == pytest.approx([unbroken_lrs(3, LR / 2)[2]], rel=1e-12)
    (line,) = [r.getMessage() for r in caplog.records if "this run's optimizer" in r.getMessage()]
    assert "lr 0.001 -> 0.0005" in line and "weight_decay 0.1 -> 0.01" in line
    assert "(step 2)" in line


@pytest.mark.parametrize("model_only", [True, False], ids=["weights", "everything"])
def test_another_runs_checkpoint_starts_a_run_at_twice_the_size(
    first_stage, tmp_path, caplog, model_only: bool
) -> None:
    caplog.set_level(logging.INFO)
    checkpoint = first_stage.dump / "checkpoint" / "step-2"
    load = ("--checkpoint.initial_load_path", str(checkpoint))
    if not model_only:
        load += ("--checkpoint.no-initial-load-model-only",)
    frozen = ("--optimizer.lr", "0", "--optimizer.weight_decay", "0")  # the weights as loaded
    with stage(tmp_path / "next", 64, 3, *load, *frozen) as trainer:
        seen = train(trainer)
        loaded = weights(trainer)
        steps = optimizer_steps(trainer)
    assert loaded.keys() == first_stage.weights.keys()
    assert all(torch.equal(loaded[k], v) for k, v in first_stage.weights.items())
    assert all(math.isfinite(v) for v in seen.losses) and seen.sides == {64}
    said = "the model's weights only" in caplog.text
    if model_only:  # from step 1: a fresh optimizer, schedule and data order
        assert seen.steps == [1, 2, 3] and steps == {3.0} and said
        assert seen.keys[:2] == first_stage.seen.keys[:2]
    else:  # the checkpoint's step, optimizer and data order, in a new folder
        assert seen.steps == [3] and steps == {3.0} and not said
        assert not set(seen.keys) & set(first_stage.seen.keys)


def test_a_stage_whose_steps_are_already_trained_says_to_raise_training_steps(
    first_stage, tmp_path, caplog
) -> None:
    """The next stage's config must end at a later step than the checkpoint's."""
    caplog.set_level(logging.WARNING)
    with stage(resumed_copy(first_stage, tmp_path), 64, 2) as trainer:
        seen = train(trainer)
    assert seen.steps == []
    (line,) = [r.getMessage() for r in caplog.records if "nothing to train" in r.getMessage()]
    assert "the checkpoint is at step 2 and training.steps is 2" in line
    assert "raise training.steps" in line


def test_aspect_buckets_go_on_from_256_to_512_px(tmp_path) -> None:
    """The issue's stages on the debug flavor: a step at 256 px in aspect buckets, then one
    at 512 px from its checkpoint; finite losses, the step count carried, the images in
    the larger size's buckets."""
    from flux.config import data_buckets
    from tests.data.images import MIX, mixed_folder

    large = {(w * 10, h * 10): count for (w, h), count in MIX.items()}  # 640x480, ...
    images = mixed_folder(tmp_path / "images", large)
    data = ("--training.dataset", "imagefolder", "--training.dataset_path", str(images))
    buckets = ("--training.buckets", "aspect", "--training.max_upscale", "2", *data)
    one = ("--training.local_batch_size", "1")
    with stage(tmp_path / "run", 256, 1, *buckets, *one) as trainer:
        first = train(trainer)
    with stage(tmp_path / "run", 512, 2, *buckets, *one) as trainer:
        second = train(trainer)
        sizes = {w for w, _ in data_buckets(trainer.job_config, 512).sizes}
    assert first.steps == [1] and second.steps == [2]
    assert all(math.isfinite(v) for v in first.losses + second.losses)
    assert second.sides <= sizes and not second.sides & first.sides
