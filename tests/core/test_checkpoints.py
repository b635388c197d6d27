"""Checkpoint I/O: diffusers folders in and out (parity with diffusers/transformers), original single files,
legacy formats, dtypes, and a one-line FixativeError naming the file or tensor for every bad input."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from parity import assert_close, randomize
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig as HFCLIPTextConfig
from transformers import CLIPTextModel as HFCLIPTextModel

from fixative.core import checkpoints, registry, single_file, toy
from fixative.core.checkpoints import load_model, save_diffusers, save_single_file
from fixative.core.errors import FixativeError
from fixative.core.model import StableDiffusionModel
from fixative.core.presets import Preset, get_preset

PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse at dusk"]


@pytest.fixture(scope="module")
def released(sd_folder) -> Path:
    return sd_folder("tiny-sd1", writer="diffusers")


@pytest.fixture(scope="module")
def reference(released):
    """The folder as diffusers loads it."""
    return StableDiffusionPipeline.from_pretrained(released, safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def ours(released) -> StableDiffusionModel:
    """The folder as fixative loads it (tests must not modify it)."""
    return load_model(released)


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def assert_outputs_match(model: StableDiffusionModel, pipe) -> None:
    """Text encoder, UNet and VAE outputs of ours and diffusers' on the same inputs."""
    generator = torch.Generator().manual_seed(1)
    input_ids = model.tokenizer(PROMPTS)
    latents = torch.randn(2, model.unet.config.in_channels, 8, 8, generator=generator)
    pixels = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    with torch.no_grad():
        text_embeddings = model.text_encoder(input_ids).last_hidden_state
        assert_close(text_embeddings, pipe.text_encoder(input_ids)[0])
        assert_close(
            model.unet(latents, 500, text_embeddings),
            pipe.unet(latents, 500, encoder_hidden_states=text_embeddings).sample,
        )
        assert_close(model.vae.encode(pixels).mean, pipe.vae.encode(pixels).latent_dist.mean)
        assert_close(model.vae.decode(latents[:, :4]), pipe.vae.decode(latents[:, :4]).sample)


def assert_same_weights(a: StableDiffusionModel, b: StableDiffusionModel) -> None:
    for name, network in a.networks().items():
        theirs = b.networks()[name].state_dict()
        ours = network.state_dict()
        assert ours.keys() == theirs.keys(), name
        for key in ours:
            assert torch.equal(ours[key], theirs[key].to(ours[key].dtype)), f"{name}: {key}"


# ------------------------------------------------------------------------------------ diffusers folders


def test_released_folder_loads_with_diffusers_outputs(ours, reference):
    model = ours
    assert model.config.unet == get_preset("tiny-sd1").model_config.unet
    assert model.prediction_type == "epsilon" and model.family == "SD 1.x"
    assert model.details.format == "diffusers folder"
    assert_outputs_match(model, reference)


def test_saved_folder_loads_in_diffusers_with_the_same_outputs(ours, reference, tmp_path):
    model = ours
    saved = save_diffusers(model, tmp_path / "saved")
    pipe = StableDiffusionPipeline.from_pretrained(saved, safety_checker=None, requires_safety_checker=False)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert pipe.scheduler.config.prediction_type == "epsilon" and pipe.scheduler.config.steps_offset == 1
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert_outputs_match(model, pipe)
    assert_outputs_match(load_model(saved), reference)
    # released layout: the text encoder keeps its text_model. prefix
    assert all(key.startswith("text_model.") for key in load_file(saved / "text_encoder" / "model.safetensors"))


def test_sd2_folder_round_trips_through_diffusers(sd_folder, tmp_path):
    folder = sd_folder("tiny-sd2", writer="diffusers")
    model = load_model(folder)
    assert model.family == "SD 2.x" and model.tokenizer.pad_token == "!"
    saved = save_diffusers(model, tmp_path / "saved")
    pipe = StableDiffusionPipeline.from_pretrained(saved, safety_checker=None, requires_safety_checker=False)
    assert pipe.tokenizer.pad_token == "!" and pipe.unet.config.use_linear_projection
    assert_outputs_match(model, pipe)


