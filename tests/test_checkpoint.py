"""flux.checkpoint, in one process: which checkpoint is complete and matches its checksums,
what an explicit load refuses, values that are not finite, and checksums of an
asynchronous save written when it finishes. (tests/test_resilience.py resumes through
./run_train.sh.)"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from torch import nn
from torchtitan.components.checkpoint import MODEL, ModelWrapper

from flux.checkpoint import (
    NO_CHECKSUMS,
    CheckpointError,
    FluxCheckpointManager,
    checkpoint_problem,
    latest_complete_step,
    sealed_after,
)
from flux.weights import save_dcp


def save(folder: Path, value: float = 1.0) -> Path:
    """A small model-only checkpoint with its checksums, as convert's from-flux writes."""
    state = {"weight": torch.full((64, 64), value), "bias": torch.arange(64.0)}
    save_dcp(state, folder)
    return folder


def overwrite_in_place(path: Path, offset: int = 1000) -> None:
    """Corruption that keeps the file's size: a block of zeros."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(64))


def manager(initial_load_path: str | None = None) -> FluxCheckpointManager:
    """The checkpoint manager's checks without torchtitan's set-up (its states: none)."""
    m = FluxCheckpointManager.__new__(FluxCheckpointManager)
    m.verified, m.initial_load_path, m.states = None, initial_load_path, {}
    return m


def test_a_same_size_corruption_of_a_distcp_falls_back_to_the_previous_step(
    tmp_path, caplog
) -> None:
    root = tmp_path / "checkpoint"
    for step in (2, 4, 6):
        save(root / f"step-{step}")
    overwrite_in_place(root / "step-6" / "__0_0.distcp")
    (root / "step-4" / "checksums-00000.json").unlink()  # stopped before its checksums
    assert checkpoint_problem(root / "step-2") is None
    with caplog.at_level(logging.WARNING):
        assert latest_complete_step(root) == 2
    log = caplog.text
    assert "step-6 is corrupted (__0_0.distcp does not match its checksum): skipped" in log
    assert f"step-4 {NO_CHECKSUMS}: skipped" in log
    assert "resuming from step-2, the newest complete checkpoint" in log


def test_a_checksum_file_without_every_file_means_an_unfinished_save(tmp_path) -> None:
    folder = save(tmp_path / "step-1")
    sums = folder / "checksums-00000.json"
    sums.write_text(sums.read_text().replace('"__0_0.distcp"', '"__9_0.distcp"'))
    assert checkpoint_problem(folder) == (
        "is incomplete (no checksum of __0_0.distcp: its save did not finish)"
    )


def test_only_checkpoints_without_checksums_are_refused_rather_than_started_over(
    tmp_path,
) -> None:
    root = tmp_path / "checkpoint"
    (save(root / "step-3") / "checksums-00000.json").unlink()  # an older flux's
    with pytest.raises(CheckpointError, match="--checkpoint.load_step 3 .loaded unverified."):
        latest_complete_step(root)


def test_an_explicit_load_of_corrupted_tensor_bytes_is_refused_in_one_line(tmp_path) -> None:
    folder = save(tmp_path / "step-2")
    overwrite_in_place(folder / "__0_0.distcp", offset=100)
    with pytest.raises(CheckpointError) as error:
        manager().check_before_load({}, str(folder))
    assert "is corrupted (__0_0.distcp does not match its checksum)" in str(error.value)
    assert "checkpoint.load_step" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match="give another checkpoint.initial_load_path"):
        manager(initial_load_path=str(folder)).check_before_load({}, str(folder))


def test_an_unverified_checkpoint_loads_when_named_but_not_finite_weights_do_not(
    tmp_path, caplog
) -> None:
    folder = save(tmp_path / "init", value=float("nan"))
    (folder / "checksums-00000.json").unlink()
    m = manager()
    with caplog.at_level(logging.WARNING):
        m.check_before_load({}, str(folder))  # no checksums: loaded with a warning
    assert f"{NO_CHECKSUMS}: loading it unverified" in caplog.text

    model = nn.Linear(64, 64)
    with torch.no_grad():
        model.weight[3, 5] = float("nan")
    m.states = {MODEL: ModelWrapper(model)}
    with pytest.raises(CheckpointError) as error:
        m.check_loaded_values({}, str(folder))
    assert "holds values that are not finite (weight)" in str(error.value)
    with torch.no_grad():
        model.weight[3, 5] = 0.0
    m.states = {MODEL: ModelWrapper(model)}
    m.check_loaded_values({}, str(folder))


def test_an_asynchronous_save_is_complete_only_once_its_checksums_are_written(
    tmp_path,
) -> None:
    folder = save(tmp_path / "step-8")
    sums = folder / "checksums-00000.json"
    sums.unlink()
    upload: Future = Future()
    sealed = sealed_after(upload, 0, str(folder))
    assert checkpoint_problem(folder) == NO_CHECKSUMS and not sealed.done()
    upload.set_result(None)  # DCP's future finishes: the checksums follow, then `sealed`
    sealed.result(timeout=30)
    assert sums.is_file() and checkpoint_problem(folder) is None
