"""``fine_tune``: the one training loop of fixative — full fine-tuning, LoRA and DreamBooth of a Stable
Diffusion model on captioned images, and the loop other objectives (consistency distillation) plug into.

    model = load_model("toy")
    data = ImageCaptions(pixels, captions)                 # in memory: (N, 3, H, W) in [-1, 1]
    fine_tune(model, data, FinetuneConfig(method="lora", rank=4, max_steps=200), out="runs/lora")

``data`` is an ``ImageCaptions`` (in memory), a folder (an ``imagefolder`` with ``metadata.jsonl`` /
``metadata.csv``) or any ``core.datasets.ImageSet``. ``out`` (optional) receives checkpoints, validation
images and the result (``save_result``): a diffusers folder for ``full`` / ``dreambooth``,
``pytorch_lora_weights.safetensors`` for ``lora``. The model is trained in place and returned (with
LoRA, its adapters stay injected: ``core.lora.merge_lora`` folds them in).

The toy report's mimicry as one config (its ``mimic``: UNet and text encoder, 24 paintings captioned
with a new name, each batch of 16 mixed with 8 paintings of trained artists, Min-SNR-5, bf16, offset 0.3)::

    config = FinetuneConfig(method="full", train_text_encoder=True, max_steps=120, batch_size=16,
                            prior_batch_size=8, prior_loss_weight=0.5, lr=1e-3, weight_decay=0.0,
                            lr_schedule="cosine", warmup=12, snr_gamma=5.0, offset_noise=0.3,
                            mixed_precision="bf16", cache_latents=True, seed=0)
    fine_tune(model, ImageCaptions(mimic_pixels, mimic_captions), config,
              prior_data=ImageCaptions(prior_pixels, prior_captions))

(with a single batch of 24 the mimic's loss averaged prior and instance samples alike, which is
``prior_loss_weight=0.5`` up to a constant factor; here instance and prior means are summed, DreamBooth's
eq. 2; and the latents are drawn from the VAE posterior anew at every step rather than once.) Without ``prior_data``,
DreamBooth's class images are generated from ``class_prompt`` by the model
itself before training (``prior_images`` of them).

Randomness. Every micro-batch k (= step x gradient_accumulation + micro-step) draws from its own
generator seeded by ``step_seed(seed, seed_stream, k)``, in this order: the bucket (only with more than
one), the global batch's item indices (uniform, with replacement), the prior batch's indices, then —
after this process takes its slice of the global batch (rank r keeps items r·B ... (r+1)·B−1; ranks
above 0 then reseed with stream ``seed_stream + "-rank<r>"``) — the posterior sample of the latents,
and then whatever the objective draws (the denoising objective: timesteps, noise, offset noise).
Caption dropout, tag shuffling and image augmentation use ``random.Random`` streams seeded the same
way (``"-captions"``, ``"-tags"``, ``"-augment"``). The data order is thus a function of the step: a
resumed run needs no sampler state and equals an uninterrupted one bit for bit on the CPU.

Processes. Under ``accelerate launch`` each process computes the loss on its slice of the batch;
gradients of the trained parameters are averaged across processes (``accelerator.reduce``) before
clipping and the optimiser step, so every process holds the same weights; only the main process
writes files. Mixed precision: bf16 / fp16 autocast of the UNet's forward pass (fp16 with a gradient
scaler). With ``frozen_in_mixed_precision`` (the default) the networks that do not train are held in that
dtype for the run, as diffusers' ``train_text_to_image.py`` (and ``_lora.py``) cast them to ``weight_dtype``:
the VAE, the text encoder when it does not train, and with LoRA the UNet's frozen base weights (the
adapters stay in the UNet's own dtype). Half their memory, and encodes about twice as fast
on CPU; afterwards they are cast back to their own dtype, so their weights come back rounded to the
mixed-precision dtype. ``frozen_in_mixed_precision=False`` leaves them untouched (the toy build).

Extension point: the training objective. ``fine_tune(..., objective=obj)`` trains whatever ``obj``
says, with this loop's data, accumulation, lr schedule, clipping, processes, checkpoints and resume.
An objective implements (see ``DenoisingObjective``, the default):

    setup(model, config)        once, before the optimiser is built: choose and prepare what trains
                                (e.g. inject LoRA adapters, build a student UNet and its EMA target)
    parameters() -> list        the trained parameters (one list; the optimiser is AdamW over them)
    trains_text_encoder: bool   True: batches carry no cached text embeddings (encode batch.input_ids)
    loss(batch, generator)      a scalar tensor for one micro-batch (``Batch``: scaled latents sampled
                                from the VAE posterior, token ids, text embeddings, prior flags);
                                draw all randomness from ``generator``
    after_step()                after each optimiser step (e.g. the EMA target update)
    finish()                    once after the last step (e.g. copy EMA weights into the model)
    state_dict() / load_state_dict(state)
                                everything needed to resume, trained weights included (the loop adds
                                optimiser, lr schedule, scaler and step): a checkpoint holds it all
    save(out)                   write the result in its ecosystem format into the folder ``out``
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from .datasets import ImageCaptions, ImageOptions, ImageSet, TensorImages, image_folder, shuffle_tags
from .devices import auto_device
from .errors import FixativeError
from .layout import emulated_bf16_warning
from .lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, inject_lora, save_lora
from .schedulers import NoiseSchedule
from .training import EMA, denoising_losses, drop_captions, warmup_constant, warmup_cosine

METHODS = ("full", "lora", "dreambooth")
LR_SCHEDULES = ("constant", "cosine")
MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class FinetuneConfig:
    """A fine-tuning recipe. Defaults follow diffusers' ``train_text_to_image.py`` where it has one."""

    method: str = "full"  # full | lora | dreambooth (full weights, instance prompt, prior preservation)
    rank: int = 4  # LoRA rank r
    alpha: float | None = None  # LoRA α (the update is scaled by α / r); None: α = r
    lora_targets: tuple[str, ...] = UNET_TARGETS  # UNet Linear layers (name endings) that get adapters
    train_text_encoder: bool = False  # also train the text encoder (its attention, with LoRA)
    instance_prompt: str | None = None  # replaces every caption of the data (DreamBooth's "a sks dog")
    class_prompt: str | None = None  # DreamBooth: the prior images' caption (and prompt when generated)
    prior_images: int = 0  # DreamBooth: class images to generate when no prior_data is given
    prior_loss_weight: float = 1.0  # λ of DreamBooth's prior-preservation loss (Ruiz et al. 2023, eq. 2)
    prior_batch_size: int | None = None  # prior images per micro-batch; None: batch_size
    max_steps: int = 1000  # optimiser steps
    batch_size: int = 1  # images per micro-batch and process
    gradient_accumulation: int = 1  # micro-batches per optimiser step
    lr: float = 1e-4
    weight_decay: float = 1e-2  # AdamW
    lr_schedule: str = "constant"  # constant | cosine (to final_lr_fraction), both after a linear warm-up
    warmup: int = 0  # warm-up steps
    final_lr_fraction: float = 0.05  # cosine: the last step's lr as a fraction of lr
    max_grad_norm: float | None = 1.0  # gradient clipping by global norm; None: off
    ema_decay: float | None = None  # EMA of the trained weights, saved as the result; None: off
    snr_gamma: float | None = None  # Min-SNR-γ loss weighting (Hang et al. 2023); 5 is the paper's
    offset_noise: float = 0.0  # Guttenberg 2023; 0.1 is usual
    caption_dropout: float = 0.0  # share of captions replaced by "" (for classifier-free guidance)
    shuffle_tags: bool = False  # shuffle comma-separated tags of each caption ...
    keep_tags: int = 1  # ... keeping the first N in place
    mixed_precision: str = "no"  # no | bf16 | fp16: autocast of the UNet's forward pass
    frozen_in_mixed_precision: bool = True  # DenoisingObjective: frozen networks in that dtype (module docstring)
    gradient_checkpointing: bool = False
    cache_latents: bool = False  # encode each image once (posterior parameters; sampled per step)
    cache_dir: str | None = None  # with cache_latents: also keep them on disk here, keyed by content hash
    checkpoint_every: int = 0  # steps between checkpoints (needs ``out``); 0: none
    validation_prompts: tuple[str, ...] = ()  # rendered at each checkpoint and at the end (needs ``out``)
    validation_steps: int | tuple[int, ...] = 25  # sampling steps; several: each prompt at each, and grid.png
    validation_guidance: float = 7.5  # guidance scale of the validation images
    seed: int = 0
    seed_stream: str = "finetune"  # names the random streams (see the module docstring)
    image: ImageOptions = field(default_factory=ImageOptions)  # resolution, bucketing, crops, flips (files)

    def __post_init__(self) -> None:
        checks = [
            (self.method in METHODS, f"method {self.method!r} is not one of {', '.join(METHODS)}"),
            (
                self.lr_schedule in LR_SCHEDULES,
                f"lr schedule {self.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}",
            ),
            (
                self.mixed_precision in MIXED_PRECISION,
                f"mixed precision {self.mixed_precision!r} is not one of {', '.join(MIXED_PRECISION)}",
            ),
            (
                self.max_steps >= 1 and self.batch_size >= 1 and self.gradient_accumulation >= 1,
                "max_steps, batch_size and gradient_accumulation must be at least 1",
            ),
            (self.rank >= 1, "the LoRA rank must be at least 1"),
            (0.0 <= self.caption_dropout <= 1.0, "caption dropout must be within [0, 1]"),
            (self.ema_decay is None or 0.0 <= self.ema_decay < 1.0, "the EMA decay must be within [0, 1)"),
            (
                self.method != "dreambooth" or (self.instance_prompt and self.class_prompt),
                "dreambooth needs an instance prompt and a class prompt",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise FixativeError(message)


def step_seed(seed: int, stream: str, index: int) -> int:
    """A seed per (run seed, stream name, micro-batch index): any step's draws can be redone alone."""
    return (seed * 1_000_003 + sum(ord(c) * 131**i for i, c in enumerate(stream)) * 10_007 + index) % 2**63


@dataclass
class Batch:
    """One micro-batch of this process, as an objective's ``loss`` receives it."""

    latents: torch.Tensor  # (B, 4, h, w) scaled latents, sampled from the VAE posterior with this step's generator
    input_ids: torch.Tensor  # (B, 77) token ids of the captions (after dropout / shuffling)
    text_embeddings: torch.Tensor | None  # (B, 77, D) from the frozen text encoder; None when it trains
    is_prior: torch.Tensor  # (B,) bool: DreamBooth prior (class) images, last in the batch
    captions: list[str]


class Objective(Protocol):
    trains_text_encoder: bool

    def setup(self, model, config: FinetuneConfig) -> None: ...
    def parameters(self) -> list[nn.Parameter]: ...
    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor: ...
    def after_step(self) -> None: ...
    def finish(self) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def save(self, out: Path) -> None: ...


class DenoisingObjective:
    """The denoising loss (DDPM's simple loss with the model's prediction type, Min-SNR and offset noise
    optional) on the UNet, and the text encoder when asked: every weight (full, dreambooth) or LoRA
    adapters on the attention projections (lora). DreamBooth: instance mean + λ · prior mean."""

    def __init__(self) -> None:
        self.model = None
        self.ema: EMA | None = None

    def setup(self, model, config: FinetuneConfig) -> None:
        self.model, self.config = model, config
        self.schedule = NoiseSchedule.from_config(model.scheduler_config)
        self.trains_text_encoder = config.train_text_encoder
        model.vae.requires_grad_(False).eval()
        dtype = MIXED_PRECISION[config.mixed_precision] if config.frozen_in_mixed_precision else None
        frozen = ["vae"] + ([] if config.train_text_encoder else ["text_encoder"])
        frozen += ["unet"] if config.method == "lora" else []
        # the frozen networks' own dtypes, restored by finish()
        self.frozen_dtypes = {name: getattr(model, name).dtype for name in frozen} if dtype else {}
        for name in self.frozen_dtypes:
            getattr(model, name).to(dtype)
        if config.method == "lora":
            model.unet.requires_grad_(False)
            model.text_encoder.requires_grad_(False)
            adapters = inject_lora(model.unet, config.rank, config.alpha, config.lora_targets)
            if config.train_text_encoder:
                adapters += inject_lora(model.text_encoder, config.rank, config.alpha, TEXT_ENCODER_TARGETS)
            for adapter in adapters:  # trained in the UNet's own dtype, over frozen base weights in ``dtype``
                adapter.data = adapter.data.to(self.frozen_dtypes.get("unet", adapter.dtype))
        else:
            model.unet.requires_grad_(True)
            model.text_encoder.requires_grad_(config.train_text_encoder)
        model.unet.train()
        model.text_encoder.train(config.train_text_encoder)
        if config.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
        if config.ema_decay is not None:
            self.ema = EMA(self._trained, config.ema_decay, trainable_only=True)

    @property
    def _trained(self) -> nn.ModuleDict:
        """The trained networks under one module, so that EMA and state dicts see one name space."""
        networks = {"unet": self.model.unet}
        if self.trains_text_encoder:
            networks["text_encoder"] = self.model.text_encoder
        return nn.ModuleDict(networks)

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self._trained.parameters() if p.requires_grad]

    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        text_embeddings = batch.text_embeddings
        if text_embeddings is None:
            text_embeddings = self.model.text_encoder(batch.input_ids).last_hidden_state
        losses = denoising_losses(
            self.model.unet,
            batch.latents,
            text_embeddings,
            self.schedule,
            self.model.prediction_type,
            generator,
            snr_gamma=self.config.snr_gamma,
            autocast_dtype=MIXED_PRECISION[self.config.mixed_precision],
            offset_noise=self.config.offset_noise,
        )
        if not batch.is_prior.any():
            return losses.mean()
        prior = batch.is_prior.to(losses.device)
        return losses[~prior].mean() + self.config.prior_loss_weight * losses[prior].mean()

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.update(self._trained)

    def finish(self) -> None:
        if self.ema is not None:
            self.ema.copy_to(self._trained)
        for name, dtype in self.frozen_dtypes.items():
            getattr(self.model, name).to(dtype)
        self.model.unet.eval()
        self.model.text_encoder.eval()

    def state_dict(self) -> dict:
        return trained_state(self._trained, self.ema)

    def load_state_dict(self, state: dict) -> None:
        load_trained_state(self._trained, self.ema, state)

    def save(self, out: Path) -> None:
        if self.config.method == "lora":
            save_lora({"unet": self.model.unet, "text_encoder": self.model.text_encoder}, out)
        else:
            save_model_into(self.model, out)


# ---------------------------------------------------------------- data


def trained_state(module: nn.Module, ema: EMA | None) -> dict:
    """An objective's checkpoint: copies of the parameters it trains (those requiring grad) and its EMA."""
    trained = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    return {"trained": trained, "ema": ema.state_dict() if ema is not None else None}


def load_trained_state(module: nn.Module, ema: EMA | None, state: dict) -> None:
    """Puts back what :func:`trained_state` saved."""
    parameters = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in state["trained"].items():
            parameters[name].copy_(value)
    if ema is not None:
        ema.load_state_dict(state["ema"])


def image_options_for(model, resolution: int | None = None, **options) -> ImageOptions:
    """Image options fitted to ``model``: the side it was trained at (UNet sample size x VAE factor) unless
    ``resolution`` is given, and buckets whose sides the VAE and every UNet down-sampling divide."""
    vae_factor = model.size_multiple
    unet_factor = 2 ** (len(model.unet.config.block_out_channels) - 1)
    return ImageOptions(
        resolution=resolution or model.unet.config.sample_size * vae_factor,
        bucket_step=vae_factor * unet_factor,
        **options,
    )


def as_image_set(data, options: ImageOptions, caption_column: str = "text") -> ImageSet:
    """``ImageCaptions``, an ``ImageSet``, or a path (an image folder; a ``.parquet`` of LAION-style metadata)."""
    if isinstance(data, ImageSet):
        return data
    if isinstance(data, ImageCaptions):
        return TensorImages(data, options.random_flip)
    if isinstance(data, (str, Path)):
        if Path(data).suffix == ".parquet":
            raise FixativeError("a parquet holds metadata only: read it with core.datasets.laion_parquet(path, images)")
        return image_folder(data, options, caption_column)
    raise FixativeError(f"cannot train on {type(data).__name__}; give ImageCaptions, an ImageSet or a folder")


class _Sampler:
    """Draws this process's micro-batches (see the module docstring) and turns them into ``Batch``es."""

    def __init__(
        self,
        model,
        data: ImageSet,
        prior: ImageSet | None,
        config: FinetuneConfig,
        objective,
        rank: int,
        world: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.model, self.data, self.prior, self.config = model, data, prior, config
        self.rank, self.world, self.device, self.dtype = rank, world, device, dtype  # dtype: the latents'
        self.groups = data.groups()
        self.bucket_keys = list(self.groups)
        self.prior_groups = prior.groups() if prior is not None else {}
        if prior is not None and not set(self.groups) <= set(self.prior_groups):
            raise FixativeError(
                f"prior images come in sizes {sorted(self.prior_groups)} but the instance images need "
                f"{sorted(self.groups)}; give prior images of the instance images' sizes"
            )
        self.trains_text = objective.trains_text_encoder
        self.posteriors: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.text_cache: dict[str, torch.Tensor] = {}
        self.text_key: str | None = None
        if config.cache_latents:
            for name, images in (("data", data), ("prior", prior)):
                if images is not None:
                    self._cache_posteriors(name, images)

    def _cache_posteriors(self, name: str, images: ImageSet) -> None:
        if not images.deterministic():
            raise FixativeError(
                "cached latents are encoded once, so they cannot have random crops or flips; "
                "turn those off or do not cache latents"
            )
        cache = Path(self.config.cache_dir) if self.config.cache_dir else None
        vae_key = _module_hash(self.model.vae) if cache else ""
        for indices in images.groups().values():
            todo = []
            for index in indices:
                file = cache / f"latents-{_hash(vae_key + images.key(index))}.pt" if cache else None
                if file is not None and file.exists():
                    self.posteriors[name, index] = torch.load(file, weights_only=True)
                else:
                    todo.append(index)
            for start in range(0, len(todo), 64):  # encoded in chunks of 64
                chunk = todo[start : start + 64]
                mean, std = self._encode(torch.stack([images.pixels(i, random.Random(0)) for i in chunk]))
                for j, index in enumerate(chunk):
                    self.posteriors[name, index] = (mean[j].clone(), std[j].clone())
                    if cache is not None:
                        cache.mkdir(parents=True, exist_ok=True)
                        _save_atomic(
                            self.posteriors[name, index], cache / f"latents-{_hash(vae_key + images.key(index))}.pt"
                        )

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.model.vae
        posterior = vae.encode(pixels.to(vae.device, vae.dtype))
        return posterior.mean.float().cpu(), posterior.std.float().cpu()

    def _posterior(self, name: str, images: ImageSet, indices: list[int], rng: random.Random):
        if self.config.cache_latents:
            pairs = [self.posteriors[name, i] for i in indices]
            return torch.stack([m for m, _ in pairs]), torch.stack([s for _, s in pairs])
        return self._encode(torch.stack([images.pixels(i, rng) for i in indices]))

    def batch(self, micro: int) -> tuple[Batch, torch.Generator]:
        config, seed, stream = self.config, self.config.seed, self.config.seed_stream
        generator = torch.Generator().manual_seed(step_seed(seed, stream, micro))
        if len(self.bucket_keys) > 1:
            sizes = torch.tensor([len(self.groups[k]) for k in self.bucket_keys], dtype=torch.float64)
            bucket = self.bucket_keys[int(torch.multinomial(sizes, 1, generator=generator))]
        else:
            bucket = self.bucket_keys[0]
        members = self.groups[bucket]
        batch, prior_batch = config.batch_size, config.prior_batch_size or config.batch_size
        picks = torch.randint(0, len(members), (batch * self.world,), generator=generator)
        indices = [members[i] for i in picks[self.rank * batch : (self.rank + 1) * batch].tolist()]
        prior_indices = []
        if self.prior is not None:
            prior_members = self.prior_groups[bucket]
            prior_picks = torch.randint(0, len(prior_members), (prior_batch * self.world,), generator=generator)
            prior_indices = [
                prior_members[i] for i in prior_picks[self.rank * prior_batch : (self.rank + 1) * prior_batch].tolist()
            ]
        if self.rank:
            generator.manual_seed(step_seed(seed, f"{stream}-rank{self.rank}", micro))
        augment = random.Random(step_seed(seed, stream + "-augment", micro))
        mean, std = self._posterior("data", self.data, indices, augment)
        if prior_indices:
            prior_mean, prior_std = self._posterior("prior", self.prior, prior_indices, augment)
            mean, std = torch.cat([mean, prior_mean]), torch.cat([std, prior_std])
        noise = torch.randn(mean.shape, generator=generator)
        latents = (mean + std * noise) * self.model.vae.config.scaling_factor

        captions = [config.instance_prompt or self.data.captions[i] for i in indices]
        if config.shuffle_tags:
            tags = random.Random(step_seed(seed, stream + "-tags", micro))
            captions = [shuffle_tags(c, config.keep_tags, tags) for c in captions]
        captions = drop_captions(
            captions, config.caption_dropout, random.Random(step_seed(seed, stream + "-captions", micro))
        )
        captions += [config.class_prompt or self.prior.captions[i] for i in prior_indices]
        input_ids = self.model.tokenizer(captions).to(self.device)
        text_embeddings = None if self.trains_text else self._frozen_text(captions, input_ids)
        is_prior = torch.tensor([False] * len(indices) + [True] * len(prior_indices))
        batch = Batch(latents.to(self.device, self.dtype), input_ids, text_embeddings, is_prior, captions)
        return batch, generator

    @torch.no_grad()
    def _frozen_text(self, captions: list[str], input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of the frozen text encoder, kept per caption (and, with a cache folder, on disk keyed by
        the encoder's weights and the caption)."""
        cache = Path(self.config.cache_dir) if self.config.cache_latents and self.config.cache_dir else None
        if cache is not None and self.text_key is None:
            self.text_key = _module_hash(self.model.text_encoder)
        missing = []
        for i, caption in enumerate(captions):
            if caption in self.text_cache:
                continue
            file = cache / f"text-{_hash(self.text_key + caption)}.pt" if cache is not None else None
            if file is not None and file.exists():
                self.text_cache[caption] = torch.load(file, weights_only=True).to(self.device)
            elif i not in missing and caption not in [captions[j] for j in missing]:
                missing.append(i)
        if missing:
            embeddings = self.model.text_encoder(input_ids[missing]).last_hidden_state
            for j, i in enumerate(missing):
                self.text_cache[captions[i]] = embeddings[j]
                if cache is not None:
                    cache.mkdir(parents=True, exist_ok=True)
                    _save_atomic(embeddings[j].cpu().clone(), cache / f"text-{_hash(self.text_key + captions[i])}.pt")
        return torch.stack([self.text_cache[c] for c in captions])


def _hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def _module_hash(module: nn.Module) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def generated_prior(model, config: FinetuneConfig, size: tuple[int, int]) -> ImageCaptions:
    """DreamBooth's class images: ``prior_images`` renders of ``class_prompt`` by the model before training
    (seeds seed·10⁶ + i, its default scheduler, 25 steps, guidance 7.5)."""
    from .pipelines import generate

    seeds = [config.seed * 1_000_000 + i for i in range(config.prior_images)]
    pixels = torch.cat(
        [
            generate(
                model,
                config.class_prompt,
                seed=[s],
                height=size[1],
                width=size[0],
                num_inference_steps=25,
                output="images",
                progress=False,
            )
            for s in seeds
        ]
    )
    return ImageCaptions(pixels.cpu().float() * 2 - 1, [config.class_prompt] * len(seeds))


# ---------------------------------------------------------------- the loop


def _latest_checkpoint(out: Path | None) -> Path | None:
    if out is None or not (out / "checkpoints").is_dir():
        return None
    steps = sorted(
        (int(p.name.split("-")[1]), p) for p in (out / "checkpoints").glob("step-*") if (p / "state.pt").exists()
    )
    return steps[-1][1] if steps else None


def _lr_schedule(optimizer, config: FinetuneConfig):
    if config.lr_schedule == "cosine":
        return warmup_cosine(optimizer, config.max_steps, max(1, config.warmup), config.final_lr_fraction)
    return warmup_constant(optimizer, config.warmup)


def fine_tune(
    model,
    data,
    config: FinetuneConfig = FinetuneConfig(),
    objective: Objective | None = None,
    *,
    out: str | Path | None = None,
    prior_data=None,
    resume: bool = False,
    caption_column: str = "text",
    save: bool = True,
    device: str = "auto",
    progress: bool = True,
    log: Callable[[str], None] = print,
):
    """Train ``model`` (a StableDiffusionModel, in place) on ``data`` with ``config``; returns the model.

    objective: what is trained and how (default ``DenoisingObjective``; see the module docstring).
    out: a folder for checkpoints (``checkpoints/step-N``), validation images and the result; without it
    nothing is written; ``save=False``: checkpoints and validation images only, no result. prior_data:
    DreamBooth's class images (as ``data``). resume: continue from the latest checkpoint in ``out`` (without
    it, a folder with checkpoints is refused). device: "auto" (accelerate's device for this process; the CPU on a
    machine without a GPU) or "cpu".
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    # accelerate joins the processes of a multi-process launch (torchrun, accelerate launch) in a CPU process group
    # only when told that the device is the CPU; otherwise each process would train alone
    accelerator = Accelerator(cpu=device == "cpu" or auto_device().type == "cpu")
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    out = Path(out) if out is not None else None
    checkpoint = _latest_checkpoint(out)
    if checkpoint is not None and not resume:
        raise FixativeError(f"{out} already has checkpoints; resume from them or choose another output folder")
    if (config.checkpoint_every or config.validation_prompts) and out is None:
        raise FixativeError("checkpoints and validation images need an output folder")
    model.to(device)
    dtype = model.unet.dtype  # the UNet's own (objectives may hold frozen weights in another)
    objective = objective if objective is not None else DenoisingObjective()
    objective.setup(model, config)
    warning = emulated_bf16_warning(device, "--mixed-precision no trains in fp32")
    if config.mixed_precision == "bf16" and warning:
        log(f"fine-tune: warning: {warning}")

    images = as_image_set(data, config.image, caption_column)
    if len(images) == 0:
        raise FixativeError("no training images left to train on" + _skipped_note(images))
    if images.skipped:
        log(f"fine-tune: {len(images)} images; skipped{_skipped_note(images)}")
    prior = None
    if prior_data is not None:
        prior = as_image_set(prior_data, config.image, caption_column)
    elif config.class_prompt and config.prior_images:
        sizes = list(images.groups())
        if len(sizes) > 1:
            raise FixativeError("generated prior images need instance images of one size; turn bucketing off")
        prior = TensorImages(generated_prior(model, config, sizes[0]))
    with accelerator.main_process_first():  # the main process fills the latent cache, the others read it
        sampler = _Sampler(model, images, prior, config, objective, rank, world, device, dtype)

    parameters = objective.parameters()
    # the multi-tensor update: equal bit for bit to the per-tensor loop, and faster. Not the fused kernel: it does
    # not bump the parameters' version counters, which caches keyed on them (upsampling.py) rely on
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    schedule = _lr_schedule(optimizer, config)
    scaler = torch.amp.GradScaler(device.type) if config.mixed_precision == "fp16" else None
    start = 0
    if checkpoint is not None:
        state = torch.load(checkpoint / "state.pt", weights_only=True, map_location="cpu")
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if scaler is not None:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
        log(f"fine-tune: resuming from {checkpoint} (step {start} of {config.max_steps})")
    if out is not None and accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        from .provenance import provenance

        base = {"base": model.source} if Path(str(model.source)).exists() else None
        record = {"config": asdict(config), "provenance": provenance(base, device, dtype)}
        tmp = out / ".finetune_config.json.tmp"
        tmp.write_text(json.dumps(record, indent=1, default=str))
        os.replace(tmp, out / "finetune_config.json")

    bar = tqdm(
        range(start, config.max_steps),
        initial=start,
        total=config.max_steps,
        desc="fine-tune",
        unit="step",
        disable=not progress or not accelerator.is_main_process,
        dynamic_ncols=True,
    )
    average = None
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro_step in range(config.gradient_accumulation):
            batch, generator = sampler.batch(step * config.gradient_accumulation + micro_step)
            loss = objective.loss(batch, generator) / config.gradient_accumulation
            (scaler.scale(loss) if scaler is not None else loss).backward()
            step_loss += loss.detach()
        if world > 1:
            for p in parameters:
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
            step_loss = accelerator.reduce(torch.as_tensor(step_loss, device=device), reduction="mean")
        if scaler is not None:
            scaler.unscale_(optimizer)
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        schedule.step()
        objective.after_step()
        step_loss = float(step_loss)
        if not math.isfinite(step_loss):
            raise FixativeError(f"the loss is {step_loss} at step {step + 1}; lower the learning rate")
        average = step_loss if average is None else 0.95 * average + 0.05 * step_loss
        bar.set_postfix(loss=f"{average:.4f}", lr=f"{schedule.get_last_lr()[0]:.2e}")
        done = step + 1
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.max_steps:
            if accelerator.is_main_process:
                _write_checkpoint(out, done, objective, optimizer, schedule, scaler)
                _validate(model, config, out / "validation" / f"step-{done}")
            accelerator.wait_for_everyone()
    bar.close()
    optimizer.zero_grad(set_to_none=True)  # gradients and moments freed before finish() casts networks back
    optimizer.state.clear()
    objective.finish()
    if out is not None and accelerator.is_main_process:
        if save:
            objective.save(out)
        _validate(model, config, out / "validation" / "final")
        if (out / "checkpoints").exists():
            shutil.rmtree(out / "checkpoints")
    accelerator.wait_for_everyone()
    return model


def save_model_into(model, out: Path) -> None:
    """``model`` as a diffusers folder in ``out`` (which may hold other files): written next to it, then each
    entry (model_index.json, unet/, vae/, ...) renamed into place."""
    from .checkpoints import save_diffusers

    staging = out / ".model.partial"
    if staging.exists():
        shutil.rmtree(staging)
    save_diffusers(model, staging)
    for entry in staging.iterdir():
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()


def _skipped_note(images: ImageSet) -> str:
    return "".join(f"; {count} {reason}" for reason, count in sorted(images.skipped.items()))


def _write_checkpoint(out: Path, step: int, objective, optimizer, schedule, scaler) -> None:
    """checkpoints/step-N/state.pt, written to a temporary folder and renamed; older checkpoints removed."""
    folder = out / "checkpoints"
    tmp = folder / f".step-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    torch.save(
        {
            "step": step,
            "objective": objective.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "torch_rng": torch.get_rng_state(),
        },
        tmp / "state.pt",
    )
    os.replace(tmp, folder / f"step-{step}")
    for old in folder.glob("step-*"):
        if old.name != f"step-{step}":
            shutil.rmtree(old)


def _validate(model, config: FinetuneConfig, folder: Path) -> None:
    """The validation prompts rendered with the model's default scheduler, seed ``config.seed``, at each of
    ``config.validation_steps``: ``NN.png`` for one step count; ``NN-S-steps.png`` and ``grid.png`` (a row per
    prompt, a column per step count) for several."""
    if not config.validation_prompts:
        return
    from PIL import Image

    from .images import save_png
    from .pipelines import generate

    steps = config.validation_steps
    steps = (steps,) if isinstance(steps, int) else tuple(steps)
    was_training = model.unet.training
    model.unet.eval()
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, prompt in enumerate(config.validation_prompts):
        rows.append([])
        for count in steps:
            image = generate(
                model,
                prompt,
                num_inference_steps=count,
                guidance_scale=config.validation_guidance,
                seed=config.seed,
                progress=False,
            )[0]
            name = f"{index:02d}.png" if len(steps) == 1 else f"{index:02d}-{count}-steps.png"
            save_png(image, folder / name, {"prompt": prompt, "seed": config.seed, "steps": count})
            rows[-1].append(image)
    if len(steps) > 1:
        width, height = rows[0][0].size
        grid = Image.new("RGB", (width * len(steps), height * len(rows)))
        for row, images in enumerate(rows):
            for column, image in enumerate(images):
                grid.paste(image, (column * width, row * height))
        save_png(grid, folder / "grid.png", {"steps": ", ".join(map(str, steps)), "seed": config.seed})
    model.unet.train(was_training)
