"""``fixative toy build``: train the toy world's CLIP, VAE and UNet on the Toy Atelier, from a seed.

Stages, each resumable (a checkpoint every few steps) and finished by a ``done.json`` marker:

    atelier   paint the data set (core/toy/atelier.py)
    clip      a small CLIP (transformers' CLIPModel), image and text towers trained contrastively on the
              captions of *all* artists; its text tower has the architecture of SD's CLIP text encoder
    vae       a small AutoencoderKL (4 latent channels, 64x64 -> 16x16) on all artists' images
    unet      a small UNet on the VAE's latents, conditioned on the CLIP's text tower, held-out artists
              excluded, 10% caption dropout for classifier-free guidance. Unlike SD 1.x, whose CLIP is
              frozen, the text tower is fine-tuned jointly with the UNet (initialised from the contrastive
              CLIP): a tower this narrow does not separate the artists well enough when frozen. The CLIP
              folder keeps the contrastive tower.
    assemble  the diffusers-format Stable Diffusion folder ``sd/`` and the CLIP folder ``clip/``

Everything happens in a work folder ``<FIXATIVE_HOME>/toy/.work-<size>-seed<seed>``; the finished build
is renamed to ``<FIXATIVE_HOME>/toy/<size>-seed<seed>`` at the very end, so a half-finished build is
never taken for a finished one. Networks are stored in fp16 (the shipped weights must stay small) and
every later stage uses the stored, fp16-rounded weights, so a resumed build equals an uninterrupted one.
The network configs are ``presets.TOY_*`` (the ``toy`` preset).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import AutoencoderKLConfig, CLIPTextConfig, UNetConfig
from ..errors import FixativeError
from ..finetune import step_seed
from ..presets import TOY_SCHEDULER, TOY_TEXT, TOY_UNET, TOY_VAES
from ..provenance import provenance
from ..text_encoder import CLIPTextModel
from ..tokenizer import CLIPTokenizer
from ..training import warmup_cosine
from ..unet import UNet2DConditionModel
from ..vae import AutoencoderKL
from . import atelier, build_folder
from .atelier import AtelierConfig

TOY_VISION = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "image_size": 64,
    "patch_size": 8,
    "hidden_act": "quick_gelu",
}  # the toy CLIP's image tower
CLIP_IMAGE_MEAN = [0.5, 0.5, 0.5]  # the toy CLIP sees pixels in [-1, 1]: (x - 0.5) / 0.5 of [0, 1] images
CLIP_IMAGE_STD = [0.5, 0.5, 0.5]


@dataclass(frozen=True)
class BuildPlan:
    """How much of everything one build size trains."""

    images_per_artist: int
    clip_steps: int
    clip_batch: int
    clip_lr: float
    vae_steps: int
    vae_batch: int
    vae_lr: float
    vae_crop: int  # 85% of the VAE steps see random crops this large (pixels), the rest whole images
    unet_steps: int
    unet_batch: int
    unet_lr: float
    unet_offset_noise: float  # Guttenberg 2023; without it samples keep the average painting's colours
    caption_dropout: float
    checkpoint_every: int


PLANS = {
    "full": BuildPlan(
        images_per_artist=160,
        clip_steps=400,
        clip_batch=64,
        clip_lr=2e-3,
        vae_steps=1000,
        vae_batch=16,
        vae_lr=2e-3,
        vae_crop=32,
        unet_steps=3000,
        unet_batch=32,
        unet_lr=1e-3,
        unet_offset_noise=0.1,
        caption_dropout=0.1,
        checkpoint_every=50,
    ),
    "ci": BuildPlan(
        images_per_artist=8,
        clip_steps=3,
        clip_batch=16,
        clip_lr=2e-3,
        vae_steps=4,
        vae_batch=4,
        vae_lr=2e-3,
        vae_crop=32,
        unet_steps=3,
        unet_batch=4,
        unet_lr=1e-3,
        unet_offset_noise=0.1,
        caption_dropout=0.1,
        checkpoint_every=2,
    ),
}


def _threads() -> int:
    """All cores on an idle machine, one on a busy one: where other processes share the cores, torch's
    threads wait for each other at every barrier and two run slower than one."""
    cores = os.cpu_count() or 1
    return 1 if os.getloadavg()[0] > cores else cores


def _stage_seed(seed: int, stage: str, step: int) -> int:
    """A seed per (build seed, stage, step): resuming at any step redraws exactly the same batch."""
    return step_seed(seed, stage, step)


def _generator(seed: int, stage: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(_stage_seed(seed, stage, step))


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _train(
    stage: str,
    folder: Path,
    steps: int,
    modules: dict,
    step_fn: Callable[[int], float],
    checkpoint_every: int,
    progress: bool,
) -> None:
    """Run ``step_fn(step)`` for the steps not yet done, resuming from ``folder/checkpoint.pt``.

    ``modules``: the state-bearing objects (networks, optimizers, lr schedules) by name.
    """
    from tqdm.auto import tqdm

    checkpoint = folder / "checkpoint.pt"
    start = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        for name, module in modules.items():
            module.load_state_dict(state[name])
        start = state["step"]
    bar = tqdm(
        range(start, steps),
        desc=f"toy build: {stage}",
        unit="step",
        initial=start,
        total=steps,
        disable=not progress,
        dynamic_ncols=True,
    )
    average = None
    for step in bar:
        loss = step_fn(step)
        average = loss if average is None else 0.95 * average + 0.05 * loss
        bar.set_postfix(loss=f"{average:.4f}")
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            _save_atomic({"step": step + 1, **{n: m.state_dict() for n, m in modules.items()}}, checkpoint)
    bar.close()


def _load_images(rows: list[dict]) -> torch.Tensor:
    """uint8 (N, 3, H, W)."""
    return torch.from_numpy(np.stack([np.asarray(Image.open(r["path"]).convert("RGB")) for r in rows])).permute(
        0, 3, 1, 2
    )


def _to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float pixels in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def _finish(folder: Path, info: dict) -> None:
    (folder / "done.json").write_text(json.dumps(info, indent=1))
    (folder / "checkpoint.pt").unlink(missing_ok=True)


def _done(folder: Path) -> bool:
    return (folder / "done.json").exists()


# ---------------------------------------------------------------- CLIP


def toy_clip_model():
    """A fresh (random) toy CLIP: transformers' CLIPModel with the toy text and vision towers."""
    import transformers

    text = TOY_TEXT.to_diffusers()
    text = {k: v for k, v in text.items() if k not in ("architectures", "model_type", "torch_dtype")}
    config = transformers.CLIPConfig(
        text_config=text, vision_config=dict(TOY_VISION), projection_dim=TOY_TEXT.projection_dim
    )
    return transformers.CLIPModel(config)


