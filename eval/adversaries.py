"""What a mimic may do to published images before fine-tuning on them, to strip a protective perturbation.

The set of Hönig et al. 2024 ("Adversarial perturbations cannot reliably protect artists from generative AI"):
JPEG compression, Gaussian noise, Gaussian blur, down/up resizing, noisy purification (noise, then low-strength
img2img with the model), and IMPRESS (Cao et al. 2023). Each adversary maps images (B, 3, H, W) in [0, 1] to
images of the same shape, quantised to 8 bits as a file would hold them. Specs on the command line:
``jpeg:75``, ``noise:0.05``, ``blur:1.0``, ``resize:0.5``, ``purify:noise=0.05,strength=0.2``,
``impress:steps=100,budget=0.1,metric=ssim``.
"""

from __future__ import annotations

import io
import typing
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fixative.core.errors import FixativeError


def quantise(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images rounded to the nearest 8-bit level (what saving a PNG does)."""
    return (images.clamp(0, 1) * 255).round() / 255


def _to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def _from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).float() / 255


@dataclass
class JPEG:
    """Encode and decode with Pillow's libjpeg at ``quality`` (1-95), 4:2:0 chroma subsampling (its default)."""

    quality: int = 75

    def __call__(self, images: torch.Tensor, seed: int = 0, model=None) -> torch.Tensor:
        if not 1 <= self.quality <= 100:
            raise FixativeError(f"JPEG quality must be in 1..100, got {self.quality}")
        out = []
        for image in images:
            buffer = io.BytesIO()
            _to_pil(image).save(buffer, format="JPEG", quality=int(self.quality))
            out.append(_from_pil(Image.open(io.BytesIO(buffer.getvalue()))))
        return torch.stack(out).to(images.device)


@dataclass
class GaussianNoise:
    """x + σ ε, ε ~ N(0, I) from ``seed``; σ in [0, 1] pixel units."""

    sigma: float = 0.05

    def __call__(self, images: torch.Tensor, seed: int = 0, model=None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(images.shape, generator=generator, dtype=torch.float32).to(images.device)
        return quantise(images.float() + self.sigma * noise)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """1-D normalised Gaussian of radius ceil(3σ) (at least 1)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


@dataclass
class GaussianBlur:
    """Separable Gaussian blur with standard deviation ``sigma`` pixels, reflect padding."""

    sigma: float = 1.0

    def __call__(self, images: torch.Tensor, seed: int = 0, model=None) -> torch.Tensor:
        if self.sigma <= 0:
            raise FixativeError(f"blur sigma must be positive, got {self.sigma}")
        kernel = gaussian_kernel(self.sigma).to(images.device)
        radius, channels = len(kernel) // 2, images.shape[1]
        x = F.pad(images.float(), (radius, radius, radius, radius), mode="reflect")
        x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
        x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
        return quantise(x)


@dataclass
class Resize:
    """Down-sample by ``factor`` (< 1) with antialiasing, then back up, both bicubic."""

    factor: float = 0.5

    def __call__(self, images: torch.Tensor, seed: int = 0, model=None) -> torch.Tensor:
        if not 0 < self.factor < 1:
            raise FixativeError(f"resize factor must be in (0, 1), got {self.factor}")
        height, width = images.shape[-2:]
        small = (max(1, round(height * self.factor)), max(1, round(width * self.factor)))
        x = F.interpolate(images.float(), size=small, mode="bicubic", antialias=True, align_corners=False)
        return quantise(F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False))


@dataclass
class NoisyPurification:
    """Gaussian noise (σ = ``noise``), then img2img with the model at ``strength`` (SDEdit; Hönig et al. 2024,
    Sec. 4.1), DDIM ``steps`` over the full schedule, guidance ``guidance``, prompt ``prompt``."""

    noise: float = 0.05
    strength: float = 0.2
    steps: int = 25
    guidance: float = 1.0
    prompt: str = ""

    def __call__(self, images: torch.Tensor, seed: int = 0, model=None) -> torch.Tensor:
        from fixative.core.pipelines import generate

        if model is None:
            raise FixativeError("noisy purification needs the model (img2img); give --model")
        noisy = GaussianNoise(self.noise)(images, seed)
        out = generate(
            model,
            [self.prompt] * len(images),
            image=noisy,
            strength=self.strength,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            scheduler="ddim",
            seed=[seed + i for i in range(len(images))],
            output="images",
            progress=False,
        )
        return quantise(out.to(images.device))


@dataclass
class IMPRESS:
    """IMPRESS (Cao et al. 2023, eq. 3): min_x' ||x' − D(E(x'))||² + α · max(d(x', x) − Δ, 0): make the image a
    fixed point of the VAE (a protective perturbation is not one) while staying within Δ of the published x.
    d is 1 − SSIM (``metric=ssim``, default: no LPIPS weights are needed) or LPIPS (``metric=lpips``, which needs
    its backbone file). Adam at ``lr`` for ``steps`` steps, as the paper."""

    steps: int = 100
    lr: float = 0.001
    alpha: float = 10.0
    budget: float = 0.05
    metric: str = "ssim"
    lpips_weights: str | None = None

    def __call__(self, images: torch.Tensor, seed: int = 0, model=None) -> torch.Tensor:
        from fixative.cloak.budget import load_lpips, ssim

        if model is None:
            raise FixativeError("IMPRESS needs the model's VAE; give --model")
        if self.metric not in ("ssim", "lpips"):
            raise FixativeError(f"IMPRESS metric must be ssim or lpips, got {self.metric!r}")
        distance = (
            (lambda x, y: 1 - ssim(x, y))
            if self.metric == "ssim"
            else load_lpips(weights=self.lpips_weights, device=images.device)
        )
        original = images.float().detach()
        purified = original.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([purified], lr=self.lr)
        vae = model.vae
        for parameter in vae.parameters():
            parameter.requires_grad_(False)
        for _ in range(self.steps):
            loss = self.loss(vae, purified, original, distance).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                purified.clamp_(0, 1)
        return quantise(purified.detach())

    def loss(self, vae, purified: torch.Tensor, original: torch.Tensor, distance) -> torch.Tensor:
        """Per image: consistency ||x' − D(E(x'))||² (mean over pixels) + α max(d(x', x) − Δ, 0)."""
        excess = (distance(purified, original) - self.budget).clamp(min=0)
        return reconstruction_error(vae, purified) + self.alpha * excess


def reconstruction_error(vae, images: torch.Tensor) -> torch.Tensor:
    """Per image mean squared error between [0, 1] images and their VAE reconstruction (posterior mean)."""
    pixels = images * 2 - 1
    reconstruction = vae.decode(vae.encode(pixels.to(vae.dtype)).mode()).float()
    return ((reconstruction.clamp(-1, 1) - pixels) / 2).pow(2).flatten(1).mean(1)


ADVERSARIES = {
    "jpeg": (JPEG, "quality"),
    "noise": (GaussianNoise, "sigma"),
    "blur": (GaussianBlur, "sigma"),
    "resize": (Resize, "factor"),
    "purify": (NoisyPurification, "strength"),
    "impress": (IMPRESS, "steps"),
}


def parse_adversary(spec: str):
    """``NAME[:VALUE | :KEY=VALUE,...]`` -> an adversary; VALUE alone sets the main setting (jpeg's quality,
    noise's and blur's sigma, resize's factor, purify's strength, impress's steps)."""
    name, _, settings = spec.partition(":")
    if name not in ADVERSARIES:
        raise FixativeError(f"unknown adversary {name!r} in {spec!r}; choose from {', '.join(ADVERSARIES)}")
    cls, main = ADVERSARIES[name]
    types = {}
    for key, hint in typing.get_type_hints(cls).items():  # `str | None` -> str
        types[key] = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    values = {}
    for item in filter(None, settings.split(",")):
        key, equals, value = item.partition("=")
        key, value = (key, value) if equals else (main, key)
        if key not in types:
            raise FixativeError(f"adversary {name} has no setting {key!r}; it has {', '.join(types)}")
        kind = types[key]
        try:
            values[key] = kind(value)
        except ValueError:
            raise FixativeError(f"adversary {name}: {key}={value!r} is not a {kind.__name__}") from None
    return cls(**values)


def describe(adversary) -> str:
    """A spec string that parses back to the same adversary."""
    name = next(n for n, (cls, _) in ADVERSARIES.items() if isinstance(adversary, cls))
    settings = ",".join(
        f"{f.name}={getattr(adversary, f.name)}" for f in fields(adversary) if getattr(adversary, f.name) is not None
    )
    return f"{name}:{settings}"