def test_transformers_5_text_encoder_without_prefix_loads(released, reference, tmp_path):
    folder = copy_of(released, tmp_path)
    weights = folder / "text_encoder" / "model.safetensors"
    save_file(
        {k.removeprefix("text_model."): v for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"}
    )
    assert_outputs_match(load_model(folder), reference)


def test_legacy_bin_files_old_vae_attention_names_and_position_ids_load(released, ours, tmp_path):
    folder = copy_of(released, tmp_path)
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for network, stem in (
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ):
        weights = folder / network / f"{stem}.safetensors"
        state = load_file(weights)
        if network == "vae":  # diffusers < 0.14 names, attention stored as 1x1 convolutions
            renamed = {}
            for key, value in state.items():
                for new, old in old_names.items():
                    if f".attentions.0.{new}." in key:
                        key = key.replace(f".{new}.", f".{old}.")
                        value = value[:, :, None, None] if value.ndim == 2 else value
                renamed[key] = value
            state = renamed
        if network == "text_encoder":
            state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        torch.save(state, folder / network / f"{'pytorch_model' if network == 'text_encoder' else stem}.bin")
        weights.unlink()
    assert_same_weights(load_model(folder), ours)


def test_fp16_variant_files_load_as_the_requested_dtype(released, tmp_path):
    folder = copy_of(released, tmp_path)
    for weights in folder.glob("*/*.safetensors"):
        save_file(
            {k: v.half() for k, v in load_file(weights).items()},
            weights.with_suffix(".fp16.safetensors"),
            metadata={"format": "pt"},
        )
        weights.unlink()
    model = load_model(folder, dtype=torch.float16)
    assert {p.dtype for network in model.networks().values() for p in network.parameters()} == {torch.float16}
    assert model.details.stored_dtypes == {"unet": "float16", "vae": "float16", "text_encoder": "float16"}
    expected = load_model(released, dtype=torch.float16)
    assert_same_weights(model, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loading_casts_every_tensor_to_the_requested_dtype(released, ours, dtype):
    model = load_model(released, dtype=dtype)
    assert {p.dtype for network in model.networks().values() for p in network.parameters()} == {dtype}
    assert model.details.stored_dtypes["unet"] == "float32"
    for key, value in ours.unet.state_dict().items():
        assert torch.equal(model.unet.state_dict()[key], value.to(dtype)), key


def test_sharded_safetensors_with_index_load(released, ours, tmp_path):
    folder = copy_of(released, tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    keys = sorted(state)
    shards = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for name, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, folder / "unet" / name, metadata={"format": "pt"})
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}})
    )
    weights.unlink()
    assert_same_weights(load_model(folder), ours)


def test_meta_device_reads_shapes_only(released, ours):
    model = load_model(released, device="meta")
    assert all(p.device.type == "meta" for network in model.networks().values() for p in network.parameters())
    assert model.config == ours.config


def test_prediction_type_argument_overrides_the_folder_and_is_noted(released):
    model = load_model(released, prediction_type="v_prediction")
    assert model.prediction_type == "v_prediction"
    assert "v_prediction" in model.details.notes[0]


def test_save_diffusers_in_fp16_is_loaded_by_diffusers_in_fp16(ours, tmp_path):
    saved = save_diffusers(ours, tmp_path / "half", dtype=torch.float16)
    for weights in saved.glob("*/*.safetensors"):
        assert {value.dtype for value in load_file(weights).values()} == {torch.float16}, weights
    pipe = StableDiffusionPipeline.from_pretrained(
        saved, safety_checker=None, requires_safety_checker=False, dtype=torch.float16
    )
    assert pipe.unet.dtype == torch.float16 and pipe.text_encoder.dtype == torch.float16
    assert load_model(saved).details.stored_dtypes["vae"] == "float16"


def test_an_fp16_folder_loads_and_renders_with_the_default_calls(ours, tmp_path):
    """As a released fp16 folder: every network float32 with no dtype argument, so the pipeline runs."""
    saved = save_diffusers(ours, tmp_path / "half", dtype=torch.float16)
    pipe = StableDiffusionPipeline.from_pretrained(saved)
    assert {network.dtype for network in (pipe.unet, pipe.vae, pipe.text_encoder)} == {torch.float32}
    assert HFCLIPTextModel.from_pretrained(saved / "text_encoder").dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=2, height=16, width=16, output_type="np").images[0]
    assert image.shape == (16, 16, 3)


