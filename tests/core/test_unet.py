"""Parity of fixative's UNet with diffusers' UNet2DConditionModel on the same random weights."""

import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel as DiffusersUNet
from parity import assert_close

from fixative.core.config import UNetConfig
from fixative.core.unet import Attention, UNet2DConditionModel

SD1_SMALL = UNetConfig(
    block_out_channels=(32, 64),
    cross_attention_blocks=(True, False),
    num_heads=2,
    norm_num_groups=8,
    cross_attention_dim=32,
)
# SD 2.x style: Linear projections, heads given by a head width of 16, fp32 attention scores
SD2_SMALL = UNetConfig(
    block_out_channels=(32, 64),
    cross_attention_blocks=(True, True),
    num_heads=UNetConfig.heads_from_width((32, 64), 16),
    norm_num_groups=16,
    cross_attention_dim=48,
    use_linear_projection=True,
    upcast_attention=True,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def reference_unet(config: UNetConfig, seed: int = 0) -> DiffusersUNet:
    """diffusers' UNet for `config`, every weight perturbed so norms and biases are not trivially 1 / 0."""
    torch.manual_seed(seed)
    settings = config.to_diffusers()
    settings.pop("_class_name")
    reference = DiffusersUNet.from_config(settings).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return reference


def our_unet(reference: DiffusersUNet, config: UNetConfig) -> UNet2DConditionModel:
    ours = UNet2DConditionModel(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours


def inputs(config: UNetConfig, batch: int = 2, size: int = 16, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, config.in_channels, size, size, generator=generator)
    text_embeddings = torch.randn(batch, 77, config.cross_attention_dim, generator=generator)
    return latents, text_embeddings


def check_forward_parity(config: UNetConfig, timesteps=torch.tensor([3, 741]), timestep_cond=None, size=16):
    reference = reference_unet(config)
    ours = our_unet(reference, config)
    latents, text_embeddings = inputs(config, size=size)
    with torch.no_grad():
        expected = reference(latents, timesteps, text_embeddings, timestep_cond=timestep_cond).sample
        got = ours(latents, timesteps, text_embeddings, timestep_cond=timestep_cond)
    assert_close(got, expected)
    return got


@pytest.mark.parametrize("config", [SD1_SMALL, SD2_SMALL, dataclasses.replace(SD1_SMALL, in_channels=9)])
def test_state_dict_keys_and_shapes_equal_diffusers(config):
    reference = reference_unet(config).state_dict()
    ours = UNet2DConditionModel(config).state_dict()
    assert set(ours) == set(reference)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}


def test_sd1_style_matches_diffusers_with_attention_in_first_block():
    check_forward_parity(SD1_SMALL)


def test_sd1_style_matches_diffusers_with_attention_in_last_block():
    config = dataclasses.replace(SD1_SMALL, cross_attention_blocks=(False, True), norm_num_groups=16)
    check_forward_parity(config)


def test_three_blocks_two_transformer_layers_and_odd_latent_size_match_diffusers():
    config = dataclasses.replace(
        SD1_SMALL,
        block_out_channels=(32, 32, 64),
        cross_attention_blocks=(True, True, False),
        num_heads=(2, 2, 4),
        transformer_layers_per_block=2,
        layers_per_block=1,
    )
    check_forward_parity(config, size=13)


def test_sd2_style_linear_projection_matches_diffusers():
    check_forward_parity(SD2_SMALL, timesteps=torch.tensor([999, 0]))


def test_inpainting_unet_with_nine_input_channels_matches_diffusers():
    config = dataclasses.replace(SD1_SMALL, in_channels=9)
    check_forward_parity(config)


def test_timestep_cond_embedding_matches_diffusers():
    config = dataclasses.replace(SD1_SMALL, time_cond_proj_dim=16)
    timestep_cond = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))
    with_cond = check_forward_parity(config, timestep_cond=timestep_cond)
    without_cond = check_forward_parity(config)
    assert (with_cond - without_cond).abs().max() > 1e-3  # the condition changes the output


@pytest.mark.parametrize("timestep", [250, 250.5, torch.tensor(250), torch.tensor([250, 250])])
def test_scalar_timestep_equals_per_sample_batch(timestep):
    reference = reference_unet(SD1_SMALL)
    ours = our_unet(reference, SD1_SMALL)
    latents, text_embeddings = inputs(SD1_SMALL)
    with torch.no_grad():
        got = ours(latents, timestep, text_embeddings)
        expected = reference(latents, timestep, text_embeddings).sample
    assert_close(got, expected)
    per_sample = torch.full((2,), float(timestep.flatten()[0] if torch.is_tensor(timestep) else timestep))
    with torch.no_grad():
        assert_close(got, ours(latents, per_sample, text_embeddings))


def test_per_sample_timesteps_act_per_sample():
    reference = reference_unet(SD1_SMALL)
    ours = our_unet(reference, SD1_SMALL)
    latents, text_embeddings = inputs(SD1_SMALL)
    with torch.no_grad():
        batched = ours(latents, torch.tensor([10, 900]), text_embeddings)
        first = ours(latents[:1], 10, text_embeddings[:1])
        second = ours(latents[1:], 900, text_embeddings[1:])
    assert_close(batched, torch.cat([first, second]))


