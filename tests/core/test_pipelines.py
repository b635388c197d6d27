"""End-to-end parity of fixative's pipelines with diffusers' StableDiffusion{,Img2Img,Inpaint}Pipeline.

A diffusers-format folder with random weights and the real CLIP tokenizer is built once per module;
diffusers renders from that folder loaded back from disk (as a user has it), fixative from the same
folder through ``load_model``. Images must agree within 2/255 per pixel and the final latents within
the project's fp32 parity tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from parity import assert_close
from PIL import Image

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from fixative.core.checkpoints import load_model  # noqa: E402
from fixative.core.errors import FixativeError  # noqa: E402
from fixative.core.images import pad_for_outpainting  # noqa: E402
from fixative.core.pipelines import (  # noqa: E402
    decode_latents,
    encode_images,
    encode_prompt,
    generate,
    guidance_scale_embedding,
    predict_noise_cfg,
)
from fixative.core.tokenizer import CLIPTokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SIZE = 64  # pixels; latents are 8x8
STEPS = 4
PROMPT = "a painting of a lighthouse at dusk"
NEGATIVE = "blurry, low quality"
DIFFUSERS_SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++2m": "DPMSolverMultistepScheduler",
    "ddpm": "DDPMScheduler",
    "lcm": "LCMScheduler",
}
SD15_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def build_folder(
    folder: Path,
    *,
    in_channels: int = 4,
    sd2: bool = False,
    time_cond_proj_dim: int | None = None,
    vae_sample_size: int = SIZE,
    seed: int = 0,
) -> Path:
    """A small SD 1.x-style (or SD 2.x-style: v-prediction, linear projections, gelu, "!" padding)
    diffusers folder with random weights, saved by diffusers itself."""
    torch.manual_seed(seed)
    text_width = 32
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIZE // 8,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_width,
        attention_head_dim=(2, 4) if sd2 else 2,
        use_linear_projection=sd2,
        time_cond_proj_dim=time_cond_proj_dim,
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=vae_sample_size,
    )
    text_config = transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=text_width,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu" if sd2 else "quick_gelu",
        projection_dim=text_width,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
    text_encoder = transformers.CLIPTextModel(text_config)
    tokenizer_folder = folder.with_name(folder.name + "-tokenizer")
    CLIPTokenizer.bundled(pad_token="!" if sd2 else "<|endoftext|>").save(tokenizer_folder)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_folder)
    scheduler_config = dict(SD15_SCHEDULER, prediction_type="v_prediction" if sd2 else "epsilon")
    scheduler = diffusers.DDIMScheduler.from_config(scheduler_config)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


_REFERENCE_PIPELINES: dict = {}


def reference_pipeline(folder: Path, kind: str, scheduler: str):
    """diffusers' pipeline for ``kind`` loaded from ``folder`` on disk (once), with the scheduler swapped
    as a user swaps it: ``SchedulerClass.from_config(<the folder's scheduler config>)``."""
    cls = {
        "txt2img": diffusers.StableDiffusionPipeline,
        "img2img": diffusers.StableDiffusionImg2ImgPipeline,
        "inpaint": diffusers.StableDiffusionInpaintPipeline,
    }[kind]
    key = (str(folder), kind)
    if key not in _REFERENCE_PIPELINES:
        pipe = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        _REFERENCE_PIPELINES[key] = (pipe, pipe.scheduler.config)
    pipe, config = _REFERENCE_PIPELINES[key]
    pipe.scheduler = getattr(diffusers, DIFFUSERS_SCHEDULERS[scheduler]).from_config(config)
    return pipe


def max_pixel_difference(ours: list[Image.Image], theirs: list[Image.Image]) -> int:
    assert len(ours) == len(theirs)
    return max(
        int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max()) for a, b in zip(ours, theirs)
    )


def assert_latents_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert_close(ours, theirs, what="latents")


