import pytest
import torch

from flux.device import has_accelerator, use_cpu_if_no_accelerator

pytestmark = pytest.mark.skipif(has_accelerator(), reason="checks the CPU adaptation")


def test_torchtitan_is_pointed_at_the_cpu() -> None:
    import torchtitan.components.metrics as metrics
    import torchtitan.distributed.utils as dist_utils
    import torchtitan.tools.utils as utils

    assert use_cpu_if_no_accelerator() == "cpu"
    assert utils.device_type == metrics.device_type == dist_utils.device_type == "cpu"
    utils.device_module.set_device(torch.device("cpu"))  # torch.cuda would raise here


def test_memory_monitor_reports_without_a_gpu() -> None:
    use_cpu_if_no_accelerator()
    from torchtitan.components.metrics import build_device_memory_monitor

    monitor = build_device_memory_monitor()
    stats = monitor.get_peak_stats()
    assert monitor.device_capacity_gib > 1
    assert 0 < stats.max_reserved_gib < monitor.device_capacity_gib
