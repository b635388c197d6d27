"""CLIP score (Hessel et al. 2021) as torchmetrics defines it: 100 · cos(E_image, E_text) per image-prompt pair,
averaged, and the average clamped at 0.

Reference and tolerance: equal to torchmetrics' ``CLIPScore`` on the same model and processor within 1e-4
(tests/eval/test_clip_score.py, on the toy CLIP). Images go through the model folder's own processor, prompts
through its tokenizer (padded, truncated to the text tower's length).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fixative.core.errors import FixativeError

from .features import folder_sha256, image_embeddings, load_clip, text_embeddings


@dataclass
class CLIPScoreResult:
    value: float  # max(mean of per_image, 0)
    per_image: list[float]  # 100 · cosine, unclamped


class CLIPScorer:
    def __init__(self, folder: str | Path, device: torch.device | str = "cpu", model=None, processor=None):
        """A CLIP from a local transformers folder (or an already loaded ``model`` and ``processor``)."""
        self.device = torch.device(device)
        if model is None:
            model, processor = load_clip(folder, self.device)
        self.model, self.processor = model, processor
        self.provenance = {
            "metric": "clip score (100 * cos, mean clamped at 0; torchmetrics' definition)",
            "clip": str(folder),
            "clip_sha256": folder_sha256(folder) if folder else None,
        }

    @torch.no_grad()
    def scores(
        self, images: torch.Tensor | list[torch.Tensor], prompts: list[str], batch_size: int = 32
    ) -> torch.Tensor:
        """Per pair 100 · cos; images uint8 (3, H, W) each, one prompt per image."""
        if len(images) != len(prompts):
            raise FixativeError(f"got {len(images)} images and {len(prompts)} prompts; give one prompt per image")
        max_length = self.model.config.text_config.max_position_embeddings
        out = []
        for start in range(0, len(prompts), batch_size):
            batch_images = [image.cpu() for image in images[start : start + batch_size]]
            pixel_values = self.processor(images=batch_images, return_tensors="pt")["pixel_values"]
            text = self.processor(
                text=list(prompts[start : start + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            image = F.normalize(image_embeddings(self.model, pixel_values.to(self.device)).float(), dim=-1)
            words = F.normalize(
                text_embeddings(
                    self.model, text["input_ids"].to(self.device), text["attention_mask"].to(self.device)
                ).float(),
                dim=-1,
            )
            out.append(100 * (image * words).sum(-1))
        return torch.cat(out).cpu()

    def __call__(self, images, prompts: list[str], batch_size: int = 32) -> CLIPScoreResult:
        per_image = self.scores(images, prompts, batch_size)
        return CLIPScoreResult(max(float(per_image.mean()), 0.0), per_image.tolist())


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line (blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FixativeError(f"prompts file {path} not found; give a text file with one prompt per line")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]