def render_both(folder: Path, model, kind: str, scheduler: str, seed=0, **settings):
    """Final latents and PIL images from diffusers and from fixative, for the same settings."""
    pipe = reference_pipeline(folder, kind, scheduler)
    reference_settings = dict(settings)
    ours_settings = dict(settings)
    if "mask_image" in reference_settings:
        ours_settings["mask"] = ours_settings.pop("mask_image")
    for name in ("num_inference_steps", "guidance_scale"):
        reference_settings.setdefault(name, {"num_inference_steps": STEPS, "guidance_scale": 7.5}[name])
        ours_settings.setdefault(name, reference_settings[name])
    if kind == "txt2img":
        for name in ("height", "width"):
            reference_settings.setdefault(name, SIZE)
            ours_settings.setdefault(name, SIZE)

    def generator():
        if isinstance(seed, list):
            return [torch.Generator("cpu").manual_seed(s) for s in seed]
        return torch.Generator("cpu").manual_seed(seed)

    latents = {}  # the final latents, kept by each side's per-step callback

    def keep_theirs(pipe, step, t, tensors):
        latents["theirs"] = tensors["latents"]
        return tensors

    def keep_ours(step, t, step_latents, pred_x0):
        latents["ours"] = step_latents

    theirs_images = pipe(generator=generator(), callback_on_step_end=keep_theirs, **reference_settings).images
    ours_images = generate(
        model, generator=generator(), scheduler=scheduler, callback=keep_ours, progress=False, **ours_settings
    )
    return latents["ours"], latents["theirs"], ours_images, theirs_images


def assert_same_render(folder, model, kind, scheduler, **settings):
    ours_latents, theirs_latents, ours_images, theirs_images = render_both(folder, model, kind, scheduler, **settings)
    assert_latents_close(ours_latents, theirs_latents)
    difference = max_pixel_difference(ours_images, theirs_images)
    assert difference <= 2, f"images differ by {difference}/255"
    return ours_images


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory):
    return build_folder(tmp_path_factory.mktemp("sd15"))


@pytest.fixture(scope="module")
def sd15(sd15_folder):
    return load_model(sd15_folder)


@pytest.fixture(scope="module")
def init_image():
    rng = np.random.default_rng(0)
    gradient = np.linspace(0, 255, SIZE, dtype=np.float32)
    array = np.stack(
        [gradient[None, :].repeat(SIZE, 0), gradient[:, None].repeat(SIZE, 1), rng.uniform(0, 255, (SIZE, SIZE))],
        axis=-1,
    )
    return Image.fromarray(array.astype(np.uint8))


@pytest.fixture(scope="module")
def mask_image():
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 8, 48, 40))
    return mask


def test_the_test_tokenizer_is_the_real_clip_bpe(sd15_folder):
    tokenizer = transformers.CLIPTokenizer.from_pretrained(sd15_folder / "tokenizer")
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler-a", "dpm++2m", "lcm", "ddpm"])
def test_txt2img_matches_diffusers(sd15_folder, sd15, scheduler):
    images = assert_same_render(sd15_folder, sd15, "txt2img", scheduler, prompt=PROMPT, negative_prompt=NEGATIVE)
    assert images[0].size == (SIZE, SIZE)
    assert np.asarray(images[0]).std() > 1.0  # not a blank image: the comparison means something


def test_prompt_lists_and_images_per_prompt_match_diffusers(sd15_folder, sd15):
    assert_same_render(
        sd15_folder,
        sd15,
        "txt2img",
        "euler-a",
        prompt=[PROMPT, "a red cube"],
        negative_prompt=[NEGATIVE, "green"],
        num_images_per_prompt=2,
    )


def test_a_list_of_seeds_draws_each_image_as_diffusers(sd15_folder, sd15):
    assert_same_render(sd15_folder, sd15, "txt2img", "euler-a", seed=[3, 7], prompt=PROMPT, num_images_per_prompt=2)


def test_guidance_rescale_matches_diffusers(sd15_folder, sd15):
    assert_same_render(sd15_folder, sd15, "txt2img", "ddim", prompt=PROMPT, guidance_rescale=0.7)


