"""The `precomputed` source and the checks that keep training on a matching cache."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux.config import ConfigError, check_precomputed
from flux.config import main as check_main
from flux.data.dataloader import CaptionedImageLoader
from flux.data.dataset import CaptionedImages
from flux.data.precomputed import CacheError, PrecomputedCache
from tests.caches import DEBUG, job, make_cache

SAMPLES = 20


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("cache"), SAMPLES, "--shard_size", "8")


def keys(dataset: CaptionedImages, n: int) -> list[str]:
    return [sample.key for sample in itertools.islice(iter(dataset), n)]


def test_an_epoch_yields_every_cached_sample_once_under_its_source_key(cache) -> None:
    epoch = keys(CaptionedImages("precomputed", 64, path=cache), SAMPLES)
    assert sorted(epoch, key=int) == [str(i) for i in range(SAMPLES)]  # shapes' own keys
    assert epoch != sorted(epoch, key=int)  # a seeded shuffle, as imagefolder's
    batch = next(iter(CaptionedImageLoader("precomputed", 64, 4, path=cache)))
    assert batch["t5"].shape == (4, 16, 64) and batch["clip"].shape == (4, 32)
    assert batch["moments"].shape == (4, 32, 8, 8)
    assert len(batch["captions"]) == len(batch["keys"]) == 4 and "images" not in batch


def test_resume_on_another_world_size_repeats_nothing(cache) -> None:
    before = [CaptionedImages("precomputed", 64, r, 2, path=cache) for r in range(2)]
    seen = [k for d in before for k in keys(d, 3)]
    after = [CaptionedImages("precomputed", 64, r, 3, path=cache) for r in range(3)]
    for d in after:
        d.load_state_dict(before[0].state_dict())
    later = [k for d in after for k in keys(d, 2)]
    assert len(set(seen + later)) == len(seen + later) == 12


def test_an_unfinished_cache_is_not_read(cache, tmp_path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(cache, partial)
    (partial / "manifest.json").unlink()
    with pytest.raises(CacheError, match="unfinished cache .* run the same precompute command"):
        PrecomputedCache(partial)
    with pytest.raises(CacheError, match="not a precomputed cache"):
        PrecomputedCache(tmp_path)


def other_autoencoder(tmp_path: Path) -> str:
    weights = load_file(str(job().encoder.autoencoder_path))
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(tmp_path / "ae.safetensors"))
    return str(tmp_path / "ae.safetensors")


def test_training_refuses_a_cache_made_with_other_settings_in_one_line(cache, tmp_path) -> None:
    on_cache = ("--training.dataset", "precomputed", "--training.dataset_path", str(cache))
    job(*on_cache)  # the settings it was made with pass
    for args, expected in [
        (("--encoder.max_t5_encoding_len", "32"), "max_t5_encoding_len 16 (this run: 32)"),
        (("--training.img_size", "128"), "img_size 64 (this run: 128)"),
        (("--encoder.t5_encoder", str(tmp_path)), "t5_encoder 't5-debug'"),
        (("--encoder.encoder_dtype", "bfloat16"), "encoder_dtype 'float32'"),
        (("--encoder.autoencoder_path", other_autoencoder(tmp_path)), "autoencoder (other"),
    ]:
        with pytest.raises(ConfigError) as error:
            job(*on_cache, *args)
        message = str(error.value)
        assert "\n" not in message and expected in message, message
        assert message.startswith(f"training.dataset_path: {cache} was made with other settings")
        assert "Precompute it again with this config" in message


def test_check_prints_a_refused_cache_as_one_line_and_exits_2(cache, capsys) -> None:
    args = ["--training.dataset", "precomputed", "--training.dataset_path", str(cache)]
    with pytest.raises(SystemExit) as exit_:
        check_main(["--job.config_file", DEBUG, *args, "--training.img_size", "32"])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "img_size 64 (this run: 32)" in lines[0]


def test_precomputed_needs_a_dataset_path_that_is_a_cache(tmp_path) -> None:
    with pytest.raises(ConfigError, match="needs training.dataset_path"):
        job("--training.dataset", "precomputed")
    with pytest.raises(ConfigError, match="not a precomputed cache"):
        job("--training.dataset", "precomputed", "--training.dataset_path", str(tmp_path))


def test_the_manifest_records_the_settings_and_the_source(cache) -> None:
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["samples"] == SAMPLES and manifest["skipped"] == 0
    assert [s["samples"] for s in manifest["shards"]] == [8, 8, 4]
    assert manifest["source"] == {
        "dataset": "shapes",
        "dataset_path": None,
        "seed": 0,
        "split": "training",
    }
    assert manifest["settings"]["max_t5_encoding_len"] == 16
    assert manifest["texts"][0] == ""
    assert PrecomputedCache(cache)[SAMPLES - 1].t5.dtype == torch.float32


def copy_of(cache: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    return copy


def on(cache: Path) -> tuple[str, ...]:
    return ("--training.dataset", "precomputed", "--training.dataset_path", str(cache))


@pytest.mark.parametrize(
    "damage, expected",
    [
        (
            lambda c: (c / "shard-000001.safetensors").unlink(),
            "shard-000001.safetensors is missing",
        ),
        (
            lambda c: (c / "shard-000002.safetensors").write_bytes(b"x" * 100),
            "shard-000002.safetensors is 100 bytes, the manifest says",
        ),
        (lambda c: (c / "texts.safetensors").unlink(), "texts.safetensors is missing"),
    ],
)
def test_a_cache_with_a_lost_file_is_refused_at_start_up_in_one_line(
    cache, tmp_path, damage, expected
) -> None:
    copy = copy_of(cache, tmp_path)
    damage(copy)
    with pytest.raises(ConfigError) as error:
        job(*on(copy))
    message = str(error.value)
    assert "\n" not in message and expected in message, message
    assert "run the precompute command again" in message


def test_a_shard_corrupted_after_start_up_is_skipped_and_counted(cache, tmp_path) -> None:
    copy = copy_of(cache, tmp_path)
    dataset = CaptionedImages("precomputed", 64, path=copy)
    shard = copy / "shard-000001.safetensors"  # samples 8..15
    shard.write_bytes(bytes(shard.stat().st_size))  # same size, header gone
    read = keys(dataset, SAMPLES - 8)
    assert sorted(read, key=int) == [str(i) for i in range(SAMPLES) if not 8 <= i < 16]
    order = keys(CaptionedImages("precomputed", 64, path=cache), SAMPLES)
    passed = order[: order.index(read[-1])]  # the epoch up to the last sample read
    assert dataset.skipped == {"unreadable cache shard": sum(8 <= int(k) < 16 for k in passed)}
    assert "shard-000001.safetensors cannot be read" in dataset.skip_report()


def test_a_cache_without_samples_is_refused(cache, tmp_path) -> None:
    copy = copy_of(cache, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "samples": 0, "shards": []}))
    with pytest.raises(ConfigError, match="holds no samples"):
        job(*on(copy))


def test_a_cache_made_before_checksums_still_loads_without_its_sizes_checked(
    cache, tmp_path
) -> None:
    copy = copy_of(cache, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["texts_file"]
    manifest["shards"] = [{"file": s["file"], "samples": s["samples"]} for s in manifest["shards"]]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    for sums in copy.glob("*.sum.json"):
        sums.unlink()
    job(*on(copy))
    assert len(keys(CaptionedImages("precomputed", 64, path=copy), SAMPLES)) == SAMPLES


def test_the_manifest_records_each_shards_size_and_checksum(cache) -> None:
    from flux.checksums import file_digest

    manifest = json.loads((cache / "manifest.json").read_text())
    for entry in [manifest["texts_file"], *manifest["shards"]]:
        path = cache / entry["file"]
        assert entry["bytes"] == path.stat().st_size and entry["digest"] == file_digest(path)


def test_a_cache_of_aspect_buckets_holds_each_sample_at_its_bucket_and_reads_back_by_bucket(
    tmp_path,
) -> None:
    """Precompute fits each image to its bucket and encodes batches of one bucket; the cache
    gives each sample's moments at its bucket's size, as the encoder makes them of the
    online sample, and the loader's batches over it hold one bucket each."""
    from flux.data.buckets import Buckets
    from flux.data.dataloader import batch_bucket, bucket_of
    from flux.flow import build_autoencoder, encode_images
    from flux.model.args import flux_configs
    from flux.train_spec import encoder_settings
    from tests.data.images import mixed_folder

    folder = mixed_folder(tmp_path / "images")
    aspect = ("--training.buckets", "aspect", "--training.max_upscale", "4")
    data = ("--training.dataset", "imagefolder", "--training.dataset_path", str(folder))
    sizes = ("--training.img_size", "48", "--shard_size", "10", "--batch_size", "3")
    cache = make_cache(tmp_path / "cache", 24, *data, *aspect, *sizes)
    online = CaptionedImages(
        "imagefolder", 48, path=folder, buckets=Buckets.aspect(48, max_upscale=4)
    )
    cached = CaptionedImages("precomputed", 48, path=cache)
    assert len({bucket_of(cached.sample(i)) for i in range(24)}) == 5  # the mix's five shapes
    config = job(*data, *aspect, "--training.img_size", "48")
    autoencoder = build_autoencoder(
        encoder_settings(config), flux_configs["flux-debug"].autoencoder_params, torch.device("cpu")
    )
    for i in (0, 5, 11, 23):
        sample, image = cached.sample(i), online.sample(i)
        assert sample.key == image.key and bucket_of(sample) == bucket_of(image)
        with torch.no_grad():
            expected = encode_images(autoencoder, image.image[None].float() / 127.5 - 1)[0]
        # one image against a batch of three: this CPU's convolutions differ by ~1e-3 on
        # these shapes; another image's moments differ by more than 0.1
        torch.testing.assert_close(sample.moments, expected, atol=1e-2, rtol=0)
    loader = CaptionedImageLoader("precomputed", 48, 2, path=cache)
    batches = list(itertools.islice(loader, 12))
    assert sorted(k for b in batches for k in b["keys"]) == sorted(online.key(i) for i in range(24))
    assert len({batch_bucket(b) for b in batches}) == 5
    square = job(*data, "--training.img_size", "48")
    square.training.dataset, square.training.dataset_path = "precomputed", str(cache)
    with pytest.raises(ConfigError, match="made with other settings: buckets 'aspect 32x96"):
        check_precomputed(square)  # the cache records its buckets
