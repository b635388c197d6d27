"""The protections, one objective each, all minimised by the one loop in ``optimise.py``.

An objective sees the perturbed pixels x + δ in [0, 1], (batch, 3, H, W), and returns a loss per image (batch,).
``target_distance`` is what the record reports before and after (the latent distance to the target, or None for
objectives without a target latent); ``after_step`` lets an objective update a model between perturbation steps
(Anti-DreamBooth's surrogate).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fixative.core.errors import FixativeError
from fixative.core.pipelines import encode_images, encode_prompt
from fixative.core.schedulers import NoiseSchedule
from fixative.core.training import TrainStepConfig, denoising_losses, train_step

METHODS = ("glaze", "mist", "photoguard", "anti-dreambooth")
WARMUP_STREAM = 1_000_000  # noise seeds of the warm-up steps, apart from the attack's steps


@dataclass
class Objective:
    loss: Callable[[torch.Tensor, int], torch.Tensor]  # (pixels in [0, 1], step) -> (batch,), minimised
    target_distance: Callable[[torch.Tensor], torch.Tensor] | None  # pixels -> (batch,) latent distance
    after_step: Callable[[torch.Tensor, int], None] = lambda pixels, step: None
    details: dict = field(default_factory=dict)  # what the record says about the objective


def encode_mean(model, pixels: torch.Tensor) -> torch.Tensor:
    """E(x): the VAE posterior mean of pixels in [0, 1], scaled latents (batch, 4, H/f, W/f), differentiable."""
    return encode_images(model, pixels * 2 - 1, sample=False).float()


def latent_distance(latents: torch.Tensor, target_latents: torch.Tensor) -> torch.Tensor:
    """Mean squared latent distance per image, (batch,)."""
    return (latents - target_latents).pow(2).flatten(1).mean(1)


def encoder_attack(model, target_latents: torch.Tensor, details: dict) -> Objective:
    """Minimise ||E(x + δ) − z_target||² (the Glaze and PhotoGuard encoder objective)."""

    def distance(pixels: torch.Tensor) -> torch.Tensor:
        return latent_distance(encode_mean(model, pixels), target_latents)

    return Objective(loss=lambda pixels, step: distance(pixels), target_distance=distance, details=details)


def glaze(
    model,
    pixels: torch.Tensor,
    target_pixels: torch.Tensor,
    style: str,
    pool: int = 1,
    push: float = 1.0,
    semantic_weight: float = 0.0,
    prompt: str | list[str] | None = None,
    seed: int = 0,
) -> Objective:
    """Glaze (Shan et al. 2023, Sec. 5.2, eq. 2): min_δ ||E(x + δ) − E(Ω(x, T))||² with Ω the style-transferred
    target (``targets.style_target``); the budget penalty is added by the loop.

    pool > 1 (our variant, not the paper's): the distance between k x k averages of the latents,
        min_δ ||P_k E(x + δ) − [P_k E(x) + κ (P_k E(Ω) − P_k E(x))]||²,   P_k: k x k average pooling, κ = push
    (k at least the latent size: the per-channel mean). It spends the budget on the coarse latent content (colour
    and layout) a fine-tuned mimic learns most readily, not on matching Ω's detail; κ > 1 aims past Ω along the
    same direction so the whole budget is used.

    semantic_weight w > 0 (our variant): adds w · L_θ(E(x + δ), c_T), the frozen UNet's denoising loss on the
    perturbed latents conditioned on the target style's ``prompt`` — Mist's / AdvDM's semantic term (Liang et al.
    2023, eq. 5) with the sign reversed and a target prompt, so that the model the mimic starts from already
    explains x + δ as the target style (the loss as a diffusion classifier's score: Li et al. 2023, "Your Diffusion
    Model is Secretly a Zero-Shot Classifier", eq. 3). ``prompt``: one for all images, or one per image (e.g. each
    image's caption with the target style: the term then pulls each image toward its own content in that style)."""
    with torch.no_grad():
        target_latents = encode_mean(model, target_pixels)
    if pool <= 1 and push == 1.0 and not semantic_weight:
        return encoder_attack(model, target_latents, {"target_style": style})
    details = {"target_style": style, "latent_pool": pool, "target_push": push}
    if semantic_weight:
        prompts = [prompt or style] * pixels.shape[0] if not isinstance(prompt, list) else prompt
        if len(prompts) != pixels.shape[0]:
            raise FixativeError(f"glaze: {len(prompts)} semantic prompts for {pixels.shape[0]} images")
        text_embeddings = _text_embeddings(model, prompts)
        schedule = NoiseSchedule.from_config(model.scheduler_config)
        details.update(
            semantic_weight=semantic_weight, semantic_prompt=prompts[0] if len(set(prompts)) == 1 else prompts
        )

    def pooled(latents: torch.Tensor) -> torch.Tensor:  # a ceil(h / k) x ceil(w / k) grid of averages
        height, width = latents.shape[-2:]
        return F.adaptive_avg_pool2d(latents, (-(-height // pool), -(-width // pool)))

    with torch.no_grad():
        clean = pooled(encode_mean(model, pixels))
        aim = clean + push * (pooled(target_latents) - clean)

    def distance(adv_pixels: torch.Tensor) -> torch.Tensor:
        return latent_distance(pooled(encode_mean(model, adv_pixels)), aim)

    def loss(adv_pixels: torch.Tensor, step: int) -> torch.Tensor:
        latents = encode_mean(model, adv_pixels)
        value = latent_distance(pooled(latents), aim)
        if semantic_weight:
            generator = torch.Generator().manual_seed(seed * 100_003 + step)
            batch_embeddings = text_embeddings[: latents.shape[0]]
            value = value + semantic_weight * denoising_losses(
                model.unet, latents, batch_embeddings, schedule, model.prediction_type, generator
            )
        return value

    return Objective(loss=loss, target_distance=distance, details=details)


def photoguard(model, pixels: torch.Tensor, target_pixels: torch.Tensor) -> Objective:
    """PhotoGuard's encoder attack (Salman et al. 2023, Sec. 4, eq. 3): min_δ ||E(x + δ) − z_target||², the target
    latent of a fixed image (mid-grey by default, ``targets.fixed_target``)."""
    with torch.no_grad():
        target_latents = encode_mean(model, target_pixels)
    return encoder_attack(model, target_latents, {"target": "fixed image"})


def _text_embeddings(model, prompts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return encode_prompt(model, prompts, guidance=False).float()


def mist(
    model, pixels: torch.Tensor, pattern_pixels: torch.Tensor, prompt: str, semantic_weight: float, seed: int
) -> Objective:
    """Mist (Liang et al. 2023, eq. 7): textural loss ||E(x + δ) − E(pattern)||² minus w times the semantic
    loss, the UNet's denoising loss on E(x + δ) (AdvDM, Liang et al. 2023, eq. 5), which the perturbation
    maximises."""
    with torch.no_grad():
        pattern_latents = encode_mean(model, pattern_pixels)
    text_embeddings = _text_embeddings(model, [prompt] * pixels.shape[0])
    schedule = NoiseSchedule.from_config(model.scheduler_config)

    def loss(adv_pixels: torch.Tensor, step: int) -> torch.Tensor:
        latents = encode_mean(model, adv_pixels)
        textural = latent_distance(latents, pattern_latents)
        generator = torch.Generator().manual_seed(seed * 100_003 + step)
        semantic = denoising_losses(model.unet, latents, text_embeddings, schedule, model.prediction_type, generator)
        return textural - semantic_weight * semantic

    def distance(adv_pixels: torch.Tensor) -> torch.Tensor:
        return latent_distance(encode_mean(model, adv_pixels), pattern_latents)

    return Objective(
        loss=loss,
        target_distance=distance,
        details={"target": "pattern", "semantic_weight": semantic_weight, "prompt": prompt},
    )


@dataclass
class ASPLConfig:
    every: int = 10  # perturbation steps between surrogate updates (0: never; the surrogate stays as warmed up)
    surrogate_steps: int = 3  # fine-tuning steps on the clean copy and on the perturbed images, each time
    surrogate_lr: float = 5e-4
    prompt: str = "a painting"
    warmup_steps: int = 0  # first fine-tune the surrogate this many steps on all the batch's clean images
    batch: bool = True  # files: one surrogate warmed up on every image of the batch (False: one per image)
    warmup_batch: int = 8  # images (or tiles) per warm-up step


class Surrogate:
    """Anti-DreamBooth's surrogate θ: a float32 copy of the model's UNet with its own AdamW state, fine-tuned with
    core's ``train_step``; fine-tuning it never touches the model. ASPL fine-tunes one θ on the whole instance set
    (Van Le et al. 2023, Sec. 4.2, Alg. 1); ``warm_up`` does that once for a batch of images of any sizes, and
    every image's attack then starts from a copy (``fork``), so an image's result does not depend on the order the
    batch is cloaked in, and a resumed batch equals an uninterrupted one."""

    def __init__(self, model, config: ASPLConfig, seed: int):
        self.model, self.config, self.seed = model, config, seed
        self.unet = copy.deepcopy(model.unet).float().train().requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=config.surrogate_lr, weight_decay=0.0)
        self.schedule = NoiseSchedule.from_config(model.scheduler_config)
        self.step_config = TrainStepConfig(prediction_type=model.prediction_type)
        self.warmup_losses: list[float] = []

    def text_embeddings(self, batch: int) -> torch.Tensor:
        return _text_embeddings(self.model, [self.config.prompt] * batch)

    def fine_tune(self, latents: torch.Tensor, steps: int, stream: int, unet=None, optimizer=None) -> list[float]:
        """``steps`` train steps of ``unet`` (default: θ) on scaled latents (B, 4, h, w); noise seeded by stream."""
        unet, optimizer = unet or self.unet, optimizer or self.optimizer
        text_embeddings = self.text_embeddings(latents.shape[0])
        losses = []
        for k in range(steps):
            generator = torch.Generator().manual_seed(self.seed * 100_003 + stream * 17 + k)
            losses.append(
                train_step(unet, optimizer, latents, text_embeddings, self.schedule, self.step_config, generator)
            )
        return losses

    def warm_up(self, groups: list[torch.Tensor]) -> None:
        """``config.warmup_steps`` steps on clean images: groups of same-size pixels (N, 3, H, W) in [0, 1]; each
        step takes up to ``config.warmup_batch`` of one group's images, in turn over groups and images."""
        if not self.config.warmup_steps or not groups:
            return
        with torch.no_grad():
            chunks = [
                encode_mean(self.model, chunk) for group in groups for chunk in group.split(self.config.warmup_batch)
            ]
        for step in range(self.config.warmup_steps):
            self.warmup_losses += self.fine_tune(chunks[step % len(chunks)], 1, WARMUP_STREAM + step)

    def fork(self) -> Surrogate:
        """A copy with its own UNet and optimizer state, for one image's attack."""
        twin = copy.copy(self)
        twin.unet = copy.deepcopy(self.unet)
        twin.optimizer = torch.optim.AdamW(twin.unet.parameters(), lr=self.config.surrogate_lr, weight_decay=0.0)
        twin.optimizer.load_state_dict(copy.deepcopy(self.optimizer.state_dict()))  # load_state_dict shares tensors
        return twin


def anti_dreambooth(
    model, pixels: torch.Tensor, config: ASPLConfig, seed: int, surrogate: Surrogate | None = None
) -> Objective:
    """Anti-DreamBooth's ASPL (Van Le et al. 2023, Sec. 4.2, Alg. 1): the perturbation maximises the denoising loss
    of θ', a copy of the surrogate θ fine-tuned on the clean images; θ itself is fine-tuned on the perturbed images.
    Both fine-tunes are ``config.surrogate_steps`` calls of core's ``train_step``, every ``config.every`` steps
    (``every`` = 0: θ' is θ as warmed up and never changes, the paper's FSMG, Sec. 4.1).
    surrogate: a batch-wide θ already warmed up (``Surrogate.warm_up``); this attack fine-tunes a fork of it.
    Without one, θ is a new copy of the model's UNet, warmed up on ``pixels``."""
    if pixels.shape[0] < 1:
        raise FixativeError("anti-dreambooth needs at least one image")
    if surrogate is None:
        surrogate = Surrogate(model, config, seed)
        surrogate.warm_up([pixels])
    surrogate = surrogate.fork()
    text_embeddings = surrogate.text_embeddings(pixels.shape[0])
    with torch.no_grad():
        clean_latents = encode_mean(model, pixels)
    state = {"attacked": None}  # θ', refreshed by after_step

    def refresh(adv_pixels: torch.Tensor, step: int) -> None:
        if not config.every:
            state["attacked"] = copy.deepcopy(surrogate.unet).eval().requires_grad_(False)
            return
        attacked = copy.deepcopy(surrogate.unet).train()
        optimizer = torch.optim.AdamW(attacked.parameters(), lr=config.surrogate_lr, weight_decay=0.0)
        surrogate.fine_tune(clean_latents, config.surrogate_steps, step, attacked, optimizer)
        attacked.eval().requires_grad_(False)
        state["attacked"] = attacked
        with torch.no_grad():
            perturbed_latents = encode_mean(model, adv_pixels)
        surrogate.fine_tune(perturbed_latents, config.surrogate_steps, step + 1)

    def loss(adv_pixels: torch.Tensor, step: int) -> torch.Tensor:
        if state["attacked"] is None:
            refresh(adv_pixels.detach(), step)
        generator = torch.Generator().manual_seed(seed * 100_003 + step)
        return -denoising_losses(
            state["attacked"],
            encode_mean(model, adv_pixels),
            text_embeddings,
            surrogate.schedule,
            model.prediction_type,
            generator,
        )

    def after_step(adv_pixels: torch.Tensor, step: int) -> None:
        if config.every and (step + 1) % config.every == 0:
            refresh(adv_pixels, step)

    details = {
        "surrogate_every": config.every,
        "surrogate_steps": config.surrogate_steps,
        "surrogate_lr": config.surrogate_lr,
        "prompt": config.prompt,
        "surrogate_warmup_steps": config.warmup_steps,
    }
    if surrogate.warmup_losses:
        tail = surrogate.warmup_losses[-10:]
        details["surrogate_warmup_loss"] = [surrogate.warmup_losses[0], sum(tail) / len(tail)]
    return Objective(loss=loss, target_distance=None, after_step=after_step, details=details)
