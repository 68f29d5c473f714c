"""The frozen encoders as the trainer runs them on one process (flux.parallel.frozen); the
layouts across ranks are checked by tests/parallel/tp_worker.py."""

from __future__ import annotations

import torch
from torchtitan.distributed import ParallelDims

from flux.data.dataloader import collate
from flux.data.dataset import CaptionedImages
from flux.model.args import flux_configs
from flux.parallel.frozen import parallelize_frozen
from flux.sampling import Streams
from flux.train_spec import build_preprocessor
from tests.caches import job

ARGS = flux_configs["flux-debug"]
CPU = torch.device("cpu")


def test_the_compiled_channels_last_encoder_gives_the_plain_encoders_latents() -> None:
    plain, compiled = (build_preprocessor(job(), ARGS, CPU) for _ in range(2))
    one = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    parallelize_frozen(compiled, one, compile_backend="eager")
    assert compiled.autoencoder is not None and plain.autoencoder is not None
    assert compiled.autoencoder.encoder._compiled_call_impl is not None
    encoder = plain.autoencoder.encoder
    encoder.to(memory_format=torch.contiguous_format)  # as the model file builds it
    assert not encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    shapes = CaptionedImages("shapes", 64)
    batch = collate([shapes.sample(i) for i in range(3)])
    latents = [
        pre.encode_latents(batch, Streams.of(0, 1, batch["keys"], CPU)) for pre in (compiled, plain)
    ]
    torch.testing.assert_close(latents[0], latents[1], rtol=0, atol=1e-5)
