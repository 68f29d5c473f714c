"""Tests never reach the network: the hub is offline for every test.

setuptools is imported first: Inductor's C++ builder imports it (through
torch.utils.cpp_extension) in the middle of a compile, and in a long test session its
distutils shim has been seen to fall back to the standard library's distutils there
(AssertionError: .../python3.11/distutils/core.py). Loaded at start-up, it is in place
before anything compiles.

The reference trainings that several test files compare to, resume or convert are made here,
once per session (only when a selected test asks for them).
"""

import os
from pathlib import Path

import pytest
import setuptools  # noqa: F401

from tests.launch import REFERENCE, Run, run_train

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Path]:
    """The reference run (tests.launch.REFERENCE) of one process, through ./run_train.sh,
    with tensorboard: what layouts, resumes and settings that keep the loss are compared to."""
    dump = tmp_path_factory.mktemp("single")
    return run_train(dump, *REFERENCE, "--metrics.enable_tensorboard"), dump


@pytest.fixture(scope="session")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Path]:
    """The reference run with FSDP over two processes (global batch 8), through
    ./run_train.sh: its checkpoints are resumed on other layouts, converted and sampled."""
    dump = tmp_path_factory.mktemp("fsdp")
    args = (*REFERENCE, "--parallelism.data_parallel_shard_degree", "2")
    return run_train(dump, *args, nproc=2), dump