def test_save_diffusers_refuses_an_existing_folder_and_replaces_it_when_asked(released, tmp_path):
    model = load_model(released)
    target = save_diffusers(model, tmp_path / "out")
    with pytest.raises(FixativeError, match="already exists"):
        save_diffusers(model, target)
    model.scheduler_config = dict(model.scheduler_config, _class_name="DDIMScheduler")
    save_diffusers(model, target, overwrite=True)
    assert json.loads((target / "model_index.json").read_text())["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_save_leaves_nothing_behind(released, tmp_path, monkeypatch):
    model = load_model(released)

    def broken_save(folder):
        raise OSError("disk full")

    monkeypatch.setattr(model.tokenizer, "save", broken_save)
    with pytest.raises(OSError):
        save_diffusers(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------- single files


def original_checkpoint(
    preset: str | Preset, seed: int = 0, text_layers: int | None = None
) -> tuple[dict, StableDiffusionModel]:
    """An original-layout state dict (as a release would have it, no fixative metadata) and the model it holds."""
    torch.manual_seed(seed)
    config = get_preset(preset) if isinstance(preset, str) else preset
    if text_layers is not None:
        config.model_config.text_encoder.num_hidden_layers = text_layers
    model = StableDiffusionModel.from_config(config.model_config, config.scheduler_config)
    for index, network in enumerate(model.networks().values()):
        randomize(network, seed + index)
    state = single_file.to_original({n: m.state_dict() for n, m in model.networks().items()}, model.config)
    return {k: v.clone() for k, v in state.items()}, model


@pytest.mark.parametrize("preset", ["tiny-sd1", "tiny-sd2"])
def test_single_file_round_trips_through_a_folder_with_identical_keys_and_tensors(preset, tmp_path):
    state, source = original_checkpoint(preset)
    save_file(state, tmp_path / "original.safetensors")
    model = load_model(tmp_path / "original.safetensors")
    assert model.family == ("SD 2.x" if preset == "tiny-sd2" else "SD 1.x")
    assert model.tokenizer.pad_token == ("!" if preset == "tiny-sd2" else "<|endoftext|>")
    assert "prediction type assumed epsilon" in model.details.notes[0]
    assert_same_weights(model, source)
    folder = save_diffusers(model, tmp_path / "folder")
    save_single_file(load_model(folder), tmp_path / "again.safetensors")
    again = load_file(tmp_path / "again.safetensors")
    assert sorted(again) == sorted(state)
    assert all(torch.equal(again[key], state[key]) for key in state)
    with torch.no_grad():
        ids = model.tokenizer(PROMPTS)
        assert torch.equal(model.text_encoder(ids).last_hidden_state, source.text_encoder(ids).last_hidden_state)


def test_fixative_single_file_keeps_the_exact_config(tmp_path):
    config = get_preset("tiny-sd1")
    config.model_config.unet.num_heads = (2, 4)  # not the SD 1 rule: only the recorded config can restore it
    model = StableDiffusionModel.from_config(
        config.model_config, dict(config.scheduler_config, prediction_type="sample")
    )
    for suffix in (".safetensors", ".ckpt"):
        loaded = load_model(save_single_file(model, tmp_path / f"model{suffix}"))
        assert loaded.config == model.config and loaded.prediction_type == "sample" and not loaded.details.notes
        assert_same_weights(loaded, model)


def test_original_ckpt_with_training_state_loads(tmp_path):
    state, source = original_checkpoint("tiny-sd1", seed=3)
    extras = {
        "alphas_cumprod": torch.rand(1000),
        "model_ema.decay": torch.tensor(0.9999),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
    }
    torch.save({"state_dict": {**state, **extras}, "global_step": 470000, "epoch": 6}, tmp_path / "model.ckpt")
    model = load_model(tmp_path / "model.ckpt", dtype=torch.bfloat16)
    assert model.unet.dtype == torch.bfloat16 and model.details.format == "original single file, weights-only pickle"
    assert_same_weights(model, source.to(dtype=torch.bfloat16))


def test_released_sd2_text_tower_of_24_layers_loads_its_first_23(tmp_path):
    state, source = original_checkpoint("tiny-sd2", text_layers=24)
    state["cond_stage_model.model.text_projection"] = torch.randn(32, 32)
    state["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    save_file(state, tmp_path / "sd2.safetensors")
    model = load_model(tmp_path / "sd2.safetensors")
    assert model.text_encoder.config.num_hidden_layers == 23
    ours = source.text_encoder.state_dict()
    for key, value in model.text_encoder.state_dict().items():
        assert torch.equal(value, ours[key]), key


def test_sd2_single_file_with_v_prediction_takes_the_768px_settings(tmp_path):
    state, _ = original_checkpoint("tiny-sd2")
    save_file(state, tmp_path / "sd2.safetensors")
    model = load_model(tmp_path / "sd2.safetensors", prediction_type="v_prediction")
    assert model.prediction_type == "v_prediction" and not model.details.notes
    assert model.scheduler_config["_class_name"] == "DDIMScheduler"
    assert model.unet.config.upcast_attention and model.unet.config.sample_size == 96


def test_inpainting_single_file_is_recognised(tmp_path):
    preset = get_preset("tiny-sd1")
    preset.model_config.unet.in_channels = 9
    model = StableDiffusionModel.from_config(preset.model_config, preset.scheduler_config)
    state = single_file.to_original({n: m.state_dict() for n, m in model.networks().items()}, model.config)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "inpaint.safetensors")
    loaded = load_model(tmp_path / "inpaint.safetensors")
    assert loaded.is_inpainting and loaded.family == "SD 1.x inpainting"
    save_diffusers(loaded, tmp_path / "folder")
    index = json.loads((tmp_path / "folder" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"


# ------------------------------------------------------------------------------------------ bad inputs


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(FixativeError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_path_and_unknown_suffix_are_named(tmp_path):
    assert "nowhere" in one_line_error(load_model, tmp_path / "nowhere")
    assert "'toy'" in one_line_error(load_model, "sd15")  # names are not presets: only "toy" is a name
    (tmp_path / "notes.txt").write_text("hello")
    assert "notes.txt is not a model checkpoint" in one_line_error(load_model, tmp_path / "notes.txt")


def test_a_registered_name_loads_its_folder(released, monkeypatch):
    monkeypatch.setattr(registry, "_FOLDERS", {"tiny": lambda: released})
    model = load_model("tiny")
    assert model.source == "tiny"
    assert "'tiny'" in one_line_error(load_model, "tinny")  # an unknown name lists the known ones


def test_toy_is_registered_through_its_entry_point():
    assert "toy" in registry.model_names()
    assert registry.named_model_folder("toy") == toy.model_folder()


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_files_that_are_not_checkpoints_or_truncated_are_named(suffix, tmp_path):
    (tmp_path / f"text{suffix}").write_text("this is not a checkpoint")
    assert f"text{suffix}" in one_line_error(load_model, tmp_path / f"text{suffix}")
    state, _ = original_checkpoint("tiny-sd1")
    whole = tmp_path / f"whole{suffix}"
    save_file(state, whole) if suffix == ".safetensors" else torch.save(state, whole)
    data = whole.read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
    message = one_line_error(load_model, tmp_path / f"cut{suffix}")
    assert f"cut{suffix}" in message and "truncated" in message


def test_pickles_with_python_objects_are_refused(tmp_path):
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": Path("/tmp")}, tmp_path / "unsafe.ckpt")
    message = one_line_error(load_model, tmp_path / "unsafe.ckpt")
    assert "unsafe.ckpt" in message and "weights_only" in message


def test_folder_problems_name_the_file(released, tmp_path):
    folder = copy_of(released, tmp_path)
    shutil.rmtree(folder / "unet")
    assert "unet is missing" in one_line_error(load_model, folder)
    folder = Path(shutil.copytree(released, tmp_path / "b"))
    (folder / "vae" / "config.json").unlink()
    assert "vae/config.json is missing" in one_line_error(load_model, folder)
    (folder / "model_index.json").unlink()
    assert "model_index.json is missing" in one_line_error(load_model, folder)


def test_sdxl_unet_config_is_rejected_naming_the_file(released, tmp_path):
    folder = copy_of(released, tmp_path)
    path = folder / "unet" / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), addition_embed_type="text_time")))
    message = one_line_error(load_model, folder)
    assert "unet/config.json" in message and "addition_embed_type" in message


def test_missing_unexpected_and_misshapen_tensors_are_named(released, tmp_path):
    folder = copy_of(released, tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if k not in ("conv_in.weight", "conv_out.bias")}, weights)
    message = one_line_error(load_model, folder)
    assert (
        "unet/diffusion_pytorch_model.safetensors is missing 2 UNet tensor(s): conv_in.weight, conv_out.bias" in message
    )
    assert "Stable Diffusion 1.x/2.x UNet" in message
    save_file({**state, "add_embedding.linear_1.weight": torch.zeros(2, 2)}, weights)
    assert "unexpected UNet tensor(s): add_embedding.linear_1.weight" in one_line_error(load_model, folder)
    save_file({**state, "conv_in.weight": torch.zeros(32, 4, 5, 5)}, weights)
    message = one_line_error(load_model, folder)
    assert "conv_in.weight has shape (32, 4, 5, 5)" in message and "(32, 4, 3, 3)" in message


