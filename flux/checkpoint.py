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
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torchtitan.components.checkpoint import DATALOADER, CheckpointManager
from torchtitan.tools.logging import logger

from flux.data.dataloader import CaptionedImageLoader

STEP_FOLDER = re.compile(r"step-(\d+)")
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


def install_load_hooks(checkpointer: CheckpointManager, dataloader: Any) -> None:
    load = checkpointer.dcp_load

    def dcp_load(
        state_dict: dict[str, Any], checkpoint_id: str, from_hf: bool, from_quantized: bool
    ) -> None:
        if not from_hf:
            problem = checkpoint_problem(checkpoint_id)
            if problem is not None:
                raise CheckpointError(
                    f"{checkpoint_id} is incomplete ({problem}): load another step "
                    "(checkpoint.load_step) or remove that folder"
                )
            metadata = read_metadata(checkpoint_id)
            check_model_entries(state_dict, metadata, checkpoint_id)
            entries = list(metadata.state_dict_metadata)
            wanted = [k for k in ("optimizer", "lr_scheduler", DATALOADER) if k in state_dict]
            saved_groups = {k.split(".")[0] for k in entries}
            if wanted and not saved_groups & set(wanted):
                raise CheckpointError(
                    f"{checkpoint_id} holds the model only (checkpoint.last_save_model_only): "
                    "to train on from its weights, start a new dump folder with "
                    f"--checkpoint.initial_load_path {checkpoint_id}; to resume, keep full "
                    "checkpoints (last_save_model_only = false)"
                )
            prefix = f"{DATALOADER}."
            saved = [k[len(prefix) :] for k in entries if k.startswith(prefix)]
            if DATALOADER in state_dict and isinstance(dataloader, CaptionedImageLoader):
                dataloader.expect_saved_ranks(saved)
        load(state_dict, checkpoint_id, from_hf, from_quantized)

    def find_load_step(folder: str = "") -> int:
        return latest_complete_step(folder or checkpointer.folder)

    checkpointer.dcp_load = dcp_load  # type: ignore[method-assign]
    checkpointer._find_load_step = find_load_step  # type: ignore[method-assign]


def install_save_gate(checkpointer: CheckpointManager, save_now: Callable[[], bool | None]) -> None:
    """Before each save decision, ask save_now: True saves, False skips, None keeps the
    configured interval."""
    should_save = checkpointer._should_save

    def gated(curr_step: int, last_step: bool = False) -> bool:
        verdict = save_now()
        if verdict is None or not checkpointer.enable or checkpointer.load_only:
            return should_save(curr_step, last_step)
        return verdict

    checkpointer._should_save = gated  # type: ignore[method-assign]


def wait_for_save(checkpointer: CheckpointManager) -> None:
    """Block until an asynchronous save has reached the disk."""
    checkpointer._async_wait()
