import pytest
import torch

from flux.data.dataloader import CaptionedImageLoader
from flux.sampling import (
    Streams,
    denoise,
    get_schedule,
    image_ids,
    pack_latents,
    sample_timesteps,
    scaled_size,
    unpack_latents,
)


def test_pack_unpack_round_trip_and_patch_layout() -> None:
    latents = torch.randn(2, 16, 6, 8)
    tokens = pack_latents(latents)
    assert tokens.shape == (2, 12, 64)
    assert torch.equal(unpack_latents(tokens, 6, 8), latents)
    # Token 1 is the patch at row 0, column 1: latent pixels (0..1, 2..3), channel-major.
    assert torch.equal(tokens[0, 1, :4], latents[0, 0, 0:2, 2:4].flatten())
    ids = image_ids(2, 6, 8)
    assert (
        ids.shape == (2, 12, 3)
        and ids[0, 1].tolist() == [0, 0, 1]
        and ids[0, 4].tolist() == [0, 1, 0]
    )


@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "flux_shift"])
def test_training_timesteps_are_in_the_open_unit_interval(kind: str) -> None:
    t = sample_timesteps(
        kind, 10_000, image_seq_len=1024, generator=torch.Generator().manual_seed(0)
    )
    assert t.shape == (10_000,) and (t > 0).all() and (t < 1).all()


def test_logit_normal_favours_the_middle_and_the_shift_moves_toward_noise() -> None:
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    uniform = sample_timesteps("uniform", 20_000, 1024, gen())
    logit = sample_timesteps("logit_normal", 20_000, 1024, gen())
    small = sample_timesteps("flux_shift", 20_000, 256, gen())
    large = sample_timesteps("flux_shift", 20_000, 4096, gen())
    assert logit.std() < uniform.std()
    assert logit.mean() == pytest.approx(0.5, abs=0.01)
    assert 0.5 < small.mean() < large.mean()  # more image tokens, more noise


def test_unknown_timestep_sampling_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown timestep_sampling 'cosine'"):
        sample_timesteps("cosine", 2, 256)


def test_a_size_scales_to_a_resolution_keeping_its_aspect_ratio_in_multiples_of_16() -> None:
    sizes = [(1024, 576), (768, 1024), (512, 512)]
    assert [scaled_size(w, h, 256) for w, h in sizes] == [(336, 192), (224, 288), (256, 256)]
    assert [scaled_size(w, h, 1024) for w, h in sizes] == [(1360, 768), (880, 1184), (1024, 1024)]
    for w, h in (scaled_size(w, h, 512) for w, h in sizes):
        assert w % 16 == h % 16 == 0 and abs(w * h / 512**2 - 1) < 0.1
    assert scaled_size(4000, 1, 64) == (4048, 16)  # no side below 16


def test_schedules_run_from_one_to_zero() -> None:
    plain = get_schedule(4, 1024, shift=False)
    shifted = get_schedule(4, 1024, shift=True)
    assert plain == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert shifted[0] == 1.0 and shifted[-1] == 0.0
    assert all(a > b for a, b in zip(shifted, shifted[1:]))
    assert all(s > p for s, p in zip(shifted[1:-1], plain[1:-1]))


def test_euler_with_the_true_velocity_recovers_the_data() -> None:
    x0, noise = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    # On the straight path the velocity is constant: noise - x0.
    out = denoise(lambda img, t: noise - x0, noise, get_schedule(3, 256, shift=True))
    torch.testing.assert_close(out, x0)


def test_classifier_free_guidance_extrapolates_from_the_unconditional() -> None:
    img = torch.zeros(1, 1, 1)
    out = denoise(
        lambda img, t: torch.full_like(img, 2.0),
        img,
        [1.0, 0.0],
        cfg_scale=3.0,
        uncond_velocity=lambda img, t: torch.full_like(img, 1.0),
    )
    assert out.item() == pytest.approx(-(1.0 + 3.0 * (2.0 - 1.0)))


def first_keys(rank: int, world_size: int) -> list[str]:
    loader = CaptionedImageLoader("shapes", 32, 4, dp_rank=rank, dp_world_size=world_size)
    return next(iter(loader))["keys"]


def noise(streams: Streams) -> torch.Tensor:
    return streams.randn((4, 2, 2), torch.device("cpu"))


def test_data_parallel_ranks_draw_different_noise_and_timesteps() -> None:
    rank0 = Streams.of(0, 1, first_keys(0, 2), torch.device("cpu"))
    rank1 = Streams.of(0, 1, first_keys(1, 2), torch.device("cpu"))
    assert not torch.equal(noise(rank0), noise(rank1))
    t0 = [torch.rand(1, generator=g).item() for g in rank0.cpu]
    t1 = [torch.rand(1, generator=g).item() for g in rank1.cpu]
    assert set(t0).isdisjoint(t1)


def test_streams_are_per_sample_and_per_step() -> None:
    keys = ["0", "1", "2", "3"]
    full = noise(Streams.of(0, 5, keys, torch.device("cpu")))
    halves = [noise(Streams.of(0, 5, k, torch.device("cpu"))) for k in (keys[:2], keys[2:])]
    assert torch.equal(full, torch.cat(halves))  # micro-batches draw what one batch would
    assert not torch.equal(full, noise(Streams.of(0, 6, keys, torch.device("cpu"))))
    assert not torch.equal(full, noise(Streams.of(1, 5, keys, torch.device("cpu"))))
