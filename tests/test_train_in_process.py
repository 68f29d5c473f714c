"""The trainer's own step in this process (flux.train.one_process: FSDP over one process,
as each rank of a data-parallel run shards): what it reads back from the device, and what
a step that is not finite leaves behind."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from flux.config import DEBUG_CONFIG, check_config, data_buckets, parse_config
from flux.data.buckets import tokens
from flux.train import FluxTrainer, one_process

# Tensor methods that read a value back to the host: on a GPU, each waits for the device.
READ_BACKS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "__index__")
# The per-sample CPU draws (caption dropout) are host tensors by design (flux.sampling.Streams).
HOST_DRAWS = str(Path("flux") / "data" / "caption_dropout.py")


@pytest.fixture
def trainer(request, tmp_path) -> Iterator[FluxTrainer]:
    """The debug trainer; indirect parameters are more trainer arguments."""
    job = parse_config(
        [
            *("--job.config_file", str(DEBUG_CONFIG), "--job.dump_folder", str(tmp_path)),
            *("--training.local_batch_size", "2", "--metrics.log_freq", "100"),
            *("--validation.no-enable", "--metrics.no-enable-tensorboard"),
            *getattr(request, "param", ()),
        ]
    )
    check_config(job, world_size=1)
    with one_process(job) as trainer:
        trainer.data = trainer.batch_generator(trainer.dataloader)  # type: ignore[attr-defined]
        yield trainer


def step(trainer: FluxTrainer) -> None:
    trainer.step += 1  # as torchtitan's loop counts
    trainer.train_step(trainer.data)  # type: ignore[attr-defined]


def read_backs_during(monkeypatch, run) -> list[str]:
    """The callers (file:line) of every read-back method called while run() runs."""
    calls: list[str] = []
    for name in READ_BACKS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, __original=original, **kwargs):
            caller = next(f for f in inspect.stack()[1:] if "site-packages" not in f.filename)
            calls.append(f"{caller.filename}:{caller.lineno}")
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    try:
        run()
    finally:
        monkeypatch.undo()
    return calls


EMA = ("--ema.enable", "--ema.decay", "0.5")


@pytest.mark.parametrize("trainer", [(), EMA], indirect=True, ids=["", "ema"])
def test_a_finite_step_that_logs_nothing_reads_nothing_back(trainer, monkeypatch) -> None:
    logged = read_backs_during(monkeypatch, lambda: step(trainer))  # step 1 logs
    assert [c for c in logged if HOST_DRAWS not in c], "a logged step reads its loss"
    step(trainer)
    quiet = read_backs_during(monkeypatch, lambda: step(trainer))  # step 3 logs nothing
    assert [c for c in quiet if HOST_DRAWS not in c] == []
    # Its verdict is still on its way; step 2's was read (from host memory) during step 3.
    assert [v.step for v in trainer.verdicts] == [3]
    assert trainer.nonfinite.last_good_step == 2


@pytest.mark.parametrize("trainer", [EMA], indirect=True, ids=["ema"])
def test_a_step_that_is_not_finite_changes_no_weight_and_is_counted_a_step_later(
    trainer, monkeypatch
) -> None:
    step(trainer)
    flow_batch = trainer.flow_batch

    def poisoned(batch):
        flow = flow_batch(batch)
        if trainer.step == 2:
            flow.target = flow.target * float("nan")
        return flow

    monkeypatch.setattr(trainer, "flow_batch", poisoned)
    model, optimizer = trainer.model_parts[0], trainer.optimizers.optimizers[0]

    def weights() -> list[torch.Tensor]:
        return [p.detach().to_local().clone() for p in model.parameters()]

    after_1 = weights()
    average = trainer.ema.average  # type: ignore[union-attr]
    average_1 = {n: v.clone() for n, v in average.items()}
    step(trainer)
    assert all(torch.equal(a, b) for a, b in zip(weights(), after_1))
    assert all(torch.equal(v, average_1[n]) for n, v in average.items())  # nor the average
    assert trainer.nonfinite.in_a_row == 0  # not known on the host yet
    step(trainer)
    assert trainer.nonfinite.in_a_row == 1 and trainer.nonfinite.last_good_step == 1
    assert trainer.ema.updates == 2  # type: ignore[union-attr]  # steps 1 and 3, not 2
    assert not all(torch.equal(a, b) for a, b in zip(weights(), after_1))  # step 3 applied
    # the optimizer counted the two steps it applied, not the one it skipped
    assert {s["step"].item() for s in optimizer.state.values()} == {2.0}
    trainer.settle()
    assert trainer.nonfinite.in_a_row == 0 and trainer.nonfinite.last_good_step == 3


@pytest.fixture
def mixed_images(tmp_path) -> Path:
    from tests.data.images import mixed_folder

    return mixed_folder(tmp_path / "images")


def test_aspect_buckets_train_one_bucket_per_micro_batch_and_validate_by_bucket(
    tmp_path, mixed_images, monkeypatch
) -> None:
    """Images of five aspect ratios at about 48² pixels, two micro-batches per step: each
    micro-batch holds one bucket, its timesteps shifted by its own token count; every step
    is applied; validation logs the loss of each bucket it saw."""
    data = (".dataset", "imagefolder", ".dataset_path", str(mixed_images), ".img_size", "48")
    job = parse_config(
        [
            *("--job.config_file", str(DEBUG_CONFIG), "--job.dump_folder", str(tmp_path / "run")),
            *("--training.local_batch_size", "2", "--training.global_batch_size", "4"),
            *(f"--training{a}" if a.startswith(".") else a for a in data),
            *("--training.buckets", "aspect", "--training.max_upscale", "4"),
            *(f"--validation{a}" if a.startswith(".") else a for a in data),
            *("--validation.steps", "4", "--validation.sampling_steps", "1"),
            *("--metrics.log_freq", "100", "--metrics.no-enable-tensorboard"),
        ]
    )
    check_config(job, world_size=1)
    seen: list[tuple[int, ...]] = []
    logged: dict[str, float] = {}
    with one_process(job) as trainer:
        flow_batch = trainer.flow_batch

        def recorded(batch):
            flow = flow_batch(batch)
            seen.append((tuple(batch["images"].shape), flow.inputs["img"].shape[1]))
            return flow

        monkeypatch.setattr(trainer, "flow_batch", recorded)
        monkeypatch.setattr(
            trainer.metrics_processor,
            "log_validation",
            lambda loss, step, extra_metrics: logged.update(extra_metrics, loss=loss),
        )
        trainer.data = trainer.batch_generator(trainer.dataloader)  # type: ignore[attr-defined]
        for _ in range(3):
            step(trainer)
        trainer.settle()
        assert trainer.nonfinite.last_good_step == 3
        trainer.flux_validator.validate(trainer.model_parts, trainer.step)
    buckets = data_buckets(job, 48)
    assert len(seen) == 6
    for shape, img_tokens in seen:
        assert (shape[3], shape[2]) in buckets.sizes
        assert img_tokens == tokens((shape[3], shape[2]))
    assert len({shape for shape, _ in seen}) > 1  # several buckets, also within a step
    names = {f"validation_metrics/loss_{w}x{h}" for w, h in buckets.sizes}
    per_bucket = {k: v for k, v in logged.items() if k in names}
    assert len(per_bucket) > 1 and all(math.isfinite(v) for v in per_bucket.values()), logged
