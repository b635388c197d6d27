"""The shipped toy world as other libraries see it: diffusers renders it as fixative does, transformers loads its
CLIP, and it stays within 25 MB (32 MB with its LCM-LoRA)."""

import numpy as np
import pytest
import torch

from fixative.core.checkpoints import load_model
from fixative.core.pipelines import generate

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py; `shipped`: tests/core/toy/conftest.py


def test_shipped_weights_are_safetensors_within_their_budgets(shipped):
    files = [p for p in shipped.rglob("*") if p.is_file()]
    world = [p for p in files if "lcm-lora" not in p.relative_to(shipped).parts]
    assert sum(p.stat().st_size for p in world) <= 25_000_000  # the toy world: SD folder and CLIP
    assert sum(p.stat().st_size for p in files) <= 32_000_000  # with the LCM-LoRA (issue 11)
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt")]
    # unet, vae, text encoder, CLIP, and the LCM-LoRA (issue 11: all shipped weights within 32 MB)
    assert {p.suffix for p in weights} == {".safetensors"} and len(weights) == 5


def test_diffusers_renders_the_shipped_toy_world_as_fixative_does(shipped):
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(shipped / "sd")  # the default call, as a user makes it
    assert {network.dtype for network in (pipe.unet, pipe.vae, pipe.text_encoder)} == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    prompt, settings = "a painting of a boat by tazu", dict(num_inference_steps=10, guidance_scale=5.0)
    theirs = pipe(prompt, generator=torch.Generator().manual_seed(3), output_type="np", **settings).images[0]
    ours = (
        generate(
            load_model(shipped / "sd"), prompt, seed=3, scheduler="ddim", output="images", progress=False, **settings
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
    assert theirs.shape == ours.shape == (64, 64, 3)
    assert np.abs(theirs - ours).max() * 255 <= 2
    assert ours.std() > 0.05  # a painting, not a flat image: the comparison means something


def test_transformers_loads_the_shipped_clip_with_the_sd_text_tower_shapes(shipped):
    transformers = pytest.importorskip("transformers")
    clip = transformers.CLIPModel.from_pretrained(shipped / "clip")  # the default call
    assert clip.dtype == torch.float32
    text_encoder = load_model(shipped / "sd").text_encoder.state_dict()
    tower = {k: v for k, v in clip.state_dict().items() if k.startswith("text_model.")}
    assert set(tower) == set(text_encoder) and all(tower[k].shape == text_encoder[k].shape for k in tower)
    processor = transformers.CLIPImageProcessor.from_pretrained(shipped / "clip")
    assert processor.crop_size == {"height": 64, "width": 64}
