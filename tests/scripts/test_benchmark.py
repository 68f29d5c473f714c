"""flux.scripts.benchmark: step (the parts of the trainer's step, with and without a
cache), ac (activation checkpointing's saved activations), ema (an update of the average
of the weights) and data (the loader on generated JPEG shards)."""

from __future__ import annotations

import json

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


def test_data_measures_each_size_and_worker_count_on_generated_shards(capsys) -> None:
    args = ["--source-size", "128", "--images", "16", "--img-size", "32", "64"]
    main(["data", *args, "--workers", "0", "1", "--batch", "4", "--batches", "2", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    runs = {(r["img_size"], r["workers"]): r["samples_per_s"] for r in result["runs"]}
    assert set(runs) == {(32, 0), (32, 1), (64, 0), (64, 1)}
    assert all(rate > 0 for rate in runs.values())
    assert set(result["decode"]) == {"32", "64"} and result["source_size"] == 128  # JSON keys
