"""Tests never reach the network: the hub is offline for every test.

setuptools is imported first: Inductor's C++ builder imports it (through
torch.utils.cpp_extension) in the middle of a compile, and in a long test session its
distutils shim has been seen to fall back to the standard library's distutils there
(AssertionError: .../python3.11/distutils/core.py). Loaded at start-up, it is in place
before anything compiles.

The reference trainings that several test files compare to, resume or convert are made here,
once per session (only when a selected test asks for them), started before the first test;
the runs test files declare ahead (their AHEAD) are queued for the background
(tests.launch.BACKGROUND), which starts them while the tests before theirs run.
"""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import setuptools  # noqa: F401

from tests.launch import (
    BACKGROUND,
    REFERENCE,
    REFERENCE_RUNS,
    Ahead,
    Run,
    Training,
    selected_tests_use,
)

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


REFERENCES = {
    "single": ((*REFERENCE, "--metrics.enable_tensorboard"), 1),
    "fsdp": ((*REFERENCE, "--parallelism.data_parallel_shard_degree", "2"), 2),
    "tp": ((*REFERENCE, "--parallelism.tensor_parallel_degree", "2"), 2),
}


@pytest.fixture(scope="session", autouse=True)
def references(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Training]]:
    """The reference runs the selected tests use, through ./run_train.sh, started side by
    side before the session's first test: they run while the tests before theirs do."""
    REFERENCE_RUNS.update(
        (name, Training(tmp_path_factory.mktemp(name) / "run", *args, nproc=nproc))
        for name, (args, nproc) in REFERENCES.items()
        if selected_tests_use(request, name)
    )
    yield REFERENCE_RUNS
    for training in REFERENCE_RUNS.values():
        training.process.wait(timeout=300)


@pytest.fixture(scope="session", autouse=True)
def started_ahead(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, references
) -> Iterator[None]:
    """The runs test files start ahead (their AHEAD, a tests.launch.Ahead), queued in the
    order of their tests for the background (tests.launch.BACKGROUND), which starts them
    while the tests before theirs run."""
    for module in dict.fromkeys(item.module for item in request.session.items):
        ahead = getattr(module, "AHEAD", None)
        if isinstance(ahead, Ahead):
            ahead.queue(request, tmp_path_factory)
    yield
    BACKGROUND.close()


@pytest.fixture(scope="session")
def single(references: dict[str, Training]) -> tuple[Run, Path]:
    """The reference run (tests.launch.REFERENCE) of one process, with tensorboard: what
    layouts, resumes and settings that keep the loss are compared to."""
    return references["single"].finish(), references["single"].dump_folder


@pytest.fixture(scope="session")
def fsdp(references: dict[str, Training]) -> tuple[Run, Path]:
    """The reference run with FSDP over two processes (global batch 8): its checkpoints are
    resumed on other layouts, converted and sampled."""
    return references["fsdp"].finish(), references["fsdp"].dump_folder


@pytest.fixture(scope="session")
def tp(references: dict[str, Training]) -> tuple[Run, Path]:
    """The reference run with its heads split over two processes (tensor parallelism): it
    follows the one of one process, and its checkpoints resume on other layouts."""
    return references["tp"].finish(), references["tp"].dump_folder
