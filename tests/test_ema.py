"""The average of the weights (flux.ema) on one process: the update against a plain
reference, the swap for validation, checkpoints, export errors. Layouts (FSDP, TP) are
checked in tests/parallel/tp_worker.py, the trainer's use end to end in tests/test_train.py,
tests/test_resilience.py and tests/scripts/test_infer_convert.py."""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp

from flux.checkpoint import EMA, FluxCheckpointManager
from flux.ema import EmaSettings, WeightAverage, ema_bytes_per_parameter
from flux.model.args import flux_configs
from flux.model.model import FluxModel
from flux.scripts import convert
from flux.weights import WeightsError, read_weights, save_dcp, save_safetensors

ARGS = flux_configs["flux-debug"]


def model(seed: int = 0, dtype: torch.dtype = torch.float32) -> FluxModel:
    torch.manual_seed(seed)
    return FluxModel(ARGS).to(dtype)


@torch.no_grad()
def train_step(m: torch.nn.Module, step: int) -> None:
    """Move every weight, as an optimizer step would (differently at each step)."""
    g = torch.Generator().manual_seed(step)
    for p in m.parameters():
        p.add_(torch.randn(p.shape, generator=g).to(p.dtype), alpha=0.1)


def reference_average(weights: list[dict[str, torch.Tensor]], steps: list[int], s: EmaSettings):
    """The EMA written out plainly, in float64: weights[i] are the weights after steps[i]."""
    average: dict[str, torch.Tensor] = {}
    k = 0
    for step, w in zip(steps, weights):
        if step < s.start_step or step % s.update_every != 0:
            continue
        if k == 0:
            average = {n: v.double() for n, v in w.items()}
        else:
            decay = min(s.decay, (1 + k) / (10 + k)) if s.warmup else s.decay
            average = {n: decay * average[n] + (1 - decay) * w[n].double() for n in w}
        k += 1
    return average, k


@pytest.mark.parametrize(
    "warmup, dtype, offload",
    [
        (True, torch.float32, False),
        (False, torch.float32, False),
        (True, torch.bfloat16, False),
        (True, torch.bfloat16, True),  # through the host buffer, a few tensors at a time
    ],
)
def test_the_average_follows_a_plain_reference(
    warmup: bool, dtype: torch.dtype, offload: bool, monkeypatch
) -> None:
    monkeypatch.setattr("flux.ema.STAGING_BYTES", 2**18)  # the debug model's: 2 MiB
    settings = EmaSettings(decay=0.8, warmup=warmup, update_every=2, start_step=3)
    settings = dataclasses.replace(settings, cpu_offload=offload)
    m = model(dtype=dtype)
    average = WeightAverage(m, settings)
    steps, weights = list(range(1, 13)), []
    for step in steps:
        train_step(m, step)
        weights.append({n: p.detach().clone() for n, p in m.named_parameters()})
        assert average.update(step) == (step >= 3 and step % 2 == 0)
    expected, updates = reference_average(weights, steps, settings)
    assert average.updates == updates == 5  # steps 4, 6, 8, 10, 12
    for name, value in average.average.items():
        assert value.dtype == torch.float32  # whatever the weights' dtype
        torch.testing.assert_close(value.double(), expected[name], rtol=1e-6, atol=1e-6)
    last = {n: p.float() for n, p in m.named_parameters()}
    assert not all(torch.equal(v, last[n]) for n, v in average.average.items())


def test_the_first_update_copies_the_weights_and_the_warmup_ramps_the_decay() -> None:
    s = EmaSettings(decay=0.9999)
    assert s.decay_at(0) == 0.0
    assert s.decay_at(1) == pytest.approx(2 / 11) and s.decay_at(100) == pytest.approx(101 / 110)
    assert s.decay_at(10**6) == 0.9999
    assert EmaSettings(decay=0.9999, warmup=False).decay_at(1) == 0.9999


