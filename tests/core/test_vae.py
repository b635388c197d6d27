"""fixative's AutoencoderKL against diffusers' on the same random weights (strict load), fp32 unless said."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from parity import assert_close

from fixative.core.config import AutoencoderKLConfig
from fixative.core.errors import FixativeError
from fixative.core.vae import AutoencoderKL, DiagonalGaussian, Upsample

# sample_size 32: 64x64 images (and latents larger than 32 / f) are tiled when tiling is on
TWO_BLOCKS = AutoencoderKLConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=32)
THREE_BLOCKS = AutoencoderKLConfig(
    block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8, sample_size=32
)
CONFIGS = {"two_blocks": TWO_BLOCKS, "three_blocks": THREE_BLOCKS}


def diffusers_kwargs(config: AutoencoderKLConfig) -> dict:
    return {k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}


def build_pair(config: AutoencoderKLConfig, seed: int = 0):
    """diffusers' model with random weights, and ours built on meta and loaded strictly from it."""
    torch.manual_seed(seed)
    theirs = DiffusersAutoencoderKL(**diffusers_kwargs(config)).eval()
    # random, non-trivial GroupNorm affine parameters (they start at 1 and 0)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    with torch.device("meta"):
        ours = AutoencoderKL(config)
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    return ours.eval(), theirs


@pytest.fixture(params=sorted(CONFIGS), scope="module")
def pair(request):
    return build_pair(CONFIGS[request.param])


def random_pixels(batch: int, size: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


def random_latents(batch: int, height: int, width: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, height, width, generator=torch.Generator().manual_seed(seed))


def test_state_dict_keys_equal_diffusers(pair):
    ours, theirs = pair
    assert set(ours.state_dict()) == set(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert ours.state_dict()[key].shape == value.shape, key


def test_state_dict_keys_equal_diffusers_without_mid_attention():
    config = AutoencoderKLConfig(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False
    )
    ours, theirs = build_pair(config)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    assert not any("attentions" in key for key in ours.state_dict())
    pixels = random_pixels(1, 32)
    with torch.no_grad():
        assert_close(ours(pixels), theirs(pixels).sample)


def test_encode_matches_diffusers_posterior(pair):
    ours, theirs = pair
    pixels = random_pixels(2, 32)
    with torch.no_grad():
        posterior = ours.encode(pixels)
        reference = theirs.encode(pixels).latent_dist
    assert_close(posterior.mean, reference.mean)
    assert_close(posterior.logvar, reference.logvar)
    assert_close(posterior.std, reference.std)
    assert_close(posterior.kl(), reference.kl())
    assert posterior.kl().shape == (2,)
    assert posterior.mode() is posterior.mean


def test_decode_matches_diffusers(pair):
    ours, theirs = pair
    latents = random_latents(2, 8, 12)
    with torch.no_grad():
        pixels = ours.decode(latents)
        reference = theirs.decode(latents).sample
    assert pixels.shape == (2, 3, 8 * ours.config.downsampling_factor, 12 * ours.config.downsampling_factor)
    assert pixels.is_contiguous()
    assert_close(pixels, reference)


def test_posterior_sample_matches_diffusers_with_same_seed(pair):
    ours, theirs = pair
    pixels = random_pixels(2, 32)
    with torch.no_grad():
        sample = ours.encode(pixels).sample(torch.Generator().manual_seed(7))
        reference = theirs.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(7))
        other_seed = ours.encode(pixels).sample(torch.Generator().manual_seed(8))
    assert_close(sample, reference)
    assert (sample - other_seed).abs().max() > 1e-3


def test_posterior_sample_with_one_generator_per_image_matches_diffusers():
    mean_and_logvar = torch.randn(3, 8, 4, 4)
    generators = [torch.Generator().manual_seed(seed) for seed in (1, 2, 3)]
    reference_generators = [torch.Generator().manual_seed(seed) for seed in (1, 2, 3)]
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    reference = DiagonalGaussianDistribution(mean_and_logvar).sample(reference_generators)
    assert torch.equal(DiagonalGaussian(mean_and_logvar).sample(generators), reference)
    with pytest.raises(FixativeError):
        DiagonalGaussian(mean_and_logvar).sample(generators[:2])


def test_logvar_is_clamped_like_diffusers():
    moments = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 50.0)], dim=1)
    moments[:, 4:, 0, 0] = -100.0
    posterior = DiagonalGaussian(moments)
    assert posterior.logvar.max().item() == 20.0 and posterior.logvar.min().item() == -30.0
    assert torch.isfinite(posterior.var).all()


