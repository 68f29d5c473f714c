"""What keeps a run's work when the cluster or the numbers go wrong.

Preemption: SLURM sends SIGTERM (or the SIGUSR1 asked for with `sbatch --signal`) before it
kills a job. Every rank notes the signal and goes on; at the end of the step all ranks agree
to stop (one all-reduce), the step's checkpoint is written, and the trainer exits with
REQUEUE_EXIT_CODE after writing the file named by FLUX_REQUEUE_FILE, which run_train.sh
turns into its exit status and slurm_train.sh into `scontrol requeue`.

Killed processes: torchrun --max-restarts starts every process again, and they resume from
the last checkpoint (each attempt's process group gets store keys of its own: flux.seam).

Non-finite steps: a step whose loss or gradient norm is not finite on any rank is not
applied (decided on the device: StepVerdict); after `training.max_nonfinite_steps` of them
in a row the run stops with NonFiniteLossError, and no checkpoint has been written since
the last good step. The host learns a step's verdict a step later (or when it logs or
saves), so ordinary steps never wait for the device; a stop asked for by a signal takes
effect after the step in which every rank has read it. The end of a run names the steps
that were not applied, and a run whose last step was not applied fails
(LastStepNotAppliedError).

Data that goes missing: the samples the loader skipped (undecodable images, unreadable
cache shards, ...) are counted by kind over the data-parallel ranks; the totals go to the
log lines and the metrics, and when more than `training.max_skipped_fraction` of the
samples read were skipped (judged once MIN_SAMPLES_JUDGED have been read), the run stops
(TooManySkipsError) instead of training on what is left. The counts are gathered on
logging steps only, which wait for the device anyway.
"""

from __future__ import annotations

import os
import re
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchtitan.tools.logging import logger

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: stopped to be started again
REQUEUE_FILE_ENV = "FLUX_REQUEUE_FILE"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class RunError(RuntimeError):
    """The run cannot go on; the message says why and what to do, in one line."""


class NonFiniteLossError(RunError):
    """Too many non-finite steps in a row."""


class LastStepNotAppliedError(RunError):
    """The run ended on a step that was not applied."""


class TooManySkipsError(RunError):
    """More of the data was skipped than training.max_skipped_fraction allows."""


class StopSignals:
    """Notes SIGTERM/SIGUSR1 instead of dying of them; the trainer stops at a step's end."""

    def __init__(self) -> None:
        self.received: str | None = None

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            # print, not the logger: a handler may run while the logger holds its lock
            print(f"flux: got {self.received}: stopping after this step", flush=True)


class StepVerdict:
    """One step's verdict, decided on the device, and its copy on the way to the host.

    On the device: whether every rank's loss and the gradient norm are finite, and whether
    any rank was asked to stop, combined across ranks by one all-reduce (max) so that all
    ranks decide alike. `nonfinite` stays there for the optimizer to skip on
    (flux.seam.skipped_where). The host reads the copy (`read`) only when it must know: a
    step later, when the device has long passed that point in the queue (the host then
    never runs more than a step ahead), or when it logs or saves. Nothing here reads a
    tensor back.
    """

    def __init__(self, step: int, loss: Tensor, grad_norm: Tensor, stop_requested: bool):
        device = loss.device
        values = torch.stack([loss.detach().float().reshape(()), grad_norm.detach().float()])
        flags = torch.cat(
            [
                (~torch.isfinite(values)).any().float().reshape(1),
                torch.full((1,), float(stop_requested), device=device),  # a fill, no copy
            ]
        )
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.step = step
        self.nonfinite = flags[0]  # () float32: 1 where the step is not to be applied
        self.averaged = False  # whether the step (masked by nonfinite) updated the EMA
        on_accelerator = device.type != "cpu"
        self.host = torch.empty(4, pin_memory=on_accelerator)  # loss, grad norm, flags
        self.host.copy_(torch.cat([values, flags]), non_blocking=on_accelerator)
        self.ready: torch.Event | None = None
        if on_accelerator:
            self.ready = torch.Event(device=device)
            self.ready.record()
        self.host_values = self.host.numpy()  # host memory, read once the copy has landed

    def read(self) -> tuple[float, float, bool, bool]:
        """(this rank's loss, the gradient norm, finite on every rank, stop on any rank)."""
        if self.ready is not None:
            self.ready.synchronize()
        loss, grad_norm, nonfinite, stop = (float(v) for v in self.host_values)
        return loss, grad_norm, nonfinite == 0.0, stop != 0.0


