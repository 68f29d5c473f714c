"""The one place that adapts torchtitan 0.2.2 to a machine without an accelerator.

torchtitan reads `device_type` and `device_module` (torch.cuda) at import time in several
modules and calls CUDA-only functions (set_device, memory stats, barriers with device ids).
On a machine with no accelerator, `use_cpu_if_no_accelerator()` points all of them at the
CPU: a stand-in for the device module (torchtitan then picks the gloo backend), and
peak resident memory as its memory statistics, so single- and multi-process runs work.
"""

from __future__ import annotations

import os
import resource
import sys
from types import SimpleNamespace
from typing import Any

import torch

# Modules of torchtitan that copied device_type / device_module at import.
_PATCHED_MODULES = (
    "torchtitan.tools.utils",
    "torchtitan.components.metrics",
    "torchtitan.distributed.parallel_dims",
    "torchtitan.distributed.utils",
    "torchtitan.tools.profiling",
)


def _total_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


class CpuDeviceModule:
    """What torchtitan asks of torch.cuda, answered for the CPU."""

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def set_device(device: Any) -> None:
        pass

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def synchronize(device: Any = None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return "CPU"

    @staticmethod
    def get_device_properties(device: Any = None) -> SimpleNamespace:
        return SimpleNamespace(total_memory=_total_memory_bytes(), name="CPU")

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        pass

    @staticmethod
    def memory_stats(device: Any = None) -> dict[str, int]:
        # Peak resident set size of this process (Linux reports KiB) stands in for the
        # allocator's peak; there are no allocator retries or OOMs to report.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {
            "active_bytes.all.peak": peak,
            "reserved_bytes.all.peak": peak,
            "num_alloc_retries": 0,
            "num_ooms": 0,
        }


def has_accelerator() -> bool:
    return torch.accelerator.is_available()


def use_cpu_if_no_accelerator() -> str:
    """Point torchtitan at the CPU when there is no accelerator; returns the device type."""
    if has_accelerator():
        return torch.accelerator.current_accelerator().type  # type: ignore[union-attr]
    cpu = CpuDeviceModule()
    for name in _PATCHED_MODULES:
        module = sys.modules.get(name)
        if module is None:
            __import__(name)
            module = sys.modules[name]
        if hasattr(module, "device_type"):
            setattr(module, "device_type", "cpu")  # noqa: B010 (module attributes)
        if hasattr(module, "device_module"):
            setattr(module, "device_module", cpu)  # noqa: B010
    return "cpu"
