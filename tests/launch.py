"""The one helper multi-process tests use: run ./run_train.sh (torchrun, gloo on the CPU)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
STEP_LOSS = re.compile(r"(?<!validate )step:\s+(\d+)\s+loss:\s+([0-9.]+|nan|inf)")
VALIDATION_LOSS = re.compile(r"validate step:\s+(\d+)\s+loss:\s+([0-9.]+|nan|inf)")


@dataclass
class Run:
    returncode: int
    output: str

    @property
    def losses(self) -> dict[int, float]:
        return {int(s): float(v) for s, v in STEP_LOSS.findall(self.output)}

    @property
    def validation_losses(self) -> dict[int, float]:
        return {int(s): float(v) for s, v in VALIDATION_LOSS.findall(self.output)}


def run_train(dump_folder: Path, *args: str, nproc: int = 1, timeout: int = 300) -> Run:
    env = dict(os.environ, NGPU=str(nproc), PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    cmd = [
        str(ROOT / "run_train.sh"),
        "--job.dump_folder",
        str(dump_folder),
        "--metrics.log_freq",
        "1",
        *args,
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return Run(done.returncode, ANSI.sub("", done.stdout + done.stderr))
