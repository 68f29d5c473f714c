"""Validation in this process: on a compiled model; the MLPerf loss by hand, across ranks and
batch sizes; when validation is due by samples seen; the stop at the target loss (and, e2e,
the MLPerf recipe in small)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from flux import validate
from flux.config import DEBUG_CONFIG
from flux.flow import Encoded, FlowBatch
from flux.generate import SampleSettings, grid_tiles, image_grid
from flux.model.args import flux_configs
from flux.model.model import FluxModel
from flux.train_spec import build_preprocessor, global_batch_size, validation_settings
from flux.validate import (
    FluxValidator,
    TimestepLosses,
    ValidationSettings,
    time_to_train_line,
    without_recompiling,
)
from tests.caches import job, make_cache_in_a_process
from tests.launch import Ahead, Run, Training
from tests.model.helpers import compiled_debug_model, model_inputs, randomize

CPU = torch.device("cpu")
SETTINGS = ValidationSettings(
    dataset="shapes",
    dataset_path=None,
    img_size=64,
    local_batch_size=3,
    steps=1,
    freq=1,
    loss_timesteps=8,
    sample_prompts=(),
    sampling=SampleSettings(width=64, height=64, steps=1, cfg_scale=1.0, shift=False),
    seed=0,
    folder=Path("unused"),
    metric="mlperf",
    samples=10,
)


def test_validation_runs_compiled_blocks_without_compiling_them_again() -> None:
    args = flux_configs["flux-debug"]
    model, graphs = compiled_debug_model()
    randomize(model, std=0.05)
    model(**model_inputs(args)).square().mean().backward()  # training's shapes
    trained = len(graphs)
    validation = model_inputs(args, batch=3, h=2, w=2, txt_len=5)
    with torch.no_grad(), without_recompiling():
        out = model(**validation)
    assert len(graphs) == trained
    with torch.no_grad():
        torch.testing.assert_close(model(**validation), out)  # compiles anew, the same
    assert len(graphs) > trained


class OneProcess:
    """ParallelDims as a validator of one data-parallel rank (in this process) sees it."""

    dp_enabled = False

    def get_optional_mesh(self, name: str) -> None:
        return None


def validator(rank: int = 0, ranks: int = 1, **changes: Any) -> FluxValidator:
    settings = dataclasses.replace(SETTINGS, **changes)
    return FluxValidator(settings, ranks, rank, OneProcess(), None)  # type: ignore[arg-type]


class ZeroLatents:
    """A preprocessor whose latents and velocity targets are 0: a model's loss is then the
    mean square of its prediction."""

    def encode(self, batch: dict, dropout_prob: float, streams: Any) -> Encoded:
        b = len(batch["captions"])
        return Encoded(torch.zeros(b, 4, 2), torch.zeros(b, 1, 2), torch.zeros(b, 2), 2, 2)

    def flow(self, encoded: Encoded, t: torch.Tensor, noise: torch.Tensor) -> FlowBatch:
        return FlowBatch({"timesteps": t, "img": encoded.x0}, torch.zeros_like(encoded.x0))


class PredictsT(nn.Module):
    """Predicts t everywhere (so a sample's loss is t²); counts its forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.forwards = 0

    def forward(self, timesteps: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        return timesteps[:, None, None].expand_as(img)


def by_class(ranks: int, **changes: Any) -> tuple[TimestepLosses, list[int]]:
    """The sums and counts of every rank added (what all_reduce gives), and each rank's
    forwards."""
    total, forwards = None, []
    for rank in range(ranks):
        v = validator(rank, ranks, **changes)
        v.preprocess = ZeroLatents()  # type: ignore[assignment]
        model = PredictsT()
        part, _ = v.mlperf_loss(model)
        forwards.append(model.forwards)
        if total is None:
            total = part
        else:
            total = TimestepLosses(total.sums + part.sums, total.counts + part.counts)
    assert total is not None
    return total, forwards


def test_the_mlperf_loss_is_the_mean_over_timesteps_of_each_ones_mean() -> None:
    # 10 samples: sample i at t = (i mod 8)/8, so classes 0 and 1 hold two samples each.
    # Each class's mean is (k/8)²; their mean is (0 + 1 + 4 + ... + 49) / 64 / 8.
    losses, forwards = by_class(1)
    assert losses.counts.tolist() == [2, 2, 1, 1, 1, 1, 1, 1]
    assert losses.per_timestep() == pytest.approx([k * k / 64 for k in range(8)])
    assert losses.mean() == pytest.approx(140 / 512)  # not the samples' mean, 141/640
    assert forwards == [4]  # ceil(10 / 3) batches


@pytest.mark.parametrize("ranks, batch", [(2, 3), (3, 1), (4, 2)])
def test_the_mlperf_loss_is_the_same_on_any_ranks_and_batch_size(ranks: int, batch: int) -> None:
    losses, forwards = by_class(ranks, local_batch_size=batch)
    assert losses.counts.tolist() == [2, 2, 1, 1, 1, 1, 1, 1]  # every sample, once
    assert losses.mean() == pytest.approx(140 / 512)
    assert len(set(forwards)) == 1  # FSDP gathers in each forward: every rank runs as many


def test_a_rank_without_samples_still_runs_its_forwards_with_nothing_counted() -> None:
    losses, forwards = by_class(4, samples=5, local_batch_size=1)  # ranks hold 2, 1, 1, 1
    assert forwards == [2, 2, 2, 2]
    assert losses.counts.tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert losses.mean() == pytest.approx(sum(k * k / 64 for k in range(5)) / 5)


def test_the_mlperf_loss_of_the_debug_model_is_fixed_and_independent_of_the_ranks() -> None:
    torch.manual_seed(0)
    args = flux_configs["flux-debug"]
    net = FluxModel(args)
    net.init_weights()
    pre = build_preprocessor(job("--validation.enable"), args, CPU)

    def metric(ranks: int, batch: int) -> float:
        total = TimestepLosses.zeros(8, CPU)
        for rank in range(ranks):
            v = validator(rank, ranks, local_batch_size=batch, samples=6)
            v.attach(pre, CPU)
            with torch.no_grad():
                part, skips = v.mlperf_loss(net)
            assert skips.used == len(range(rank, 6, ranks)) and not skips.counts
            total = TimestepLosses(total.sums + part.sums, total.counts + part.counts)
        return total.mean()

    one = metric(1, 4)
    assert one > 0
    assert metric(1, 4) == one  # the same noise every time
    assert metric(2, 2) == pytest.approx(one, rel=1e-5)
    assert metric(3, 1) == pytest.approx(one, rel=1e-5)


def test_a_validator_with_two_sample_sizes_writes_a_grid_of_both_shapes(
    tmp_path, monkeypatch
) -> None:
    """validation.sample_sizes [[1024, 576], [768, 1024]] at a 64-px run: 80×48 and 48×80,
    each prompt at each size, in one grid whose tiles keep their shapes."""
    config = job(
        "--validation.enable",
        *("--validation.sample_sizes", "1024", "576", "768", "1024"),
        *("--validation.sampling_steps", "1", "--validation.cfg_scale", "1"),
        *("--job.dump_folder", str(tmp_path)),
    )
    config.validation.sample_prompts = ["a red circle", "a blue square"]
    settings = validation_settings(config)
    assert settings.image_sizes() == ((80, 48), (48, 80))
    v = FluxValidator(settings, 1, 0, OneProcess(), None)  # type: ignore[arg-type]
    args = flux_configs["flux-debug"]
    v.attach(build_preprocessor(config, args, CPU), CPU)
    gridded: list[tuple[int, ...]] = []

    def recording_grid(rows, prompts):
        gridded.extend(tuple(images.shape) for images in rows)
        return image_grid(rows, prompts)

    monkeypatch.setattr(validate, "image_grid", recording_grid)
    torch.manual_seed(0)
    model = FluxModel(args)
    model.init_weights()
    with torch.no_grad():
        path = v.save_grid(v.sample(model), step=3)
    assert gridded == [(2, 3, 48, 80), (2, 3, 80, 48)]  # (B, 3, height, width) per size
    assert path == tmp_path / "validation" / "step_000003.png"
    tiles = grid_tiles(str(path))
    assert [(prompt, image.size) for prompt, image in tiles] == [
        ("a red circle", (80, 48)),
        ("a blue square", (80, 48)),
        ("a red circle", (48, 80)),
        ("a blue square", (48, 80)),
    ]


def test_validation_is_due_each_time_the_samples_seen_pass_a_multiple() -> None:
    # 2 ranks × local batch 2 × 2 accumulation steps: 8 samples per step.
    config = job("--training.local_batch_size", "2", "--training.global_batch_size", "8")
    per_step = global_batch_size(config, 2)
    assert per_step == 8
    v = validator(every_samples=20, samples_per_step=per_step)
    assert [s for s in range(1, 9) if v.is_due(s)] == [3, 5, 8]  # 24, 40, 64 samples seen
    assert global_batch_size(job("--training.local_batch_size", "2"), 4) == 8
    by_steps = validator(freq=3)
    assert [s for s in range(1, 9) if by_steps.is_due(s)] == [1, 3, 6]


def test_the_target_loss_is_reached_at_or_below_it() -> None:
    v = validator(target_loss=0.586)
    v.latest = {"raw": 0.6, "ema": 0.5}
    assert v.reached_target() is None  # the raw weights' loss decides
    v.latest = {"raw": 0.586}
    assert v.reached_target() == 0.586
    v.latest = {"ema": 0.5}  # only the average validated
    assert v.reached_target() == 0.5
    never = validator(target_loss=0.0)
    never.latest = {"raw": 0.0001}
    assert never.reached_target() is None
    line = time_to_train_line(0.5812, 0.586, 1024, 1024 * 256, 754.2, 8, "cuda")
    assert line == (
        "time to train: validation loss 0.5812 <= target 0.586 at step 1024: 262,144 "
        "training samples seen, 754.2 s (12.57 min) wall time on 8 GPUs"
    )
    assert time_to_train_line(1.0, 2.0, 1, 4, 1.0, 1, "cpu").endswith("on 1 cpu process")


RECIPE_VALIDATION = """[validation]
enable = true
metric = "mlperf"
loss_timesteps = 8
every_samples = 8
target_loss = 100.0
dataset = "precomputed"
dataset_path = "{cache}"
samples = -1
img_size = 64
local_batch_size = 2
sample_prompts = []
"""


def start_recipe(factory: pytest.TempPathFactory) -> Training:
    """The MLPerf recipe in small: caches of shapes, FSDP over two processes, the mlperf
    metric over 5 held-out samples (one rank's last batch is empty) every 8 samples, and a
    target the first evaluation reaches."""
    folder = factory.mktemp("recipe")
    train = make_cache_in_a_process(folder / "train", 16)
    held_out = make_cache_in_a_process(folder / "held_out", 5, "--split", "validation")
    debug = DEBUG_CONFIG.read_text()
    recipe = folder / "recipe.toml"
    recipe.write_text(
        debug[: debug.index("[validation]")] + RECIPE_VALIDATION.format(cache=held_out)
    )
    return Training(
        folder / "run",
        *("--training.dataset", "precomputed", "--training.dataset_path", str(train)),
        *("--training.steps", "6", "--training.local_batch_size", "2"),
        *("--checkpoint.enable", "--checkpoint.interval", "100"),
        *("--parallelism.data_parallel_shard_degree", "2"),
        nproc=2,
        env={"CONFIG_FILE": str(recipe)},
    )


AHEAD = Ahead(recipe_run=start_recipe)  # started in the background (conftest)


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Path]:
    training = AHEAD.take("recipe_run", tmp_path_factory)
    return training.finish(), training.dump_folder


@pytest.mark.e2e
def test_the_debug_recipe_precomputes_trains_evaluates_and_stops_at_the_target(
    recipe_run,
) -> None:
    """The MLPerf recipe in small (start_recipe): precompute, train, evaluate, stop."""
    run, dump = recipe_run
    assert run.returncode == 0, run.output[-3000:]
    assert sorted(run.losses) == [1, 2]  # 4 samples a step: 8 seen after step 2
    assert list(run.validation_losses) == [2]
    loss = run.validation_losses[2]
    assert 0 < loss < 100
    lines = [line for line in run.output.splitlines() if "time to train:" in line]
    assert len(lines) == 1, run.output[-3000:]
    assert f"validation loss {loss:.4f} <= target 100.0 at step 2: 8 training samples" in lines[0]
    assert "on 2 cpu processes" in lines[0]
    assert "Training completed" in run.output
    assert (dump / "checkpoint" / "step-2").is_dir()  # the last step is saved
    assert not (dump / "validation").exists()  # no prompts: no images
