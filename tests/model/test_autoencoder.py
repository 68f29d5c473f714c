import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from flux.model.args import AutoEncoderParams, flux_configs
from flux.model.autoencoder import AutoEncoder, load_ae
from tests.model.helpers import randomize
from tests.oracle import diffusers_autoencoder

PARAMS = flux_configs["flux-debug"].autoencoder_params


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).norm() / theirs.norm()).item()


@pytest.fixture(scope="module")
def pair() -> tuple[AutoEncoder, torch.nn.Module]:
    ae = AutoEncoder(PARAMS)
    randomize(ae, seed=2, std=0.05)
    return ae, diffusers_autoencoder(ae.state_dict(), PARAMS)


def test_encoder_moments_match_diffusers(pair) -> None:
    ae, oracle = pair
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours = ae.encoder(x)
        theirs = oracle.encode(x).latent_dist
    assert ours.shape == (2, 2 * PARAMS.z_channels, 4, 6)
    mean, logvar = ours.chunk(2, dim=1)
    assert relative_error(mean, theirs.mean) < 1e-5
    assert relative_error(logvar, theirs.logvar) < 1e-5


def test_decoder_matches_diffusers(pair) -> None:
    ae, oracle = pair
    z = torch.randn(2, PARAMS.z_channels, 4, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = ae.decoder(z)
        theirs = oracle.decode(z).sample
    assert ours.shape == (2, 3, 32, 48)
    assert relative_error(ours, theirs) < 1e-5


def test_encode_applies_the_published_scale_and_shift(pair) -> None:
    ae, _ = pair
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean = ae.encoder(x).chunk(2, dim=1)[0]
        z = ae.encode(x, sample=False)
        torch.testing.assert_close(z, PARAMS.scale_factor * (mean - PARAMS.shift_factor))
        torch.testing.assert_close(ae.decode(z), ae.decoder(mean))


def test_published_autoencoder_has_the_ae_safetensors_layout() -> None:
    with torch.device("meta"):
        ae = AutoEncoder(flux_configs["flux-dev"].autoencoder_params)
    sd = ae.state_dict()
    assert sd["encoder.conv_out.weight"].shape == (32, 512, 3, 3)
    assert sd["decoder.conv_in.weight"].shape == (512, 16, 3, 3)
    assert sd["decoder.up.0.block.2.conv2.weight"].shape == (128, 128, 3, 3)
    assert "encoder.down.3.downsample.conv.weight" not in sd
    assert "decoder.up.0.upsample.conv.weight" not in sd
    assert "decoder.up.3.upsample.conv.weight" in sd
    assert 83e6 < sum(t.numel() for t in sd.values()) < 85e6


def test_load_ae_loads_a_matching_file(tmp_path, pair) -> None:
    ae, _ = pair
    save_file(ae.state_dict(), tmp_path / "ae.safetensors")
    loaded = load_ae(tmp_path / "ae.safetensors", PARAMS)
    for name, tensor in ae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


def test_load_ae_says_how_to_download_a_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="download_autoencoder.py"):
        load_ae(tmp_path / "absent.safetensors", PARAMS)


def test_load_ae_refuses_a_file_of_another_shape(tmp_path) -> None:
    other = AutoEncoder(dataclasses.replace(PARAMS, ch=64))
    save_file(other.state_dict(), tmp_path / "ae.safetensors")
    with pytest.raises(ValueError, match="does not match the autoencoder.*wrong shape"):
        load_ae(tmp_path / "ae.safetensors", PARAMS)


def test_load_ae_refuses_a_transformer_file(tmp_path) -> None:
    save_file({"img_in.weight": torch.zeros(2, 2)}, tmp_path / "flux.safetensors")
    with pytest.raises(ValueError, match="missing"):
        load_ae(tmp_path / "flux.safetensors", AutoEncoderParams(ch=32, ch_mult=(1, 2)))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_attention_gets_contiguous_queries_keys_and_values(
    pair, monkeypatch, layout: torch.memory_format
) -> None:
    """The fused attention kernels take only contiguous q, k, v; the math path they leave
    for holds the whole (H·W)² score matrix."""
    from flux.model import autoencoder

    ae, _ = pair
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recorded(q, k, v, *args, **kwargs):
        seen.extend(t.is_contiguous() for t in (q, k, v))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(autoencoder.F, "scaled_dot_product_attention", recorded)
    encoder = ae.encoder.to(memory_format=layout)
    x = torch.rand(1, 3, 32, 32).contiguous(memory_format=layout)
    with torch.no_grad():
        encoder(x)
    ae.encoder.to(memory_format=torch.contiguous_format)
    assert seen == [True, True, True]
