"""Sampling with Stable Diffusion: txt2img, img2img, inpainting and outpainting.

The building blocks are plain functions of a ``StableDiffusionModel`` and are differentiable (no
``no_grad`` inside), so the cloak module can back-propagate through ``encode_images`` and the
consistency module can train through ``predict_noise_cfg``:

    encode_prompt      prompts -> text_embeddings (negatives first when guiding, as diffusers)
    encode_images      pixels in [-1, 1] -> scaled latents (VAE posterior sample * scaling_factor)
    decode_latents     scaled latents -> pixels in [-1, 1]
    predict_noise_cfg  one guided UNet prediction (classifier-free guidance + guidance rescale)
    denoise            the sampling loop over a scheduler's timesteps

``generate`` is the one entry point that puts them together the way diffusers' StableDiffusionPipeline,
StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline do: with the same weights, scheduler
settings and seed the images agree within uint8 rounding. Random numbers are drawn exactly as diffusers
draws them (``noise.randn_tensor``: a CPU generator draws on the CPU, then the tensor moves to the
device), in the same order, so stochastic samplers agree too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from PIL import Image
from tqdm.auto import tqdm

from .defaults import default_strength
from .errors import FixativeError
from .images import default_size, images_to_pixels, masks_to_tensor, pixels_to_images, pixels_to_unit
from .noise import randn_tensor
from .schedulers import SCHEDULERS, make_scheduler
from .unet import timestep_embedding

if TYPE_CHECKING:
    from .model import StableDiffusionModel
    from .schedulers import Scheduler

Generator = torch.Generator | list[torch.Generator] | None
# callback(step, timestep, latents, pred_x0): called after every scheduler step; pred_x0 is the
# scheduler's estimate of the clean latents at that step (its pred_original_sample).
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]

# diffusers scheduler classes -> fixative scheduler names, for a model folder's own scheduler_config.json
SCHEDULER_NAMES = {cls.diffusers_class: name for name, cls in SCHEDULERS.items()}


def generators_from_seed(seed: int | Sequence[int] | None) -> Generator:
    """``torch.Generator("cpu").manual_seed(seed)`` (diffusers' convention); a list of seeds gives one per image."""
    if seed is None:
        return None
    if isinstance(seed, int):
        return torch.Generator("cpu").manual_seed(seed)
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seed]


def guidance_scale_embedding(guidance_scale: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """Sinusoidal embedding of guidance weights w (B,) -> (B, embedding_dim): the ``timestep_cond`` of
    latent consistency models (LCM paper Sec. 4.2; VDM's embedding of 1000 * w)."""
    # the UNet's timestep sinusoid at t = 1000 w, with sin before cos and frequencies 10000^(-i / (half - 1))
    return timestep_embedding(guidance_scale.float() * 1000.0, embedding_dim, flip_sin_to_cos=False, freq_shift=1)


def uses_guidance(model: StableDiffusionModel, guidance_scale: float) -> bool:
    """Classifier-free guidance runs for guidance_scale > 1, except for UNets that embed the guidance scale
    (``time_cond_proj_dim``, LCM-distilled): those take w as a condition and predict once."""
    return guidance_scale > 1.0 and model.unet.config.time_cond_proj_dim is None


def _prompt_list(prompts: str | Sequence[str]) -> list[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)


def _text_device_dtype(model: StableDiffusionModel) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.text_encoder.parameters())
    return parameter.device, parameter.dtype


def encode_prompt(
    model: StableDiffusionModel,
    prompts: str | Sequence[str],
    negative_prompts: str | Sequence[str] | None = None,
    num_images_per_prompt: int = 1,
    guidance: bool = True,
    clip_skip: int = 0,
) -> torch.Tensor:
    """Prompts -> text_embeddings (B * num_images_per_prompt [* 2], 77, cross_attention_dim).

    With ``guidance`` the negative prompts' embeddings come first, then the prompts' (diffusers' order);
    missing negative prompts are "" and a single negative prompt applies to every prompt. Each prompt's
    embedding is repeated num_images_per_prompt times in a row. ``clip_skip`` (0 = none) applies to the
    negative prompts too, unlike diffusers' SD 1.x/2.x pipelines, which ignore it there.
    """
    prompts = _prompt_list(prompts)
    device, _ = _text_device_dtype(model)

    def embed(texts: list[str]) -> torch.Tensor:
        input_ids = model.tokenizer(texts).to(device)  # (n, 77)
        hidden = model.text_encoder(input_ids, clip_skip=clip_skip).last_hidden_state  # (n, 77, width)
        return hidden.repeat_interleave(num_images_per_prompt, dim=0)

    text_embeddings = embed(prompts)
    if not guidance:
        return text_embeddings
    if negative_prompts is None:
        negative_prompts = [""] * len(prompts)
    elif isinstance(negative_prompts, str):
        negative_prompts = [negative_prompts] * len(prompts)
    elif len(negative_prompts) != len(prompts):
        raise FixativeError(
            f"got {len(negative_prompts)} negative prompts for {len(prompts)} prompts; "
            "give one negative prompt, or one per prompt"
        )
    return torch.cat([embed(list(negative_prompts)), text_embeddings])


