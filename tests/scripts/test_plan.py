"""python -m flux.scripts.plan: a plan as JSON, the sweep, a run that does not fit, and bad
input refused in one line."""

from __future__ import annotations

import json

import pytest

from flux.config import parse_config
from flux.plan.planner import PlanSettings, check_plan, knobs
from flux.scripts.plan import main

DEBUG = ("--job.config_file", "flux/train_configs/debug_model.toml")
# 80 GB less this margin leaves 20 MB: the debug model's step (27 MB at batch 8) overflows
TIGHT = ("--margin", str(1 - 20e6 / 80e9))
# 12 MB usable: the debug model's full-AC step from a cache fits a batch of a few (11.0 MB at
# batch 1, 12.4 MB at 8), so the sweep plans only small batches
SMALL = ("--margin", str(1 - 12e6 / 80e9))


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_plan_as_json_for_each_gpu(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, *DEBUG, "--ngpu", "2", "--gpu", "h100-80gb,h200", "--json")
    assert code == 0
    h100, h200 = json.loads(out)
    assert (h100["gpu"], h200["gpu"]) == ("h100-80gb", "h200")
    assert h100["layout"] == {"dp_replicate": 1, "dp_shard": 2, "cp": 1, "tp": 1}
    memory = h100["memory"]
    assert memory["fits"] and memory["peak_bytes"] == sum(memory["at_peak"].values())
    assert h200["memory"]["peak_bytes"] == memory["peak_bytes"]  # one step, two GPUs
    assert h200["memory"]["usable_bytes"] > memory["usable_bytes"]
    kinds = {(t["kind"], t["group"]) for t in h100["traffic"]}
    assert {("all-gather", "fsdp"), ("reduce-scatter", "fsdp")} <= kinds
    time = h100["time"]
    assert time["step_s"] >= time["compute_s"] > 0 and 0 < time["mfu"] < 1
    assert h200["time"]["step_s"] <= time["step_s"]  # the same FLOPs, more HBM bandwidth
    assert h100["mlperf"]["minutes"] > 0 and len(h100["mlperf"]["published"]) == 2


def test_the_text_states_what_the_plan_assumes(capsys: pytest.CaptureFixture) -> None:
    float8 = ("--model.converters", "quantize.linear.float8")
    code, out, _ = run(capsys, *DEBUG, "--ngpu", "2", *float8)
    assert code == 0
    assert "images/s per GPU" in out and "compute at 40% of" in out and "links at 80%" in out
    assert "assumed: blocks planned eagerly" in out
    assert "assumed: float8 casts and all-gathers as torchao runs them" in out


def test_a_run_that_does_not_fit_says_by_how_much_and_what_helps_most(
    capsys: pytest.CaptureFixture,
) -> None:
    code, out, _ = run(capsys, *DEBUG, "--ngpu", "1", *TIGHT, "--json")
    assert code == 0
    (p,) = json.loads(out)
    memory = p["memory"]
    assert not memory["fits"] and memory["peak_bytes"] > memory["usable_bytes"]
    advice = p["advice"]
    changes = [a["change"] for a in advice]
    assert any("activation_checkpoint.mode full" in c for c in changes)
    assert any("local_batch_size 4" in c for c in changes)
    assert any("precompute" in c for c in changes)
    peaks = [a["peak_bytes"] for a in advice]
    assert peaks == sorted(peaks) and peaks[0] < memory["peak_bytes"]
    # the debug step's peak is the autoencoder encoding 64 px images: a cache helps most
    assert "precompute" in changes[0]


def test_sweep_finds_the_largest_batch_that_fits(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(
        capsys, *DEBUG, "--ngpu", "1", *SMALL, "--encoders", "precomputed", "--sweep",
        "--sweep-ac", "full", "--json",
    )  # fmt: skip
    assert code == 0
    (result,) = json.loads(out)
    batch = result["largest_batch"]
    assert result["activation_checkpoint"] == "full" and 1 < batch < 8
    assert result["plan"]["memory"]["fits"] and result["plan"]["local_batch"] == batch
    code, out, _ = run(
        capsys, *DEBUG, "--ngpu", "1", *SMALL, "--encoders", "precomputed", "--json",
        "--no-advice", "--activation_checkpoint.mode", "full",
        "--training.local_batch_size", str(batch + 1),
    )  # fmt: skip
    assert not json.loads(out)[0]["memory"]["fits"]


def test_advice_on_an_odd_batch_keeps_the_global_batch() -> None:
    """Local batch 5 on 8 GPUs: a smaller batch that divides it (1), accumulated to the same
    global batch of 40 (not 2: 40 is no multiple of 2 x 8, a plan the trainer refuses)."""
    job = parse_config([*DEBUG, "--training.local_batch_size", "5"])
    (hint, smaller), *_ = [(h, j) for h, j, _ in knobs(job, PlanSettings(ngpu=8)) if "batch" in h]
    assert hint.startswith("--training.local_batch_size 1 --training.global_batch_size 40 ")
    training = smaller.training
    assert (training.local_batch_size, training.global_batch_size) == (1, 40)
    check_plan(smaller, PlanSettings(ngpu=8))  # the trainer's checks take it


@pytest.mark.parametrize(
    "args, message",
    [
        (("--gpu", "h100"), "unknown GPU profile 'h100': choose one of h100-80gb, h200"),
        (("--parallelism.data_parallel_shard_degree", "3"), "parallel degrees multiply to 3"),
        (("--model.flavor", "flux-huge"), "unknown model.flavor 'flux-huge'"),
        (("--encoders", "sometimes"), "--encoders 'sometimes'"),
        (("--efficiency", "1.5"), "--efficiency 1.5"),
    ],
)
def test_bad_input_is_refused_in_one_line(
    capsys: pytest.CaptureFixture, args: tuple[str, ...], message: str
) -> None:
    code, out, err = run(capsys, *DEBUG, "--ngpu", "2", *args)
    assert code == 2 and out == ""
    assert err.startswith("flux: error: ") and err.count("\n") == 1
    assert message in err
