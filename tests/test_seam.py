"""The seam to torchtitan and torch internals: pinned versions and private signatures, the
CPU stand-in for a machine without an accelerator, and what `install` puts in place."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import pytest
import torch

from flux import seam
from flux.seam import has_accelerator, use_cpu_if_no_accelerator


def test_torchtitan_is_the_version_the_seam_was_written_for() -> None:
    for package, expected in seam.VERSIONS.items():
        assert version(package) == expected, (
            f"{package} {version(package)}: flux.seam was written against {expected}; "
            "check every entry of flux.seam.PINNED before changing the pin"
        )


@pytest.mark.parametrize("name", sorted(seam.PINNED))
def test_each_private_function_the_seam_uses_keeps_its_signature(name: str) -> None:
    assert seam.signature(name) == seam.PINNED[name], f"{name} changed: adapt flux.seam"


def test_install_has_torchtitan_build_flux_checkpoint_manager() -> None:
    import torchtitan.train

    from flux.checkpoint import FluxCheckpointManager

    seam.install()
    assert torchtitan.train.CheckpointManager is FluxCheckpointManager
    assert torch.distributed.init_process_group is seam.init_process_group_of_this_attempt


def test_the_model_imports_neither_torchtitan_nor_distributed_training() -> None:
    """`import flux.model...` loads no torchtitan, FSDP, DTensor or DCP (torch itself
    imports the core of torch.distributed)."""
    code = (
        "import sys, torch; before = set(sys.modules); "
        "import flux.model.model, flux.model.autoencoder, flux.model.text_encoders; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    new = done.stdout.split()
    assert any(m == "flux.model.model" for m in new)
    assert not [m for m in new if m.startswith(("torchtitan", "torch.distributed"))], new


@pytest.mark.skipif(has_accelerator(), reason="the CPU stand-in is only used without one")
def test_torchtitan_is_pointed_at_the_cpu() -> None:
    import torchtitan.components.metrics as metrics
    import torchtitan.distributed.utils as dist_utils
    import torchtitan.tools.utils as utils

    assert use_cpu_if_no_accelerator() == "cpu"
    assert utils.device_type == metrics.device_type == dist_utils.device_type == "cpu"
    utils.device_module.set_device(torch.device("cpu"))  # torch.cuda would raise here


@pytest.mark.skipif(has_accelerator(), reason="the CPU stand-in is only used without one")
def test_memory_monitor_reports_without_a_gpu() -> None:
    use_cpu_if_no_accelerator()
    from torchtitan.components.metrics import build_device_memory_monitor

    monitor = build_device_memory_monitor()
    stats = monitor.get_peak_stats()
    assert monitor.device_capacity_gib > 1
    assert 0 < stats.max_reserved_gib < monitor.device_capacity_gib


def test_fused_adamw_skips_its_step_on_a_device_side_verdict() -> None:
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(8))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=True)
    assert seam.skips_on_device(optimizer)
    assert not seam.skips_on_device(torch.optim.AdamW([param], lr=0.1, foreach=True))
    param.grad = torch.randn(8)
    optimizer.step()  # a first step, so there are moments to keep
    state = {k: v.clone() for k, v in optimizer.state[param].items()}
    before = param.detach().clone()
    param.grad = torch.full((8,), float("nan"))
    with seam.skipped_where([optimizer], torch.tensor(1.0)):
        optimizer.step()
    assert torch.equal(param, before)
    assert all(torch.equal(optimizer.state[param][k], v) for k, v in state.items())
    param.grad = torch.randn(8)
    with seam.skipped_where([optimizer], torch.tensor(0.0)):
        optimizer.step()
    assert not torch.equal(param, before) and optimizer.state[param]["step"] == 2
    assert not hasattr(optimizer, "found_inf")
