"""The one helper multi-process tests use: run ./run_train.sh (torchrun, gloo on the CPU)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
STEP_LOSS = re.compile(r"(?<!validate )step:\s+(\d+)\s+loss:\s+([0-9.]+|nan|inf)")
VALIDATION_LOSS = re.compile(r"validate step:\s+(\d+)\s+loss:\s+([0-9.]+|nan|inf)")
EMA_VALIDATION_LOSS = re.compile(r"validate step:\s+(\d+)\s+ema loss:\s+([0-9.]+|nan|inf)")


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

    @property
    def ema_validation_losses(self) -> dict[int, float]:
        """The validation losses of the average of the weights ([ema])."""
        return {int(s): float(v) for s, v in EMA_VALIDATION_LOSS.findall(self.output)}


def run_train(dump_folder: Path, *args: str, nproc: int | str = 1, timeout: int = 300) -> Run:
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


def average_at(dump_folder: Path, step: int) -> dict:
    """The average of the weights ([ema]) a run saved at `step`, as convert --ema reads it."""
    from flux.scripts.convert import meta_model
    from flux.weights import read_weights

    return read_weights(dump_folder / "checkpoint" / f"step-{step}", meta_model("flux-debug"), True)


class Training:
    """./run_train.sh started in the background, its output going to a file, so a test can
    act on it mid-run (send a signal, kill a process)."""

    def __init__(
        self,
        dump_folder: Path,
        *args: str,
        nproc: int = 1,
        env: dict | None = None,
        script: Path = ROOT / "run_train.sh",
    ):
        self.dump_folder = dump_folder
        self.log = dump_folder.with_name(dump_folder.name + ".log")
        full_env = dict(os.environ, NGPU=str(nproc), PYTHONUNBUFFERED="1")
        full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env['PATH']}"
        full_env.update(env or {})
        cmd = [str(script), "--job.dump_folder", str(dump_folder), "--metrics.log_freq", "1", *args]
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=out)

    @property
    def output(self) -> str:
        return ANSI.sub("", self.log.read_text())

    def wait_until(self, ready: Callable[[], bool], timeout: float = 240) -> None:
        """Poll until ready() holds; fails if the run ends or the time runs out first."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the run ended or timed out first:\n{self.output[-3000:]}")
            time.sleep(0.05)

    def worker_pids(self) -> dict[int, int]:
        """rank -> pid of this run's trainer processes (children of torchrun; -1: torchrun)."""
        pids = {}
        for proc in Path("/proc").iterdir():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
                environ = (proc / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if b"flux.train" in cmdline and str(self.dump_folder).encode() in cmdline:
                rank = [e[5:] for e in environ if e.startswith(b"RANK=")]
                if b"torchrun" in b" ".join(cmdline):
                    pids[-1] = int(proc.name)
                elif rank:
                    pids[int(rank[0])] = int(proc.name)
        return pids

    def finish(self, timeout: float = 300) -> Run:
        self.process.wait(timeout=timeout)
        return Run(self.process.returncode, self.output)
