"""flux.scripts.benchmark: step (the parts of the trainer's step, with and without a
cache), ac (activation checkpointing's saved activations), ema (an update of the average
of the weights) and data (the loader on generated JPEG shards)."""

from __future__ import annotations

import json

import pytest
import torch

from flux.model.args import flux_configs
from flux.model.model import FluxModel
from flux.scripts.benchmark import PARTS, main, step_table
from tests.caches import make_cache

ARGS = flux_configs["flux-debug"]


def test_step_times_each_part_with_and_without_a_cache(tmp_path, capsys) -> None:
    cache = make_cache(tmp_path / "cache", 4)
    results = []
    for extra in ([], ["--cache", str(cache)]):
        args = ["step", "--steps", "2", "--warmup", "1", "--json", *extra]
        main([*args, "--training.local_batch_size", "2"])
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    online, cached = results
    for result in results:
        assert set(result["ms"]) == {*PARTS, "step"} and all(result["ms"].values())
        assert result["images_per_s"] > 0 and result["peak_memory_mib"] > 0
        # MFU against a GPU's peak FLOPs; a CPU has none to compare with
        assert (result["mfu_percent"] is None) == (not torch.cuda.is_available())
    assert (online["dataset"], cached["dataset"]) == ("shapes", "precomputed")
    assert cached["frozen_weights_mib"] == 0 < online["frozen_weights_mib"]
    assert online["compile"] is False and online["activation_checkpoint"] == "none"
    table = step_table(results)
    assert "precomputed" in table and "latent encoding (ms)" in table
    assert "FSDP over one process" in table


def test_ac_measures_saved_activations_per_mode_with_no_ac_gradients(capsys) -> None:
    small = ("--hidden", "64", "--double", "1", "--single", "1", "--img-tokens", "16")
    main(["ac", *small, "--txt-tokens", "8", "--rounds", "1", "--warmup", "0", "--json"])
    modes = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["modes"]
    assert list(modes) == ["none", "op", "full"]
    assert all(m["same_gradients_as_none"] for m in modes.values())
    saved = [modes[m]["activations_mib"] for m in ("full", "op", "none")]
    assert 0 < saved[0] < saved[1] < saved[2]


def test_ema_times_an_update_with_and_without_cpu_offload(capsys) -> None:
    main(["ema", "--updates", "2", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["parameters"] == sum(p.numel() for p in FluxModel(ARGS).parameters())
    for key in ("beside_weights", "cpu_offload"):
        assert result[key]["update_ms"] > 0 and result[key]["swap_in_and_out_ms"] > 0


def test_data_measures_each_size_bucketing_and_worker_count_on_generated_shards(capsys) -> None:
    """The default mix of aspect ratios, square crops against aspect buckets: aspect buckets
    keep more of the pixels (a 16:9 image's centre square keeps 56%)."""
    args = ["--source-size", "128", "--images", "16", "--img-size", "32", "64"]
    main(["data", *args, "--workers", "0", "1", "--batch", "4", "--batches", "2", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    runs = {(r["img_size"], r["buckets"], r["workers"]): r for r in result["runs"]}
    assert set(runs) == {
        (size, kind, workers)
        for size in (32, 64)
        for kind in ("square", "aspect")
        for workers in (0, 1)
    }
    assert all(r["samples_per_s"] > 0 and r["skipped"] == 0 for r in runs.values())
    assert set(result["decode"]) == {"32 square", "32 aspect", "64 square", "64 aspect"}
    assert result["source_size"] == 128 and sum(result["mix"].values()) == pytest.approx(1)
    kept = result["pixels_kept"]
    assert 0.6 < kept["64 square"] < 0.9 < kept["64 aspect"] <= 1, kept


def test_data_mix_of_aspect_ratios_is_parsed_or_refused_in_one_line(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["data", "--mix", "16:9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert "--mix '16:9': give W:H=PERCENT pairs" in err[-1]
