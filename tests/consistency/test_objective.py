"""Consistency distillation on core's training loop: what trains, the EMA target, resume, and the results
rendered by diffusers as by fixative."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from distill_helpers import CAPTIONS, tiny_teacher, toy_data

from fixative.consistency.objective import ConsistencyDistillation, DistillSettings
from fixative.core.checkpoints import load_model, save_diffusers
from fixative.core.errors import FixativeError
from fixative.core.finetune import Batch, FinetuneConfig, fine_tune
from fixative.core.lora import LoRAConv2d, LoRALinear, apply_lora, read_lora
from fixative.core.pipelines import encode_prompt, generate

pytestmark = pytest.mark.usefixtures("one_thread")


def settings(method: str, **overrides) -> DistillSettings:
    return DistillSettings(method=method, num_ddim_timesteps=10, time_cond_proj_dim=16, rank=4, **overrides)


def config(**overrides) -> FinetuneConfig:
    return FinetuneConfig(**{"max_steps": 1, "batch_size": 2, "lr": 1e-3, "seed": 0, **overrides})


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def changed(before: dict, module: torch.nn.Module) -> set[str]:
    return {name for name, value in module.state_dict().items() if not torch.equal(before[name], value)}


def fixed_batch(model) -> Batch:
    """Two captions' frozen text embeddings and fixed random latents."""
    text = encode_prompt(model, CAPTIONS[:2], guidance=False)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    return Batch(latents, model.tokenizer(CAPTIONS[:2]), text, torch.zeros(2, dtype=torch.bool), CAPTIONS[:2])


def sgd_step(objective: ConsistencyDistillation, optimizer: torch.optim.Optimizer, batch: Batch) -> None:
    """One optimiser step on the objective's loss, then its after_step (the EMA updates), as the loop does."""
    optimizer.zero_grad()
    objective.loss(batch, torch.Generator().manual_seed(2)).backward()
    optimizer.step()
    objective.after_step()


def test_one_lcd_step_trains_the_student_and_never_the_teacher():
    model = tiny_teacher()
    teacher_unet = model.unet
    teacher, vae, text = snapshot(model.unet), snapshot(model.vae), snapshot(model.text_encoder)
    objective = ConsistencyDistillation(settings("lcd"))
    fine_tune(model, toy_data(), config(), objective, progress=False)
    assert model.unet is objective.student and model.unet is not teacher_unet
    assert changed(teacher, teacher_unet) == set() and changed(vae, model.vae) == set()
    assert changed(text, model.text_encoder) == set()
    moved = changed({**teacher, "time_embedding.cond_proj.weight": torch.zeros(1)}, model.unet)
    assert "time_embedding.cond_proj.weight" in moved
    assert len(moved) > 0.9 * len(teacher)  # every layer of the student trains
    assert model.scheduler_config["_class_name"] == "LCMScheduler"


def test_one_lcm_lora_step_changes_only_the_adapters():
    model = tiny_teacher()
    teacher_unet = model.unet
    teacher = snapshot(model.unet)
    objective = ConsistencyDistillation(settings("lcm-lora"))
    fine_tune(model, toy_data(), config(), objective, progress=False)
    student = model.unet
    assert changed(teacher, teacher_unet) == set()
    adapters = {n for n in student.state_dict() if ".lora_" in n}
    base = {n: v for n, v in student.state_dict().items() if n not in adapters}
    assert base.keys() == teacher.keys() and all(torch.equal(base[n], teacher[n]) for n in base)
    assert {n for n in adapters if n.endswith("lora_up.weight")} <= changed(
        {n: torch.zeros_like(v) for n, v in student.state_dict().items()}, student
    )
    adapted = {n for n, m in student.named_modules() if isinstance(m, LoRALinear)}
    assert any(n.endswith("time_emb_proj") for n in adapted) and any(n.endswith("attn2.to_k") for n in adapted)
    convolutions = {n for n, m in student.named_modules() if isinstance(m, LoRAConv2d)}
    assert any(n.endswith("resnets.0.conv1") for n in convolutions)
    assert any(n.endswith("upsamplers.0.conv") for n in convolutions)
    assert student.config.time_cond_proj_dim is None


