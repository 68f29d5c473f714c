"""Small precomputed caches for tests, made in this process by flux.scripts.precompute."""

from __future__ import annotations

from pathlib import Path

from flux.config import DEBUG_CONFIG, check_config, parse_config
from flux.scripts import precompute

DEBUG = str(DEBUG_CONFIG)


def make_cache(root: Path, num_samples: int, *args: str) -> Path:
    """A finished cache of the debug config's data (shapes unless args say otherwise)."""
    precompute.main(
        ["--output", str(root), "--num_samples", str(num_samples), "--workers", "0", *args]
    )
    return root


def job(*args: str):
    """The debug config with these trainer arguments, checked (validation off unless asked)."""
    config = parse_config(["--job.config_file", DEBUG, *args])
    if "--validation.enable" not in args:
        config.validation.enable = False
    check_config(config, world_size=1)
    return config
