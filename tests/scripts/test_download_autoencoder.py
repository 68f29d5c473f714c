"""flux/scripts/download_autoencoder.py, with the hub replaced by fakes (no network)."""

import subprocess
import sys
from pathlib import Path

import httpx2  # the HTTP client huggingface_hub builds its errors from
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
from huggingface_hub.utils import hf_raise_for_status
from safetensors.torch import save_file

import flux.scripts.download_autoencoder as script
from flux.model.args import flux_configs
from flux.model.autoencoder import AutoEncoder
from flux.model.text_encoders import CLIP_HUB_ID, T5_HUB_ID

REPO = "black-forest-labs/FLUX.1-dev"
TOKEN = "hf_SECRETtoken123"
FILE_URL = f"https://huggingface.co/{REPO}/resolve/main/ae.safetensors"


@pytest.fixture(autouse=True)
def no_env_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)


def hub_error(status: int, headers: dict[str, str], body: str = "") -> Exception:
    """The exception huggingface_hub raises for this response from the hub."""
    request = httpx2.Request("GET", FILE_URL)
    response = httpx2.Response(status, headers=headers, text=body, request=request)
    with pytest.raises(Exception) as info:
        hf_raise_for_status(response)
    return info.value


def fake_download(tmp_path: Path, state: dict[str, torch.Tensor], calls: list[dict]):
    """An hf_hub_download that 'downloads' a safetensors file of state into a fake cache."""

    def download(repo_id: str, filename: str, token: str | None = None) -> str:
        calls.append({"repo_id": repo_id, "filename": filename, "token": token})
        cached = tmp_path / "cache" / filename
        cached.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(cached))
        return str(cached)

    return download


def raising(error: Exception):
    def download(*args, **kwargs):
        raise error

    return download


def debug_ae_state() -> dict[str, torch.Tensor]:
    ae = AutoEncoder(flux_configs["flux-debug"].autoencoder_params)
    return {k: v.contiguous() for k, v in ae.state_dict().items()}


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = script.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_download_places_the_file_at_out_and_checks_it_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[dict] = []
    monkeypatch.setattr(script, "hf_hub_download", fake_download(tmp_path, debug_ae_state(), calls))
    out = tmp_path / "x" / "ae.safetensors"
    code, stdout, stderr = run_main(
        ["--repo_id", REPO, "--ae_path", "ae.safetensors", "--flavor", "flux-debug"]
        + ["--out", str(out)],
        capsys,
    )
    assert code == 0, stderr
    assert out.read_bytes() == (tmp_path / "cache" / "ae.safetensors").read_bytes()
    assert calls == [{"repo_id": REPO, "filename": "ae.safetensors", "token": None}]
    assert "loaded" in stdout and str(out.resolve()) in stdout
    assert stderr == ""


def test_token_from_hf_token_env_reaches_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[dict] = []
    monkeypatch.setattr(script, "hf_hub_download", fake_download(tmp_path, debug_ae_state(), calls))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "ae.safetensors"
    code, stdout, stderr = run_main(["--flavor", "flux-debug", "--out", str(out)], capsys)
    assert code == 0, stderr
    assert calls[0]["token"] == TOKEN
    assert TOKEN not in stdout + stderr


def test_a_file_that_does_not_fit_the_autoencoder_fails_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state = {"not.an.autoencoder": torch.zeros(2)}
    monkeypatch.setattr(script, "hf_hub_download", fake_download(tmp_path, state, []))
    out = tmp_path / "ae.safetensors"
    code, _, stderr = run_main(["--flavor", "flux-debug", "--out", str(out)], capsys)
    assert code == 1
    assert len(stderr.splitlines()) == 1
    assert "does not match" in stderr


