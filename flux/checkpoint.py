"""What flux adds to torchtitan's CheckpointManager.

Which checkpoint to resume from: torchtitan takes the newest `step-N` folder that has a
`.metadata` file. DCP writes that file last, but a crash while saving can still leave a
newer folder without it, or (on a filesystem that lost data) with files shorter than the
metadata says. The newest *complete* folder is chosen instead, and each skipped one is named
in the log.

Before a load: a checkpoint with another model's tensors (another flavor) or without the
training state is refused in one line; and, since torchtitan asks DCP for exactly the
entries the current run's state dict names and the data loader's state is one entry per
data-parallel rank, the loader is told which entries the checkpoint holds so a resume on
another number of ranks asks for one that exists.

When to save: the trainer may override the interval (always when stopping for a signal,
never while its latest step was not applied).

Tensor parallelism keeps FLUX.1's fused projections as strided shards, a layout DCP cannot
save (its chunks are not boxes): checkpoints get plain copies in the Shard layout of the
same dimension, and loaded values go back to the strided layout (the modules' load hooks,
flux.parallel.tensor_parallel). A checkpoint holds the global tensors and moves between
TP, FSDP and single-process layouts like any other.

These methods override private ones of torchtitan's CheckpointManager; flux.seam has the
trainer build FluxCheckpointManager and pins the signatures.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor, Shard
from torchtitan.components.checkpoint import (
    DATALOADER,
    LR_SCHEDULER,
    OPTIMIZER,
    AsyncMode,
    CheckpointManager,
)
from torchtitan.tools.logging import logger

from flux.data.dataloader import CaptionedImageLoader
from flux.seam import StridedShard

STEP_FOLDER = re.compile(r"step-(\d+)")
EMA = "ema"  # flux.ema's average of the weights, in runs with [ema] enabled
HF_INDEX = "model.safetensors.index.json"  # torchtitan's other format (last_save_in_hf)


class CheckpointError(ValueError):
    """A checkpoint this run cannot resume from; the message says what to do, in one line."""


def read_metadata(checkpoint_id: str | Path) -> Metadata:
    return FileSystemReader(str(checkpoint_id)).read_metadata()


def checkpoint_problem(checkpoint_id: str | Path) -> str | None:
    """Why a DCP checkpoint folder is not complete (its save was interrupted), or None."""
    folder = Path(checkpoint_id)
    if (folder / HF_INDEX).is_file():
        return None
    if not (folder / ".metadata").is_file():
        return "no .metadata: its save did not finish"
    try:
        metadata = read_metadata(folder)
    except Exception as e:  # a truncated pickle raises anything from EOFError to KeyError
        return f".metadata cannot be read ({type(e).__name__})"
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), end)
    for name, end in sorted(ends.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size < end:
            return f"{name} is cut short ({path.stat().st_size} of {end} bytes)"
    return None


def latest_complete_step(folder: str | Path) -> int:
    """The newest step-N folder in `folder` that is complete (-1 if none); logs the newer
    ones that are not."""
    root = Path(folder)
    if not root.is_dir():
        return -1
    steps = sorted(
        (int(m.group(1)) for p in root.iterdir() if (m := STEP_FOLDER.fullmatch(p.name))),
        reverse=True,
    )
    skipped: list[int] = []
    for step in steps:
        problem = checkpoint_problem(root / f"step-{step}")
        if problem is None:
            if skipped:
                logger.warning(f"resuming from step-{step}, the newest complete checkpoint")
            return step
        logger.warning(f"checkpoint {root / f'step-{step}'} is incomplete ({problem}): skipped")
        skipped.append(step)
    return -1


def check_model_entries(state_dict: dict[str, Any], metadata: Metadata, checkpoint_id: str) -> None:
    """Refuse a checkpoint whose tensors do not fit this run's model (another flavor)."""
    saved = metadata.state_dict_metadata
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue  # optimizer, data loader, ... are nested under their own names
        entry = saved.get(name)
        if entry is None:
            problem = f"has no {name}"
        elif isinstance(entry, TensorStorageMetadata) and tuple(entry.size) != tuple(value.shape):
            problem = f"has {name} of shape {tuple(entry.size)}, this model {tuple(value.shape)}"
        else:
            continue
        raise CheckpointError(
            f"{checkpoint_id} was written by another model ({problem}): resume it with the "
            "model.flavor it was trained with, or give this run another dump folder"
        )


