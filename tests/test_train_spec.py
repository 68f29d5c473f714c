"""What the trainer builds for flux: model args torchtitan can ask for FLOPs, a registered
TrainSpec, and the settings the parts below the trainer get from a job's configuration."""

from __future__ import annotations

import pytest
import torch
from torchtitan.protocols.train_spec import get_train_spec

from flux.config import DEBUG_CONFIG, check_config, parse_config
from flux.model.args import flux_configs
from flux.model.model import FluxModel
from flux.train_spec import FluxTrainArgs, FluxTrainModel, frozen_parts, validation_settings


def test_flops_per_token_counts_matmuls_and_attention() -> None:
    args = FluxTrainArgs.of(flux_configs["flux-schnell"])
    with torch.device("meta"):
        model = FluxModel(args)
    nparams, per_token_1k = args.get_nparams_and_flops(model, seq_len=1024 + 256)
    _, per_token_4k = args.get_nparams_and_flops(model, seq_len=4096 + 256)
    assert 11.8e9 < nparams < 12.0e9
    # Dense matmuls: 6 FLOPs per parameter a token passes through: one stream of each of
    # 19 double blocks and all 38 single blocks, 12·D² each, about 6.5e9 parameters.
    dense = 6 * 12 * 3072**2 * (19 + 38)
    assert dense < per_token_1k < 1.1 * dense
    # Attention adds 12·L·D per layer per token: the longer sequence costs that much more.
    extra_attention = 12 * (4352 - 1280) * 3072 * (19 + 38)
    assert per_token_4k - per_token_1k == pytest.approx(extra_attention, rel=1e-2)


def test_flop_count_refuses_a_sequence_with_no_image_tokens() -> None:
    args = FluxTrainArgs(txt_seq_len=256)
    with pytest.raises(ValueError, match="no image tokens"):
        args.get_nparams_and_flops(torch.nn.Linear(1, 1), seq_len=256)


def test_the_train_spec_builds_flux_with_the_flavors_args() -> None:
    spec = get_train_spec("flux")
    assert spec.model_cls is FluxTrainModel
    assert set(spec.model_args) == set(flux_configs)
    debug = spec.model_args["flux-debug"]
    assert isinstance(debug, FluxTrainArgs)
    assert debug.hidden_size == flux_configs["flux-debug"].hidden_size
    assert isinstance(FluxTrainModel(debug), FluxModel)


def job(*args: str):
    config = parse_config(["--job.config_file", str(DEBUG_CONFIG), *args])
    check_config(config, 1)
    return config


def test_online_data_builds_every_frozen_part_and_no_decoder_without_validation() -> None:
    parts = frozen_parts(job())
    assert parts.text_encoders and parts.latent_encoder and parts.latent_decoder
    assert parts.texts is None
    parts = frozen_parts(job("--validation.no-enable"))
    assert parts.text_encoders and parts.latent_encoder and not parts.latent_decoder


def test_validation_settings_carry_the_runs_seed_and_sampling() -> None:
    settings = validation_settings(job("--training.seed_data", "7", "--validation.cfg_scale", "2"))
    assert settings.seed == 7 and settings.sampling.seed == 7
    assert settings.sampling.cfg_scale == 2.0
    assert settings.sampling.shift  # the debug config trains with flux_shift