def test_clip_skip_matches_diffusers_embeddings_of_the_penultimate_layer(sd15_folder, sd15):
    # diffusers' own clip_skip path reads text_encoder.text_model, which transformers >= 5 no longer has,
    # and it skips no layer for the negative prompt; give it the embeddings it means to compute, for both.
    pipe = reference_pipeline(sd15_folder, "txt2img", "euler")
    text_encoder = pipe.text_encoder
    final_layer_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm

    def penultimate(text):
        input_ids = pipe.tokenizer(
            text, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            return final_layer_norm(text_encoder(input_ids, output_hidden_states=True).hidden_states[-2])

    settings = dict(num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE)
    theirs = pipe(
        prompt_embeds=penultimate(PROMPT),
        negative_prompt_embeds=penultimate(NEGATIVE),
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="latent",
        **settings,
    ).images
    ours = generate(
        sd15, PROMPT, NEGATIVE, clip_skip=1, scheduler="euler", seed=0, output="latents", progress=False, **settings
    )
    without = generate(sd15, PROMPT, NEGATIVE, scheduler="euler", seed=0, output="latents", progress=False, **settings)
    assert_latents_close(ours, theirs)
    assert (ours - without).abs().max() > 1e-2  # the skipped layer made a difference


@pytest.mark.parametrize("scheduler", ["ddim", "euler-a", "dpm++2m"])
def test_img2img_matches_diffusers(sd15_folder, sd15, init_image, scheduler):
    assert_same_render(
        sd15_folder,
        sd15,
        "img2img",
        scheduler,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        image=init_image,
        strength=0.6,
        num_inference_steps=5,
    )


def test_img2img_at_full_strength_matches_diffusers(sd15_folder, sd15, init_image):
    assert_same_render(sd15_folder, sd15, "img2img", "euler", prompt=PROMPT, image=init_image, strength=1.0)


def test_img2img_with_a_list_of_seeds_matches_diffusers(sd15_folder, sd15, init_image):
    assert_same_render(
        sd15_folder,
        sd15,
        "img2img",
        "euler-a",
        seed=[4, 9],
        prompt=PROMPT,
        image=init_image,
        strength=0.7,
        num_images_per_prompt=2,
    )


@pytest.mark.parametrize("scheduler", ["ddim", "euler-a"])
@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_inpainting_by_latent_blending_matches_diffusers(
    sd15_folder, sd15, init_image, mask_image, scheduler, strength
):
    images = assert_same_render(
        sd15_folder,
        sd15,
        "inpaint",
        scheduler,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        image=init_image,
        mask_image=mask_image,
        strength=strength,
        height=SIZE,
        width=SIZE,
    )
    assert images[0].size == init_image.size


@pytest.fixture(scope="module")
def inpainting_folder(tmp_path_factory):
    return build_folder(tmp_path_factory.mktemp("sd15-inpainting"), in_channels=9, seed=1)


@pytest.mark.parametrize("scheduler,strength", [("ddim", 1.0), ("euler-a", 1.0), ("dpm++2m", 0.7)])
def test_inpainting_with_a_9_channel_unet_matches_diffusers(
    inpainting_folder, init_image, mask_image, scheduler, strength
):
    model = load_model(inpainting_folder)
    assert model.unet.config.in_channels == 9
    assert_same_render(
        inpainting_folder,
        model,
        "inpaint",
        scheduler,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        image=init_image,
        mask_image=mask_image,
        strength=strength,
        height=SIZE,
        width=SIZE,
        num_images_per_prompt=2,
    )


def test_inpainting_with_a_list_of_seeds_matches_diffusers(
    sd15_folder, sd15, inpainting_folder, init_image, mask_image
):
    for folder, model in ((sd15_folder, sd15), (inpainting_folder, load_model(inpainting_folder))):
        assert_same_render(
            folder,
            model,
            "inpaint",
            "euler-a",
            seed=[4, 9],
            prompt=PROMPT,
            image=init_image,
            mask_image=mask_image,
            strength=0.8,
            height=SIZE,
            width=SIZE,
            num_images_per_prompt=2,
        )


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    return build_folder(tmp_path_factory.mktemp("sd2"), sd2=True, seed=2)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++2m"])
def test_v_prediction_sd2_model_matches_diffusers(sd2_folder, scheduler):
    model = load_model(sd2_folder)
    assert model.scheduler_config["prediction_type"] == "v_prediction"
    assert_same_render(
        sd2_folder, model, "txt2img", scheduler, prompt=PROMPT, negative_prompt=NEGATIVE, guidance_rescale=0.7
    )


@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory):
    return build_folder(tmp_path_factory.mktemp("lcm"), time_cond_proj_dim=16, seed=3)


def test_guidance_embedding_unet_matches_diffusers_without_cfg(lcm_folder):
    model = load_model(lcm_folder)
    assert_same_render(lcm_folder, model, "txt2img", "lcm", prompt=PROMPT, guidance_scale=8.0)


def test_guidance_scale_embedding_matches_diffusers():
    w = torch.tensor([0.0, 3.5, 7.0])
    reference = diffusers.StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=16)
    # one sinusoid serves the UNet's timesteps and this (unet.timestep_embedding, bit-exact with diffusers' timestep
    # embedding); diffusers rounds the guidance frequencies in another order, which at angles of thousands of
    # radians (t = 1000 w) moves a few entries by up to ~5e-5
    assert_close(guidance_scale_embedding(w, 16), reference, 1e-4, what="guidance embeddings")


