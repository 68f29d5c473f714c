"""The trainer's own step in this process (flux.train.one_process: FSDP over one process,
as each rank of a data-parallel run shards): what it reads back from the device, and what
a step that is not finite leaves behind."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from flux.config import DEBUG_CONFIG, check_config, parse_config
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
