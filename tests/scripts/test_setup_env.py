"""flux/scripts/setup_env.sh, the set-up run_train.sh and run_tests.sh do on a fresh clone, in a
stand-in checkout (the two scripts, pyproject.toml, a flux package whose modules print their
arguments) with stand-ins that install nothing: `python3 -m venv` makes a real virtual
environment without pip and puts a stand-in pip in it, which records its arguments and
"installs" a requirement as its metadata and a module that prints its arguments (torch also
gets a `torchrun` that prints them)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pip
import pytest

from tests.launch import ROOT

PYTHON3 = """#!/usr/bin/env bash
# python3 stand-in: `-m venv DIR` makes a virtual environment without pip and puts the
# stand-in pip in it; everything else goes to the real Python.
if [ "$1" = -m ] && [ "$2" = venv ]; then
    "{real}" -m venv --without-pip "$3" || exit 1
    site=$("$3/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    cp -R "{fake_pip}" "$site/pip"
    exit 0
fi
exec "{real}" "$@"
"""

PIP = '''"""pip stand-in: records its arguments, then "installs" each requirement as its
metadata and a module that prints its arguments; FAKE_PIP_KILL / FAKE_PIP_FAIL (substrings of
the arguments) kill the whole set-up or fail with FAKE_PIP_ERROR."""

import json
import os
import re
import shutil
import signal
import sys
import sysconfig
import tomllib
from pathlib import Path

args = sys.argv[1:]
with open(os.environ["FAKE_PIP_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if args == ["--version"]:
    sys.exit(print("pip (stand-in)"))
line = " ".join(args)
if os.environ.get("FAKE_PIP_KILL", "\\0") in line:
    os.killpg(0, signal.SIGKILL)  # as a user's kill -9 or a closed terminal would
if os.environ.get("FAKE_PIP_FAIL", "\\0") in line:
    print(os.environ.get("FAKE_PIP_ERROR", "ERROR: No matching distribution found for torch"))
    sys.exit(1)
site = Path(sysconfig.get_paths()["purelib"])


def metadata(name, version, exact=False):
    """Writes NAME's metadata, as pip does: unless some version is there (the same, if exact)."""
    installed = list(site.glob(f"{name.replace('-', '_')}-*.dist-info"))
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    if installed and (not exact or info in installed):
        print("Requirement already satisfied:", name)
        return False
    for old in installed:
        shutil.rmtree(old)
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\\nName: {name}\\nVersion: {version}\\n")
    return True


def install(text):
    if ";" in text:
        return
    name = re.match(r"[A-Za-z0-9._-]+", text).group()
    pinned = re.search(r"([=>~])=\\s*([0-9][^,\\s]*)", text)
    version, exact = (pinned.group(2), pinned.group(1) == "=") if pinned else ("1.0", False)
    if not metadata(name, version, exact):
        return
    module = site / name.lower().replace("-", "_")
    module.mkdir(exist_ok=True)
    (module / "__main__.py").write_text(f"import sys\\nprint({name!r}, *sys.argv[1:])\\n")
    stub = "class cuda:\\n    device_count = staticmethod(lambda: 0)\\n" if name == "torch" else ""
    (module / "__init__.py").write_text(stub)
    if name == "torch":
        torchrun = Path(sys.prefix) / "bin" / "torchrun"
        torchrun.write_text('#!/bin/sh\\necho torchrun "$@"\\n')
        torchrun.chmod(0o755)


args = [a for a in args if a not in ("install", "--progress-bar", "off")]
while args:
    arg = args.pop(0)
    if arg in ("--extra-index-url", "--index-url"):
        args.pop(0)
    elif arg == "-e":
        root, extras = re.fullmatch(r"(.*?)(?:\\[(.*)\\])?", args.pop(0)).groups()
        root = Path(root).resolve()
        project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
        metadata("flux", project["version"])
        (site / "__editable__flux.pth").write_text(f"{root}\\n")
        for req in project["dependencies"] + [
            r for e in (extras or "").split(",") if e for r in project["optional-dependencies"][e]
        ]:
            install(req)
    else:
        install(arg)
'''


@dataclass
class Done:
    returncode: int
    output: str
    pip_calls: list[list[str]]

    @property
    def setup_lines(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith("flux: ")]

    def installs(self) -> list[list[str]]:
        """The pip install calls, without the arguments every call has."""
        common = ["install", "--progress-bar", "off"]
        return [call[3:] for call in self.pip_calls if call[:3] == common]


class Checkout:
    """A stand-in checkout with stand-in python3 and pip on PATH."""

    def __init__(self, tmp_path: Path):
        self.root = tmp_path / "repo"
        (self.root / "flux/scripts").mkdir(parents=True)
        for name in ("run_train.sh", "run_tests.sh", "run_infer.sh", "pyproject.toml"):
            shutil.copy2(ROOT / name, self.root / name)
        shutil.copy2(ROOT / "flux/scripts/setup_env.sh", self.root / "flux/scripts")
        infer = "import os, sys\nprint('flux.scripts.infer in', os.getcwd(), *sys.argv[1:])\n"
        (self.root / "flux/scripts/__init__.py").write_text("")
        (self.root / "flux/scripts/infer.py").write_text(infer)
        (self.root / "flux/__init__.py").write_text("")
        (self.root / "flux/train.py").write_text("")
        config = "import sys\nprint('flux.config', *sys.argv[1:])\n"
        (self.root / "flux/config.py").write_text(config)
        fake_pip = tmp_path / "fake_pip"
        fake_pip.mkdir()
        (fake_pip / "__init__.py").write_text("")
        (fake_pip / "__main__.py").write_text(PIP)
        (fake_pip / "_vendor").symlink_to(Path(pip.__file__).parent / "_vendor")  # packaging
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.tool("python3", PYTHON3.format(real=sys.executable, fake_pip=fake_pip))
        self.tool("nvidia-smi", "#!/bin/sh\nexit 9\n")  # no NVIDIA GPU, whatever the host has
        self.pip_log = tmp_path / "pip.log"
        self.env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "TORCH_SPEC")}
        self.env.update(
            PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            FAKE_PIP_LOG=str(self.pip_log),
            TORCH_CPU_INDEX=(tmp_path / "no-cpu-index").as_uri(),
        )
        self.venv = self.root / ".venv"

    def tool(self, name: str, text: str) -> None:
        path = self.bin / name
        path.write_text(text)
        path.chmod(0o755)

    def run(
        self, script: str = "run_train.sh", *args: str, cwd: Path | None = None, **env: str
    ) -> Done:
        self.pip_log.write_text("")
        done = subprocess.run(
            [str(self.root / script), *args],
            cwd=cwd,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=120,
            start_new_session=True,  # the stand-in pip's kill takes the session, not pytest
        )
        calls = [json.loads(line) for line in self.pip_log.read_text().splitlines()]
        return Done(done.returncode, done.stdout + done.stderr, calls)

    def marker(self) -> dict[str, str]:
        lines = (self.venv / "flux-setup").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines)


@pytest.fixture
def checkout(tmp_path) -> Checkout:
    return Checkout(tmp_path)


def test_first_run_sets_up_venv_and_trains_and_the_next_starts_at_once(checkout) -> None:
    first = checkout.run("run_train.sh", "--training.steps", "2")
    assert first.returncode == 0, first.output
    lines = first.setup_lines
    assert len(lines) == 3, first.output
    assert lines[0].startswith("flux: setting up .venv (first run only): Python 3.")
    assert "torch==2.13.0 from your pip index (no NVIDIA GPU" in lines[0]
    assert f"log: {checkout.venv}/flux-setup.log" in lines[1]
    assert lines[2].startswith("flux: .venv ready in")
    assert first.installs() == [["torch==2.13.0"], ["-e", f"{checkout.root}/."]]
    assert checkout.marker()["complete"] == "1"
    config = "--job.config_file flux/train_configs/debug_model.toml --training.steps 2"
    assert f"flux.config {config}" in first.output
    assert "torchrun --nproc_per_node=1 " in first.output
    assert f"-m flux.train {config}" in first.output

    second = checkout.run("run_train.sh", "--training.steps", "2")
    assert second.returncode == 0, second.output
    assert second.setup_lines == [] and second.pip_calls == []
    assert f"-m flux.train {config}" in second.output


@pytest.mark.parametrize("case", ["gpu", "cpu index", "TORCH_SPEC"])
def test_torch_is_the_cuda_build_with_a_gpu_the_cpu_build_without_or_torch_spec(
    checkout, tmp_path, case
) -> None:
    env = {}
    if case == "gpu":
        checkout.tool("nvidia-smi", "#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-0)'\n")
        want = ["torch==2.13.0"]
    elif case == "cpu index":
        (tmp_path / "cpu-index/torch").mkdir(parents=True)
        env["TORCH_CPU_INDEX"] = (tmp_path / "cpu-index").as_uri()
        want = ["torch==2.13.0", "--extra-index-url", env["TORCH_CPU_INDEX"]]
    else:
        env["TORCH_SPEC"] = "torch==2.11.0 --index-url https://download.pytorch.org/whl/cu126"
        want = env["TORCH_SPEC"].split()
    done = checkout.run("run_train.sh", **env)
    assert done.returncode == 0, done.output
    assert done.installs()[0] == want
    kind = {
        "gpu": "CUDA build",
        "cpu index": "CPU build: no NVIDIA GPU",
        "TORCH_SPEC": "TORCH_SPEC",
    }
    assert f"({kind[case]})" in done.setup_lines[0]
    if case == "TORCH_SPEC":  # a later run with another TORCH_SPEC reinstalls torch
        again = checkout.run("run_train.sh", TORCH_SPEC="torch==2.12.0")
        assert again.returncode == 0, again.output
        log = checkout.venv / "flux-setup.log"
        assert again.setup_lines[0] == f"flux: updating .venv (TORCH_SPEC; log: {log})"
        assert again.installs()[0] == ["torch==2.12.0"]


def test_run_tests_adds_the_dev_extra_then_lints_type_checks_and_runs_pytest(checkout) -> None:
    assert checkout.run("run_train.sh").returncode == 0
    done = checkout.run("run_tests.sh")
    assert done.returncode == 0, done.output
    assert done.setup_lines[0].startswith("flux: updating .venv (adding the dev extra;")
    assert done.installs() == [["-e", f"{checkout.root}/.[dev]"]]
    assert checkout.marker()["extras"] == "dev"
    for step in ("ruff check flux tests", "ruff format --check flux tests", "mypy", "pytest -q"):
        assert f"{step}\n" in done.output
    some = checkout.run("run_tests.sh", "tests/test_flow.py", "-k", "loss")
    assert some.returncode == 0 and some.setup_lines == [] and some.pip_calls == []
    assert some.output.splitlines() == ["pytest -q tests/test_flow.py -k loss"]


def test_an_interrupted_set_up_is_finished_by_the_next_run(checkout) -> None:
    killed = checkout.run("run_train.sh", FAKE_PIP_KILL="-e ")
    assert killed.returncode == -signal.SIGKILL
    assert checkout.marker()["complete"] == "0"
    done = checkout.run("run_train.sh")
    assert done.returncode == 0, done.output
    assert done.setup_lines[0].startswith("flux: finishing the set-up of .venv that an earlier run")
    assert done.installs() == [["torch==2.13.0"], ["-e", f"{checkout.root}/."]]
    assert checkout.marker()["complete"] == "1"
    assert "-m flux.train" in done.output


@pytest.mark.parametrize("damage", ["torch half-written", "python gone", "killed before pip"])
def test_a_broken_venv_of_this_script_is_made_again(checkout, damage) -> None:
    if damage == "torch half-written":  # pip's metadata is there, the module is not whole
        assert checkout.run("run_train.sh", FAKE_PIP_KILL="-e ").returncode != 0
        torch = next(checkout.venv.glob("lib/python*/site-packages/torch/__init__.py"))
        torch.write_text("raise ImportError('half-written')\n")
        why = "again: the earlier set-up left it broken"
    elif damage == "python gone":
        assert checkout.run("run_train.sh").returncode == 0
        (checkout.venv / "bin/python").unlink()
        why = "again: the Python it was made with is gone"
    else:
        checkout.venv.mkdir()
        (checkout.venv / "flux-setup").write_text("complete=0\n")
        why = "again: an earlier set-up stopped before pip was in place"
    done = checkout.run("run_train.sh")
    assert done.returncode == 0, done.output
    assert any(line.startswith(f"flux: setting up .venv ({why}): ") for line in done.setup_lines)
    assert checkout.marker()["complete"] == "1"
    assert "-m flux.train" in done.output


def test_a_changed_pyproject_updates_the_venv(checkout) -> None:
    assert checkout.run("run_train.sh").returncode == 0
    pyproject = checkout.root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"einops",', '"einops",\n    "webdataset",'))
    done = checkout.run("run_train.sh")
    assert done.returncode == 0, done.output
    assert done.setup_lines[0].startswith("flux: updating .venv (pyproject.toml changed;")
    assert done.installs() == [["-e", f"{checkout.root}/."]]
    assert checkout.run("run_train.sh").setup_lines == []


@pytest.mark.parametrize("failure", ["install", "network", "python"])
def test_a_failed_set_up_is_one_line(checkout, failure) -> None:
    env = {}
    if failure == "install":
        env["FAKE_PIP_FAIL"] = "torch"
        want = (
            "flux: error: installing torch failed (ERROR: No matching distribution found for torch)"
        )
    elif failure == "network":
        env["FAKE_PIP_FAIL"] = "-e "
        env["FAKE_PIP_ERROR"] = (
            "WARNING: Retrying (Retry(total=4)) after connection broken by 'NewConnectionError('"
            "Failed to establish a new connection: [Errno -3] Temporary failure in name"
            " resolution')"
        )
        want = "flux: error: could not reach the package index to install flux and its dependencies"
    else:
        for name in ("python3", "python3.11", "python3.12", "python3.13", "python3.14"):
            checkout.tool(name, "#!/bin/sh\necho 3.10.12\n")
        want = "flux: error: setting up .venv needs Python 3.11 or newer, and there is none on PATH"
        want += " (python3 is 3.10.12"
    done = checkout.run("run_train.sh", **env)
    assert done.returncode == 1
    assert done.output.count("\nflux: error: ") + done.output.startswith("flux: error: ") == 1
    assert done.output.splitlines()[-1].startswith(want), done.output
    assert "Traceback" not in done.output and "torchrun" not in done.output
    if failure != "python":
        assert done.output.endswith(f"log: {checkout.venv}/flux-setup.log\n")
        assert checkout.marker()["complete"] == "0"  # the next run finishes it
    else:
        assert not checkout.venv.exists()
    if failure == "network":  # the next failure is told by its own output, not the log's past
        again = checkout.run("run_train.sh", FAKE_PIP_FAIL="-e ")
        assert again.setup_lines[-1].startswith(
            "flux: error: installing flux and its dependencies failed (ERROR: No matching"
        )


def made_by_hand(checkout: Checkout, prefix: Path, *requirements: str) -> None:
    subprocess.run([str(checkout.bin / "python3"), "-m", "venv", str(prefix)], check=True)
    if requirements:
        pip_install = [str(prefix / "bin/python"), "-m", "pip", "install", *requirements]
        subprocess.run(pip_install, env=checkout.env, check=True, capture_output=True)


def test_an_active_environment_with_flux_is_used_as_it_is(checkout, tmp_path) -> None:
    active = tmp_path / "active"
    made_by_hand(checkout, active, "torch==2.13.0", "-e", str(checkout.root))
    path = f"{active / 'bin'}{os.pathsep}{checkout.env['PATH']}"
    done = checkout.run("run_train.sh", "--training.steps", "2", PATH=path, VIRTUAL_ENV=str(active))
    assert done.returncode == 0, done.output
    assert done.setup_lines == [] and done.pip_calls == []
    assert not checkout.venv.exists()
    assert "flux.config --job.config_file flux/train_configs/debug_model.toml" in done.output

    # It lacks the dev extra: run_tests.sh says so and changes nothing.
    tests = checkout.run("run_tests.sh", PATH=path)
    assert tests.returncode == 1 and tests.pip_calls == []
    [line] = tests.setup_lines
    assert line.startswith(f"flux: error: the active environment ({active}) has flux but lacks ")
    assert "pytest" in line
    assert line.endswith(
        f": pip install -e '{checkout.root}/.[dev]' in it, or deactivate it to let this script set"
        " up .venv"
    )


def test_a_venv_made_by_hand_is_used_when_it_has_flux_and_never_changed(checkout) -> None:
    made_by_hand(checkout, checkout.venv)
    refused = checkout.run("run_train.sh")
    assert refused.returncode == 1 and refused.pip_calls == []
    assert refused.setup_lines == [
        "flux: error: .venv was not made by this script and lacks this checkout's flux:"
        f" {checkout.venv}/bin/pip install -e '{checkout.root}/.', or move .venv away to let this"
        " script set it up"
    ]
    made_by_hand(checkout, checkout.venv, "torch==2.13.0", "-e", str(checkout.root))
    done = checkout.run("run_train.sh")
    assert done.returncode == 0, done.output
    assert done.setup_lines == [] and done.pip_calls == []
    assert not (checkout.venv / "flux-setup").exists()
    assert "-m flux.train" in done.output


def test_run_infer_uses_the_same_environment_and_stays_where_it_is_run(checkout, tmp_path) -> None:
    assert checkout.run("run_train.sh").returncode == 0
    done = checkout.run("run_infer.sh", "--checkpoint", "outputs/checkpoint/step-30", cwd=tmp_path)
    assert done.returncode == 0, done.output
    assert done.setup_lines == [] and done.pip_calls == []
    assert (
        done.output == f"flux.scripts.infer in {tmp_path} --checkpoint outputs/checkpoint/step-30\n"
    )