class NonFiniteSteps:
    """Counts non-finite steps in a row and says when to give up."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"training.max_nonfinite_steps = {limit}: use 1 or more")
        self.limit = limit
        self.in_a_row = 0
        self.last_good_step = 0
        self.not_applied: list[int] = []  # every step of the run that was not applied

    def record(self, step: int, finite: bool, loss: float, grad_norm: float) -> None:
        if finite:
            self.in_a_row, self.last_good_step = 0, step
            return
        self.in_a_row += 1
        self.not_applied.append(step)
        logger.warning(
            f"step {step}: loss {loss} / gradient norm {grad_norm} not finite on some rank: "
            f"step not applied ({self.in_a_row} in a row, at most {self.limit})"
        )
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"step {step}: loss or gradients not finite for {self.in_a_row} steps in a row "
                f"(training.max_nonfinite_steps = {self.limit}); stopped without saving, so "
                f"the last checkpoint (at or before step {self.last_good_step}) is intact: "
                "lower the learning rate or check the data, then run again to resume from it"
            )

    @property
    def in_streak(self) -> bool:
        return self.in_a_row > 0

    def summary(self) -> str | None:
        """The end-of-run line naming the steps not applied (None if every one was)."""
        steps = self.not_applied
        if not steps:
            return None
        shown = ", ".join(map(str, steps[:20])) + (", ..." if len(steps) > 20 else "")
        plural = "s" * (len(steps) > 1)
        return f"{len(steps)} step{plural} not applied (loss or gradients not finite): {shown}"

    def check_last_step(self, step: int) -> None:
        """Fail the run if its last step was not applied."""
        if step in self.not_applied:
            raise LastStepNotAppliedError(
                f"the last step ({step}) was not applied (loss or gradients not finite) and "
                f"no checkpoint was written for it; the last good step was "
                f"{self.last_good_step}: lower the learning rate or check the data, then run "
                "again to resume from the last checkpoint"
            )


# -- data that goes missing ----------------------------------------------------------------
MIN_SAMPLES_JUDGED = 1000  # the skipped fraction is noise before this many samples are read


def skip_counts(loader: Any) -> Counter[str]:
    """What a data loader's dataset skipped so far, by kind (its `dataset.skipped`)."""
    return Counter(getattr(getattr(loader, "dataset", None), "skipped", None) or {})


@dataclass
class Skips:
    """Samples skipped (by kind) and used, over the data-parallel ranks."""

    counts: Counter[str]
    used: int

    @classmethod
    def gather(cls, counts: Counter[str], used: int, group: Any = None) -> Skips:
        """The sums over the ranks of `group` (None: this rank's own); every rank of the
        group calls it."""
        if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
            return cls(Counter(counts), used)
        everyone: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, (dict(counts), used), group=group)
        total: Counter[str] = Counter()
        for rank_counts, _ in everyone:
            total.update(rank_counts)
        return cls(total, sum(rank_used for _, rank_used in everyone))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def fraction(self) -> float:
        read = self.total + self.used
        return self.total / read if read else 0.0

    def kinds(self) -> str:
        return ", ".join(f"{n} {kind}" for kind, n in self.counts.most_common())

    def line(self) -> str:
        """'N samples used, M skipped (f%: K kind, ...)'."""
        skipped = f", {self.total} skipped ({self.fraction:.1%}: {self.kinds()})" * bool(self.total)
        return f"{self.used} samples used{skipped or ', none skipped'}"

    def metrics(self, prefix: str) -> dict[str, float]:
        """Tensorboard scalars: the total, the fraction, and each kind."""
        values = {f"{prefix}skipped": float(self.total), f"{prefix}skipped_fraction": self.fraction}
        for kind, n in self.counts.items():
            values[f"{prefix}skipped/{re.sub(r'[^0-9A-Za-z]+', '_', kind).strip('_')}"] = n
        return values

    def check(self, max_fraction: float) -> None:
        """Stop the run when more than max_fraction of the samples read were skipped."""
        read = self.total + self.used
        if read >= MIN_SAMPLES_JUDGED and self.fraction > max_fraction:
            raise TooManySkipsError(
                f"{self.total} of the {read} samples read so far were skipped "
                f"({self.fraction:.1%}; training.max_skipped_fraction = {max_fraction}): "
                f"{self.kinds()}; fix or remove the bad data (the log names the latest "
                "skipped), or raise training.max_skipped_fraction"
            )


def write_requeue_file(step: int, checkpoint_folder: str | None) -> None:
    """Rank 0 tells the launch script the run stopped to be started again."""
    path = os.environ.get(REQUEUE_FILE_ENV)
    if not path or (dist.is_initialized() and dist.get_rank() != 0):
        return
    where = f"checkpoint {checkpoint_folder}/step-{step}" if checkpoint_folder else "no checkpoint"
    Path(path).write_text(f"preempted after step {step}; {where}\n")
