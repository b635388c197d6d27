import json

import pytest

from fixative.core.config import AutoencoderKLConfig, CLIPTextConfig, UNetConfig
from fixative.core.errors import FixativeError

SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "sample_size": 64,
}
SD21_UNET = dict(
    SD15_UNET,
    attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024,
    use_linear_projection=True,
    upcast_attention=True,
    sample_size=96,
)


def test_sd15_attention_head_dim_is_read_as_a_head_count():
    config = UNetConfig.from_diffusers(SD15_UNET)
    assert config.num_heads == (8, 8, 8, 8)
    assert config.cross_attention_blocks == (True, True, True, False)


def test_sd21_per_block_heads_have_width_64():
    config = UNetConfig.from_diffusers(SD21_UNET)
    assert config.num_heads == (5, 10, 20, 20)
    assert config.num_heads == UNetConfig.heads_from_width(config.block_out_channels, 64)
    assert config.use_linear_projection and config.upcast_attention


def test_unet_config_round_trips_through_diffusers_dict():
    for raw in (SD15_UNET, SD21_UNET):
        config = UNetConfig.from_diffusers(raw)
        assert UNetConfig.from_diffusers(json.loads(json.dumps(config.to_diffusers()))) == config


def test_sdxl_unet_config_is_rejected_with_the_setting_named():
    with pytest.raises(FixativeError, match="addition_embed_type"):
        UNetConfig.from_diffusers(dict(SD15_UNET, addition_embed_type="text_time"))


def test_unknown_block_type_is_rejected():
    with pytest.raises(FixativeError, match="SimpleCrossAttnDownBlock2D"):
        UNetConfig.from_diffusers(dict(SD15_UNET, down_block_types=["SimpleCrossAttnDownBlock2D"] * 4))


def test_vae_config_keeps_scaling_factor_and_round_trips():
    config = AutoencoderKLConfig.from_diffusers(
        {"block_out_channels": [128, 256, 512, 512], "scaling_factor": 0.18215, "sample_size": 512}
    )
    assert config.scaling_factor == 0.18215 and config.downsampling_factor == 8
    assert AutoencoderKLConfig.from_diffusers(config.to_diffusers()) == config


def test_text_config_reads_transformers_file_and_ignores_unknown_keys():
    config = CLIPTextConfig.from_diffusers(
        {
            "hidden_size": 1024,
            "num_hidden_layers": 23,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
            "hidden_act": "gelu",
            "eos_token_id": 2,
            "transformers_version": "4.25.0",
        }
    )
    assert (config.hidden_size, config.num_hidden_layers, config.hidden_act, config.eos_token_id) == (
        1024,
        23,
        "gelu",
        2,
    )


def test_text_config_rejects_unknown_activation():
    with pytest.raises(FixativeError, match="relu"):
        CLIPTextConfig(hidden_act="relu")


def test_configs_that_cannot_build_their_networks_are_refused_before_building():
    from fixative.core.text_encoder import CLIPTextModel
    from fixative.core.unet import UNet2DConditionModel
    from fixative.core.vae import AutoencoderKL

    with pytest.raises(FixativeError, match="UNet block width 16 is not divisible by its 32 GroupNorm groups"):
        UNet2DConditionModel(UNetConfig(block_out_channels=(16, 32), cross_attention_blocks=(True, False), num_heads=8))
    with pytest.raises(FixativeError, match="UNet block width 36 is not divisible by its 8 attention heads"):
        UNet2DConditionModel(
            UNetConfig(
                block_out_channels=(32, 36), norm_num_groups=4, num_heads=8, cross_attention_blocks=(False, False)
            )
        )  # the mid block attends
    with pytest.raises(FixativeError, match="VAE block width 16"):
        AutoencoderKL(AutoencoderKLConfig(block_out_channels=(16, 32)))
    with pytest.raises(FixativeError, match="text encoder width 48 is not divisible by its 5 attention heads"):
        CLIPTextModel(CLIPTextConfig(hidden_size=48, num_attention_heads=5))
