"""What flux adds to torchtitan's CheckpointManager.

Checksums: once a save is complete (for an asynchronous save, when its future finishes, in
the thread that finishes it, while the next steps run), every rank hashes the files it
wrote (`__<rank>_*.distcp`; rank 0 also `.metadata`) and writes `checksums-<rank>.json`
beside them (flux.checksums). A checkpoint is complete only with the checksums of every
file its metadata names.

Which checkpoint to resume from: torchtitan takes the newest `step-N` folder that has a
`.metadata` file. DCP writes that file last, but a crash while saving can still leave a
newer folder without it or without its checksums, a filesystem that lost data can leave
files shorter than the metadata says, and one that corrupted data can leave files of the
right size with other bytes. The newest *complete* folder whose files match their
checksums is chosen instead (each rank hashes a share of the files, and the ranks agree),
and each skipped one is named in the log. A folder without any checksums (an older flux,
another tool) is loaded only when asked for by name, unverified.

Before a load: a checkpoint with another model's tensors (another flavor) or without the
training state is refused in one line; and, since torchtitan asks DCP for exactly the
entries the current run's state dict names and the data loader's state is one entry per
data-parallel rank, the loader is told which entries the checkpoint holds so a resume on
another number of ranks asks for one that exists. After a load: weights or optimizer state
that are not finite are refused in one line.

After a full load, the optimizer's moments and step count and the learning-rate schedule's
position are the checkpoint's, and its settings are this run's: torchtitan would keep the
checkpoint's learning rate, betas, eps and weight decay (they are saved with the moments),
so a resume with a changed optimizer.lr, or a next stage of a progressive run, would
silently train on the old values. The learning rate is this run's schedule at the loaded
step, and what changed is logged. A model-only load (checkpoint.initial_load_path) says
what starts afresh.

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

import math
import re
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor, Shard
from torch.optim.lr_scheduler import LambdaLR
from torchtitan.components.checkpoint import (
    DATALOADER,
    LR_SCHEDULER,
    MODEL,
    OPTIMIZER,
    AsyncMode,
    CheckpointManager,
)
from torchtitan.components.lr_scheduler import LRSchedulersContainer
from torchtitan.tools.logging import logger

from flux.checksums import mismatch, read_checksums, write_checksums
from flux.data.dataloader import CaptionedImageLoader
from flux.seam import StridedShard

STEP_FOLDER = re.compile(r"step-(\d+)")
EMA = "ema"  # flux.ema's average of the weights, in runs with [ema] enabled
HF_INDEX = "model.safetensors.index.json"  # torchtitan's other format (last_save_in_hf)
METADATA = ".metadata"
CHECKSUMS = "checksums-{rank:05d}.json"  # one per saving rank
NO_CHECKSUMS = (
    "has no checksums (written by an older flux or another tool, or its save stopped "
    "before they were written)"
)


class CheckpointError(ValueError):
    """A checkpoint this run cannot resume from; the message says what to do, in one line."""


def read_metadata(checkpoint_id: str | Path) -> Metadata:
    return FileSystemReader(str(checkpoint_id)).read_metadata()


def rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def agreed(problem: str | None) -> str | None:
    """The first rank's problem among every rank's (each checks its own share); every rank
    gets the same answer. One process: its own."""
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return problem
    problems: list[str | None] = [None] * world_size
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p is not None), None)


# -- checksums -------------------------------------------------------------------------------
def seal(checkpoint_id: str | Path, rank: int) -> None:
    """Write this rank's checksums of the files it wrote (rank 0: with .metadata), once the
    save is complete."""
    folder = Path(checkpoint_id)
    files = sorted(folder.glob(f"__{rank}_*.distcp"))
    if rank == 0:
        files.append(folder / METADATA)
    write_checksums(folder / CHECKSUMS.format(rank=rank), files)


def sealed_after(save: Future, rank: int, checkpoint_id: str) -> Future:
    """A future that finishes once `save` has and this rank's checksums are written (by the
    thread that finishes `save`, while training goes on)."""
    sealed: Future = Future()

    def on_done(done: Future) -> None:
        try:
            done.result()
            seal(checkpoint_id, rank)
        except BaseException as e:  # the trainer sees it when it waits for the save
            sealed.set_exception(e)
        else:
            sealed.set_result(None)

    save.add_done_callback(on_done)
    return sealed


def read_all_checksums(folder: Path) -> dict[str, dict[str, Any]]:
    """file name -> {"bytes", "digest"} from every rank's checksum file in `folder`."""
    sums: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob(CHECKSUMS.replace("{rank:05d}", "*"))):
        sums.update(read_checksums(path))
    return sums


