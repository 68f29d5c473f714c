"""The sweep's search for the largest batch that fits, on peaks given as functions."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from flux.config import parse_config
from flux.plan.planner import PlanSettings, Sweep

GB = 1e9


class Peaks(Sweep):
    """A sweep whose plans are peaks from a function: no fake steps."""

    def __init__(self, peak_of_batch: Any, margin: float = 0.0):
        job = parse_config(["--job.config_file", "flux/train_configs/debug_model.toml"])
        super().__init__(
            job, PlanSettings(ngpu=1, gpus=("h100-80gb", "h200"), margin=margin), "full"
        )
        self.peak_of_batch = peak_of_batch
        self.planned: list[int] = []

    def plans_at(self, batch: int) -> list[Any]:
        if batch not in self.plans:
            self.planned.append(batch)
            memory = SimpleNamespace(peak_bytes=self.peak_of_batch(batch))
            self.plans[batch] = [SimpleNamespace(memory=memory, local_batch=batch)] * 2
        return self.plans[batch]  # type: ignore[return-value]


@pytest.mark.parametrize(
    "peak_of_batch",
    [
        lambda b: 20 * GB + 1.7 * GB * b,  # linear
        lambda b: 20 * GB + 0.5 * GB * b + 0.02 * GB * b * b,  # grows faster
        lambda b: 20 * GB + 8 * GB * b**0.5,  # grows slower
    ],
    ids=["linear", "convex", "concave"],
)
def test_the_largest_batch_fits_and_the_next_does_not(peak_of_batch: Any) -> None:
    sweep = Peaks(peak_of_batch)
    for gpu in range(2):
        usable = sweep.gpus[gpu].hbm_bytes
        largest = sweep.largest(gpu).largest_batch
        assert peak_of_batch(largest) <= usable < peak_of_batch(largest + 1)
    assert len(sweep.planned) <= 16  # about 7 a GPU; the two share what was planned


def test_a_linear_peak_takes_four_plans() -> None:
    sweep = Peaks(lambda b: 20 * GB + 1.7 * GB * b)
    assert sweep.largest(0).largest_batch == 35  # (80 - 20) / 1.7
    assert len(sweep.planned) <= 4


def test_batch_one_that_does_not_fit_is_zero() -> None:
    result = Peaks(lambda b: 90 * GB * b).largest(0)
    assert result.largest_batch == 0 and result.plan is None
