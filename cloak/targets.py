"""What the objectives aim at: Glaze's style-transferred target Ω(x, T), PhotoGuard's fixed image, Mist's pattern,
and the automatic choice of a target style (Glaze, Sec. 5.1: a style far enough, but not the farthest)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fixative.core.errors import FixativeError
from fixative.core.pipelines import generate

# Candidate target styles for real models (Glaze's list is of this kind: distinct, well-known, public domain).
ART_HISTORICAL_STYLES = (
    "cubism",
    "impressionism",
    "pointillism",
    "fauvism",
    "art nouveau",
    "baroque painting",
    "ukiyo-e woodblock print",
    "pop art",
    "abstract expressionism",
    "surrealism",
    "art deco poster",
    "byzantine mosaic",
    "expressionism",
    "romanticism landscape",
    "renaissance fresco",
    "minimalism",
    "futurism",
    "constructivism",
    "pixel art",
    "chinese ink wash painting",
)
STYLE_PROMPT = "a painting by {style}"


@dataclass
class StyleTargetConfig:
    strength: float = 0.5  # img2img strength (Glaze: 0.4-0.6)
    guidance_scale: float = 7.5
    steps: int = 25  # solver steps of the full schedule; img2img runs strength * steps of them
    scheduler: str = "dpm++2m"  # a multi-step solver
    prompt: str = STYLE_PROMPT  # "{style}" is replaced by the target style


def style_target(model, pixels: torch.Tensor, style: str, config: StyleTargetConfig, seed: int) -> torch.Tensor:
    """Ω(x, T): img2img of pixels (batch, 3, H, W) in [0, 1] toward ``style``; same shape, [0, 1]."""
    prompt = config.prompt.format(style=style)
    seeds = [seed + i for i in range(pixels.shape[0])]
    return generate(
        model,
        [prompt] * pixels.shape[0],
        image=pixels,
        strength=config.strength,
        guidance_scale=config.guidance_scale,
        num_inference_steps=config.steps,
        scheduler=config.scheduler,
        seed=seeds,
        output="images",
        progress=False,
    ).to(pixels.device)


def fixed_target(pixels: torch.Tensor, grey: float = 0.5) -> torch.Tensor:
    """PhotoGuard's target image: flat grey of the input's shape."""
    return torch.full_like(pixels, grey)


def pattern_target(pixels: torch.Tensor, period: int = 8) -> torch.Tensor:
    """Mist's textural target: a high-contrast pattern (diagonal black/white stripes, ``period`` pixels)."""
    height, width = pixels.shape[-2:]
    rows = torch.arange(height).view(-1, 1)
    columns = torch.arange(width).view(1, -1)
    stripes = (((rows + columns) // (period // 2)) % 2).float()
    return stripes.expand_as(pixels[:, :1]).expand_as(pixels).to(pixels.device).clone()


def toy_candidates() -> tuple[list[str], list[list[str]]]:
    """The toy world's candidate styles (its artists) and, per style, its captions over the subjects."""
    from fixative.core.toy import atelier

    artists = atelier.artist_names()
    return artists, [[atelier.caption(s, a) for s in atelier.SUBJECTS] for a in artists]


def auto_style(
    pixels: torch.Tensor,
    clip_folder: str | Path,
    candidates: list[str],
    captions: list[list[str]] | None = None,
    exclude_nearest: bool = True,
) -> tuple[str, dict]:
    """A target style between the 50th and 75th percentile of CLIP distance from the artworks (Glaze, Sec. 5.1).

    pixels: the artist's artworks (batch, 3, H, W) in [0, 1]; candidates: style names; captions: per candidate, the
    texts whose mean embedding stands for it (default: the name itself). Distance: 1 − cos(mean image embedding,
    style embedding). ``exclude_nearest``: the nearest candidate is taken to be the artist's own style.
    Returns (style, {style: distance}).
    """
    import transformers

    from fixative.core.tokenizer import CLIPTokenizer

    folder = Path(clip_folder)
    if not (folder / "config.json").is_file():
        raise FixativeError(
            f"--target-style auto needs a CLIP model folder (transformers CLIPModel); {folder} has none"
        )
    clip = transformers.CLIPModel.from_pretrained(folder, dtype=torch.float32).eval()
    captions = captions or [[name] for name in candidates]
    tokenizer = CLIPTokenizer.from_folder(folder)
    with torch.no_grad():
        size = clip.config.vision_config.image_size
        images = F.interpolate(pixels.float() * 2 - 1, size=size, mode="bilinear", antialias=True, align_corners=False)
        image_embedding = F.normalize(clip.get_image_features(pixel_values=images).pooler_output, dim=-1).mean(0)
        style_embeddings = torch.stack(
            [
                F.normalize(clip.get_text_features(input_ids=tokenizer(texts)).pooler_output, dim=-1).mean(0)
                for texts in captions
            ]
        )
    distances = 1 - F.cosine_similarity(style_embeddings, image_embedding[None], dim=-1)
    order = distances.argsort().tolist()
    if exclude_nearest:
        order = order[1:]
    # the candidate at the 62.5th percentile of distance: halfway between the 50th and the 75th
    pick = order[round(0.625 * (len(order) - 1))]
    return candidates[pick], {name: round(d, 4) for name, d in zip(candidates, distances.tolist())}