def saved_files(folder: Path) -> tuple[str | None, dict[str, int]]:
    """(why the folder is not a finished DCP save, or None; its files -> the bytes the
    metadata says each holds at least)."""
    if not (folder / METADATA).is_file():
        return "is incomplete (no .metadata: its save did not finish)", {}
    try:
        metadata = read_metadata(folder)
    except Exception as e:  # a truncated pickle raises anything from EOFError to KeyError
        return f"is incomplete (.metadata cannot be read ({type(e).__name__}))", {}
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), end)
    return None, ends


def checkpoint_problem(checkpoint_id: str | Path, verify: bool = True) -> str | None:
    """Why a DCP checkpoint folder cannot be loaded as it was saved, or None: its save did
    not finish ("is incomplete (...)"), its files are not what was written ("is corrupted
    (...)"), or NO_CHECKSUMS. verify: also compare the bytes with the checksums (each rank
    of the process group a share of the files; every rank must call this then)."""
    folder = Path(checkpoint_id)
    if (folder / HF_INDEX).is_file():
        return None
    problem, ends = saved_files(folder)
    sums: dict[str, dict[str, Any]] = {}
    if problem is None:
        problem = _structure_problem(folder, ends)
    if problem is None:
        try:
            sums = read_all_checksums(folder)
        except ValueError as e:
            problem = f"is incomplete ({e})"
    if problem is None:
        problem = _checksum_problem(folder, [*sorted(ends), METADATA], sums, verify)
    return agreed(problem) if verify else problem


def _structure_problem(folder: Path, ends: dict[str, int]) -> str | None:
    for name, end in sorted(ends.items()):
        path = folder / name
        if not path.is_file():
            return f"is incomplete ({name} is missing)"
        if path.stat().st_size < end:
            return f"is incomplete ({name} is cut short ({path.stat().st_size} of {end} bytes))"
    return None


def _checksum_problem(
    folder: Path, names: list[str], sums: dict[str, dict[str, Any]], verify: bool
) -> str | None:
    if not sums:
        return NO_CHECKSUMS
    for name in names:
        if name not in sums:
            return f"is incomplete (no checksum of {name}: its save did not finish)"
        wrong = mismatch(folder / name, sums[name], check_digest=False)
        if wrong is not None:
            return f"is corrupted ({wrong})"
    if not verify:
        return None
    rank, world_size = rank_and_world_size()
    for name in names[rank::world_size]:
        wrong = mismatch(folder / name, sums[name])
        if wrong is not None:
            return f"is corrupted ({wrong})"
    return None


def latest_complete_step(folder: str | Path) -> int:
    """The newest step-N folder in `folder` that is complete and matches its checksums (-1
    if there is none); logs the newer ones that are not. With a process group, every rank
    calls this (they share the hashing). Refuses to start over while a folder without
    checksums (an older flux's) is the only candidate: it may be the run's work."""
    root = Path(folder)
    if not root.is_dir():
        return -1
    steps = sorted(
        (int(m.group(1)) for p in root.iterdir() if (m := STEP_FOLDER.fullmatch(p.name))),
        reverse=True,
    )
    skipped: list[int] = []
    unverified: list[int] = []
    for step in steps:
        problem = checkpoint_problem(root / f"step-{step}")
        if problem is None:
            if skipped:
                logger.warning(f"resuming from step-{step}, the newest complete checkpoint")
            return step
        logger.warning(f"checkpoint {root / f'step-{step}'} {problem}: skipped")
        skipped.append(step)
        if problem == NO_CHECKSUMS:
            unverified.append(step)
    if unverified:
        step = unverified[0]
        raise CheckpointError(
            f"{root / f'step-{step}'} {NO_CHECKSUMS} and no other checkpoint is complete: "
            f"resume from it with --checkpoint.load_step {step} (loaded unverified), or move "
            f"{root} away to start over"
        )
    return -1


