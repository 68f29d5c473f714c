"""Every command-line tool answers unreadable inputs and out-of-range numbers in one line
(exit 2, no traceback); weights are checked before anything is built or written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import flux.scripts.infer as infer
from flux.model.args import flux_configs
from flux.model.model import FluxModel
from flux.scripts import benchmark, convert, download_autoencoder, precompute
from flux.weights import save_dcp, save_safetensors

Tool = Callable[[list[str]], object]


def debug_state(value: float | None = None) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        shapes = FluxModel(flux_configs["flux-debug"]).state_dict()
    state = {k: torch.randn(v.shape) * 0.02 for k, v in shapes.items()}
    if value is not None:
        state["img_in.weight"][0, 0] = value
    return state


def one_line_error(tool: Tool, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        tool(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, (argv, err)
    assert err.count("\n") == 1 and " error: " in err, (argv, err)
    return err


def bad_inputs(tmp: Path) -> list[tuple[Tool, list[str], str]]:
    garbage = tmp / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    latin1 = tmp / "prompts.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    a_file = tmp / "a_file"
    a_file.write_text("")
    weights = tmp / "debug.safetensors"
    save_safetensors(debug_state(), weights, "float32")
    run = ["--checkpoint", str(weights), "--prompts", "a red circle"]
    return [
        (infer.main, [*run, "--steps", "0"], "--steps: 0 is not a positive integer"),
        (infer.main, [*run, "--batch_size", "-2"], "--batch_size: -2 is not a positive"),
        (infer.main, [*run, "--cfg_scale", "nan"], "--cfg_scale: nan is not a number >= 0"),
        (infer.main, [*run, "--size", "40"], "--size = 40: use a positive multiple of 16"),
        (infer.main, [*run, "--prompts_file", str(latin1)], "is not UTF-8 text"),
        (infer.main, ["--checkpoint", str(garbage), "--prompts", "x"], "not a readable"),
        (infer.main, [*run, "--autoencoder", str(garbage)], "garbage.safetensors"),
        (convert.main, ["to-flux", str(tmp), str(tmp / "o.safetensors")], "not a DCP"),
        (convert.main, ["from-flux", str(garbage), str(tmp / "o")], "not a readable"),
        (precompute.main, ["--output", str(tmp / "c"), "--num_samples", "0"], "--num_samples"),
        (precompute.main, ["--output", str(tmp / "c"), "--shard_size", "0"], "--shard_size"),
        (precompute.main, ["--output", str(tmp / "c"), "--workers", "-1"], "--workers: -1"),
        (precompute.main, ["--output", str(a_file)], "is a file"),
        (benchmark.main, ["step", "--steps", "0"], "--steps: 0 is not a positive integer"),
        (benchmark.main, ["step", "--cache", str(tmp / "none")], "is not a folder"),
        (benchmark.main, ["step", "--training.steps", "0"], "training.steps = 0"),
        (benchmark.main, ["model", "--rounds", "0"], "--rounds: 0 is not a positive"),
        (benchmark.main, ["data", "--batches", "-3"], "--batches: -3 is not a positive"),
        (
            download_autoencoder.main,
            ["--ae_path", str(tmp / "ae.safetensors")],
            f"give --out {tmp / 'ae.safetensors'}",
        ),
    ]


def test_tools_answer_bad_input_in_one_line(tmp_path, capsys) -> None:
    for tool, argv, expected in bad_inputs(tmp_path):
        err = one_line_error(tool, argv, capsys)
        assert expected in err, (argv, err)


def test_inference_checks_the_flavor_before_building_the_model(
    tmp_path, capsys, monkeypatch
) -> None:
    built = []

    class Spy(FluxModel):  # a full-size model would not fit in memory here
        def __init__(self, args):
            built.append(torch.get_default_device().type)
            assert built[-1] == "meta", "built before the weights were checked"
            super().__init__(args)

    monkeypatch.setattr(infer, "FluxModel", Spy)
    weights = tmp_path / "debug.safetensors"
    save_safetensors(debug_state(), weights, "float32")
    argv = ["--checkpoint", str(weights), "--flavor", "flux-dev", "--prompts", "x"]
    err = one_line_error(infer.main, argv, capsys)
    assert "does not fit this flavor" in err and built == ["meta"]


def test_convert_never_writes_non_finite_weights_without_saying_so(tmp_path, capsys) -> None:
    checkpoint = tmp_path / "step-1"
    save_dcp(debug_state(float("nan")), checkpoint)
    out = tmp_path / "model.safetensors"
    err = one_line_error(convert.main, ["to-flux", str(checkpoint), str(out)], capsys)
    assert "holds values that are not finite (img_in.weight)" in err and not out.exists()

    convert.main(["to-flux", str(checkpoint), str(out), "--allow_nonfinite"])
    captured = capsys.readouterr()
    assert out.is_file() and "1 tensors hold NaN or infinity" in captured.err


def test_convert_refuses_a_checkpoint_that_does_not_match_its_checksums(tmp_path, capsys) -> None:
    checkpoint = tmp_path / "step-1"
    save_dcp(debug_state(), checkpoint)
    data = checkpoint / "__0_0.distcp"
    with open(data, "r+b") as f:
        f.seek(data.stat().st_size // 2)
        f.write(bytes(16))
    argv = ["to-flux", str(checkpoint), str(tmp_path / "model.safetensors")]
    err = one_line_error(convert.main, argv, capsys)
    assert "is corrupted (__0_0.distcp does not match its checksum)" in err
