"""Transformer weights in and out of the trainer: DCP checkpoint folders and FLUX.1-format
safetensors files.

FluxModel's state dict already uses the published FLUX.1 tensor names, and torchtitan's
checkpoints store the model under those same names (wrappers stripped), so conversion is a
matter of reading one format and writing the other; no renaming is involved. A checkpoint
of a run with [ema] also holds the average of the weights, under ema.<the same names>.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint import FileSystemReader
from torchtitan.config import TORCH_DTYPE_MAP

from flux.ema import EMA
from flux.ema import UPDATES as EMA_UPDATES

UPDATES = f"{EMA}.{EMA_UPDATES}"  # flux.ema's count of updates; 0: it has not started

DTYPES = ("bfloat16", "float32")  # what weights are saved and sampled in


class WeightsError(ValueError):
    """Weights that cannot be used as asked; the message says what to do, in one line."""


def _check_keys(path: Path, have: set[str], want: dict[str, Tensor], shapes: dict) -> None:
    missing = sorted(set(want) - have)
    unexpected = sorted(have - set(want))
    wrong = sorted(k for k in set(want) & have if tuple(shapes[k]) != tuple(want[k].shape))
    if missing or wrong:
        raise WeightsError(
            f"{path} does not fit this flavor (missing {len(missing)} tensors, e.g. "
            f"{missing[:2]}; {len(wrong)} of another shape, e.g. {wrong[:2]}; "
            f"{len(unexpected)} unknown): give the --flavor the weights were trained as"
        )


def _metadata(path: Path) -> dict:
    try:
        return FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except (FileNotFoundError, OSError):
        raise WeightsError(
            f"{path} is not a DCP checkpoint (no .metadata): give a checkpoint/step-N "
            "folder or a .safetensors file"
        ) from None


def _updates(path: Path) -> int:
    """How many updates made a checkpoint's average of the weights (-1: it holds none)."""
    if UPDATES not in _metadata(path):
        return -1
    state = {UPDATES: torch.tensor(0, dtype=torch.int64)}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return int(state[UPDATES])


def holds_average(path: str | Path) -> bool:
    """Whether `path` is a checkpoint folder with an average of the weights (flux.ema)
    that has started."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and _updates(path) > 0


def read_weights(path: str | Path, model: nn.Module, average: bool = False) -> dict[str, Tensor]:
    """The transformer's tensors from a DCP checkpoint folder (any world size it was saved
    with) or a FLUX.1-format .safetensors file, checked against the model's names/shapes.
    average: the checkpoint's average of the weights (flux.ema) instead."""
    path = Path(path)
    want = model.state_dict()
    if path.is_dir():
        metadata = _metadata(path)
        prefix = f"{EMA}." if average else ""
        if average and _updates(path) < 1:
            raise WeightsError(
                f"{path} holds no average of the weights"
                + (" yet (its ema.start_step is later)" if UPDATES in metadata else "")
                + ": leave out --ema for its weights, or give a checkpoint of a run with "
                "--ema.enable"
            )
        saved = {k[len(prefix) :]: v for k, v in metadata.items() if k.startswith(prefix)}
        shapes = {k: getattr(v, "size", None) for k, v in saved.items()}
        _check_keys(path, set(saved), want, shapes)
        state = {k: torch.empty_like(v, device="cpu") for k, v in want.items()}
        dcp.load({EMA: state} if average else state, checkpoint_id=str(path), no_dist=True)
        return state
    if not path.is_file():
        raise WeightsError(f"{path} not found: give a checkpoint/step-N folder or a .safetensors")
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: expected a .safetensors file or a DCP checkpoint folder")
    if average:
        raise WeightsError(
            f"{path} is a weights file, not a checkpoint: --ema reads the average from a "
            "checkpoint/step-N folder; leave it out for a file"
        )
    state = load_file(str(path))
    _check_keys(path, set(state), want, {k: v.shape for k, v in state.items()})
    return {k: state[k] for k in want}


def load_weights(path: str | Path, model: nn.Module, average: bool = False) -> None:
    state = read_weights(path, model, average)
    model.load_state_dict(state, strict=True)


def save_safetensors(state: dict[str, Tensor], path: str | Path, dtype: str) -> None:
    """A FLUX.1-format file: the published names, one dtype, contiguous CPU tensors."""
    if dtype not in DTYPES:
        raise WeightsError(f"dtype {dtype!r}: use {' or '.join(DTYPES)}")
    target = TORCH_DTYPE_MAP[dtype]
    out = {k: v.detach().to("cpu", target).contiguous() for k, v in state.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata={"format": "pt"})


def save_dcp(state: dict[str, Tensor], folder: str | Path) -> None:
    """A model-only DCP checkpoint the trainer starts from (checkpoint.initial_load_path)."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise WeightsError(f"{folder} exists and is not empty: give a new folder")
    dcp.save({k: v.contiguous() for k, v in state.items()}, checkpoint_id=str(folder), no_dist=True)
