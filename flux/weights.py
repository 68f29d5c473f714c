"""Transformer weights in and out of the trainer: DCP checkpoint folders and FLUX.1-format
safetensors files.

FluxModel's state dict already uses the published FLUX.1 tensor names, and torchtitan's
checkpoints store the model under those same names (wrappers stripped), so conversion is a
matter of reading one format and writing the other; no renaming is involved. A checkpoint
of a run with [ema] also holds the average of the weights, under ema.<the same names>.

What is read is checked first against the model's names and shapes (from the files'
headers: a model on the meta device is enough, so a wrong flavor is refused before anything
large is built), a checkpoint folder against its checksums (flux.checkpoint), and the values
for NaN and infinity.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint import FileSystemReader
from torchtitan.config import TORCH_DTYPE_MAP

from flux.checkpoint import NO_CHECKSUMS, checkpoint_problem, describe_nonfinite, seal
from flux.ema import EMA
from flux.ema import UPDATES as EMA_UPDATES

UPDATES = f"{EMA}.{EMA_UPDATES}"  # flux.ema's count of updates; 0: it has not started

DTYPES = ("bfloat16", "float32")  # what weights are saved and sampled in
logger = logging.getLogger(__name__)
# DCP's note that it reads or writes in one process, as these functions ask it to
SINGLE_PROCESS = "torch.distributed is disabled, unavailable or uninitialized"


class WeightsError(ValueError):
    """Weights that cannot be used as asked; the message says what to do, in one line."""


def _check_keys(path: Path, have: dict[str, tuple[int, ...]], want: dict[str, Tensor]) -> None:
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if tuple(have[k]) != tuple(want[k].shape))
    if missing or wrong:
        raise WeightsError(
            f"{path} does not fit this flavor (missing {len(missing)} tensors, e.g. "
            f"{missing[:2]}; {len(wrong)} of another shape, e.g. {wrong[:2]}; "
            f"{len(unexpected)} unknown): give the --flavor the weights were trained as"
        )


def _metadata(path: Path) -> dict:
    """A checkpoint folder's DCP metadata, unverified."""
    try:
        return FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except FileNotFoundError:
        raise WeightsError(
            f"{path} is not a DCP checkpoint (no .metadata): give a checkpoint/step-N "
            "folder or a .safetensors file"
        ) from None
    except OSError as e:
        raise WeightsError(f"{path} cannot be read ({e.strerror or e})") from None


def _updates(path: Path) -> int:
    """How many updates made a checkpoint's average of the weights (-1: it holds none)."""
    if UPDATES not in _metadata(path):
        return -1
    state = {UPDATES: torch.tensor(0, dtype=torch.int64, device="cpu")}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS)
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return int(state[UPDATES])


def holds_average(path: str | Path) -> bool:
    """Whether `path` is a checkpoint folder with an average of the weights (flux.ema)
    that has started."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and _updates(path) > 0


def _dcp_shapes(path: Path, average: bool) -> dict[str, tuple[int, ...]]:
    """The shapes of a checkpoint's weights (average: of its average of the weights), once
    the folder is found complete and matching its checksums."""
    problem = checkpoint_problem(path)
    if problem is not None and not (path / ".metadata").is_file():
        raise WeightsError(
            f"{path} is not a DCP checkpoint (no .metadata): give a checkpoint/step-N "
            "folder or a .safetensors file"
        )
    if problem == NO_CHECKSUMS:
        logger.warning(f"{path} {problem}: read unverified")
    elif problem is not None:
        raise WeightsError(f"{path} {problem}: give another checkpoint")
    metadata = _metadata(path)
    if average and _updates(path) < 1:
        raise WeightsError(
            f"{path} holds no average of the weights"
            + (" yet (its ema.start_step is later)" if UPDATES in metadata else "")
            + ": leave out --ema for its weights, or give a checkpoint of a run with "
            "--ema.enable"
        )
    prefix = f"{EMA}." if average else ""
    return {
        k[len(prefix) :]: tuple(v.size)
        for k, v in metadata.items()
        if k.startswith(prefix) and hasattr(v, "size")
    }


def _safetensors_shapes(path: Path, average: bool) -> dict[str, tuple[int, ...]]:
    if not path.is_file():
        raise WeightsError(f"{path} not found: give a checkpoint/step-N folder or a .safetensors")
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: expected a .safetensors file or a DCP checkpoint folder")
    if average:
        raise WeightsError(
            f"{path} is a weights file, not a checkpoint: --ema reads the average from a "
            "checkpoint/step-N folder; leave it out for a file"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file ({e})") from None


def check_weights(path: str | Path, model: nn.Module, average: bool = False) -> None:
    """Refuse weights that do not fit `model` (names and shapes, read from the headers; the
    model may be on the meta device), or a checkpoint folder that is incomplete or does not
    match its checksums. average: the checkpoint's average of the weights (flux.ema)."""
    path = Path(path)
    shapes = _dcp_shapes(path, average) if path.is_dir() else _safetensors_shapes(path, average)
    _check_keys(path, shapes, model.state_dict())


def check_finite(state: dict[str, Tensor], path: str | Path) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    problem = describe_nonfinite(bad)
    if problem is not None:
        raise WeightsError(
            f"{path} holds values that are not finite ({problem}): give an earlier checkpoint"
        )


def read_weights(
    path: str | Path,
    model: nn.Module,
    average: bool = False,
    allow_nonfinite: bool = False,
    checked: bool = False,
) -> dict[str, Tensor]:
    """The transformer's tensors from a DCP checkpoint folder (any world size it was saved
    with) or a FLUX.1-format .safetensors file, checked against the model's names/shapes and
    the checkpoint's checksums (unless `checked` already) and (unless allow_nonfinite) for
    values that are not finite. average: the checkpoint's average of the weights (flux.ema)
    instead."""
    path = Path(path)
    if not checked:
        check_weights(path, model, average)
    want = model.state_dict()
    try:
        if path.is_dir():
            state = {k: torch.empty_like(v, device="cpu") for k, v in want.items()}
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=SINGLE_PROCESS)
                dcp.load({EMA: state} if average else state, checkpoint_id=str(path), no_dist=True)
        else:
            loaded = load_file(str(path))
            state = {k: loaded[k] for k in want}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise WeightsError(f"{path} cannot be read ({type(e).__name__}: {e})") from None
    if not allow_nonfinite:
        check_finite(state, path)
    return state


def load_weights(
    path: str | Path, model: nn.Module, average: bool = False, checked: bool = False
) -> None:
    state = read_weights(path, model, average, checked=checked)
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
    """A model-only DCP checkpoint the trainer starts from (checkpoint.initial_load_path),
    with its checksums."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise WeightsError(f"{folder} exists and is not empty: give a new folder")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS)
        state = {k: v.contiguous() for k, v in state.items()}
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    seal(folder, rank=0)