class FluxCheckpointManager(CheckpointManager):
    """torchtitan's CheckpointManager with what flux adds (see the module's docstring).
    flux.seam has the trainer build it; FluxTrainer then attaches its save verdict."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.save_now: Callable[[], bool | None] = lambda: None
        self.plain_layouts = False  # tensor parallelism: DCP sees plain copies

    def attach(self, save_now: Callable[[], bool | None], plain_layouts: bool) -> None:
        """The trainer's save verdict (True saves, False skips, None keeps the configured
        interval), and whether tensor parallelism's strided layouts need plain copies."""
        self.save_now, self.plain_layouts = save_now, plain_layouts

    def checkpoint_state(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """What DCP sees: with tensor parallelism, plain copies of the strided tensors and
        the optimizer's state through a plain-layout view."""
        if not self.plain_layouts:
            return state_dict
        state = plain_layout(state_dict)
        if OPTIMIZER in state:
            state[OPTIMIZER] = PlainLayoutState(state[OPTIMIZER])
        return state

    def dcp_save(
        self,
        state_dict: dict[str, Any],
        checkpoint_id: str,
        async_mode: AsyncMode,
        enable_garbage_collection: bool = False,
        to_hf: bool = False,
    ) -> Any:
        state = self.checkpoint_state(state_dict)
        return super().dcp_save(state, checkpoint_id, async_mode, enable_garbage_collection, to_hf)

    def dcp_load(
        self, state_dict: dict[str, Any], checkpoint_id: str, from_hf: bool, from_quantized: bool
    ) -> None:
        if not from_hf:
            self.check_before_load(state_dict, checkpoint_id)
        super().dcp_load(self.checkpoint_state(state_dict), checkpoint_id, from_hf, from_quantized)

    def check_before_load(self, state_dict: dict[str, Any], checkpoint_id: str) -> None:
        """Refuse an incomplete checkpoint, another model's, or a model-only one for a
        resume; tell the loader which of its entries the checkpoint holds; leave out an EMA
        the checkpoint lacks."""
        problem = checkpoint_problem(checkpoint_id)
        if problem is not None:
            raise CheckpointError(
                f"{checkpoint_id} is incomplete ({problem}): load another step "
                "(checkpoint.load_step) or remove that folder"
            )
        metadata = read_metadata(checkpoint_id)
        check_model_entries(state_dict, metadata, checkpoint_id)
        entries = list(metadata.state_dict_metadata)
        wanted = [k for k in (OPTIMIZER, LR_SCHEDULER, DATALOADER) if k in state_dict]
        saved_groups = {k.split(".")[0] for k in entries}
        if wanted and not saved_groups & set(wanted):
            raise CheckpointError(
                f"{checkpoint_id} holds the model only (checkpoint.last_save_model_only): "
                "to train on from its weights, start a new dump folder with "
                f"--checkpoint.initial_load_path {checkpoint_id}; to resume, keep full "
                "checkpoints (last_save_model_only = false)"
            )
        if EMA in state_dict and EMA not in saved_groups:  # saved by a run without [ema]
            logger.warning(f"{checkpoint_id} holds no EMA: the average starts from its weights")
            del state_dict[EMA]
        prefix = f"{DATALOADER}."
        saved = [k[len(prefix) :] for k in entries if k.startswith(prefix)]
        loader = self.states.get(DATALOADER)
        if DATALOADER in state_dict and isinstance(loader, CaptionedImageLoader):
            loader.expect_saved_ranks(saved)

    def _find_load_step(self, folder: str = "") -> int:
        return latest_complete_step(folder or self.folder)

    def _should_save(self, curr_step: int, last_step: bool = False) -> bool:
        verdict = self.save_now()
        if verdict is None or not self.enable or self.load_only:
            return super()._should_save(curr_step, last_step)
        return verdict

    def wait_for_save(self) -> None:
        """Block until an asynchronous save has reached the disk."""
        self._async_wait()


# -- tensor parallelism's layouts in checkpoints -------------------------------------------
def _strided_by_tp(t: Any) -> bool:
    names = t.device_mesh.mesh_dim_names if isinstance(t, DTensor) else None
    return (
        names is not None
        and "tp" in names
        and isinstance(t.placements[names.index("tp")], StridedShard)
    )


def _plain(t: DTensor) -> DTensor:
    """The same tensor with tensor parallelism's strided shards as a Shard of its dimension."""
    placements = [Shard(p.dim) if isinstance(p, StridedShard) else p for p in t.placements]
    return t.redistribute(t.device_mesh, placements)


def plain_layout(state: dict[str, Any]) -> dict[str, Any]:
    """A flat state dict with the strided tensors in plain layouts DCP can save."""
    return {k: _plain(v.detach()) if _strided_by_tp(v) else v for k, v in state.items()}


def restore_layout(state: dict[str, Any], like: dict[str, Any]) -> dict[str, Any]:
    """plain_layout undone: each tensor back in the layout of its entry in `like`."""
    restored = dict(state)
    for key, value in state.items():
        target = like.get(key)
        if isinstance(target, DTensor) and _strided_by_tp(target) and isinstance(value, DTensor):
            restored[key] = value.redistribute(target.device_mesh, target.placements)
    return restored


class PlainLayoutState(Stateful):
    """The optimizer's state (moments in the parameters' strided layouts) given to DCP in
    plain layouts, and taken back into the strided ones."""

    def __init__(self, optimizers: Stateful):
        self.optimizers = optimizers

    def state_dict(self) -> dict[str, Any]:
        return plain_layout(self.optimizers.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        like = self.optimizers.state_dict()
        self.optimizers.load_state_dict(restore_layout(state_dict, like))
