"""How tests train: ./run_train.sh (torchrun, gloo on the CPU) for what needs processes, or
flux.train.main in the test's own process (train_here) where one process shows the same;
the arguments of the reference runs tests/conftest.py makes once per session; and the
background that starts the runs test files declare (their AHEAD) while other tests run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
STEP_LOSS = re.compile(r"(?<!validate )step:\s+(\d+)\s+loss:\s+([0-9.]+|nan|inf)")
VALIDATION_LOSS = re.compile(r"validate step:\s+(\d+)\s+loss:\s+([0-9.]+|nan|inf)")
EMA_VALIDATION_LOSS = re.compile(r"validate step:\s+(\d+)\s+ema loss:\s+([0-9.]+|nan|inf)")

# The reference runs (tests/conftest.py): 4 steps of local batch 4 that keep an average of the
# weights ([ema]), validate the weights and the average at steps 1, 2 and 4, and save a
# checkpoint every 2 steps, right after that validation.
SEED_STEPS = ("--debug.seed", "0", "--training.steps", "4")
VALIDATE = (
    *("--validation.enable", "--validation.freq", "2", "--validation.steps", "1"),
    *("--validation.local_batch_size", "2", "--validation.sampling_steps", "2"),
)
CHECKPOINT = ("--checkpoint.enable", "--checkpoint.interval", "2")
EMA = ("--ema.enable", "--ema.decay", "0.5")  # from step 1, validated beside the weights
REFERENCE = (*SEED_STEPS, "--training.local_batch_size", "4", *VALIDATE, *CHECKPOINT, *EMA)


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


def start_worker(
    folder: Path, nproc: int, module: str, *args: str
) -> tuple[subprocess.Popen, Path]:
    """A test's own worker (python -m MODULE ARGS) on `nproc` gloo processes under torchrun,
    one thread each, its output in FOLDER/log: the process and the folder, for worker_report."""
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)),
        *("-m", module, *args),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(folder / "log", "w") as log:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log), folder


def worker_report(started: tuple[subprocess.Popen, Path], report: Path) -> dict:
    """The JSON report a start_worker worker wrote, once it ended well (else its log's end)."""
    process, folder = started
    assert process.wait(timeout=600) == 0, (folder / "log").read_text()[-3000:]
    return json.loads(report.read_text())


def selected_tests_use(request: Any, fixture: str) -> bool:
    """Whether a test of this pytest session (as selected) asks for `fixture`, directly or
    through another fixture: what a fixture that starts runs side by side checks first."""
    return any(fixture in getattr(item, "fixturenames", ()) for item in request.session.items)


# The reference runs of this session, by name (tests/conftest.py starts them): what a Job
# that resumes or compares to one waits for (its `after`).
REFERENCE_RUNS: dict[str, Training] = {}


@dataclass
class Job:
    """A run, or a whole scenario (a run signalled, killed, run again), that a test file
    declares in its AHEAD for the background to start before its tests ask for it.
    start(tmp_path_factory) gives what the fixture takes: a started Training or process, or
    a scenario's finished result. `after`: the reference runs it needs ended first (it
    resumes from their checkpoints). `wanted(items)`: whether the session's selected tests
    need it (default: whether one uses the fixture of its name). start runs in a thread
    beside the tests, which share this process's torch state (its random generators, its
    compile caches) and sys.stdout: it only starts processes and writes files."""

    start: Callable[[Any], Any]
    after: tuple[str, ...] = ()
    wanted: Callable[[list[Any]], bool] | None = None


class Ahead:
    """The runs a test file starts in the background (a module-level AHEAD = Ahead(
    fixture=start_or_job, ...)): tests/conftest.py hands those the selected tests need to
    BACKGROUND, and the fixture takes its own with take(), which starts it there and then
    when the background has not yet, or when the file runs alone."""

    def __init__(self, **starts: Callable[[Any], Any] | Job):
        self.jobs = {
            name: start if isinstance(start, Job) else Job(start) for name, start in starts.items()
        }

    def queue(self, request: Any, factory: Any) -> None:
        items = request.session.items
        for name, job in self.jobs.items():
            if job.wanted(items) if job.wanted else selected_tests_use(request, name):
                BACKGROUND.add((self, name), job, factory)

    def take(self, fixture: str, factory: Any) -> Any:
        return BACKGROUND.take((self, fixture), self.jobs[fixture], factory)


def _busy_cpu_time() -> tuple[int, int]:
    """(busy, total) CPU time of this machine since boot, in ticks (Linux's /proc/stat)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    return sum(fields) - fields[3] - fields[4], sum(fields)  # idle, iowait


class Background:
    """Starts the queued jobs, in the order their tests come, each in a thread of its own,
    whenever the CPU has room: the share of this machine's CPU time in use over the last
    second is under SPARE. Most tests run in this process on one core, so the runs test
    files need go on beside them rather than after; started all at once they would crowd
    the cores instead (measured: the whole suite took longer). A job whose reference runs
    (`after`) are still going waits for them, the next one may start first. Where
    /proc/stat is missing (not Linux), each job starts when the one before has started
    and a few seconds have passed."""

    SPARE = 0.6  # on two cores: one of them mostly free
    SETTLE = 3.0  # seconds for a started job's processes to load the CPU

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: dict[Any, tuple[Job, Any]] = {}
        self.started: dict[Any, tuple[threading.Thread, list]] = {}
        self.filler: threading.Thread | None = None
        self.stopping = threading.Event()

    def add(self, key: Any, job: Job, factory: Any) -> None:
        with self.lock:
            self.pending[key] = (job, factory)
            if self.filler is None or not self.filler.is_alive():
                self.filler = threading.Thread(target=self._fill, name="background", daemon=True)
                self.filler.start()

    def _ready(self, job: Job) -> bool:
        runs = [REFERENCE_RUNS[name] for name in job.after if name in REFERENCE_RUNS]
        return all(run.process.poll() is not None for run in runs)

    def _start(self, key: Any, job: Job, factory: Any) -> None:
        """In a thread: the job's result, or the error it raised, for take()."""
        outcome: list = []

        def run() -> None:
            try:
                outcome.append((job.start(factory), None))
            except BaseException as e:  # noqa: B036 - given to the test that takes it
                outcome.append((None, e))

        thread = threading.Thread(target=run, name=f"background {key[1]}", daemon=True)
        self.started[key] = thread, outcome
        thread.start()

    def _fill(self) -> None:
        last = _busy_cpu_time() if Path("/proc/stat").exists() else None
        while not self.stopping.wait(1.0):
            if last is not None:
                now = _busy_cpu_time()
                busy = (now[0] - last[0]) / max(now[1] - last[1], 1)
                last = now
                if busy >= self.SPARE:
                    continue
            with self.lock:
                ready = [key for key, (job, _) in self.pending.items() if self._ready(job)]
                if not ready:
                    if not self.pending:
                        return
                    continue
                job, factory = self.pending.pop(ready[0])
                self._start(ready[0], job, factory)
            if self.stopping.wait(self.SETTLE):
                return
            last = _busy_cpu_time() if last is not None else None

    def take(self, key: Any, job: Job, factory: Any) -> Any:
        with self.lock:
            self.pending.pop(key, None)
            running = self.started.pop(key, None)
        if running is None:  # not started yet, or not queued: here and now
            for name in job.after:
                if name in REFERENCE_RUNS:
                    REFERENCE_RUNS[name].process.wait(timeout=600)
            return job.start(factory)
        thread, outcome = running
        thread.join()
        result, error = outcome[0]
        if error is not None:
            raise error
        return result

    def close(self, timeout: float = 600) -> None:
        """Starts nothing more; waits for the runs started but never taken (a test before
        failed) to end."""
        self.stopping.set()
        with self.lock:
            self.pending.clear()
            started = list(self.started.values())
            self.started.clear()
        for thread, outcome in started:
            thread.join(timeout)
            result = outcome[0][0] if outcome else None
            for process in _processes(result):
                process.wait(timeout=timeout)


def _processes(result: Any) -> list[subprocess.Popen]:
    """The processes in a job's result (a Training, a Popen, or tuples of them)."""
    if isinstance(result, Training):
        return [result.process]
    if isinstance(result, subprocess.Popen):
        return [result]
    if isinstance(result, tuple | list):
        return [p for r in result for p in _processes(r)]
    return []


BACKGROUND = Background()


class _NoOtherRanks:
    """The time module as torchtitan's Trainer sees it, but for the 2 s it sleeps after the
    last step "for other ranks to complete": a process group of one has none to wait for."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        pass


def train_here(dump_folder: Path, *args: str, config_file: Path | None = None) -> Run:
    """flux.train.main in this process, with the arguments ./run_train.sh gives it (NGPU=1;
    CONFIG_FILE: config_file or the debug config), but without torchrun: a process group
    of one, as one process of run_train.sh has. What it logs and prints is the Run's
    output; its exit status the returncode (0 when main returns). The process's logging,
    signal handlers, garbage collection and environment, which the trainer takes over, are
    given back."""
    import contextlib
    import gc
    import io
    import logging
    import signal
    from unittest import mock

    import torch.distributed as dist
    import torchtitan.train

    from flux.config import DEBUG_CONFIG
    from flux.resilience import STOP_SIGNALS
    from flux.train import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    signals = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    collecting = gc.isenabled()
    environ = dict(os.environ)
    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")
    out = io.StringIO()
    argv = [
        *("--job.config_file", str(config_file or DEBUG_CONFIG)),
        *("--job.dump_folder", str(dump_folder), "--metrics.log_freq", "1", *args),
    ]
    returncode = 0
    try:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        with (
            mock.patch.object(torchtitan.train, "time", _NoOtherRanks()),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(out),
        ):
            main(argv)
    except SystemExit as e:
        returncode = e.code if isinstance(e.code, int) else 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        root.handlers[:], root.level = handlers, level
        for sig, handler in signals.items():
            signal.signal(sig, handler)
        if collecting:
            gc.enable()
        os.environ.clear()
        os.environ.update(environ)
    return Run(returncode, ANSI.sub("", out.getvalue()))


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