def test_forward_reconstruction_matches_diffusers(pair):
    ours, theirs = pair
    pixels = random_pixels(1, 32)
    with torch.no_grad():
        assert_close(ours(pixels), theirs(pixels).sample)
        sampled = ours(pixels, sample_posterior=True, generator=torch.Generator().manual_seed(3))
        reference = theirs(pixels, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample
    assert_close(sampled, reference)


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_equals_nearest_upsampling_then_conv_with_gradients(channels_last):
    torch.manual_seed(0)
    upsample = Upsample(6)
    x = torch.randn(2, 6, 5, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ours_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = upsample(ours_x)
    reference = upsample.conv(F.interpolate(ref_x, scale_factor=2.0, mode="nearest"))
    assert_close(out, reference)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    grad_out = torch.randn_like(reference)
    ours_grads = torch.autograd.grad(out, (ours_x, upsample.conv.weight, upsample.conv.bias), grad_out)
    ref_grads = torch.autograd.grad(reference, (ref_x, upsample.conv.weight, upsample.conv.bias), grad_out)
    for ours_grad, ref_grad in zip(ours_grads, ref_grads):
        assert_close(ours_grad, ref_grad)


@pytest.fixture
def tiled_pair(pair):
    ours, theirs = pair
    ours.enable_tiling()
    theirs.enable_tiling()
    yield ours, theirs
    ours.disable_tiling()
    theirs.disable_tiling()


def test_tiled_encode_matches_diffusers_tiled_encode(tiled_pair):
    ours, theirs = tiled_pair
    pixels = random_pixels(1, 64)
    with torch.no_grad():
        posterior = ours.encode(pixels)
        reference = theirs.encode(pixels).latent_dist
        ours.disable_tiling()
        untiled = ours.encode(pixels)
    assert_close(posterior.mean, reference.mean)
    assert_close(posterior.logvar, reference.logvar)
    assert (posterior.mean - untiled.mean).abs().max() > 1e-3  # tiling did happen


def test_tiled_decode_matches_diffusers_tiled_decode(tiled_pair):
    ours, theirs = tiled_pair
    side = 64 // ours.config.downsampling_factor
    latents = random_latents(1, side, side + 6)  # not square: rows and columns tile differently
    with torch.no_grad():
        pixels = ours.decode(latents)
        reference = theirs.decode(latents).sample
        ours.disable_tiling()
        untiled = ours.decode(latents)
    assert_close(pixels, reference)
    assert (pixels - untiled).abs().max() > 1e-3


def test_custom_tile_size_matches_diffusers():
    ours, theirs = build_pair(TWO_BLOCKS)
    ours.enable_tiling(tile_size=16, overlap=0.5)
    theirs.enable_tiling()
    theirs.tile_sample_min_size, theirs.tile_latent_min_size, theirs.tile_overlap_factor = 16, 8, 0.5
    pixels = random_pixels(1, 28)
    latents = random_latents(1, 14, 12)
    with torch.no_grad():
        assert_close(ours.encode(pixels).mean, theirs.encode(pixels).latent_dist.mean)
        assert_close(ours.decode(latents), theirs.decode(latents).sample)


def test_tiling_is_skipped_for_inputs_no_larger_than_a_tile():
    ours, _ = build_pair(TWO_BLOCKS)
    pixels = random_pixels(1, 32)
    with torch.no_grad():
        plain = ours.encode(pixels).mean
        ours.enable_tiling()
        assert torch.equal(ours.encode(pixels).mean, plain)


def test_enable_tiling_rejects_bad_settings():
    ours, _ = build_pair(TWO_BLOCKS)
    with pytest.raises(FixativeError):
        ours.enable_tiling(overlap=1.0)
    with pytest.raises(FixativeError):
        ours.enable_tiling(tile_size=1)


def test_slicing_gives_the_same_result_as_whole_batches(pair):
    ours, _ = pair
    pixels = random_pixels(3, 32)
    latents = random_latents(3, 8, 8)
    with torch.no_grad():
        whole_moments, whole_pixels = ours.encode(pixels).mean, ours.decode(latents)
        ours.enable_slicing()
        try:
            sliced_moments, sliced_pixels = ours.encode(pixels).mean, ours.decode(latents)
        finally:
            ours.disable_slicing()
    torch.testing.assert_close(sliced_moments, whole_moments, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sliced_pixels, whole_pixels, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_decode_is_close_to_fp32(dtype):
    ours, _ = build_pair(TWO_BLOCKS)
    latents = random_latents(1, 16, 16)
    with torch.no_grad():
        reference = ours.decode(latents)
        ours.to(dtype)
        pixels = ours.decode(latents)  # fp32 latents are cast to the model's dtype
    assert ours.dtype == dtype and pixels.dtype == dtype
    relative_error = ((pixels.float() - reference).norm() / reference.norm()).item()
    assert relative_error < 5e-2


def test_gradients_reach_pixels_through_encode_mean():
    ours, _ = build_pair(TWO_BLOCKS)
    pixels = random_pixels(1, 32).requires_grad_()
    ours.encode(pixels).mean.square().sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    assert torch.isfinite(pixels.grad).all()


def test_gradients_reach_every_tile_through_tiled_encode():
    ours, _ = build_pair(TWO_BLOCKS)
    ours.enable_tiling()
    pixels = random_pixels(1, 64).requires_grad_()
    ours.encode(pixels).mean.square().sum().backward()
    grad = pixels.grad.abs()
    for corner in (grad[..., :16, :16], grad[..., :16, -16:], grad[..., -16:, :16], grad[..., -16:, -16:]):
        assert corner.sum() > 0


def test_gradient_through_encode_matches_diffusers():
    ours, theirs = build_pair(TWO_BLOCKS)
    ours_pixels = random_pixels(1, 32).requires_grad_()
    their_pixels = random_pixels(1, 32).requires_grad_()
    ours.encode(ours_pixels).mean.sum().backward()
    theirs.encode(their_pixels).latent_dist.mean.sum().backward()
    assert_close(ours_pixels.grad, their_pixels.grad)


def test_builds_on_meta_and_reports_device_and_dtype():
    with torch.device("meta"):
        model = AutoencoderKL(TWO_BLOCKS)
    assert model.device.type == "meta"
    ours, _ = build_pair(TWO_BLOCKS)
    assert ours.device == torch.device("cpu") and ours.dtype == torch.float32
    assert ours.to(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.slow
def test_full_sd_vae_decode_matches_diffusers():
    ours, theirs = build_pair(AutoencoderKLConfig())
    latents = random_latents(1, 16, 16)
    with torch.inference_mode():
        pixels = ours.decode(latents)
        reference = theirs.decode(latents).sample
    assert pixels.shape == (1, 3, 128, 128)
    assert_close(pixels, reference)
