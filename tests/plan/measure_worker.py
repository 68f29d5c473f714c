"""One rank of the real steps the planner is checked against, under torchrun on gloo:

    torchrun --nproc_per_node N -m tests.plan.measure_worker OUT.json

Each run of tests.plan.helpers.TWO_PROCESS_RUNS (RUNS on other world sizes) is built as the
trainer builds it and stepped once on real tensors; rank 0 writes what it measured to
OUT.json.
"""

from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist

from flux.seam import use_cpu_if_no_accelerator
from tests.plan.helpers import RUNS, TWO_PROCESS_RUNS, measure, register_mid


def main() -> None:
    register_mid()
    use_cpu_if_no_accelerator()
    dist.init_process_group("gloo")
    world_size = int(os.environ["WORLD_SIZE"])
    runs = TWO_PROCESS_RUNS if world_size == 2 else RUNS
    results = {name: measure(name, world_size) for name in runs}
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