def test_single_file_missing_tensor_is_named_in_the_original_layout(tmp_path):
    state, _ = original_checkpoint("tiny-sd2")
    unet_key = "model.diffusion_model.input_blocks.1.0.in_layers.0.weight"
    text_key = "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"
    save_file({k: v for k, v in state.items() if k != unet_key}, tmp_path / "broken.safetensors")
    message = one_line_error(load_model, tmp_path / "broken.safetensors")
    assert f"broken.safetensors is missing 1 UNet tensor(s): {unet_key};" in message
    save_file({k: v for k, v in state.items() if k != text_key}, tmp_path / "broken.safetensors")
    assert f"is missing 1 text encoder tensor(s): {text_key};" in one_line_error(
        load_model, tmp_path / "broken.safetensors"
    )


def custom_preset(vae_groups: int = 8) -> Preset:
    """A small custom model whose single file cannot describe it: UNet widths 16/32 with 8 GroupNorm groups and
    2 heads per block (the SD 1 rule infers 32 groups, 8 heads)."""
    preset = get_preset("tiny-sd1")
    unet = preset.model_config.unet
    unet.block_out_channels, unet.norm_num_groups, unet.num_heads = (16, 32), 8, (2, 2)
    preset.model_config.vae.norm_num_groups = vae_groups
    return preset