def _augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flips, a random amount of blur and a little noise: the CLIP must also judge VAE reconstructions and
    generated images, which are softer than the paintings."""
    batch = pixels.shape[0]
    flip = torch.rand(batch, generator=generator) < 0.5
    pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    amount = torch.rand(batch, generator=generator) * (torch.rand(batch, generator=generator) < 0.5)
    pixels = torch.lerp(pixels, blurred, amount[:, None, None, None])
    return pixels + 0.03 * torch.rand(batch, 1, 1, 1, generator=generator) * torch.randn(
        pixels.shape, generator=generator
    )


def caption_table(artists: list[str]) -> list[str]:
    """Every caption of these artists, artist-major: index = artist * len(SUBJECTS) + subject."""
    return [atelier.caption(subject, artist) for artist in artists for subject in atelier.SUBJECTS]


def _copy_clip(work: Path, clip: Path) -> None:
    """The CLIP stage from a finished toy CLIP folder (``--clip``): two worlds built so share one judge."""
    folder = work / "clip"
    if _done(folder):
        return
    if not (clip / "config.json").is_file() or not (clip / "model.safetensors").is_file():
        raise FixativeError(f"--clip {clip}: not a toy CLIP folder (config.json and model.safetensors)")
    if (folder / "model").exists():
        shutil.rmtree(folder / "model")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(clip, folder / "model")
    _finish(folder, {"copied_from": str(clip)})


def _train_clip(work: Path, data: Path, plan: BuildPlan, seed: int, progress: bool) -> None:
    folder = work / "clip"
    if _done(folder):
        return
    folder.mkdir(parents=True, exist_ok=True)
    rows = atelier.load_split(data, "train")
    images = _load_images(rows)
    artists = atelier.artist_names()
    captions = caption_table(artists)
    labels = torch.tensor([captions.index(atelier.caption(r["subject"], r["artist"])) for r in rows])
    tokenizer = CLIPTokenizer.bundled()
    input_ids = tokenizer(captions)
    # The text tower is causal: the pooled output at EOS depends on the tokens up to EOS only, so the
    # padding after the longest caption can be cut for training (same outputs, a fraction of the work).
    input_ids = input_ids[:, : int((input_ids == tokenizer.eos_token_id).int().argmax(1).max()) + 1]
    torch.manual_seed(_stage_seed(seed, "clip-init", 0))
    clip = toy_clip_model()
    optimizer = torch.optim.AdamW(clip.parameters(), lr=plan.clip_lr, weight_decay=0.1)
    schedule = warmup_cosine(optimizer, plan.clip_steps, max(1, plan.clip_steps // 20))

    def step_fn(step: int) -> float:
        generator = _generator(seed, "clip", step)
        index = torch.randint(0, len(rows), (plan.clip_batch,), generator=generator)
        pixels = _augment(_to_pixels(images[index]), generator)
        image_embeds = F.normalize(clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        text_embeds = F.normalize(clip.get_text_features(input_ids=input_ids).pooler_output, dim=-1)
        logits = clip.logit_scale.exp().clamp(max=100) * image_embeds @ text_embeds.T  # (batch, captions)
        # image -> caption: a softmax over every caption of the data set (CLIP eq. of Radford et al. 2021,
        # Fig. 3, with all captions as negatives, since many images share one caption)
        loss_images = F.cross_entropy(logits, labels[index])
        # caption -> image: over the batch, each caption's positives are all its images
        positives = (labels[index][None, :] == torch.arange(len(captions))[:, None]).float()  # (captions, batch)
        present = positives.sum(1) > 0
        targets = positives[present] / positives[present].sum(1, keepdim=True)
        loss_texts = -(targets * logits.T[present].log_softmax(-1)).sum(1).mean()
        loss = (loss_images + loss_texts) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        return loss.item()

    clip.train()
    _train(
        "clip",
        folder,
        plan.clip_steps,
        {"clip": clip, "optimizer": optimizer, "schedule": schedule},
        step_fn,
        plan.checkpoint_every,
        progress,
    )
    save_clip(clip.eval(), tokenizer, folder / "model")
    _finish(folder, {"captions": captions})


def save_clip(clip, tokenizer: CLIPTokenizer, folder: Path) -> None:
    """The CLIP folder: fp16 weights, tokenizer and image processor files that transformers loads."""
    import transformers

    clip.to(torch.float16).save_pretrained(folder)
    clip.to(torch.float32)
    # released folders say float32 whatever their weights are stored in: transformers then builds the model in
    # float32 by default, as diffusers does its networks, and the two work together without a dtype argument
    config_file = folder / "config.json"
    config = {k: v for k, v in json.loads(config_file.read_text()).items() if k != "torch_dtype"}
    config_file.write_text(json.dumps({**config, "dtype": "float32"}, indent=2, sort_keys=True) + "\n")
    tokenizer.save(folder)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": TOY_VISION["image_size"]},
        crop_size={"height": TOY_VISION["image_size"], "width": TOY_VISION["image_size"]},
        image_mean=CLIP_IMAGE_MEAN,
        image_std=CLIP_IMAGE_STD,
    ).save_pretrained(folder)


def load_clip(folder: str | Path, dtype: torch.dtype = torch.float32):
    import transformers

    return transformers.CLIPModel.from_pretrained(folder, dtype=dtype).eval()


def text_encoder_from_clip(clip) -> CLIPTextModel:
    """Our CLIPTextModel holding the CLIP's text tower (same keys: ``text_model.*``)."""
    text_encoder = CLIPTextModel(TOY_TEXT)
    state = {k: v for k, v in clip.state_dict().items() if k.startswith("text_model.")}
    text_encoder.load_state_dict(state, strict=True)
    return text_encoder.float().eval()