def encode_images(
    model: StableDiffusionModel, pixels: torch.Tensor, generator: Generator = None, sample: bool = True
) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8), differentiable.

    ``sample``: draw from the VAE posterior with ``generator`` (as diffusers' img2img and inpaint
    pipelines do); otherwise take its mean. Latents are multiplied by the VAE's scaling_factor.
    """
    posterior = model.vae.encode(pixels.to(device=model.vae.device, dtype=model.vae.dtype))
    latents = posterior.sample(generator) if sample else posterior.mode()
    return latents * model.vae.config.scaling_factor


def decode_latents(model: StableDiffusionModel, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, 4, h, w) -> pixels (B, 3, 8h, 8w) in [-1, 1] (not clamped), differentiable."""
    return model.vae.decode(latents.to(model.vae.dtype) / model.vae.config.scaling_factor)


def rescale_noise_cfg(noise_pred: torch.Tensor, noise_pred_text: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    Sec. 3.4, Eq. 15-16): match the guided prediction's std to the conditional one's, then mix by phi."""
    dims = list(range(1, noise_pred.ndim))
    rescaled = noise_pred * (noise_pred_text.std(dim=dims, keepdim=True) / noise_pred.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_pred


def predict_noise_cfg(
    model: StableDiffusionModel,
    latents: torch.Tensor,
    t: torch.Tensor | float,
    text_embeddings: torch.Tensor,
    guidance_scale: float,
    guidance_rescale: float = 0.0,
    timestep_cond: torch.Tensor | None = None,
    conditioning: torch.Tensor | None = None,
) -> torch.Tensor:
    """One UNet prediction with classifier-free guidance, differentiable.

    latents: (B, 4, h, w) already scaled by the scheduler's ``scale_model_input``; text_embeddings from
    ``encode_prompt``: (2B, 77, D) with the negatives first guides, eps = eps_u + w (eps_c - eps_u)
    (Ho & Salimans 2022, Eq. 6), then ``rescale_noise_cfg`` when guidance_rescale > 0; (B, 77, D)
    predicts once, unguided. conditioning: extra input channels (B, 5, h, w) of 9-channel inpainting
    UNets (mask, masked-image latents), appended after the latents. Returns the model output
    (epsilon, v or x0, whatever the UNet predicts), (B, out_channels, h, w).
    """
    guided = text_embeddings.shape[0] == 2 * latents.shape[0]
    model_input = torch.cat([latents, latents]) if guided else latents
    if conditioning is not None:
        conditioning = torch.cat([conditioning, conditioning]) if guided else conditioning
        model_input = torch.cat([model_input, conditioning.to(model_input.dtype)], dim=1)
    if timestep_cond is not None and guided:
        timestep_cond = torch.cat([timestep_cond, timestep_cond])
    noise_pred = model.unet(model_input, t, text_embeddings, timestep_cond=timestep_cond)
    if not guided:
        return noise_pred
    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
    noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
    if guidance_rescale > 0.0:
        noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale)
    return noise_pred


class LatentBlend:
    """Inpainting with an ordinary 4-channel UNet (Blended Latent Diffusion, Avrahami et al. 2023, Alg. 1;
    as diffusers' StableDiffusionInpaintPipeline does for 4-channel UNets): after every step the kept
    region (mask 0) is replaced by the image's latents noised to the next timestep, so only the masked
    region is generated."""

    def __init__(self, image_latents: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor):
        self.image_latents = image_latents  # (B, 4, h, w), scaled
        self.mask = mask  # (B, 1, h, w), 1 = generate
        self.noise = noise  # the noise the initial latents were drawn with

    def __call__(self, scheduler: Scheduler, latents: torch.Tensor, next_t: torch.Tensor | None) -> torch.Tensor:
        known = self.image_latents
        if next_t is not None:
            known = scheduler.add_noise(known, self.noise, next_t.reshape(1))
        return (1 - self.mask) * known + self.mask * latents


def denoise(
    model: StableDiffusionModel,
    scheduler: Scheduler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    text_embeddings: torch.Tensor,
    guidance_scale: float,
    guidance_rescale: float = 0.0,
    timestep_cond: torch.Tensor | None = None,
    conditioning: torch.Tensor | None = None,
    blend: LatentBlend | None = None,
    generator: Generator = None,
    callback: StepCallback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """The sampling loop: for each t, x_{t-1} = scheduler.step(predict_noise_cfg(x_t, t), t, x_t).

    Differentiable unless called under ``torch.no_grad()``. Returns the final (scaled) latents.
    """
    for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="sampling", leave=False)):
        model_input = scheduler.scale_model_input(latents, t)
        noise_pred = predict_noise_cfg(
            model, model_input, t, text_embeddings, guidance_scale, guidance_rescale, timestep_cond, conditioning
        )
        latents = scheduler.step(noise_pred, t, latents, generator=generator)
        if blend is not None:
            latents = blend(scheduler, latents, timesteps[i + 1] if i + 1 < len(timesteps) else None)
        if callback is not None:
            callback(i, t, latents, scheduler.pred_original_sample)
    return latents


def default_scheduler_name(model: StableDiffusionModel) -> str:
    """The name of the model's own scheduler (its scheduler_config.json), or "ddim" where fixative does not
    implement that one (e.g. SD 1.x's PNDM)."""
    return SCHEDULER_NAMES.get(model.scheduler_config.get("_class_name"), "ddim")


def scheduler_for(model: StableDiffusionModel, scheduler: str | Scheduler | None, eta: float = 0.0) -> Scheduler:
    """A scheduler by name (keeping the model's schedule settings, as diffusers' from_config does), the
    model's own one for None (``default_scheduler_name``), or the one given. eta: DDIM's noise."""
    if scheduler is None:
        scheduler = default_scheduler_name(model)
    if isinstance(scheduler, str):
        return make_scheduler(scheduler, model.scheduler_config, eta=eta)
    return scheduler


def _check_size(height: int, width: int, multiple: int) -> None:
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise FixativeError(f"height and width must be positive multiples of {multiple}, got {height}x{width}")


def _expand_to_batch(tensor: torch.Tensor, batch: int, per_prompt: int) -> torch.Tensor:
    """One image for all, or one per prompt (each repeated per_prompt times in a row)."""
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    if tensor.shape[0] * per_prompt == batch:
        return tensor.repeat_interleave(per_prompt, dim=0)
    if tensor.shape[0] == batch:
        return tensor
    raise FixativeError(
        f"got {tensor.shape[0]} images for {batch // per_prompt} prompts; give one image, or one per prompt"
    )


def _encode_for_batch(
    model: StableDiffusionModel,
    pixels: torch.Tensor,
    batch: int,
    per_prompt: int,
    generator: Generator,
    each_row: bool,
) -> torch.Tensor:
    """Encode images for a batch, drawing posterior noise as diffusers does. A single generator samples
    the given images once and the latents are repeated. With a list of generators, ``each_row`` (img2img)
    samples every batch row with its own generator; otherwise (inpainting) image i uses generator i."""
    if not isinstance(generator, list):
        return _expand_to_batch(encode_images(model, pixels, generator), batch, per_prompt)
    if each_row:
        return encode_images(model, _expand_to_batch(pixels, batch, per_prompt), generator)
    latents = encode_images(model, pixels, generator[: pixels.shape[0]])
    return _expand_to_batch(latents, batch, per_prompt)


@torch.no_grad()
def generate(
    model: StableDiffusionModel,
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] | None = None,
    *,
    image: Image.Image | Sequence[Image.Image] | torch.Tensor | None = None,
    mask: Image.Image | Sequence[Image.Image] | torch.Tensor | None = None,
    strength: float | None = None,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    guidance_rescale: float = 0.0,
    scheduler: str | Scheduler | None = None,
    eta: float = 0.0,
    num_images_per_prompt: int = 1,
    seed: int | Sequence[int] | None = None,
    generator: Generator = None,
    clip_skip: int = 0,
    vae_tiling: bool = False,
    output: str = "pil",
    callback: StepCallback | None = None,
    progress: bool = True,
) -> list[Image.Image] | torch.Tensor:
    """Render images: txt2img; img2img when ``image`` is given; inpainting when ``image`` and ``mask`` are.

    image: PIL image(s) or a (B, 3, H, W) tensor in [0, 1]; mask: PIL image(s) or a (B, 1, H, W) tensor
    in [0, 1], white (>= 0.5) where the model paints. Inpainting uses the mask and masked-image latents
    as extra UNet channels for 9-channel inpainting UNets, and latent blending for ordinary UNets.
    For outpainting, pad the image with ``images.pad_for_outpainting`` and inpaint.
    strength: how far the image is noised, 1 = from pure noise (default: ``defaults.default_strength``). height/width
    default to the image's size rounded down to a multiple of 8, or to the
    UNet's sample size * 8. seed: an int (diffusers' ``torch.Generator("cpu").manual_seed(seed)``) or one
    per image; or pass ``generator`` directly. scheduler: a name of ``make_scheduler`` (keeping the model's
    schedule settings), a Scheduler, or None for the model's own one; eta: DDIM's noise (0 = deterministic,
    diffusers' default). vae_tiling: decode (and encode) in
    overlapping tiles, for images larger than the VAE was trained at.
    output: "pil" -> list of PIL images; "images" -> tensor (N, 3, H, W) in [0, 1], float32;
    "latents" -> the final scaled latents (N, 4, H/8, W/8). N = len(prompts) * num_images_per_prompt.
    """
    if output not in ("pil", "images", "latents"):
        raise FixativeError(f"output must be 'pil', 'images' or 'latents', not {output!r}")
    if mask is not None and image is None:
        raise FixativeError("inpainting needs the image to paint into as well as the mask")
    prompts = _prompt_list(prompt)
    batch = len(prompts) * num_images_per_prompt
    height, width = _output_size(model, image, height, width)
    if strength is None:
        strength = default_strength(inpainting=mask is not None or image is None)
    if not 0.0 < strength <= 1.0:
        raise FixativeError(f"strength must be in (0, 1], got {strength}")
    if generator is None:
        generator = generators_from_seed(seed)
    if model.is_inpainting and mask is None:
        raise FixativeError("this is an inpainting model (9-channel UNet): give an image and a mask")

    if vae_tiling:
        model.vae.enable_tiling()
    try:
        device = model.unet.device
        guided = uses_guidance(model, guidance_scale)
        text_embeddings = encode_prompt(model, prompts, negative_prompt, num_images_per_prompt, guided, clip_skip)
        dtype = text_embeddings.dtype  # diffusers draws latents in the text encoder's dtype
        scheduler = scheduler_for(model, scheduler, eta)
        timesteps = _timesteps(scheduler, image is not None, num_inference_steps, strength, device)
        shape = (batch, model.vae.config.latent_channels, height // model.size_multiple, width // model.size_multiple)
        # Random draws in diffusers' order: image posterior, initial noise (both in _initial_latents), then the
        # masked image's posterior (_inpainting_inputs).
        start = _initial_latents(
            model,
            scheduler,
            timesteps,
            shape,
            image,
            mask,
            height,
            width,
            strength,
            generator,
            num_images_per_prompt,
            device,
            dtype,
        )
        conditioning, blend = (
            _inpainting_inputs(model, start, mask, shape, generator, num_images_per_prompt, device, dtype)
            if mask is not None
            else (None, None)
        )
        timestep_cond = _timestep_condition(model, guidance_scale, batch, device, dtype)
        latents = denoise(
            model,
            scheduler,
            start.latents,
            timesteps,
            text_embeddings,
            guidance_scale,
            guidance_rescale,
            timestep_cond,
            conditioning,
            blend,
            generator,
            callback,
            progress,
        )
        if output == "latents":
            return latents
        pixels_out = decode_latents(model, latents)
        return pixels_to_unit(pixels_out).float() if output == "images" else pixels_to_images(pixels_out)
    finally:
        if vae_tiling:
            model.vae.disable_tiling()


def _output_size(model: StableDiffusionModel, image, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width): as given, else the image's rounded down to the model's multiple, else the model's own."""
    multiple = model.size_multiple
    if image is not None and (height is None or width is None):
        first = image if isinstance(image, (Image.Image, torch.Tensor)) else image[0]
        default_height, default_width = default_size(first, multiple)
        height, width = height or default_height, width or default_width
    height = height or model.unet.config.sample_size * multiple
    width = width or model.unet.config.sample_size * multiple
    _check_size(height, width, multiple)
    return height, width


def _timesteps(
    scheduler: Scheduler, from_image: bool, num_inference_steps: int, strength: float, device: torch.device
) -> torch.Tensor:
    """The sampling timesteps; img2img and inpainting start part-way (strength), as diffusers' pipelines do."""
    if from_image:
        timesteps = scheduler.img2img_timesteps(num_inference_steps, strength, device=device)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = scheduler.timesteps
    if len(timesteps) == 0:
        raise FixativeError(
            f"strength {strength} with {num_inference_steps} steps leaves no step to run; "
            "raise the strength or the number of steps"
        )
    return timesteps


class _Start(NamedTuple):
    latents: torch.Tensor  # where sampling starts
    noise: torch.Tensor  # the initial noise it was drawn with
    pixels: torch.Tensor | None  # the init image(s) in [-1, 1]
    image_latents: torch.Tensor | None  # their scaled latents, where used


def _initial_latents(
    model: StableDiffusionModel,
    scheduler: Scheduler,
    timesteps: torch.Tensor,
    shape: tuple,
    image,
    mask,
    height: int,
    width: int,
    strength: float,
    generator: Generator,
    per_prompt: int,
    device: torch.device,
    dtype: torch.dtype,
) -> _Start:
    """Pure noise (txt2img, full-strength inpainting with an inpainting UNet), or the image's latents noised to
    the first timestep (SDEdit, Meng et al. 2022). Draws the image posterior, then the noise."""
    batch = shape[0]
    pixels = image_latents = None
    if image is not None:
        pixels = images_to_pixels(image, height, width)
        if mask is None or strength < 1.0 or not model.is_inpainting:
            image_latents = _encode_for_batch(model, pixels, batch, per_prompt, generator, each_row=mask is None).to(
                dtype
            )
    noise = randn_tensor(shape, generator, device, dtype)
    if image is not None and (mask is None or strength < 1.0):
        latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(batch))
    else:
        latents = noise * scheduler.init_noise_sigma
    return _Start(latents, noise, pixels, image_latents)


def _inpainting_inputs(
    model: StableDiffusionModel,
    start: _Start,
    mask,
    shape: tuple,
    generator: Generator,
    per_prompt: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor | None, LatentBlend | None]:
    """(conditioning, blend): the extra UNet channels of a 9-channel inpainting UNet (mask, masked-image latents),
    or the latent blend of an ordinary UNet. Draws the masked image's posterior noise."""
    height, width = start.pixels.shape[-2:]
    batch = shape[0]
    mask_pixels = masks_to_tensor(mask, height, width)  # (k, 1, H, W), 1 = paint
    masked_pixels = start.pixels * (mask_pixels < 0.5)
    latent_mask = torch.nn.functional.interpolate(mask_pixels, size=shape[-2:])  # nearest, as diffusers
    latent_mask = _expand_to_batch(latent_mask, batch, per_prompt).to(device, dtype)
    if model.is_inpainting:
        masked_latents = _encode_for_batch(model, masked_pixels, batch, per_prompt, generator, each_row=False)
        return torch.cat([latent_mask, masked_latents.to(dtype)], dim=1), None  # (B, 5, h, w)
    # diffusers encodes the masked image for 4-channel UNets too, without using it: draw the same posterior
    # noise so that later draws (ancestral steps) stay in step with diffusers
    k = masked_pixels.shape[0]
    randn_tensor(
        (k, *shape[1:]), generator[:k] if isinstance(generator, list) else generator, model.vae.device, model.vae.dtype
    )
    return None, LatentBlend(start.image_latents, latent_mask, start.noise)


def _timestep_condition(
    model: StableDiffusionModel, guidance_scale: float, batch: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor | None:
    """The guidance-scale embedding of w = guidance_scale - 1 for UNets that take one (LCM), else None."""
    if model.unet.config.time_cond_proj_dim is None:
        return None
    w = torch.full((batch,), guidance_scale - 1.0)
    return guidance_scale_embedding(w, model.unet.config.time_cond_proj_dim).to(device, dtype)
