"""The original single-file layout mappers, checked against diffusers' own converters (same keys, same tensors)."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as reference

from fixative.core import single_file
from fixative.core.config import ModelConfig, UNetConfig
from fixative.core.errors import FixativeError
from fixative.core.presets import get_preset

# three down levels, attention only in the deeper two, two ResNets per level: exercises every index rule
UNEVEN_UNET = UNetConfig(
    block_out_channels=(32, 64, 64),
    cross_attention_blocks=(False, True, True),
    layers_per_block=2,
    num_heads=8,
    cross_attention_dim=32,
)


def random_state_dict(module: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(value.shape, generator=generator) for key, value in module.state_dict().items()}


def diffusers_unet(config: UNetConfig, device: str = "cpu") -> UNet2DConditionModel:
    with torch.device(device):
        return UNet2DConditionModel.from_config(config.to_diffusers())


def diffusers_vae(config, device: str = "cpu") -> AutoencoderKL:
    with torch.device(device):
        return AutoencoderKL.from_config(config.to_diffusers())


def text_state_dict(config, seed: int = 0, meta: bool = False) -> dict[str, torch.Tensor]:
    """A released-layout CLIPTextModel state dict (text_model.*) with random (or meta) tensors, from the config
    alone."""
    generator = torch.Generator().manual_seed(seed)
    h, i = config.hidden_size, config.intermediate_size
    shapes = {
        "text_model.embeddings.token_embedding.weight": (config.vocab_size, h),
        "text_model.embeddings.position_embedding.weight": (config.max_position_embeddings, h),
        "text_model.final_layer_norm.weight": (h,),
        "text_model.final_layer_norm.bias": (h,),
    }
    for layer in range(config.num_hidden_layers):
        p = f"text_model.encoder.layers.{layer}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{name}.weight"], shapes[f"{p}self_attn.{name}.bias"] = (h, h), (h,)
        for name in ("layer_norm1", "layer_norm2"):
            shapes[f"{p}{name}.weight"], shapes[f"{p}{name}.bias"] = (h,), (h,)
        shapes[f"{p}mlp.fc1.weight"], shapes[f"{p}mlp.fc1.bias"] = (i, h), (i,)
        shapes[f"{p}mlp.fc2.weight"], shapes[f"{p}mlp.fc2.bias"] = (h, i), (h,)
    if meta:
        return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    return {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].shape == value.shape, key
        if value.device.type != "meta":
            assert torch.equal(actual[key], value), key


@pytest.mark.parametrize(
    "config",
    [get_preset("tiny-sd1").model_config.unet, get_preset("tiny-sd2").model_config.unet, UNEVEN_UNET],
    ids=["tiny-sd1", "tiny-sd2", "uneven"],
)
def test_unet_original_layout_matches_diffusers_converter(config):
    ours = random_state_dict(diffusers_unet(config, "meta"))
    original = single_file.unet_to_original(ours, config)
    assert all(key.startswith("model.diffusion_model.") for key in original)
    converted = reference.convert_ldm_unet_checkpoint(original, config.to_diffusers())
    assert_same_tensors(converted, ours)
    mapped = {}
    for key, value in original.items():
        mapped.update(single_file.map_unet_key(key.removeprefix("model.diffusion_model."), value, config))
    assert_same_tensors(mapped, ours)


def test_full_size_sd15_unet_and_vae_map_like_diffusers():
    config = get_preset("sd15").model_config
    counts = {}
    for network, ours, convert in (
        ("unet", diffusers_unet(config.unet, "meta").state_dict(), reference.convert_ldm_unet_checkpoint),
        ("vae", diffusers_vae(config.vae, "meta").state_dict(), reference.convert_ldm_vae_checkpoint),
    ):
        original = single_file.to_original({"unet": {}, "vae": {}, "text_encoder": {}, network: ours}, config)
        converted = convert(original, getattr(config, network).to_diffusers())
        assert_same_tensors(converted, ours)
        counts[network] = len(original)
    assert counts == {"unet": 686, "vae": 248}  # the tensor counts of the released SD 1.5 unet/ and vae/


@pytest.mark.parametrize("preset", ["tiny-sd1", "sd15"])
def test_vae_attention_is_stored_as_1x1_convolutions_as_diffusers_expects(preset):
    config = get_preset(preset).model_config.vae
    ours = random_state_dict(diffusers_vae(config, "meta"))
    original = single_file.vae_to_original(ours, config)
    assert original["first_stage_model.encoder.mid.attn_1.q.weight"].shape[2:] == (1, 1)
    assert_same_tensors(reference.convert_ldm_vae_checkpoint(original, config.to_diffusers()), ours)
    mapped = {}
    for key, value in original.items():
        mapped.update(single_file.map_vae_key(key.removeprefix("first_stage_model."), value, config))
    assert_same_tensors(mapped, ours)


def test_sd1_text_encoder_maps_like_diffusers_with_or_without_text_model_prefix():
    config = get_preset("tiny-sd1").model_config.text_encoder
    ours = text_state_dict(config)
    original = single_file.text_encoder_to_original(ours, config)
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in original
    assert_same_tensors(reference.convert_ldm_clip_checkpoint(original), ours)
    for strip in ("", "text_model."):
        mapped = {}
        for key, value in original.items():
            key = key.removeprefix("cond_stage_model.transformer.").removeprefix(strip)
            mapped.update(single_file.map_clip_key(key, value))
        assert_same_tensors(mapped, ours)
    assert single_file.map_clip_key("text_model.embeddings.position_ids", torch.arange(77)[None]) == []


def test_open_clip_fused_attention_is_split_like_diffusers():
    config = get_preset("tiny-sd2").model_config.text_encoder
    ours = text_state_dict(config)
    original = single_file.text_encoder_to_original(ours, config)
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in original
    assert "cond_stage_model.model.positional_embedding" in original
    assert not any(".q_proj." in key for key in original)
    text_model = SimpleNamespace(config=SimpleNamespace(hidden_size=config.hidden_size))
    assert_same_tensors(reference.convert_open_clip_checkpoint(text_model, original), ours)
    mapped = {}
    for key, value in original.items():
        mapped.update(single_file.map_open_clip_key(key.removeprefix("cond_stage_model.model."), value, config))
    assert_same_tensors(mapped, ours)


def test_released_sd2_text_tower_keeps_23_of_its_24_layers_and_ignores_the_projection():
    config = get_preset("sd21").model_config.text_encoder
    shapes = {
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
        "cond_stage_model.model.positional_embedding": (77, 1024),
        "cond_stage_model.model.text_projection": (1024, 1024),
        "cond_stage_model.model.logit_scale": (),
    }
    for layer in range(24):
        shapes[f"cond_stage_model.model.transformer.resblocks.{layer}.mlp.c_fc.weight"] = (4096, 1024)
    inferred = single_file.infer_text_config(single_file._strip(shapes, "cond_stage_model.model."), open_clip=True)
    assert inferred == config
    value = torch.zeros(3 * 1024, 1024, device="meta")
    assert single_file.map_open_clip_key("transformer.resblocks.23.attn.in_proj_weight", value, config) == []
    assert len(single_file.map_open_clip_key("transformer.resblocks.22.attn.in_proj_weight", value, config)) == 3
    assert single_file.map_open_clip_key("text_projection", value, config) == []
    assert single_file.map_open_clip_key("transformer.resblocks.0.attn.bogus", value, config) is None


def original_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    ours = {
        "unet": diffusers_unet(config.unet, "meta").state_dict(),
        "vae": diffusers_vae(config.vae, "meta").state_dict(),
        "text_encoder": text_state_dict(config.text_encoder, meta=True),
    }
    return {key: tuple(value.shape) for key, value in single_file.to_original(ours, config).items()}


@pytest.mark.parametrize(
    "name, prediction_type",
    [("sd15", None), ("sd21-base", None), ("sd21", "v_prediction"), ("tiny-sd1", None), ("tiny-sd2", None)],
)
def test_architecture_is_inferred_from_tensor_shapes(name, prediction_type):
    preset = get_preset(name)
    config, scheduler_config, notes = single_file.infer_model_config(
        original_shapes(preset.model_config), prediction_type
    )
    expected = preset.model_config
    if name.startswith("tiny"):  # image size is not in the shapes: the release's is taken
        expected.unet.sample_size, expected.vae.sample_size = 64, 512
        expected.text_encoder.projection_dim = config.text_encoder.projection_dim
    assert config == expected
    assert scheduler_config == preset.scheduler_config
    assert bool(notes) == (prediction_type is None)


def test_inpainting_unet_is_inferred_with_nine_input_channels():
    model_config = get_preset("tiny-sd1").model_config
    model_config.unet.in_channels = 9
    config, _, _ = single_file.infer_model_config(original_shapes(model_config), None)
    assert config.unet.in_channels == 9 and config.unet.out_channels == 4


def test_checkpoint_without_text_encoder_is_rejected():
    shapes = {
        k: v
        for k, v in original_shapes(get_preset("tiny-sd1").model_config).items()
        if not k.startswith("cond_stage_model")
    }
    with pytest.raises(FixativeError, match="no Stable Diffusion 1.x/2.x text encoder"):
        single_file.infer_model_config(shapes, None)


def test_missing_unet_tensor_is_named():
    shapes = original_shapes(get_preset("tiny-sd1").model_config)
    del shapes["model.diffusion_model.out.2.weight"]
    with pytest.raises(FixativeError, match=r"out\.2\.weight"):
        single_file.infer_model_config(shapes, None)


def test_sdxl_style_unet_is_rejected():
    shapes = original_shapes(get_preset("tiny-sd1").model_config)
    shapes["model.diffusion_model.label_emb.0.0.weight"] = (128, 2816)
    with pytest.raises(FixativeError, match="SDXL"):
        single_file.infer_model_config(shapes, None)


def test_unet_keys_map_back_and_forth_one_to_one():
    ours = diffusers_unet(UNEVEN_UNET, "meta").state_dict()
    originals = {single_file.unet_original_key(key, UNEVEN_UNET) for key in ours}
    assert len(originals) == len(ours)
    # the deepest level has attention, so its upsampler follows the transformer; the first level has none
    assert "output_blocks.2.2.conv.weight" in originals and "input_blocks.1.1.proj_in.weight" not in originals
    for key in ours:
        assert single_file.map_unet_key(single_file.unet_original_key(key, UNEVEN_UNET), None, UNEVEN_UNET)[0][0] == key


def test_full_size_sd21_open_clip_tower_maps_like_diffusers():
    config = get_preset("sd21").model_config.text_encoder
    ours = text_state_dict(config, meta=True)
    original = single_file.text_encoder_to_original(ours, config)
    released_layer = {
        key.replace("resblocks.22.", "resblocks.23."): value
        for key, value in original.items()
        if ".resblocks.22." in key
    }  # the unused 24th layer of the released file
    original.update(released_layer)
    text_model = SimpleNamespace(config=SimpleNamespace(hidden_size=config.hidden_size))
    assert_same_tensors(reference.convert_open_clip_checkpoint(text_model, original), ours)
    shapes = {key: tuple(value.shape) for key, value in original.items()}
    assert (
        single_file.infer_text_config(single_file._strip(shapes, "cond_stage_model.model."), open_clip=True) == config
    )
    assert len(ours) == 23 * 16 + 4
