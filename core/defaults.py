"""Defaults shared by the Python API and the command line (torch-free: the command line reads them at start-up)."""

# How far img2img noises its init image (diffusers' StableDiffusionImg2ImgPipeline default); inpainting starts
# from pure noise, as diffusers' StableDiffusionInpaintPipeline does.
IMG2IMG_STRENGTH = 0.8
INPAINT_STRENGTH = 1.0


def default_strength(inpainting: bool) -> float:
    return INPAINT_STRENGTH if inpainting else IMG2IMG_STRENGTH
