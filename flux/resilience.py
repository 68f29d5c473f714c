"""What keeps a run's work when the cluster or the numbers go wrong.

Preemption: SLURM sends SIGTERM (or the SIGUSR1 asked for with `sbatch --signal`) before it
kills a job. Every rank notes the signal and goes on; at the end of the step all ranks agree
to stop (one all-reduce), the step's checkpoint is written, and the trainer exits with
REQUEUE_EXIT_CODE after writing the file named by FLUX_REQUEUE_FILE, which run_train.sh
turns into its exit status and slurm_train.sh into `scontrol requeue`.

Killed processes: torchrun --max-restarts starts every process again, and they resume from
the last checkpoint (each attempt's process group gets store keys of its own: flux.seam).

Non-finite steps: a step whose loss or gradient norm is not finite on any rank is not
applied; after `training.max_nonfinite_steps` of them in a row the run stops with
NonFiniteLossError, and no checkpoint has been written since the last good step.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist
from torch import Tensor
from torchtitan.tools.logging import logger

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: stopped to be started again
REQUEUE_FILE_ENV = "FLUX_REQUEUE_FILE"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row; the message says what to do, in one line."""


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


def step_verdict(loss: Tensor, grad_norm: Tensor, stop_requested: bool) -> tuple[bool, bool]:
    """(finite, stop): whether every rank's loss and the gradient norm are finite, and
    whether any rank was asked to stop. One all-reduce, so all ranks decide alike."""
    flags = torch.stack(
        [
            (~torch.isfinite(loss.detach().float())).float(),
            (~torch.isfinite(grad_norm.detach().float())).float(),
            torch.tensor(float(stop_requested), device=loss.device),
        ]
    )
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    nonfinite_loss, nonfinite_grad, stop = flags.tolist()
    return not (nonfinite_loss or nonfinite_grad), bool(stop)


class NonFiniteSteps:
    """Counts non-finite steps in a row and says when to give up."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"training.max_nonfinite_steps = {limit}: use 1 or more")
        self.limit = limit
        self.in_a_row = 0
        self.last_good_step = 0

    def record(self, step: int, finite: bool, loss: float, grad_norm: float) -> None:
        if finite:
            self.in_a_row, self.last_good_step = 0, step
            return
        self.in_a_row += 1
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


def write_requeue_file(step: int, checkpoint_folder: str | None) -> None:
    """Rank 0 tells the launch script the run stopped to be started again."""
    path = os.environ.get(REQUEUE_FILE_ENV)
    if not path or (dist.is_initialized() and dist.get_rank() != 0):
        return
    where = f"checkpoint {checkpoint_folder}/step-{step}" if checkpoint_folder else "no checkpoint"
    Path(path).write_text(f"preempted after step {step}; {where}\n")
