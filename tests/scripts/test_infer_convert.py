"""Inference and weight conversion on a checkpoint the trainer wrote with 2 processes
(keeping an average of the weights, [ema]): the session's reference run (tests/conftest.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from flux.model.args import flux_configs
from flux.model.model import FluxModel
from flux.scripts import convert, infer
from flux.weights import save_safetensors
from tests.launch import train_here
from tests.model.helpers import model_inputs, randomize
from tests.oracle import diffusers_config, diffusers_forward, diffusers_transformer

ARGS = flux_configs["flux-debug"]
RED = "a large red circle at the center on a white background"


@pytest.fixture(scope="module")
def checkpoint(fsdp) -> Path:
    """A full checkpoint (optimizer and all) of the two-process reference run
    (tests/conftest.py), after its steps 1 and 2: its average is of the two."""
    run, dump = fsdp
    assert run.returncode == 0, run.output[-3000:]
    return dump / "checkpoint" / "step-2"


@pytest.mark.e2e
def test_the_average_exports_and_round_trips_bit_exact(checkpoint, tmp_path) -> None:
    average, raw = tmp_path / "ema.safetensors", tmp_path / "raw.safetensors"
    convert.main(["to-flux", str(checkpoint), str(average), "--dtype", "float32", "--ema"])
    convert.main(["to-flux", str(checkpoint), str(raw), "--dtype", "float32"])
    convert.main(["from-flux", str(average), str(tmp_path / "imported")])
    again = tmp_path / "again.safetensors"
    convert.main(["to-flux", str(tmp_path / "imported"), str(again), "--dtype", "float32"])
    a, r, b = (load_file(str(p)) for p in (average, raw, again))
    assert list(a) == list(r) == list(b) and len(a) == len(FluxModel(ARGS).state_dict())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], r[k]) for k in a)  # the average, not the weights
    FluxModel(ARGS).load_state_dict(a, strict=True)


@pytest.mark.e2e
def test_export_import_round_trip_is_bit_exact(checkpoint, tmp_path) -> None:
    first = tmp_path / "model.safetensors"
    convert.main(["to-flux", str(checkpoint), str(first), "--dtype", "float32"])
    convert.main(["from-flux", str(first), str(tmp_path / "imported")])
    second = tmp_path / "again.safetensors"
    convert.main(["to-flux", str(tmp_path / "imported"), str(second), "--dtype", "float32"])
    a, b = load_file(str(first)), load_file(str(second))
    assert list(a) == list(b) and len(a) == len(FluxModel(ARGS).state_dict())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "final" in k)


@pytest.mark.e2e
def test_bfloat16_export_keeps_the_published_names(checkpoint, tmp_path) -> None:
    out = tmp_path / "model.safetensors"
    convert.main(["to-flux", str(checkpoint), str(out)])
    state = load_file(str(out))
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    assert "double_blocks.0.img_attn.qkv.weight" in state and "final_layer.linear.weight" in state


@pytest.mark.e2e
def test_exported_file_gives_diffusers_the_same_output(checkpoint, tmp_path) -> None:
    out = tmp_path / "model.safetensors"
    convert.main(["to-flux", str(checkpoint), str(out), "--dtype", "float32"])
    state = load_file(str(out))
    ours = FluxModel(ARGS)
    ours.load_state_dict(state, strict=True)
    theirs = diffusers_transformer(state, ARGS)
    i = model_inputs(ARGS)
    with torch.no_grad():
        a = ours(**i)
        b = diffusers_forward(theirs, i)
    assert ((a - b).norm() / b.norm()).item() < 1e-5


@pytest.mark.e2e
def test_imported_file_starts_a_training_run(tmp_path) -> None:
    model = FluxModel(ARGS)
    randomize(model, seed=3)
    weights = tmp_path / "flux1-debug.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    convert.main(["from-flux", str(weights), str(tmp_path / "init")])
    dump = tmp_path / "run"
    run = train_here(
        dump,
        "--training.steps",
        "1",
        "--checkpoint.enable",
        "--checkpoint.initial_load_path",
        str(tmp_path / "init"),
        "--optimizer.lr",
        "0",
        "--optimizer.weight_decay",
        "0",
    )
    assert run.returncode == 0, run.output[-3000:]
    assert f"Loading the checkpoint from {tmp_path / 'init'}" in run.output
    # lr 0: the run's final checkpoint holds exactly the imported weights
    convert.main(["to-flux", str(dump / "checkpoint" / "step-1"), str(tmp_path / "out.st")])
    out = load_file(str(tmp_path / "out.st"))
    original = load_file(str(weights))
    assert all(torch.equal(out[k], original[k].to(torch.bfloat16)) for k in original)


@pytest.mark.e2e
def test_inference_writes_pngs_with_metadata_independent_of_batch_size(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{RED}\n\na small blue square at the top left on a black background\n")
    common = ["--checkpoint", str(checkpoint), "--steps", "3", "--seed", "7"]
    infer.main([*common, "--prompts_file", str(prompts), "--out", str(tmp_path / "a")])
    infer.main(
        [*common, "--prompts_file", str(prompts), "--batch_size", "1", "--out", str(tmp_path / "b")]
    )
    written = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert written == ["00000_7.png", "00001_8.png"]
    image = Image.open(tmp_path / "a" / "00000_7.png")
    assert image.size == (64, 64)
    assert image.text["prompt"] == RED and image.text["seed"] == "7"  # type: ignore[attr-defined]
    settings = json.loads(image.text["settings"])  # type: ignore[attr-defined]
    assert settings["steps"] == 3 and settings["flavor"] == "flux-debug"
    assert settings["weights"] == "ema"  # the checkpoint holds an average: sampled
    for name in written:  # the same up to float rounding of batched matmuls
        a = np.asarray(Image.open(tmp_path / "a" / name)).astype(int)
        b = np.asarray(Image.open(tmp_path / "b" / name)).astype(int)
        assert np.abs(a - b).max() <= 2


@pytest.mark.e2e
def test_inference_from_a_safetensors_file(checkpoint, tmp_path) -> None:
    weights = tmp_path / "model.safetensors"
    convert.main(["to-flux", str(checkpoint), str(weights), "--dtype", "float32"])
    infer.main(
        ["--checkpoint", str(weights), "--steps", "2", "--prompts", RED, "--out", str(tmp_path)]
    )
    assert (tmp_path / "00000_0.png").is_file()


@pytest.mark.e2e
def test_inference_samples_the_average_or_the_weights_as_asked(checkpoint, tmp_path) -> None:
    common = ["--checkpoint", str(checkpoint), "--steps", "3", "--prompts", RED]
    infer.main([*common, "--out", str(tmp_path / "default")])
    infer.main([*common, "--no-ema", "--out", str(tmp_path / "raw")])
    pngs = {w: Image.open(tmp_path / w / "00000_0.png") for w in ("default", "raw")}
    chosen = {w: json.loads(p.text["settings"])["weights"] for w, p in pngs.items()}  # type: ignore[attr-defined]
    assert chosen == {"default": "ema", "raw": "raw"}
    assert not np.array_equal(np.asarray(pngs["default"]), np.asarray(pngs["raw"]))


def test_inference_writes_an_image_of_the_width_and_height_asked_for(tmp_path) -> None:
    model = FluxModel(ARGS)
    randomize(model, std=0.05)
    weights = tmp_path / "flux1-debug.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    out = tmp_path / "images"
    common = ["--checkpoint", str(weights), "--steps", "1", "--prompts", RED]
    infer.main([*common, "--width", "48", "--height", "32", "--out", str(out)])
    image = Image.open(out / "00000_0.png")
    assert image.size == (48, 32)  # PIL: (width, height)
    settings = json.loads(image.text["settings"])  # type: ignore[attr-defined]
    assert (settings["width"], settings["height"]) == (48, 32)
    infer.main([*common, "--size", "32", "--width", "16", "--out", str(tmp_path / "sized")])
    assert Image.open(tmp_path / "sized" / "00000_0.png").size == (16, 32)  # --size: the other


@pytest.mark.parametrize(
    "sides, expected",
    [
        (("--width", "40"), "--width = 40: use a positive multiple of 16"),
        (("--height", "24"), "--height = 24: use a positive multiple of 16"),
        (("--size", "8"), "--size = 8: use a positive multiple of 16"),
        (("--width", "0"), "--width: 0 is not a positive integer"),
    ],
    ids=["width", "height", "size", "zero"],
)
def test_inference_refuses_a_side_that_is_not_a_multiple_of_16_in_one_line(
    tmp_path, capsys, sides, expected
) -> None:
    with pytest.raises(SystemExit) as exit_:
        infer.main(["--checkpoint", str(tmp_path), "--prompts", RED, *sides])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d: d / "missing", "not found"),
        (lambda d: d, "not a DCP checkpoint"),
    ],
)
def test_inference_errors_are_one_line(tmp_path, capsys, make, expected) -> None:
    with pytest.raises(SystemExit) as exit_:
        infer.main(["--checkpoint", str(make(tmp_path)), "--prompts", RED])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("infer: error:") and expected in err and "\n" not in err


@pytest.mark.e2e
def test_weights_of_another_flavor_are_refused(checkpoint, tmp_path, capsys) -> None:
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    with pytest.raises(SystemExit):
        convert.main(
            ["to-flux", str(copy), str(tmp_path / "x.safetensors"), "--flavor", "flux-schnell"]
        )
    err = capsys.readouterr().err.strip()
    assert "does not fit this flavor" in err and "\n" not in err


def test_exported_file_loads_with_diffusers_from_single_file(tmp_path) -> None:
    """diffusers' single-file converter fixes the width at FLUX.1's 3072 and reads the depth
    from the file: a full-width model with one block of each kind, config from a local
    folder (from_single_file would otherwise fetch it from the hub)."""
    from dataclasses import replace

    from diffusers import FluxTransformer2DModel

    args = replace(
        flux_configs["flux-dev"], depth=1, depth_single_blocks=1, context_in_dim=64, vec_in_dim=32
    )
    with torch.device("meta"):
        model = FluxModel(args)
    model = model.to_empty(device="cpu")
    randomize(model, std=0.02)
    weights = tmp_path / "flux-mini.safetensors"
    save_safetensors(model.state_dict(), weights, "float32")  # what to-flux writes
    config = {"_class_name": "FluxTransformer2DModel", **diffusers_config(args)}
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text(json.dumps(config))
    theirs = FluxTransformer2DModel.from_single_file(
        str(weights), config=str(tmp_path / "config"), local_files_only=True
    ).eval()
    i = model_inputs(args, h=2, w=2, txt_len=3)
    with torch.no_grad():
        a = model(**i)
        b = diffusers_forward(theirs, i)
    assert ((a - b).norm() / b.norm()).item() < 1e-4