# ---------------------------------------------------------------- VAE


def _train_vae(
    work: Path, data: Path, plan: BuildPlan, seed: int, progress: bool, vae_config: AutoencoderKLConfig
) -> None:
    folder = work / "vae"
    if _done(folder):
        return
    folder.mkdir(parents=True, exist_ok=True)
    images = _load_images(atelier.load_split(data, "train"))
    torch.manual_seed(_stage_seed(seed, "vae-init", 0))
    vae = AutoencoderKL(vae_config).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=plan.vae_lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, plan.vae_steps, max(1, plan.vae_steps // 20))
    crop_steps = plan.vae_steps * 17 // 20
    size = images.shape[-1]

    def step_fn(step: int) -> float:
        generator = _generator(seed, "vae", step)
        index = torch.randint(0, len(images), (plan.vae_batch,), generator=generator)
        pixels = _to_pixels(images[index])
        if step < crop_steps and plan.vae_crop < size:
            y, x = torch.randint(0, size - plan.vae_crop + 1, (2,), generator=generator).tolist()
            pixels = pixels[..., y : y + plan.vae_crop, x : x + plan.vae_crop]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            posterior = vae.encode(pixels)
            noise = torch.randn(posterior.mean.shape, generator=generator)
            reconstruction = vae.decode(posterior.mean + posterior.std * noise)
        # MSE + a tiny KL to N(0, I) (LDM, Rombach et al. 2022, Sec. 3: "a slight KL-penalty")
        loss = F.mse_loss(reconstruction.float(), pixels) + 1e-6 * posterior.kl().float().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        return loss.item()

    _train(
        "vae",
        folder,
        plan.vae_steps,
        {"vae": vae, "optimizer": optimizer, "schedule": schedule},
        step_fn,
        plan.checkpoint_every,
        progress,
    )
    vae.eval()
    # LDM, Sec. 4.3.2 / SD's 0.18215: scale latents to unit standard deviation for the diffusion model
    with torch.no_grad():
        latents = torch.cat(
            [
                vae.encode(_to_pixels(chunk)).sample(_generator(seed, "vae-scale", i))
                for i, chunk in enumerate(images.split(64))
            ]
        )
    config = AutoencoderKLConfig(
        **{**asdict(vae_config), "scaling_factor": round(1.0 / latents.float().std().item(), 5)}
    )
    _save_network(vae, config, folder / "model")
    _finish(folder, {"scaling_factor": config.scaling_factor})


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # the work folder's networks, stored as diffusers stores them


def _save_network(network: torch.nn.Module, config, folder: Path) -> None:
    """One network's weights (fp16 safetensors) and config.json, as a diffusers sub-folder."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in network.state_dict().items()}
    save_file(state, folder / WEIGHTS_NAME)
    (folder / "config.json").write_text(json.dumps(config.to_diffusers(), indent=1))


def _load_network(cls, config_cls, folder: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    config = config_cls.from_diffusers(json.loads((folder / "config.json").read_text()))
    network = cls(config)
    network.load_state_dict({k: v.float() for k, v in load_file(folder / WEIGHTS_NAME).items()}, strict=True)
    return network.eval()


# ---------------------------------------------------------------- UNet


def toy_unet_config(vae_config: AutoencoderKLConfig) -> UNetConfig:
    """The toy UNet for latents of this VAE: TOY_UNET with its sample size at the VAE's latent resolution."""
    return replace(TOY_UNET, sample_size=vae_config.sample_size // vae_config.downsampling_factor)


def _train_unet(work: Path, data: Path, plan: BuildPlan, seed: int, progress: bool) -> None:
    """The UNet and the text tower, on ``fine_tune`` (core/finetune.py) with the posterior latents cached."""
    from ..datasets import ImageCaptions
    from ..finetune import FinetuneConfig, fine_tune
    from ..model import StableDiffusionModel

    folder = work / "unet"
    if _done(folder):
        return
    folder.mkdir(parents=True, exist_ok=True)
    rows = [r for r in atelier.load_split(data, "train") if not r["held_out"]]
    vae = _load_network(AutoencoderKL, AutoencoderKLConfig, work / "vae" / "model")
    text_encoder = text_encoder_from_clip(load_clip(work / "clip" / "model"))
    torch.manual_seed(_stage_seed(seed, "unet-init", 0))
    unet_config = toy_unet_config(vae.config)
    unet = UNet2DConditionModel(unet_config)
    model = StableDiffusionModel(
        unet, vae, text_encoder, CLIPTokenizer.bundled(), dict(TOY_SCHEDULER), source="fixative toy build"
    )
    # Min-SNR-5 weighting (converges ~3x faster, Hang et al. 2023) and bf16 autocast (1.6x faster on CPU):
    # the build must fit 45 minutes on 2 shared CPU cores
    config = FinetuneConfig(
        method="full",
        train_text_encoder=True,
        max_steps=plan.unet_steps,
        batch_size=plan.unet_batch,
        lr=plan.unet_lr,
        weight_decay=0.01,
        lr_schedule="cosine",
        warmup=max(1, plan.unet_steps // 20),
        max_grad_norm=1.0,
        snr_gamma=5.0,
        offset_noise=plan.unet_offset_noise,
        caption_dropout=plan.caption_dropout,
        mixed_precision="bf16",
        frozen_in_mixed_precision=False,
        cache_latents=True,
        checkpoint_every=plan.checkpoint_every,
        seed=seed,
        seed_stream="unet",
    )
    images = ImageCaptions(_to_pixels(_load_images(rows)), [r["text"] for r in rows])
    fine_tune(model, images, config, out=folder, resume=True, save=False, progress=progress, log=lambda _: None)
    _save_network(unet.eval(), unet_config, folder / "model")
    _save_network(text_encoder.eval(), TOY_TEXT, folder / "text_encoder")
    _finish(folder, {"captions": caption_table(atelier.artist_names(held_out=False)) + [""]})


# ---------------------------------------------------------------- assemble


def _assemble(work: Path) -> None:
    """sd/: the diffusers-format Stable Diffusion folder (the UNet stage's text encoder); clip/: the CLIP folder."""
    from ..checkpoints import save_diffusers
    from ..model import StableDiffusionModel

    sd = work / "sd"
    if sd.exists():
        shutil.rmtree(sd)
    model = StableDiffusionModel(
        unet=_load_network(UNet2DConditionModel, UNetConfig, work / "unet" / "model"),
        vae=_load_network(AutoencoderKL, AutoencoderKLConfig, work / "vae" / "model"),
        text_encoder=_load_network(CLIPTextModel, CLIPTextConfig, work / "unet" / "text_encoder"),
        tokenizer=CLIPTokenizer.bundled(),
        scheduler_config=dict(TOY_SCHEDULER),
        source="fixative toy build",
    )
    save_diffusers(model, sd, dtype=torch.float16)
    if (work / "clip-folder").exists():
        shutil.rmtree(work / "clip-folder")
    shutil.copytree(work / "clip" / "model", work / "clip-folder")


def build(
    out: str | Path | None = None,
    seed: int = 0,
    size: str = "full",
    vae: str = "f4",
    clip: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Train the toy world; returns the finished build folder (``sd/``, ``clip/``, ``atelier/``, ``build.json``).

    ``out``: the finished folder (default ``build_folder(size, seed)``). Resumes an interrupted build;
    a finished one is returned as it is. ``vae``: ``f4`` (the shipped toy VAE) or ``f8`` (the more SD-like
    variant of ``core/presets.py``; the UNet follows its 8x8 latents). ``clip``: a finished toy CLIP folder to
    use instead of training one (the CLIP judges the toy world: two worlds built on one share their judge).
    """
    if size not in PLANS:
        raise FixativeError(f"unknown toy build size {size!r}; choose one of {sorted(PLANS)}")
    if vae not in TOY_VAES:
        raise FixativeError(f"unknown toy VAE {vae!r}; choose one of {sorted(TOY_VAES)}")
    plan = PLANS[size]
    out = Path(out) if out is not None else build_folder(size, seed)
    if (out / "build.json").exists():
        log(f"toy build: {out} is already built")
        return out
    if out.exists():
        raise FixativeError(f"{out} exists but holds no finished toy build; remove it or choose another --out")
    work = out.with_name(f".work-{out.name}")
    work.mkdir(parents=True, exist_ok=True)
    variant_file = work / "vae_variant.txt"  # a resumed build must train on with the VAE it began with
    if variant_file.exists() and variant_file.read_text() != vae:
        raise FixativeError(
            f"{work} holds an interrupted build with --vae {variant_file.read_text()}; resume with that or remove it"
        )
    variant_file.write_text(vae)
    started = time.time()
    timings_file = work / "timings.json"  # seconds per stage, summed over interrupted and resumed sessions
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    data = work / "atelier"
    stages = [
        (
            "atelier",
            lambda: atelier.write_atelier(
                data, AtelierConfig(seed=seed, images_per_artist=plan.images_per_artist), progress=progress
            ),
        ),
        ("clip", lambda: _copy_clip(work, Path(clip)) if clip else _train_clip(work, data, plan, seed, progress)),
        ("vae", lambda: _train_vae(work, data, plan, seed, progress, TOY_VAES[vae])),
        ("unet", lambda: _train_unet(work, data, plan, seed, progress)),
        ("assemble", lambda: _assemble(work)),
    ]
    for number, (name, run) in enumerate(stages, 1):
        log(f"toy build: stage {number}/{len(stages)} {name} ({time.time() - started:.0f} s so far)")
        stage_start = time.time()
        torch.set_num_threads(_threads())
        run()
        timings[name] = round(timings.get(name, 0.0) + time.time() - stage_start, 1)
        timings_file.write_text(json.dumps(timings))
    info = {
        "seed": seed,
        "size": size,
        "vae": vae,
        "clip_copied_from": str(Path(clip).resolve()) if clip else None,
        "plan": asdict(plan),
        "stage_seconds": timings,
        "total_seconds": round(sum(timings.values()), 1),
        "cpu_count": os.cpu_count(),
    }
    # final layout: sd/, clip/, atelier/ (the data set, for the report), build.json
    final = work / "final"
    if final.exists():
        shutil.rmtree(final)
    final.mkdir()
    os.replace(work / "sd", final / "sd")
    os.replace(work / "clip-folder", final / "clip")
    os.replace(data, final / "atelier")
    # trained on the CPU, stored in float16; the models are named by where they end up
    info["provenance"] = provenance({"sd": final / "sd", "clip": final / "clip"}, device="cpu", dtype=torch.float16)
    for name, record in info["provenance"]["models"].items():
        record["source"] = str(out / name)
    (final / "build.json").write_text(json.dumps(info, indent=1))
    os.replace(final, out)
    shutil.rmtree(work)
    log(f"toy build: finished in {info['total_seconds']:.0f} s of training -> {out}")
    return out