@pytest.mark.slow
def test_vae_tiling_matches_diffusers_tiled_decoding(tmp_path):
    folder = build_folder(tmp_path / "tiled", vae_sample_size=32, seed=4)
    model = load_model(folder)
    pipe = reference_pipeline(folder, "txt2img", "ddim")
    pipe.vae.enable_tiling()
    settings = dict(prompt=PROMPT, height=96, width=96, num_inference_steps=2)
    theirs = pipe(generator=torch.Generator("cpu").manual_seed(0), **settings).images
    ours = generate(model, seed=0, scheduler="ddim", vae_tiling=True, progress=False, **settings)
    untiled = generate(model, seed=0, scheduler="ddim", progress=False, **settings)
    assert max_pixel_difference(ours, theirs) <= 2
    assert max_pixel_difference(ours, untiled) > 2  # tiling was really used


def test_callback_sees_every_step_and_its_latents(sd15):
    seen = []
    final = generate(
        sd15,
        PROMPT,
        height=SIZE,
        width=SIZE,
        num_inference_steps=3,
        scheduler="ddim",
        seed=0,
        output="latents",
        progress=False,
        callback=lambda step, t, latents, pred_x0: seen.append((step, int(t), latents.clone(), pred_x0)),
    )
    assert [s[0] for s in seen] == [0, 1, 2]
    assert seen[0][1] > seen[1][1] > seen[2][1]
    torch.testing.assert_close(seen[-1][2], final)
    assert all(p.shape == final.shape for *_, p in seen)


def test_tensor_output_is_the_pil_image_in_unit_range(sd15):
    settings = dict(height=SIZE, width=SIZE, num_inference_steps=2, scheduler="ddim", seed=0, progress=False)
    images = generate(sd15, PROMPT, output="images", **settings)
    pil = generate(sd15, PROMPT, **settings)[0]
    assert images.shape == (1, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    assert np.array_equal((images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), np.asarray(pil))


def test_outpainting_pads_the_canvas_and_paints_only_the_border(sd15, init_image):
    canvas, mask = pad_for_outpainting(init_image.crop((0, 0, 40, 64)), left=8, right=13)
    assert canvas.size == (64, 64) and mask.size == (64, 64)  # 40 + 8 + 13 = 61 -> 64
    mask_array = np.asarray(mask)
    assert (mask_array[:, 8:48] == 0).all() and (mask_array[:, :8] == 255).all() and (mask_array[:, 48:] == 255).all()
    assert np.array_equal(np.asarray(canvas)[:, 8:48], np.asarray(init_image)[:, :40])
    out = generate(
        sd15, PROMPT, image=canvas, mask=mask, num_inference_steps=2, scheduler="ddim", seed=0, progress=False
    )[0]
    assert out.size == (64, 64)


def test_building_blocks_are_differentiable(sd15):
    torch.manual_seed(0)
    pixels = (torch.rand(1, 3, SIZE, SIZE) * 2 - 1).requires_grad_()
    latents = encode_images(sd15, pixels, torch.Generator("cpu").manual_seed(0))
    text_embeddings = encode_prompt(sd15, PROMPT, guidance=True)
    noise_pred = predict_noise_cfg(sd15, latents, torch.tensor(500), text_embeddings, guidance_scale=5.0)
    decoded = decode_latents(sd15, latents)
    (noise_pred.square().mean() + decoded.mean()).backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    assert all(p.grad is not None for p in sd15.unet.parameters() if p.requires_grad)
    sd15.unet.zero_grad(set_to_none=True)
    sd15.vae.zero_grad(set_to_none=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_renders_close_to_full_precision(sd15_folder, sd15, dtype):
    half = load_model(sd15_folder, dtype=dtype)
    settings = dict(height=SIZE, width=SIZE, num_inference_steps=3, scheduler="euler", seed=0, progress=False)
    ours = generate(half, PROMPT, output="latents", **settings)
    full = generate(sd15, PROMPT, output="latents", **settings)
    assert ours.dtype == dtype
    assert torch.isfinite(ours.float()).all()
    assert (ours.float() - full).abs().max() < 0.1 * full.abs().max()


def test_size_not_a_multiple_of_8_is_a_user_error(sd15):
    with pytest.raises(FixativeError, match="multiples of 8"):
        generate(sd15, PROMPT, height=60, width=64, progress=False)


def test_inpainting_model_without_a_mask_is_a_user_error(inpainting_folder):
    with pytest.raises(FixativeError, match="mask"):
        generate(load_model(inpainting_folder), PROMPT, progress=False)
