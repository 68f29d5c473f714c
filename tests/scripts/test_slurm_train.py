"""flux/scripts/slurm_train.sh under stand-ins for srun and scontrol: one node, 2 CPU ranks."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import ANSI, ROOT, Ahead, Run, Training

pytestmark = pytest.mark.e2e

SCRIPT = ROOT / "flux/scripts/slurm_train.sh"

SRUN = """#!/usr/bin/env bash
# srun stand-in: drop srun's own options, run the command once (one node)
while [[ "$1" == --* ]]; do shift; done
exec "$@"
"""
SCONTROL = """#!/usr/bin/env bash
if [ "$1" = requeue ]; then echo "$@" >> "${SCONTROL_LOG}"; else echo localhost; fi
"""


def fake_slurm(bin_dir: Path) -> None:
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)


def slurm_env(tmp_path: Path) -> dict[str, str]:
    fake_slurm(tmp_path / "bin")
    return dict(
        os.environ,
        PATH=f"{tmp_path / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
        f"{os.environ['PATH']}",
        SLURM_JOB_NODELIST="localhost",
        SLURM_JOB_NUM_NODES="1",
        SLURM_JOB_ID="4242",
        SLURM_SUBMIT_DIR=str(ROOT),
        GPUS_PER_NODE="2",
        PORT="0",
        CONFIG_FILE="flux/train_configs/debug_model.toml",
        PYTHONUNBUFFERED="1",
        SCONTROL_LOG=str(tmp_path / "scontrol.log"),
        FLUX_REQUEUE_FILE=str(tmp_path / "requeue"),
    )


def slurm_train(tmp_path: Path, *args: str) -> Run:
    env = slurm_env(tmp_path)
    cmd = [str(SCRIPT), "--job.dump_folder", str(tmp_path), *args]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return Run(done.returncode, ANSI.sub("", done.stdout + done.stderr))


def test_slurm_script_refuses_a_bad_config_before_launching(tmp_path) -> None:
    run = slurm_train(tmp_path, "--parallelism.data_parallel_shard_degree", "3")
    assert run.returncode == 2
    assert "flux: error: parallel degrees multiply to 3" in run.output
    assert "ChildFailedError" not in run.output  # refused before torchrun started


def signal_a_job(factory: pytest.TempPathFactory) -> tuple[Run, Path]:
    """A job of 40 steps on one node of 2 CPU ranks, told to stop after step 2 as
    `#SBATCH --signal=USR1@300` tells it: SLURM signals the processes of the job step
    (torchrun and the trainers), not the batch shell; the shell then requeues the job.
    The same job shows the script training: one launch for both tests."""
    tmp_path = factory.mktemp("slurm")
    dump = tmp_path / "run"
    args = ("--training.steps", "40", "--checkpoint.enable", "--checkpoint.interval", "1000")
    training = Training(dump, *args, env=slurm_env(tmp_path), script=SCRIPT)
    training.wait_until(lambda: len(training.worker_pids()) == 3 and "step:  2 " in training.output)
    for pid in training.worker_pids().values():
        os.kill(pid, signal.SIGUSR1)
    return training.finish(), tmp_path


AHEAD = Ahead(signalled=signal_a_job)  # played in the background (conftest)


@pytest.fixture(scope="module")
def signalled(tmp_path_factory) -> tuple[Run, Path]:
    return AHEAD.take("signalled", tmp_path_factory)


def test_slurm_script_trains_with_fsdp_over_the_node(signalled) -> None:
    run, _ = signalled
    assert run.returncode == 0, run.output[-3000:]
    assert "dp_shard=2" in run.output
    assert sorted(run.losses) == list(range(1, max(run.losses) + 1))


def test_slurm_signal_checkpoints_and_requeues_the_job(signalled) -> None:
    run, tmp_path = signalled
    assert run.returncode == 0, run.output[-3000:]
    last = max(run.losses)
    assert 2 <= last < 40
    assert f"preempted after step {last}; checkpoint" in run.output
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoint").iterdir())
    assert checkpoints == [f"step-{last}"]
