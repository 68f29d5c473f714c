"""Fixtures of the data tests."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem


class HubStandIn(DirFileSystem):
    """The hub's file system (hf://datasets/OWNER/NAME/...) over a local folder."""

    protocol = "hf"
    cachable = False
    root = ""

    def __init__(self, *args, **kwargs):
        super().__init__(path=self.root, fs=LocalFileSystem())


@pytest.fixture
def hub(tmp_path: Path):
    """hf:// served from tmp_path/hub (datasets/OWNER/NAME/FILE), for this test."""
    original = fsspec.get_filesystem_class("hf")
    HubStandIn.root = str(tmp_path / "hub")
    fsspec.register_implementation("hf", HubStandIn, clobber=True)
    yield tmp_path / "hub" / "datasets"
    fsspec.register_implementation("hf", original, clobber=True)