def test_an_inferred_architecture_that_cannot_be_built_names_the_config_option(tmp_path):
    state, _ = original_checkpoint(custom_preset())
    save_file(state, tmp_path / "custom.safetensors")
    message = one_line_error(load_model, tmp_path / "custom.safetensors")
    assert "custom.safetensors" in message and "16 is not divisible by its 32 GroupNorm groups" in message
    assert "--config" in message


@pytest.mark.parametrize("given", ["folder", "unet folder", "unet config.json"])
def test_config_gives_a_single_file_what_its_shapes_cannot(given, tmp_path):
    state, source = original_checkpoint(custom_preset(vae_groups=32))
    save_file(state, tmp_path / "custom.safetensors")
    folder = save_diffusers(source, tmp_path / "folder")
    config = {"folder": folder, "unet folder": folder / "unet", "unet config.json": folder / "unet" / "config.json"}
    model = load_model(tmp_path / "custom.safetensors", config=config[given])
    assert model.unet.config == source.unet.config
    assert_same_weights(model, source)
    assert any(str(config[given]) in note for note in model.details.notes)


def test_an_ldm_yaml_gives_the_head_count_of_an_sd2_single_file(tmp_path):
    preset = get_preset("tiny-sd2")
    preset.model_config.unet.num_heads = (2, 4)  # 16-wide heads; the SD 2 rule infers 64-wide ones
    preset.model_config.unet.upcast_attention = True
    state, source = original_checkpoint(preset)
    save_file(state, tmp_path / "sd2.safetensors")
    (tmp_path / "v2-inference-v.yaml").write_text("""
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    image_size: 8
    scale_factor: 0.18215
    unet_config:
      params: {in_channels: 4, out_channels: 4, model_channels: 32, attention_resolutions: [1], num_res_blocks: 1,
               channel_mult: [1, 2], num_head_channels: 16, use_linear_in_transformer: true, transformer_depth: 1,
               context_dim: 32}
    first_stage_config:
      params:
        ddconfig: {double_z: true, z_channels: 4, resolution: 256, in_channels: 3, out_ch: 3, ch: 32, ch_mult: [1, 2],
                   num_res_blocks: 1, attn_resolutions: []}
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
""")
    model = load_model(tmp_path / "sd2.safetensors", config=tmp_path / "v2-inference-v.yaml")
    assert model.unet.config == source.unet.config and model.vae.config == source.vae.config
    assert model.prediction_type == "v_prediction"
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text_embeddings = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(model.unet(latents, 10, text_embeddings), source.unet(latents, 10, text_embeddings), 1e-5)
        guessed = load_model(tmp_path / "sd2.safetensors").unet(latents, 10, text_embeddings)
    assert (guessed - source.unet(latents, 10, text_embeddings)).abs().max() > 1e-4  # the heads matter


