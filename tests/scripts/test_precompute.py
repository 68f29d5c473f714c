"""flux.scripts.precompute: every sample once, across interruptions and processes; and a
training run on what it writes."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from flux.data import precomputed
from flux.data.precomputed import shard_metadata
from flux.data.shapes import shape_spec
from tests.caches import PRECOMPUTE, make_cache, precompute_args
from tests.data.images import folder_with_bad_files
from tests.data.tars import make_shards, record, write_tar
from tests.launch import ROOT, Ahead, train_here


def cached_keys(root: Path) -> list[str]:
    """The keys of a finished cache, in its order, checked against their captions."""
    manifest = json.loads((root / "manifest.json").read_text())
    keys = []
    for shard in manifest["shards"]:
        meta = shard_metadata(root / shard["file"])
        assert len(meta["keys"]) == len(meta["captions"]) == shard["samples"]
        keys += meta["keys"]
        if manifest["source"]["dataset"] == "shapes":
            assert meta["captions"] == [shape_spec(0, int(k)).caption for k in meta["keys"]]
    assert manifest["samples"] == len(keys)
    return keys


def interrupt_after(monkeypatch, shards: int) -> None:
    """Stop the job (as a kill would) once `shards` shards are published, with the next
    one written under its temporary name but not yet renamed."""
    publish, done = precomputed._publish, list[Path]()

    def publish_or_stop(tmp: Path, path: Path) -> None:
        if path.name.startswith("shard-"):
            if len(done) == shards:
                raise KeyboardInterrupt
            done.append(path)
        publish(tmp, path)

    monkeypatch.setattr(precomputed, "_publish", publish_or_stop)


def test_an_interrupted_precompute_resumes_losing_and_repeating_nothing(
    tmp_path, monkeypatch
) -> None:
    root, args = tmp_path / "cache", ("--shard_size", "7", "--batch_size", "4")
    interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        make_cache(root, 30, *args)
    kept = {p.name: p.stat().st_mtime_ns for p in root.glob("shard-*.safetensors")}
    assert sorted(kept) == ["shard-000000.safetensors", "shard-000001.safetensors"]
    assert list(root.glob("shard-000002.safetensors.tmp*"))  # the shard it was writing
    assert not (root / "manifest.json").exists()

    monkeypatch.undo()
    for rank in (0, 1):  # restarted as two processes: indexed shards go to any number
        make_cache(root, 30, *args, "--rank", str(rank), "--world_size", "2")
    keys = cached_keys(root)
    assert sorted(keys, key=int) == [str(i) for i in range(30)]
    assert {name: (root / name).stat().st_mtime_ns for name in kept} == kept


def start_two_processes(factory: pytest.TempPathFactory) -> tuple[list[subprocess.Popen], Path]:
    """python -m flux.scripts.precompute as two processes (RANK, WORLD_SIZE) into one cache;
    each one's output goes to log-RANK beside it."""
    folder = factory.mktemp("two_processes")
    command = [*PRECOMPUTE, *precompute_args(folder / "cache", 24, "--shard_size", "5")]
    processes = []
    for rank in range(2):
        with open(folder / f"log-{rank}", "w") as log:
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2")
            processes.append(
                subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
    return processes, folder


AHEAD = Ahead(two_processes=start_two_processes)  # started in the background (conftest)


@pytest.fixture
def two_processes(tmp_path_factory) -> tuple[list[subprocess.Popen], Path]:
    return AHEAD.take("two_processes", tmp_path_factory)


@pytest.mark.e2e
def test_two_processes_precompute_every_sample_once(two_processes) -> None:
    processes, folder = two_processes
    returncodes = [p.wait(timeout=300) for p in processes]
    outputs = [(folder / f"log-{rank}").read_text() for rank in range(2)]
    assert returncodes == [0, 0], outputs
    assert "process 0 of 2 wrote 3 shards" in outputs[0]
    assert "process 1 of 2 wrote 2 shards" in outputs[1]
    assert sorted(cached_keys(folder / "cache"), key=int) == [str(i) for i in range(24)]


def test_a_stream_is_precomputed_once_across_processes_and_an_interruption(
    tmp_path, monkeypatch
) -> None:
    data = make_shards(tmp_path / "tars", 3, 6)
    # A caption that is not UTF-8: a counted skip, not a dead run.
    latin1 = [("0000x.png", record(0)[0][1]), ("0000x.txt", "caf\xe9".encode("latin-1"))]
    write_tar(data / "shard-003.tar", [*latin1, *record(18)])
    root = tmp_path / "cache"
    args = (
        *("--training.dataset", "webdataset", "--training.dataset_path", str(data)),
        *("--shard_size", "4", "--world_size", "2"),
    )
    interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        make_cache(root, 100, *args, "--rank", "0")
    monkeypatch.undo()
    make_cache(root, 100, *args, "--rank", "1")
    assert not (root / "manifest.json").exists()  # process 0 has not finished
    make_cache(root, 100, *args, "--rank", "0")
    keys = cached_keys(root)
    expected = [f"shard-{s:03d}.tar:{i:05d}" for s in range(3) for i in range(6 * s, 6 * s + 6)]
    assert sorted(keys) == [*expected, "shard-003.tar:00018"]
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["skipped"] == 1


def test_a_restart_with_other_settings_is_refused(tmp_path, capsys) -> None:
    root = make_cache(tmp_path / "cache", 6)
    with pytest.raises(SystemExit):
        make_cache(root, 6, "--encoder.max_t5_encoding_len", "32")
    errors = [line for line in capsys.readouterr().err.splitlines() if "flux: error:" in line]
    assert len(errors) == 1 and "started with other settings" in errors[0], errors


def test_precompute_counts_every_bad_file_it_skipped(tmp_path, capsys) -> None:
    folder = folder_with_bad_files(tmp_path / "images", good=4)
    source = ("--training.dataset", "imagefolder", "--training.dataset_path", str(folder))
    root = make_cache(tmp_path / "cache", 100, *source, "--shard_size", "3")
    out = capsys.readouterr().out
    manifest = json.loads((root / "manifest.json").read_text())
    assert (manifest["samples"], manifest["skipped"]) == (4, 3)
    kinds = manifest["skipped_kinds"]
    assert sum(kinds.values()) == 3 and kinds["undecodable image"] == 1, kinds
    assert "wrote 3 shards of 4 samples; skipped 3 (" in out
    assert "finished with 4 samples; 3 skipped (" in out


def test_a_source_without_a_usable_sample_is_refused_in_one_line(tmp_path, capsys) -> None:
    folder = folder_with_bad_files(tmp_path / "images", good=0)
    source = ("--training.dataset", "imagefolder", "--training.dataset_path", str(folder))
    with pytest.raises(SystemExit) as exit_:
        make_cache(tmp_path / "cache", 100, *source)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert "no usable sample in the source: all 3 were skipped" in err
    assert not (tmp_path / "cache" / "manifest.json").exists()


TRAIN = ("--debug.seed", "0", "--training.steps", "4", "--training.local_batch_size", "4")
VALIDATE = (
    *("--validation.enable", "--validation.freq", "2", "--validation.steps", "1"),
    *("--validation.local_batch_size", "2", "--validation.sampling_steps", "2"),
)
CHECKPOINT = ("--checkpoint.enable", "--checkpoint.interval", "2")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run of the debug config on a cache of shapes, validating on it too."""
    cache = make_cache(tmp_path_factory.mktemp("cache"), 40, "--shard_size", "16")
    on_cache = (
        *("--training.dataset", "precomputed", "--training.dataset_path", str(cache)),
        *("--validation.dataset", "precomputed", "--validation.dataset_path", str(cache)),
    )
    dump = tmp_path_factory.mktemp("run")
    args = (*TRAIN, *VALIDATE, *CHECKPOINT, *on_cache)
    return train_here(dump, *args), dump, args


@pytest.mark.e2e
def test_training_on_a_cache_runs_and_validates_without_the_encoders(trained) -> None:
    run, dump, _ = trained
    assert run.returncode == 0, run.output[-3000:]
    assert "precomputed data: frozen parts built: autoencoder decoder" in run.output
    assert sorted(run.losses) == [1, 2, 3, 4]
    assert all(math.isfinite(v) and v > 0 for v in run.losses.values())
    assert sorted(run.validation_losses) == [1, 2, 4]
    assert (dump / "validation" / "step_000004.png").is_file()


@pytest.mark.e2e
def test_training_on_a_cache_resumes_with_the_same_losses(trained, tmp_path) -> None:
    reference, dump, args = trained
    assert reference.returncode == 0, reference.output[-3000:]
    (tmp_path / "checkpoint").mkdir()
    shutil.copytree(dump / "checkpoint" / "step-2", tmp_path / "checkpoint" / "step-2")
    run = train_here(tmp_path, *args)
    assert run.returncode == 0, run.output[-3000:]
    assert "Training starts at step 3" in run.output
    assert {s: run.losses[s] for s in (3, 4)} == pytest.approx(
        {s: reference.losses[s] for s in (3, 4)}, rel=1e-5
    )