def test_ema_target_update_and_result():
    """θ⁻ ← μ θ⁻ + (1 − μ) θ after each step; the target starts as the student; finish() keeps θ⁻."""
    model = tiny_teacher()
    objective = ConsistencyDistillation(settings("lcd", ema_decay=0.9))
    objective.setup(model, config())
    student = objective.student
    start = snapshot(student)
    assert all(torch.equal(objective.ema.shadow[n], start[n]) for n in objective.ema.shadow)
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.1)
    batch = fixed_batch(model)
    for _ in range(2):
        before = {n: objective.ema.shadow[n].clone() for n in objective.ema.shadow}
        sgd_step(objective, optimizer, batch)
        for name, parameter in student.named_parameters():
            expected = 0.9 * before[name] + 0.1 * parameter.detach()
            torch.testing.assert_close(objective.ema.shadow[name], expected, rtol=1e-6, atol=1e-7)
    assert changed(start, student)  # the student moved ...
    with torch.no_grad():  # ... and the target network is the student's architecture with the EMA weights
        args = (batch.latents, torch.tensor([5, 5]), batch.text_embeddings)
        target = objective._target(*args, timestep_cond=torch.zeros(2, 16))
        assert not torch.equal(target, student(*args, timestep_cond=torch.zeros(2, 16)))
    objective.finish()
    assert all(torch.equal(p, objective.ema.shadow[n]) for n, p in student.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(student(*args, timestep_cond=torch.zeros(2, 16)), target)


class Interrupted(Exception):
    pass


class StopsAtStep3(ConsistencyDistillation):
    """Fails in the third step's loss, after the checkpoint of step 2 was written."""

    calls = 0

    def loss(self, batch, generator):
        self.calls += 1
        if self.calls == 3:
            raise Interrupted
        return super().loss(batch, generator)


@pytest.mark.parametrize("method", ["lcd", "lcm-lora"])
def test_average_of_the_weights_is_the_result(method):
    """With FinetuneConfig.ema_decay: θ̄ ← d θ̄ + (1 − d) θ over the trained parameters after each step, apart from
    the LCD target θ⁻; finish() keeps θ̄, not θ⁻."""
    model = tiny_teacher()
    objective = ConsistencyDistillation(settings(method, ema_decay=0.5))
    objective.setup(model, config(ema_decay=0.8))
    student = objective.student
    trained = {n: p for n, p in student.named_parameters() if p.requires_grad}
    average = objective.average.shadow
    assert average.keys() == trained.keys()  # the adapters only, for an LCM-LoRA
    assert all(torch.equal(average[n], p) for n, p in trained.items())
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.1)
    batch = fixed_batch(model)
    for _ in range(2):
        before = {n: v.clone() for n, v in average.items()}
        sgd_step(objective, optimizer, batch)
        for name, parameter in trained.items():
            expected = 0.8 * before[name] + 0.2 * parameter.detach()
            torch.testing.assert_close(average[name], expected, rtol=1e-6, atol=1e-7)
    if method == "lcd":  # the target network keeps its own decay
        assert any(not torch.equal(objective.ema.shadow[n], average[n]) for n in average)
    objective.finish()
    assert all(torch.equal(p, average[n]) for n, p in trained.items())


@pytest.mark.parametrize("method, average", [("lcd", None), ("lcm-lora", None), ("ict", None), ("lcd", 0.9)])
def test_resume_equals_an_uninterrupted_run_bit_for_bit(tmp_path, method, average):
    run = config(max_steps=4, checkpoint_every=2, ema_decay=average)
    whole = fine_tune(
        tiny_teacher(),
        toy_data(),
        run,
        ConsistencyDistillation(settings(method)),
        out=tmp_path / "whole",
        progress=False,
        log=lambda _: None,
    )
    with pytest.raises(Interrupted):
        fine_tune(
            tiny_teacher(),
            toy_data(),
            run,
            StopsAtStep3(settings(method)),
            out=tmp_path / "cut",
            progress=False,
            log=lambda _: None,
        )
    with pytest.raises(FixativeError, match="already has checkpoints"):
        fine_tune(
            tiny_teacher(),
            toy_data(),
            run,
            ConsistencyDistillation(settings(method)),
            out=tmp_path / "cut",
            progress=False,
            log=lambda _: None,
        )
    with pytest.raises(FixativeError, match=r"other settings: num_ddim_timesteps 10 \(now 20\);"):
        fine_tune(
            tiny_teacher(),
            toy_data(),
            run,
            ConsistencyDistillation(DistillSettings(**{**asdict(settings(method)), "num_ddim_timesteps": 20})),
            out=tmp_path / "cut",
            resume=True,
            progress=False,
            log=lambda _: None,
        )
    with pytest.raises(FixativeError, match="another --average-decay"):
        fine_tune(
            tiny_teacher(),
            toy_data(),
            config(max_steps=4, checkpoint_every=2, ema_decay=None if average else 0.9),
            ConsistencyDistillation(settings(method)),
            out=tmp_path / "cut",
            resume=True,
            progress=False,
            log=lambda _: None,
        )
    resumed = fine_tune(
        tiny_teacher(),
        toy_data(),
        run,
        ConsistencyDistillation(settings(method)),
        out=tmp_path / "cut",
        resume=True,
        progress=False,
        log=lambda _: None,
    )
    for folder in ("whole", "cut"):  # both results carry their settings
        assert json.loads((tmp_path / folder / "distill_config.json").read_text()) == asdict(settings(method))
    ours, theirs = whole.unet.state_dict(), resumed.unet.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    untrained = ConsistencyDistillation(settings(method))
    untrained.setup(tiny_teacher(), run)
    assert any("lora_up" in n or method != "lcm-lora" for n in changed(snapshot(untrained.student), resumed.unet))


diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("student_prediction", [None, "v_prediction"])
def test_distilled_student_folder_renders_as_in_diffusers(tmp_path, student_prediction):
    """The folder's LCM scheduler carries the student's parameterisation (the teacher's unless changed), which
    diffusers follows: read as ε, a v student's weights render otherwise."""
    fine_tune(
        tiny_teacher(),
        toy_data(),
        config(max_steps=2),
        ConsistencyDistillation(settings("lcd", student_prediction=student_prediction)),
        out=tmp_path / "student",
        progress=False,
    )
    scheduler_config = json.loads((tmp_path / "student" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["prediction_type"] == (student_prediction or "epsilon")
    student = load_model(tmp_path / "student")

    def render():  # the folder's own scheduler: lcm
        return generate(
            student, "a red square", num_inference_steps=2, guidance_scale=6.0, seed=3, output="images", progress=False
        )

    ours = render()
    pipe = diffusers.LatentConsistencyModelPipeline.from_pretrained(tmp_path / "student", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        "a red square",
        num_inference_steps=2,
        guidance_scale=6.0,
        generator=torch.Generator("cpu").manual_seed(3),
        output_type="np",
    ).images
    assert np.abs(ours.permute(0, 2, 3, 1).numpy() - theirs).max() <= 2 / 255
    if student_prediction == "v_prediction":
        student.scheduler_config["prediction_type"] = "epsilon"
        assert (render() - ours).abs().max() > 2 / 255


@pytest.mark.parametrize("method", ["lcm-lora", "ict"])
def test_only_an_lcd_student_changes_its_parameterisation(method):
    with pytest.raises(FixativeError, match="only an lcd student"):
        settings(method, student_prediction="v_prediction")
    with pytest.raises(FixativeError, match="unknown student parameterisation"):
        settings("lcd", student_prediction="x0")


def test_lcm_lora_renders_as_in_diffusers(tmp_path):
    pytest.importorskip("peft")
    teacher_folder = save_diffusers(tiny_teacher(), tmp_path / "teacher")
    fine_tune(
        load_model(teacher_folder),
        toy_data(),
        config(max_steps=2, lr=1e-2),
        ConsistencyDistillation(settings("lcm-lora")),
        out=tmp_path / "lora",
        progress=False,
    )
    lora_file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    assert lora_file.is_file()
    kernels = [v for k, v in read_lora(lora_file).items() if k.endswith("lora_A.weight") and v.ndim == 4]
    assert any(v.shape[-1] == 3 for v in kernels)  # 3x3 convolutions are adapted too

    model = load_model(teacher_folder)
    plain = generate(
        model,
        "a red square",
        num_inference_steps=4,
        guidance_scale=1.0,
        scheduler="lcm",
        seed=3,
        output="images",
        progress=False,
    )
    assert apply_lora(model, lora_file) > 0
    ours = (
        generate(
            model,
            "a red square",
            num_inference_steps=4,
            guidance_scale=1.0,
            scheduler="lcm",
            seed=3,
            output="images",
            progress=False,
        )
        .permute(0, 2, 3, 1)
        .numpy()
    )
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(teacher_folder, safety_checker=None)
    pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(tmp_path / "lora")
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        "a red square",
        num_inference_steps=4,
        guidance_scale=1.0,
        generator=torch.Generator("cpu").manual_seed(3),
        output_type="np",
    ).images
    assert np.abs(ours - theirs).max() <= 2 / 255
    assert np.abs(ours - plain.permute(0, 2, 3, 1).numpy()).max() > 2 / 255  # the adapters change the image
