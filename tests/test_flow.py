"""The flow step on precomputed batches is the flow step on images: same draws, same loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flux.data.caption_dropout import drop_captions
from flux.data.dataloader import collate
from flux.data.dataset import CaptionedImages
from flux.flow import FluxPreprocessor, flow_matching_loss
from flux.model.args import flux_configs
from flux.model.model import FluxModel
from flux.sampling import Streams
from flux.train_spec import build_preprocessor
from tests.caches import job, make_cache

ARGS = flux_configs["flux-debug"]
CPU = torch.device("cpu")
ORDER = [9, 2, 7, 0, 5, 3]  # a batch of the cache's samples, not in its order


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """dtype -> a cache of 10 shapes samples encoded in it, made once per module."""
    made: dict[str, Path] = {}

    def get(dtype: str) -> Path:
        if dtype not in made:
            root = tmp_path_factory.mktemp(f"cache-{dtype}")
            made[dtype] = make_cache(
                root, 10, "--encoder.encoder_dtype", dtype, "--shard_size", "4"
            )
        return made[dtype]

    return get


def batches(cache) -> tuple[dict, dict]:
    """The same samples as an online batch (images) and as a precomputed one."""
    cached = collate([CaptionedImages("precomputed", 64, path=cache).sample(i) for i in ORDER])
    shapes = CaptionedImages("shapes", 64)
    online = collate([shapes.sample(int(key)) for key in cached["keys"]])
    return online, cached


def preprocessors(cache, dtype: str, prob: str) -> tuple[FluxPreprocessor, FluxPreprocessor]:
    common = ("--encoder.encoder_dtype", dtype, "--training.classifier_free_guidance_prob", prob)
    online = job(*common)
    cached = job(
        *common, "--training.dataset", "precomputed", "--training.dataset_path", str(cache)
    )
    return build_preprocessor(online, ARGS, CPU), build_preprocessor(cached, ARGS, CPU)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_precomputed_batch_gives_the_online_inputs_target_and_loss(caches, dtype: str) -> None:
    root = caches(dtype)
    online_pre, cached_pre = preprocessors(root, dtype, "0.5")
    online, cached = batches(root)
    assert online["keys"] == cached["keys"]
    torch.manual_seed(0)
    model = FluxModel(ARGS)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    # The cache holds exactly what the encoders return (in their dtype): on this CPU the two
    # agree to the bit; the tolerances leave room for other batched-matmul kernels (one
    # bfloat16 rounding step of a value near 1 is 1/128). Other draws (another step's, as
    # a wrong draw would be) move the loss by more than 10 × loss_tolerance: checked last.
    tolerance, loss_tolerance = (1e-5, 1e-6) if dtype == "float32" else (1e-2, 1e-4)
    losses = []
    for step in (3, 4):
        flows = [
            pre(batch, Streams.of(0, step, batch["keys"], CPU))
            for pre, batch in ((online_pre, online), (cached_pre, cached))
        ]
        for name, value in flows[0].inputs.items():
            torch.testing.assert_close(flows[1].inputs[name], value, rtol=0, atol=tolerance)
        torch.testing.assert_close(flows[1].target, flows[0].target, rtol=0, atol=tolerance)
        with torch.no_grad():
            losses.append([flow_matching_loss(model, f).item() for f in flows])
        assert losses[-1][1] == pytest.approx(losses[-1][0], rel=loss_tolerance)
    assert abs(losses[0][0] - losses[1][0]) > 10 * loss_tolerance * losses[0][0]


@pytest.mark.parametrize("prob", ["0.5", "1.0"])
def test_caption_dropout_drops_the_same_samples_with_a_cache(caches, prob: str) -> None:
    root, dtype = caches("float32"), "float32"
    online_pre, cached_pre = preprocessors(root, dtype, prob)
    online, cached = batches(root)
    streams = lambda b: Streams.of(0, 7, b["keys"], CPU)  # noqa: E731
    assert cached_pre.texts is not None
    empty = {kind: cached_pre.texts.lookup(kind, [""]).float() for kind in ("t5", "clip")}
    txt, y = cached_pre.encode_text(cached, float(prob), streams(cached))
    cached_drops = (
        [torch.equal(row, empty["t5"][0]) for row in txt],
        [torch.equal(row, empty["clip"][0]) for row in y],
    )
    t5_captions, clip_captions = drop_captions(online["captions"], float(prob), streams(online).cpu)
    online_drops = ([c == "" for c in t5_captions], [c == "" for c in clip_captions])
    assert cached_drops == online_drops
    dropped = sum(online_drops[0]) + sum(online_drops[1])
    assert 0 < dropped < 2 * len(ORDER) if prob == "0.5" else dropped == 2 * len(ORDER)


def test_precomputed_data_builds_only_what_validation_needs(caches) -> None:
    root, dtype = caches("float32"), "float32"
    cached = ("--training.dataset", "precomputed", "--training.dataset_path", str(root))
    common = ("--encoder.encoder_dtype", dtype, *cached)
    train_only = build_preprocessor(job(*common), ARGS, CPU)
    assert train_only.t5 is None and train_only.clip is None and train_only.autoencoder is None

    validate_on_cache = ("--validation.enable", "--validation.dataset", "precomputed")
    pre = build_preprocessor(
        job(*common, *validate_on_cache, "--validation.dataset_path", str(root)), ARGS, CPU
    )
    assert pre.t5 is None and pre.clip is None and pre.autoencoder is not None
    assert all(p.is_meta for p in pre.autoencoder.encoder.parameters())  # the decoder only
    assert not any(p.is_meta for p in pre.autoencoder.decoder.parameters())
    t5, clip = pre.text_encoders()
    prompts = job().validation.sample_prompts[:2]
    online_t5, online_clip = preprocessors(root, dtype, "0.1")[0].text_encoders()
    tolerance = 1e-5
    torch.testing.assert_close(t5(prompts), online_t5(prompts), rtol=0, atol=tolerance)
    torch.testing.assert_close(clip(prompts), online_clip(prompts), rtol=0, atol=tolerance)

    validate_on_shapes = build_preprocessor(job(*common, "--validation.enable"), ARGS, CPU)
    assert validate_on_shapes.t5 is not None and validate_on_shapes.autoencoder is not None
    assert not any(p.is_meta for p in validate_on_shapes.autoencoder.parameters())