def test_config_errors_are_one_line(released, tmp_path):
    state, _ = original_checkpoint("tiny-sd1")
    save_file(state, tmp_path / "model.safetensors")
    assert "no such file" in one_line_error(load_model, tmp_path / "model.safetensors", config=tmp_path / "nowhere")
    (tmp_path / "broken.yaml").write_text("model: [unclosed")
    assert "broken.yaml" in one_line_error(load_model, tmp_path / "model.safetensors", config=tmp_path / "broken.yaml")
    assert "--config applies to single-file" in one_line_error(load_model, released, config=released)
    (tmp_path / "empty").mkdir()
    assert "holds no model_index.json" in one_line_error(
        load_model, tmp_path / "model.safetensors", config=tmp_path / "empty"
    )


def test_save_single_file_needs_a_known_suffix(tmp_path):
    preset = get_preset("tiny-sd1")
    model = StableDiffusionModel.from_config(preset.model_config, preset.scheduler_config)
    assert "model.bin" in one_line_error(save_single_file, model, tmp_path / "model.bin")
    assert not list(tmp_path.iterdir())


def test_unknown_preset_names_the_known_ones():
    assert "sd15" in one_line_error(get_preset, "sd3")


@pytest.mark.parametrize("preset", ["sd15", "sd21"])
def test_full_size_networks_have_exactly_the_released_tensors(preset):
    """Our networks at full size, on the meta device: the same tensor names and shapes as diffusers' and
    transformers' models of the released configs, so real folders load strictly."""
    config = get_preset(preset).model_config
    with checkpoints._meta_without_init():
        ours = {
            "unet": checkpoints.NETWORKS["unet"](config.unet).state_dict(),
            "vae": checkpoints.NETWORKS["vae"](config.vae).state_dict(),
            "text_encoder": checkpoints.NETWORKS["text_encoder"](config.text_encoder).state_dict(),
        }
    with torch.device("meta"):
        theirs = {
            "unet": UNet2DConditionModel.from_config(config.unet.to_diffusers()).state_dict(),
            "vae": AutoencoderKL.from_config(config.vae.to_diffusers()).state_dict(),
            "text_encoder": {
                "text_model." + k.removeprefix("text_model."): v
                for k, v in HFCLIPTextModel(HFCLIPTextConfig(**vars(config.text_encoder))).state_dict().items()
            },
        }
    for network in ours:
        assert {k: tuple(v.shape) for k, v in ours[network].items()} == {
            k: tuple(v.shape) for k, v in theirs[network].items()
        }, network
    assert len(ours["unet"]) == 686 and len(ours["vae"]) == 248