HUB_FAILURES = {
    "gated": (
        lambda: hub_error(403, {"X-Error-Code": "GatedRepo", "X-Error-Message": "restricted"}),
        ["accept the licence", f"https://huggingface.co/{REPO}", "--hf_token"],
    ),
    "bad token": (
        lambda: hub_error(401, {"X-Error-Message": "Invalid credentials in Authorization header"}),
        ["refused the token", "https://huggingface.co/settings/tokens"],
    ),
    "repo not found or private": (
        lambda: hub_error(401, {"X-Error-Code": "RepoNotFound"}),
        ["token was refused", "--repo_id", "https://huggingface.co/settings/tokens"],
    ),
    "missing file": (
        lambda: hub_error(404, {"X-Error-Code": "EntryNotFound"}),
        ["ae.safetensors is not in", "--ae_path"],
    ),
    "offline, not cached": (
        lambda: LocalEntryNotFoundError("cannot find the requested files in the local cache"),
        ["cannot reach the Hugging Face hub", "machine with internet", "OUT"],
    ),
    "offline mode": (
        lambda: OfflineModeIsEnabled("HF_HUB_OFFLINE=1"),
        ["cannot reach the Hugging Face hub", "OUT"],
    ),
    "no connection": (
        lambda: httpx2.ConnectError("[Errno -3] Temporary failure in name resolution"),
        ["cannot reach the Hugging Face hub", "OUT"],
    ),
    "server error echoing the token": (
        lambda: hub_error(500, {"X-Error-Message": f"could not use token {TOKEN}"}),
        ["the hub failed to serve"],
    ),
}


@pytest.mark.parametrize("token_from", ["flag", "env"])
@pytest.mark.parametrize("failure", list(HUB_FAILURES))
def test_hub_failures_print_one_line_of_advice_without_the_token(
    failure: str,
    token_from: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_error, advice = HUB_FAILURES[failure]
    monkeypatch.setattr(script, "hf_hub_download", raising(make_error()))
    out = tmp_path / "ae.safetensors"
    argv = ["--repo_id", REPO, "--ae_path", "ae.safetensors", "--out", str(out)]
    if token_from == "flag":
        argv += ["--hf_token", TOKEN]
    else:
        monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, stdout, stderr = run_main(argv, capsys)
    assert code == 1
    assert len(stderr.splitlines()) == 1, stderr
    for words in advice:
        assert words.replace("OUT", str(out)) in stderr, stderr
    assert TOKEN not in stdout + stderr
    assert not out.exists()


def test_encoders_go_to_dir_t5_and_dir_clip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[dict] = []

    def snapshot(repo_id: str, local_dir: Path, allow_patterns: list[str], token: str | None):
        calls.append({"repo_id": repo_id, "local_dir": Path(local_dir), "patterns": allow_patterns})
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / "model.safetensors").write_bytes(b"weights")
        return str(local_dir)

    monkeypatch.setattr(script, "snapshot_download", snapshot)
    monkeypatch.setattr(script, "hf_hub_download", raising(AssertionError("--skip_ae")))
    root = tmp_path / "encoders"
    code, stdout, stderr = run_main(["--encoders", str(root), "--skip_ae"], capsys)
    assert code == 0, stderr
    assert [(c["repo_id"], c["local_dir"]) for c in calls] == [
        (T5_HUB_ID, root / "t5"),
        (CLIP_HUB_ID, root / "clip"),
    ]
    assert all("*.safetensors" in c["patterns"] and "*.json" in c["patterns"] for c in calls)
    assert "[encoder]" in stdout
    assert f't5_encoder = "{(root / "t5").resolve()}"' in stdout
    assert f'clip_encoder = "{(root / "clip").resolve()}"' in stdout


def test_encoders_without_safetensors_fall_back_to_pytorch_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    patterns: dict[str, list[list[str]]] = {}

    def snapshot(repo_id: str, local_dir: Path, allow_patterns: list[str], token: str | None):
        patterns.setdefault(repo_id, []).append(allow_patterns)
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        if repo_id == CLIP_HUB_ID:  # T5's repo has no safetensors
            (Path(local_dir) / "model.safetensors").write_bytes(b"weights")
        return str(local_dir)

    monkeypatch.setattr(script, "snapshot_download", snapshot)
    code, _, stderr = run_main(["--encoders", str(tmp_path), "--skip_ae"], capsys)
    assert code == 0, stderr
    assert patterns[T5_HUB_ID][1] == ["pytorch_model*.bin"]
    assert len(patterns[CLIP_HUB_ID]) == 1


def test_encoders_offline_fails_in_one_line_naming_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(script, "snapshot_download", raising(LocalEntryNotFoundError("offline")))
    code, _, stderr = run_main(
        ["--encoders", str(tmp_path), "--skip_ae", "--hf_token", TOKEN], capsys
    )
    assert code == 1
    assert len(stderr.splitlines()) == 1
    assert "cannot reach the Hugging Face hub" in stderr and str(tmp_path / "t5") in stderr
    assert TOKEN not in stderr


def test_runs_as_a_file_from_any_directory(tmp_path: Path) -> None:
    path = Path(script.__file__)
    result = subprocess.run(
        [sys.executable, str(path), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--encoders" in result.stdout