def nonfinite_entries(state: dict[str, Any], prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a (flat) state dict that hold a NaN or an
    infinity; of a DTensor, this rank's shard is checked."""
    bad = []
    for name, value in state.items():
        if isinstance(value, DTensor):
            value = value.to_local()
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if not bool(torch.isfinite(value).all()):
                bad.append(f"{prefix}{name}")
    return bad


def describe_nonfinite(names: Iterable[str]) -> str | None:
    names = list(names)
    if not names:
        return None
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    return f"{names[0]}{more}"


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
        self.should_save: Callable[[bool], bool] = lambda due: due
        self.plain_layouts = False  # tensor parallelism: DCP sees plain copies
        self.verified: str | None = None  # the checkpoint _find_load_step verified

    def attach(self, should_save: Callable[[bool], bool], plain_layouts: bool) -> None:
        """The trainer's save verdict (given whether the configured interval says a step is
        due, whether to save it), and whether tensor parallelism's strided layouts need
        plain copies."""
        self.should_save, self.plain_layouts = should_save, plain_layouts

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
        """torchtitan's save, then this rank's checksums: at once for a synchronous save,
        in the background when an asynchronous one finishes (its future then finishes
        after them)."""
        state = self.checkpoint_state(state_dict)
        rank, _ = rank_and_world_size()
        if not to_hf:  # a save into an existing folder (a rerun) makes its checksums anew
            (Path(checkpoint_id) / CHECKSUMS.format(rank=rank)).unlink(missing_ok=True)
        gc = enable_garbage_collection
        result = super().dcp_save(state, checkpoint_id, async_mode, gc, to_hf)
        if to_hf:
            return result
        if isinstance(result, AsyncSaveResponse):
            return AsyncSaveResponse(
                result.staging_completion,
                sealed_after(result.upload_completion, rank, checkpoint_id),
            )
        if isinstance(result, Future):
            return sealed_after(result, rank, checkpoint_id)
        seal(checkpoint_id, rank)  # a synchronous save has finished
        return result

    def dcp_load(
        self, state_dict: dict[str, Any], checkpoint_id: str, from_hf: bool, from_quantized: bool
    ) -> None:
        if not from_hf:
            self.check_before_load(state_dict, checkpoint_id)
        schedules = self.states.get(LR_SCHEDULER)
        settings = None
        if LR_SCHEDULER in state_dict and isinstance(schedules, LRSchedulersContainer):
            settings = optimizer_settings(schedules)
        super().dcp_load(self.checkpoint_state(state_dict), checkpoint_id, from_hf, from_quantized)
        self.check_loaded_values(state_dict, checkpoint_id)
        if settings is not None and isinstance(schedules, LRSchedulersContainer):
            changed = follow_settings(schedules, settings)
            if changed:
                logger.warning(
                    f"{checkpoint_id}: resumed with this run's optimizer settings "
                    f"({'; '.join(changed)}); the optimizer's moments and the learning-rate "
                    f"schedule's position (step {schedules.schedulers[0].last_epoch}) are the "
                    "checkpoint's"
                )

    def check_before_load(self, state_dict: dict[str, Any], checkpoint_id: str) -> None:
        """Refuse an incomplete or corrupted checkpoint, another model's, or a model-only
        one for a resume; tell the loader which of its entries the checkpoint holds; leave out
        an EMA the checkpoint lacks."""
        problem = None if checkpoint_id == self.verified else checkpoint_problem(checkpoint_id)
        if problem == NO_CHECKSUMS:
            logger.warning(f"{checkpoint_id} {problem}: loading it unverified")
        elif problem is not None:
            advice = (
                "give another checkpoint.initial_load_path"
                if checkpoint_id == self.initial_load_path
                else "load another step (checkpoint.load_step) or remove that folder"
            )
            raise CheckpointError(f"{checkpoint_id} {problem}: {advice}")
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
        if checkpoint_id == self.initial_load_path and not wanted:
            logger.info(
                f"checkpoint.initial_load_path {checkpoint_id}: the model's weights only; the "
                "step count (from 1), optimizer, learning-rate schedule (with its warm-up), "
                "data order and EMA start afresh (--checkpoint.no-initial-load-model-only "
                "carries them too)"
            )
        if EMA in state_dict and EMA not in saved_groups:  # saved by a run without [ema]
            logger.warning(f"{checkpoint_id} holds no EMA: the average starts from its weights")
            del state_dict[EMA]
        prefix = f"{DATALOADER}."
        saved = [k[len(prefix) :] for k in entries if k.startswith(prefix)]
        loader = self.states.get(DATALOADER)
        if DATALOADER in state_dict and isinstance(loader, CaptionedImageLoader):
            loader.expect_saved_ranks(saved)

    def check_loaded_values(self, state_dict: dict[str, Any], checkpoint_id: str) -> None:
        """Refuse weights or optimizer state that are not finite (every rank checks its
        shards; they agree)."""
        bad: list[str] = []
        if MODEL in self.states:
            bad += nonfinite_entries(self.states[MODEL].state_dict())
        if OPTIMIZER in state_dict:
            bad += nonfinite_entries(self.states[OPTIMIZER].state_dict(), "optimizer ")
        problem = agreed(describe_nonfinite(bad))
        if problem is not None:
            raise CheckpointError(
                f"{checkpoint_id} holds values that are not finite ({problem}): training "
                "cannot go on from it; load an earlier step (checkpoint.load_step) or remove "
                "that folder"
            )

    def _find_load_step(self, folder: str = "") -> int:
        folder = folder or self.folder
        step = latest_complete_step(folder)
        self.verified = self._create_checkpoint_id(step, folder) if step >= 0 else None
        return step

    def _should_save(self, curr_step: int, last_step: bool = False) -> bool:
        if not self.enable or self.load_only:
            return False
        return self.should_save(super()._should_save(curr_step, last_step))

    def wait_for_save(self) -> None:
        """Block until an asynchronous save has reached the disk, with its checksums."""
        if self.enable:  # torchtitan sets up its saving state only then
            self._async_wait()


# -- this run's optimizer settings after a load ---------------------------------------------
def optimizer_settings(schedules: LRSchedulersContainer) -> list[list[dict[str, Any]]]:
    """What this run sets for each parameter group of each scheduled optimizer: all but the
    parameters and the current learning rate (initial_lr is the schedule's base)."""
    return [
        [{k: v for k, v in group.items() if k not in ("params", "lr")} for group in groups]
        for groups in (s.optimizer.param_groups for s in schedules.schedulers)
    ]


def follow_settings(
    schedules: LRSchedulersContainer, settings: list[list[dict[str, Any]]]
) -> list[str]:
    """After a load: each group's settings back to this run's (optimizer_settings, taken
    before it), its learning rate this run's schedule at the loaded step. Returns what
    changed from the checkpoint's, as "name saved -> now"."""
    changed: dict[str, str] = {}
    for schedule, groups in zip(schedules.schedulers, settings):
        assert isinstance(schedule, LambdaLR), "torchtitan schedules with LambdaLR"
        step = schedule.last_epoch
        params = schedule.optimizer.param_groups
        for group, wanted, lr_lambda in zip(params, groups, schedule.lr_lambdas):
            lr = wanted["initial_lr"] * lr_lambda(step)
            for key, value in (*wanted.items(), ("lr", lr)):
                if key != "initial_lr" and not _same(group.get(key), value):
                    changed.setdefault(key, f"{key} {group.get(key)} -> {value}")
            group.update(wanted, lr=lr)
        schedule.base_lrs = [g["initial_lr"] for g in groups]
        schedule._last_lr = [g["lr"] for g in params]
    return list(changed.values())


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


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