def test_gradients_match_diffusers():
    reference = reference_unet(SD2_SMALL).train()
    ours = our_unet(reference, SD2_SMALL).train()
    latents, text_embeddings = inputs(SD2_SMALL)
    gradients = {}
    for name, model in (("reference", reference), ("ours", ours)):
        noisy_latents = latents.clone().requires_grad_(True)
        output = model(noisy_latents, torch.tensor([5, 600]), text_embeddings)
        output = output.sample if name == "reference" else output
        output.square().mean().backward()
        gradients[name] = {"latents": noisy_latents.grad, **{k: p.grad for k, p in model.named_parameters()}}
    assert gradients["ours"].keys() == gradients["reference"].keys()
    for key, expected in gradients["reference"].items():
        # gradients are small: compare relative to each tensor's own scale
        error = (gradients["ours"][key] - expected).abs().max().item()
        assert error <= 1e-4 * expected.abs().max().item() + 1e-9, f"{key}: max abs difference {error:.3g}"


def test_gradient_checkpointing_gives_the_same_gradients():
    config = dataclasses.replace(SD1_SMALL, cross_attention_blocks=(True, True))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(config).train()
    latents, text_embeddings = inputs(config)
    latents.requires_grad_(True)

    def gradients(checkpointing: bool) -> list[torch.Tensor]:
        unet.enable_gradient_checkpointing(checkpointing)
        unet.zero_grad()
        latents.grad = None
        unet(latents, torch.tensor([5, 600]), text_embeddings).square().mean().backward()
        return [latents.grad.clone()] + [p.grad.clone() for p in unet.parameters()]

    # checkpointed modules start their forward again during the backward pass (recomputation stops early,
    # so count forward starts)
    resnet_calls = []
    unet.down_blocks[0].resnets[0].register_forward_pre_hook(lambda *_: resnet_calls.append(1))
    plain = gradients(False)
    assert len(resnet_calls) == 1
    checkpointed = gradients(True)
    assert len(resnet_calls) == 3
    assert len(plain) == len(checkpointed)
    for a, b in zip(plain, checkpointed):
        assert_close(b, a)


def test_builds_on_meta_device_and_loads_with_assign():
    reference = reference_unet(SD1_SMALL)
    with torch.device("meta"):
        ours = UNet2DConditionModel(SD1_SMALL)
    assert ours.device.type == "meta"
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    assert ours.device.type == "cpu" and ours.dtype == torch.float32
    latents, text_embeddings = inputs(SD1_SMALL)
    with torch.no_grad():
        assert_close(ours(latents, 7, text_embeddings), reference(latents, 7, text_embeddings).sample)


def test_upcast_attention_computes_softmax_in_fp32_for_bf16():
    torch.manual_seed(0)
    attention = Attention(64, heads=4, context_dim=32, upcast=True).to(torch.bfloat16)
    hidden = torch.randn(2, 50, 64, dtype=torch.bfloat16)
    context = torch.randn(2, 77, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        query, key, value = (
            layer(source).unflatten(-1, (4, 16)).transpose(1, 2).float()
            for layer, source in ((attention.to_q, hidden), (attention.to_k, context), (attention.to_v, context))
        )
        attended = torch.softmax(query @ key.transpose(-1, -2) / 4.0, dim=-1) @ value  # fp32, head width 16
        expected = attention.to_out[0](attended.to(torch.bfloat16).transpose(1, 2).flatten(2))
        got = attention(hidden, context)
        attention.upcast = False
        not_upcast = attention(hidden, context)
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected.float()).abs().max() <= 1e-2 * expected.abs().max()
    assert (got.float() - expected.float()).abs().max() <= (not_upcast.float() - expected.float()).abs().max()


@pytest.mark.parametrize("config", [SD1_SMALL, SD2_SMALL])
def test_bf16_forward_is_close_to_fp32(config):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(config).eval()
    latents, text_embeddings = inputs(config)
    with torch.no_grad():
        full = unet(latents, torch.tensor([20, 700]), text_embeddings)
        unet.to(torch.bfloat16)
        assert unet.dtype == torch.bfloat16
        half = unet(latents.bfloat16(), torch.tensor([20, 700]), text_embeddings.bfloat16())
    assert half.dtype == torch.bfloat16
    relative_error = ((half.float() - full).norm() / full.norm()).item()
    print(f"bf16 relative error {relative_error:.4f}")
    assert relative_error < 5e-2


@pytest.mark.slow
def test_full_sd15_unet_matches_diffusers_at_16x16():
    config = UNetConfig()
    torch.manual_seed(0)
    settings = config.to_diffusers()
    settings.pop("_class_name")
    reference = DiffusersUNet.from_config(settings).eval()
    with torch.device("meta"):
        ours = UNet2DConditionModel(config)
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    latents, text_embeddings = inputs(config, batch=1, size=16)
    with torch.inference_mode():
        expected = reference(latents, 500, text_embeddings).sample
        got = ours(latents, 500, text_embeddings)
    assert_close(got, expected)