@pytest.mark.parametrize("offload", [False, True])
def test_an_update_masked_on_the_device_is_the_plain_update_or_none(offload: bool) -> None:
    """The trainer's update of a step whose verdict is still on the device: 0 (applied)
    gives the plain update exactly, 1 (not applied) leaves the average and, uncounted,
    the next update's decay as they were."""
    settings = EmaSettings(decay=0.8, cpu_offload=offload)
    m = model()
    masked, plain = WeightAverage(m, settings), WeightAverage(m, settings)
    for step in (1, 2):  # the first (a copy) and an average
        train_step(m, step)
        assert masked.update(step, not_applied=torch.tensor(0.0))
        plain.update(step)
        assert all(torch.equal(v, plain.average[n]) for n, v in masked.average.items())
    kept = {n: v.clone() for n, v in masked.average.items()}
    train_step(m, 3)
    assert masked.update(3, not_applied=torch.tensor(1.0)) and masked.updates == 3
    assert all(torch.equal(v, kept[n]) for n, v in masked.average.items())
    masked.not_applied()
    masked.update(3)
    plain.update(3)
    assert masked.updates == plain.updates == 3
    assert all(torch.equal(v, plain.average[n]) for n, v in masked.average.items())


@pytest.mark.parametrize("dtype, offload", [(torch.float32, False), (torch.bfloat16, True)])
def test_validation_swaps_the_average_in_and_the_weights_back_exactly(dtype, offload) -> None:
    m = model(dtype=dtype)
    average = WeightAverage(m, EmaSettings(decay=0.5, cpu_offload=offload))
    average.update(1)
    train_step(m, 2)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    kept = {n: v.clone() for n, v in average.average.items()}
    with average.swapped_in():
        for n, p in m.named_parameters():
            assert torch.equal(p, kept[n].to(dtype))
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n])
        assert torch.equal(average.average[n], kept[n])


def test_a_saved_average_loads_exactly_with_its_update_count(tmp_path) -> None:
    settings = EmaSettings(decay=0.7)
    m = model()
    average = WeightAverage(m, settings)
    for step in (1, 2, 3):
        train_step(m, step)
        average.update(step)
    dcp.save({EMA: average}, checkpoint_id=str(tmp_path), no_dist=True)
    other = WeightAverage(model(seed=1), settings)
    dcp.load({EMA: other}, checkpoint_id=str(tmp_path), no_dist=True)
    assert other.updates == 3
    assert all(torch.equal(other.average[n], v) for n, v in average.average.items())
    # what export reads: the average under the model's own names
    exported = read_weights(tmp_path, FluxModel(ARGS), average=True)
    assert all(torch.equal(exported[n], v) for n, v in average.average.items())


def test_a_checkpoint_without_an_average_resumes_and_starts_one(tmp_path, caplog) -> None:
    m = model()
    save_dcp(m.state_dict(), tmp_path / "step-2")
    state = {**m.state_dict(), EMA: WeightAverage(m, EmaSettings(decay=0.9))}
    # check_before_load reads these from the manager
    manager = SimpleNamespace(states={}, verified=None, initial_load_path=None)
    with caplog.at_level(logging.WARNING):
        FluxCheckpointManager.check_before_load(manager, state, str(tmp_path / "step-2"))  # type: ignore[arg-type]
    assert EMA not in state  # DCP is not asked for it
    assert "holds no EMA" in caplog.text


def test_exporting_the_average_of_a_checkpoint_without_one_is_refused(tmp_path, capsys) -> None:
    save_dcp(model().state_dict(), tmp_path / "ckpt")
    with pytest.raises(SystemExit):
        convert.main(["to-flux", str(tmp_path / "ckpt"), str(tmp_path / "x.st"), "--ema"])
    err = capsys.readouterr().err.strip()
    assert "holds no average of the weights" in err and "\n" not in err
    save_safetensors(model().state_dict(), tmp_path / "model.safetensors", "float32")
    with pytest.raises(WeightsError, match="not a checkpoint"):
        read_weights(tmp_path / "model.safetensors", FluxModel(ARGS), average=True)


def test_memory_per_parameter_for_the_planner() -> None:
    assert ema_bytes_per_parameter(None) == {"device": 0, "host": 0}
    assert ema_bytes_per_parameter(EmaSettings(decay=0.9)) == {"device": 4, "host": 0}
    assert ema_bytes_per_parameter(EmaSettings(0.9, cpu_offload=True)) == {"device": 0, "host": 4}
