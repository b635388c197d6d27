"""The toy world's LCM-LoRA: applying one to a model, and the shipped one when it is there."""

from __future__ import annotations

import pytest
import torch
from distill_helpers import tiny_teacher, toy_data

from fixative.consistency import toy
from fixative.consistency.objective import ConsistencyDistillation, DistillSettings
from fixative.core.errors import FixativeError
from fixative.core.finetune import FinetuneConfig, fine_tune

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lcm_sampler_merges_the_lora_into_a_copy_with_its_schedule(tmp_path):
    settings = DistillSettings(method="lcm-lora", num_ddim_timesteps=10, rank=2)
    fine_tune(
        tiny_teacher(),
        toy_data(),
        FinetuneConfig(max_steps=1, batch_size=2, lr=1e-2),
        ConsistencyDistillation(settings),
        out=tmp_path,
        progress=False,
    )
    model = tiny_teacher()
    before = {n: p.clone() for n, p in model.unet.state_dict().items()}
    sampler = toy.lcm_sampler(model, tmp_path)
    assert all(torch.equal(before[n], p) for n, p in model.unet.state_dict().items())  # the model is untouched
    assert any(not torch.equal(before[n], p) for n, p in sampler.unet.state_dict().items())
    assert sampler.scheduler_config["_class_name"] == "LCMScheduler"
    assert sampler.scheduler_config["original_inference_steps"] == 10
    assert sampler.text_encoder is model.text_encoder


def test_missing_toy_lcm_lora_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(toy, "TOY_LCM_LORA", tmp_path / "none")
    with pytest.raises(FixativeError, match="not shipped"):
        toy.toy_lcm_lora()


def test_shipped_toy_lcm_lora_samples_the_prompted_artists_in_two_steps():
    """The shipped LCM-LoRA on the toy teacher, 2 steps, guidance 1: the toy CLIP names the prompted artist."""
    if not toy.TOY_LCM_LORA.is_dir():
        pytest.skip("no toy LCM-LoRA shipped in this checkout")
    from fixative.core.checkpoints import load_model
    from fixative.core.pipelines import generate
    from fixative.core.toy import clip_folder
    from fixative.core.toy.atelier import artist_names, caption
    from fixative.eval.attribution import ToyJudge

    artists = artist_names(held_out=False)
    prompts = [caption(subject, artist) for artist in artists for subject in ("boat", "house")]
    sampler = toy.lcm_sampler(load_model("toy"))
    images = generate(
        sampler,
        prompts,
        num_inference_steps=2,
        guidance_scale=1.0,
        scheduler="lcm",
        seed=list(range(len(prompts))),
        output="images",
        progress=False,
    )
    attributed, _ = ToyJudge(clip_folder()).classify(images * 2 - 1)
    expected = [artist for artist in artists for _ in range(2)]
    assert sum(a == b for a, b in zip(attributed, expected)) / len(prompts) >= 0.75
