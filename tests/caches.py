"""Small precomputed caches for tests, made by flux.scripts.precompute in this process, or
by its command in a process of its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from flux.config import DEBUG_CONFIG, PACKAGE_ROOT, check_config, parse_config
from flux.scripts import precompute

DEBUG = str(DEBUG_CONFIG)


def precompute_args(root: Path, num_samples: int, *args: str) -> list[str]:
    """flux.scripts.precompute's arguments for a cache of the debug config's data (shapes
    unless args say otherwise), made without data-loading workers."""
    return ["--output", str(root), "--num_samples", str(num_samples), "--workers", "0", *args]


PRECOMPUTE = [sys.executable, "-m", "flux.scripts.precompute"]  # the command


def make_cache(root: Path, num_samples: int, *args: str) -> Path:
    """A finished cache of the debug config's data (shapes unless args say otherwise)."""
    precompute.main(precompute_args(root, num_samples, *args))
    return root


def make_cache_in_a_process(root: Path, num_samples: int, *args: str) -> Path:
    """make_cache, by `python -m flux.scripts.precompute`: what a background job (tests.launch
    .Job) uses, as it runs beside tests that share this process's state."""
    command = [*PRECOMPUTE, *precompute_args(root, num_samples, *args)]
    done = subprocess.run(command, cwd=PACKAGE_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return root


def job(*args: str):
    """The debug config with these trainer arguments, checked (validation off unless asked)."""
    config = parse_config(["--job.config_file", DEBUG, *args])
    if "--validation.enable" not in args:
        config.validation.enable = False
    check_config(config, world_size=1)
    return config
