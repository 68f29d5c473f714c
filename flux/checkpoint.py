"""What flux adds to torchtitan's CheckpointManager when a checkpoint is loaded.

torchtitan asks DCP for exactly the entries the current run's state dict names. The data
loader's state is one entry per data-parallel rank, so on a resume with another number of
ranks some of them would ask for entries that were never written. Before each load, the
loader is told which entries the checkpoint holds (from DCP's metadata) and asks for one
that exists; the dataset then maps the saved position onto the new world size.
"""

from __future__ import annotations

from typing import Any

from torch.distributed.checkpoint import FileSystemReader
from torchtitan.components.checkpoint import DATALOADER, CheckpointManager

from flux.data.dataloader import CaptionedImageLoader


class CheckpointError(ValueError):
    """A checkpoint this run cannot resume from; the message says what to do, in one line."""


def saved_entries(checkpoint_id: str) -> list[str]:
    """The flattened keys of a DCP checkpoint folder (e.g. 'dataloader.dp_rank_0')."""
    return list(FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata)


def install_load_hooks(checkpointer: CheckpointManager, dataloader: Any) -> None:
    load = checkpointer.dcp_load

    def dcp_load(
        state_dict: dict[str, Any], checkpoint_id: str, from_hf: bool, from_quantized: bool
    ) -> None:
        if not from_hf:
            entries = saved_entries(checkpoint_id)
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

    checkpointer.dcp_load = dcp_load  # type: ignore[method-assign]
