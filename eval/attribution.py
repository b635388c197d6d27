"""Attribution: which artist (or style) an image is in, by a CLIP zero-shot classifier or a small trained CNN.

Zero-shot, as CLIP classifies (Radford et al. 2021, Sec. 3.1.2): the image is compared with every caption
``template.format(artist=a, subject=s)`` over the candidate artists and subjects; an artist's score is the
log-sum-exp of its captions' logits over the subjects (and a subject's over the artists), i.e. the marginal of
the softmax over all captions. ``ToyJudge`` is this judge with the toy CLIP and the Toy Atelier's artists and
subjects (the judge of the toy report and of mimicry on the toy world).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from fixative.core.tokenizer import CLIPTokenizer
from fixative.core.toy import atelier


class ZeroShotJudge:
    """CLIP zero-shot attribution over ``artists`` (and ``subjects``: one caption per pair; without subjects the
    template's ``{subject}`` is left out and each artist has one caption)."""

    def __init__(
        self,
        clip_folder: str | Path,
        artists: Sequence[str],
        subjects: Sequence[str] = (),
        template: str = "a painting by {artist}",
        device: torch.device | str = "cpu",
    ):
        import transformers

        self.device = torch.device(device)
        self.clip = transformers.CLIPModel.from_pretrained(clip_folder, dtype=torch.float32).to(self.device).eval()
        self.artists = list(artists)
        self.subjects = list(subjects) or [""]
        captions = [template.format(subject=s, artist=a) for a in self.artists for s in self.subjects]
        input_ids = CLIPTokenizer.from_folder(clip_folder)(captions).to(self.device)
        with torch.no_grad():
            text = self.clip.get_text_features(input_ids=input_ids).pooler_output
        self.text_embeds = F.normalize(text.float(), dim=-1)  # (artists * subjects, projection)

    @torch.no_grad()
    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) in [-1, 1] -> unit image embeddings (B, projection), resized to the CLIP's size."""
        pixels = pixels.to(self.device, torch.float32)
        if pixels.shape[-1] != self.clip.config.vision_config.image_size:
            pixels = F.interpolate(
                pixels,
                size=self.clip.config.vision_config.image_size,
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        return F.normalize(self.clip.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) in [-1, 1] -> caption logits (B, artists, subjects)."""
        image = self.image_embeddings(pixels)
        logits = self.clip.logit_scale.exp().float() * image @ self.text_embeds.T
        return logits.reshape(-1, len(self.artists), len(self.subjects))

    def classify(self, pixels: torch.Tensor, batch_size: int = 128) -> tuple[list[str], list[str]]:
        """The most likely artist and subject of each image (names)."""
        artists, subjects = [], []
        for chunk in pixels.split(batch_size):
            logits = self.logits(chunk)
            artists += [self.artists[i] for i in logits.logsumexp(2).argmax(1).tolist()]
            subjects += [self.subjects[i] for i in logits.logsumexp(1).argmax(1).tolist()]
        return artists, subjects


class ToyJudge(ZeroShotJudge):
    """The toy CLIP over every caption "a painting of a {subject} by {artist}" of the Toy Atelier."""

    def __init__(self, clip_folder: str | Path, device: torch.device | str = "cpu"):
        super().__init__(clip_folder, atelier.artist_names(), atelier.SUBJECTS, atelier.CAPTION, device)


class PaintingClassifier(torch.nn.Module):
    """A small CNN trained on the Atelier's paintings to tell apart its subjects (whatever the style) or
    its artists (whatever the subject): the report's check that a generated image shows the prompted
    subject (the toy CLIP reads styles far better than shapes), and a second opinion on attribution."""

    def __init__(self, labels: list[str]):
        super().__init__()
        self.labels = list(labels)
        layers, width = [], 3
        for out in (32, 64, 96, 128):  # 64 -> 32 -> 16 -> 8 -> 4 pixels
            layers += [torch.nn.Conv2d(width, out, 3, stride=2, padding=1), torch.nn.GroupNorm(8, out), torch.nn.SiLU()]
            width = out
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(width, len(self.labels))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, 64, 64) in [-1, 1] -> logits (B, labels)."""
        return self.head(self.features(pixels).mean((2, 3)))

    @torch.no_grad()
    def classify(self, pixels: torch.Tensor, batch_size: int = 256) -> list[str]:
        self.eval()
        return [self.labels[i] for chunk in pixels.split(batch_size) for i in self(chunk.float()).argmax(1).tolist()]


def train_classifier(
    pixels: torch.Tensor, targets: list[str], labels: list[str], steps: int = 300, batch_size: int = 64, seed: int = 0
) -> PaintingClassifier:
    """Train on paintings (pixels in [-1, 1]) with flips, blur and noise (as the CLIP); targets: one label each."""
    from fixative.core.toy.build import _augment

    torch.manual_seed(seed)
    model = PaintingClassifier(labels)
    indices = torch.tensor([labels.index(t) for t in targets])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(indices), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(_augment(pixels[index], generator)), indices[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()
