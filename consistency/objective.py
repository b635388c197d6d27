"""Consistency distillation as an objective of core's one training loop (``core.finetune.fine_tune``).

    model = load_model("toy")
    objective = ConsistencyDistillation(DistillSettings(method="lcm-lora", rank=16))
    fine_tune(model, data, FinetuneConfig(max_steps=500, lr=1e-4), objective, out="runs/lcm-lora")

The loop brings the data (scaled latents and frozen text embeddings per micro-batch), accumulation, lr
schedule, clipping, processes, checkpoints and resume; this objective brings the networks and the loss:

- ``lcd``: the student is the teacher's UNet plus a guidance-scale embedding (``student_from_teacher``),
  trained in full; the target network θ⁻ is the EMA of the student, θ⁻ ← μ θ⁻ + (1 − μ) θ after every
  optimiser step (LCM, Algorithm 1; μ = ``ema_decay``). The result is the target network (as diffusers'
  script keeps ``unet_target`` and the LCM paper samples with θ⁻), saved as a model folder with an LCM
  scheduler, unless the loop's ``FinetuneConfig.ema_decay`` asks for an average of the weights (below).
  ``student_prediction`` lets the student (and its target) read their output in another parameterisation than
  the teacher's: with v, x0 = α_t x_t − σ_t v passes the network's error on to x0 at most once, where ε's
  x0 = (x_t − σ_t ε)/α_t multiplies it by σ_t/α_t (14.6 at t = 999 of SD's schedule), the one-step sample's
  noise level. The student starts from the teacher's weights all the same; the folder's scheduler says v.
- ``ict``: consistency training without a teacher (improved CT, Song & Dhariwal 2023; ``ict.py``): the model's
  own UNet, starting from the teacher's weights, trained in full on the data alone: the target is the student
  itself under ``torch.no_grad`` (no EMA), the teacher is never called. Saved as a model folder with an LCM
  scheduler, sampled with guidance 1 (it has no guidance embedding).
- ``lcm-lora``: low-rank adapters (core's ``LoRALinear`` / ``LoRAConv2d``) on a copy of the teacher UNet,
  the teacher itself frozen; no guidance embedding and no separate target: the target is the adapted UNet under
  ``torch.no_grad`` (μ = 0), as in LCM-LoRA (Luo et al. 2023b) and diffusers' train_lcm_distill_lora
  scripts. The result is ``pytorch_lora_weights.safetensors``.

With ``FinetuneConfig.ema_decay`` (``fixative distill --average-decay``), every method also keeps a slow EMA of
the trained weights and saves it as the result: the sampling network is an average of the iterates, apart from
the target network that the loss reads (Song & Dhariwal 2023 sample their consistency models from such an EMA,
decay 0.99993, while their target network has none; the LCD target keeps its own μ).

While training, ``model.unet`` is the student and ``model.scheduler_config`` the LCM one, so the loop's
validation images and the returned model sample as the distilled model does.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from fixative.core.errors import FixativeError
from fixative.core.finetune import (
    MIXED_PRECISION,
    Batch,
    FinetuneConfig,
    load_trained_state,
    save_model_into,
    trained_state,
)
from fixative.core.lora import inject_lora, save_lora
from fixative.core.parameterization import PREDICTION_TYPES
from fixative.core.pipelines import encode_prompt
from fixative.core.schedulers import NoiseSchedule
from fixative.core.training import EMA

from .export import lcm_scheduler_config
from .ict import consistency_training_loss
from .lcd import LCDSettings, SkippingSchedule, consistency_distillation_loss, student_from_teacher

METHODS = ("lcd", "lcm-lora", "ict")
# Every layer of the UNet that LCM-LoRA adapts: diffusers' train_lcm_distill_lora_sd_wds list, linear layers
# (core's LoRALinear) and convolutions (LoRAConv2d). proj_in / proj_out are Linear in SD 2.x UNets and 1x1
# convolutions in SD 1.x ones.
LCM_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)


@dataclass
class DistillSettings(LCDSettings):
    """What to distil and how (``LCDSettings``' schedule, guidance range and loss, plus the networks)."""

    method: str = "lcd"  # lcd (full student with guidance embedding) | lcm-lora (adapters on the teacher) | ict
    huber_c: float | None = None  # pseudo-Huber c; None: 0.001 for lcd / lcm-lora (LCM), 0.00054 √d for ict
    time_cond_proj_dim: int = 256  # lcd: width of the guidance-scale embedding
    ema_decay: float = 0.95  # lcd: μ of the EMA target network
    student_prediction: str | None = None  # lcd: the student's parameterisation (epsilon | v_prediction | sample);
    # None: the teacher's
    rank: int = 64  # lcm-lora: adapter rank (LCM-LoRA's and diffusers' default)
    alpha: float | None = None  # lcm-lora: adapter α; None: α = rank
    p_mean: float = -1.1  # ict: the lognormal noise-level distribution's mean and deviation of ln σ (Sec. 3.5)
    p_std: float = 2.0
    curriculum_s0: int = 10  # ict: the discretisation curriculum's first and last s (N(k) = min(s0 2^.., s1) + 1)
    curriculum_s1: int = 1280

    def __post_init__(self) -> None:
        if self.huber_c is None and self.method != "ict":
            self.huber_c = 0.001
        super().__post_init__()
        if self.method not in METHODS:
            raise FixativeError(f"unknown distillation method {self.method!r}; use one of {', '.join(METHODS)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise FixativeError(f"the EMA decay must be within [0, 1), got {self.ema_decay}")
        if self.student_prediction is not None:
            if self.student_prediction not in PREDICTION_TYPES:
                raise FixativeError(
                    f"unknown student parameterisation {self.student_prediction!r}; "
                    f"use one of {', '.join(PREDICTION_TYPES)}"
                )
            if self.method != "lcd":
                raise FixativeError(
                    "only an lcd student can change its parameterisation (an LCM-LoRA adapts the teacher, "
                    "and ict trains the model's own UNet); drop --student-prediction"
                )
        if self.rank < 1:
            raise FixativeError("the LoRA rank must be at least 1")
        if not 1 <= self.curriculum_s0 <= self.curriculum_s1:
            raise FixativeError(
                f"the iCT curriculum needs 1 <= s0 <= s1, got {self.curriculum_s0} and {self.curriculum_s1}"
            )
        if self.method == "ict" and self.loss != "huber":
            raise FixativeError(
                "ict trains with the pseudo-Huber loss (Song & Dhariwal 2023, Sec. 3.3); use --loss huber"
            )
        if self.p_std <= 0:
            raise FixativeError(f"the noise-level deviation must be positive, got {self.p_std}")


class ConsistencyDistillation:
    """The ``fine_tune`` objective of latent consistency distillation (see the module docstring)."""

    trains_text_encoder = False

    def __init__(self, settings: DistillSettings = DistillSettings()):
        self.settings = settings
        self.ema: EMA | None = None  # lcd's target network θ⁻
        self.average: EMA | None = None  # the saved result, with FinetuneConfig.ema_decay
        self.step = 0  # optimiser steps done (iCT's curriculum reads it)

    def setup(self, model, config: FinetuneConfig) -> None:
        settings = self.settings
        self.model, self.config = model, config
        self.noise_schedule = NoiseSchedule.from_config(model.scheduler_config)
        self.schedule = SkippingSchedule(self.noise_schedule, settings.num_ddim_timesteps)
        self.prediction_type = model.prediction_type
        self.student_prediction_type = settings.student_prediction or self.prediction_type
        teacher = model.unet
        if teacher.config.time_cond_proj_dim is not None:
            raise FixativeError(
                "the teacher UNet already embeds a guidance scale: it is a distilled model; "
                "distil from the original one"
            )
        for network in (teacher, model.vae, model.text_encoder):
            network.requires_grad_(False).eval()
        with torch.no_grad():
            self.uncond_embeddings = encode_prompt(model, [""], guidance=False)  # (1, 77, D), for guidance
        if settings.method == "lcd":
            student = student_from_teacher(teacher, settings.time_cond_proj_dim).requires_grad_(True)
            self.ema = EMA(student, settings.ema_decay)
        elif settings.method == "ict":  # no teacher: the UNet itself trains, from the teacher's weights
            student, teacher = teacher.requires_grad_(True), None
        else:
            student = copy.deepcopy(teacher)
            inject_lora(student, settings.rank, settings.alpha, LCM_LORA_TARGETS)
        self.teacher, self.student = teacher, student.train()
        if config.ema_decay is not None:
            self.average = EMA(student, config.ema_decay, trainable_only=True)
        if config.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        model.unet = student
        model.scheduler_config = lcm_scheduler_config(
            model.scheduler_config, settings.num_ddim_timesteps, self.student_prediction_type
        )

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def _target(self, *args, **kwargs) -> torch.Tensor:
        """θ⁻: the EMA of the student (lcd), or the student itself (lcm-lora; called under no_grad)."""
        if self.ema is None:
            return self.student(*args, **kwargs)
        return torch.func.functional_call(self.student, self.ema.shadow, args, kwargs)

    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        if batch.text_embeddings is None:
            raise FixativeError("consistency distillation needs the frozen text encoder's embeddings")
        autocast_dtype = MIXED_PRECISION[self.config.mixed_precision]
        latents = batch.latents
        precision = torch.autocast(latents.device.type, autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with precision:
            if self.teacher is None:
                settings = self.settings
                return consistency_training_loss(
                    self.student,
                    latents,
                    batch.text_embeddings,
                    self.noise_schedule,
                    self.step,
                    self.config.max_steps,
                    settings.boundary,
                    self.prediction_type,
                    settings.huber_c,
                    settings.p_mean,
                    settings.p_std,
                    settings.curriculum_s0,
                    settings.curriculum_s1,
                    generator,
                )
            return consistency_distillation_loss(
                self.student,
                self.teacher,
                self._target,
                latents,
                batch.text_embeddings,
                self.uncond_embeddings,
                self.schedule,
                self.settings,
                self.prediction_type,
                generator,
                self.student_prediction_type,
            )

    def after_step(self) -> None:
        self.step += 1
        for ema in (self.ema, self.average):
            if ema is not None:
                ema.update(self.student)

    def finish(self) -> None:
        result = self.average or self.ema
        if result is not None:
            result.copy_to(self.student)
        self.student.eval()

    def state_dict(self) -> dict:
        average = self.average.state_dict() if self.average is not None else None
        return {
            **trained_state(self.student, self.ema),
            "average": average,
            "step": self.step,
            "settings": asdict(self.settings),
        }

    def load_state_dict(self, state: dict) -> None:
        """Puts back a checkpoint's state; one written with other distillation settings is refused."""
        saved, ours = state["settings"], asdict(self.settings)
        differ = [f"{key} {saved.get(key)!r} (now {value!r})" for key, value in ours.items() if saved.get(key) != value]
        if differ:
            raise FixativeError(
                f"--resume: the checkpoint was distilled with other settings: {', '.join(differ)}; "
                "resume with the same options or choose another output folder"
            )
        if (state.get("average") is None) != (self.average is None):
            raise FixativeError(
                "--resume: the checkpoint was distilled with another --average-decay (on / off); "
                "resume with the same options or choose another output folder"
            )
        load_trained_state(self.student, self.ema, state)
        if self.average is not None:
            self.average.load_state_dict(state["average"])
        self.step = state["step"]

    def save(self, out: Path) -> None:
        """The result (a model folder, or pytorch_lora_weights.safetensors) and distill_config.json."""
        if self.settings.method == "lcm-lora":
            save_lora({"unet": self.student}, out)
        else:
            save_model_into(self.model, out)
        record = out / "distill_config.json"
        partial = record.with_name(record.name + ".partial")
        partial.write_text(json.dumps(asdict(self.settings), indent=1))
        partial.replace(record)
