"""``fixative toy report``: does the toy world do what the suite needs? Measured figures beside targets.

    vae         reconstruction PSNR on the test split, and how often the toy CLIP attributes a
                reconstruction to its artist
    clip        zero-shot artist (and subject) classification of the test split's paintings
    generation  "a painting of a {subject} by {artist}" for every trained artist and subject (25 DDIM
                steps, guidance 5): how often the CLIP names the prompted artist, and the subject
    mimicry     the attack every protection experiment is measured against (eval/mimicry.py): fine-tune the
                toy SD's UNet and text encoder on 24 paintings of a held-out artist under a new name, with
                prior preservation on the trained artists' paintings, then generate for that name; the
                attribution to the held-out artist, the subject, and whether the trained artists keep theirs

The judge is the toy CLIP (eval/attribution.py ToyJudge), which was trained on all artists, held-out ones
included. Each part is one function of a ``ToyWorld``; the small CNN classifiers (subject; artist, a second
opinion) are trained only when a requested part uses them.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from PIL import Image

from fixative.core.datasets import ImageCaptions
from fixative.core.toy import atelier
from fixative.core.toy.atelier import AtelierConfig

from .attribution import PaintingClassifier, ToyJudge, train_classifier
from .grid import labelled_grid
from .mimicry import MimicConfig, fine_tune_mimic, sample, sample_seeds

PARTS = ("vae", "clip", "generation", "mimicry")
TARGETS = {
    "vae_psnr_db": 22.0,
    "vae_attribution": 0.95,
    "clip_artist_accuracy": 0.95,
    "generation_attribution": 0.90,
    "mimic_attribution": 0.80,
    "mimic_trained_attribution": 0.85,
}
# New names for the held-out artists: words no Atelier caption uses (two BPE tokens each).
MIMIC_NAMES = {"zenji": "nabu", "tovik": "fenn"}


@dataclass
class ReportConfig:
    seed: int = 0
    num_inference_steps: int = 25
    guidance_scale: float = 5.0
    samples_per_prompt: int = 2  # per (trained artist, subject)
    mimic_artists: tuple[str, ...] = ("zenji", "tovik")
    mimic_images: int = 24  # paintings of the held-out artist the mimic trains on
    mimic_steps: int = 120
    mimic_batch: int = 16  # the mimic's images per step ...
    mimic_prior_batch: int = 8  # ... plus this many of trained artists with their own captions (prior preservation)
    mimic_lr: float = 1e-3
    mimic_text_encoder: bool = True  # fine-tune the text encoder with the UNet (as the toy build trains them)
    # Offset noise (Guttenberg 2023) lets the fine-tune move the mean colour away from the trained artists':
    # without it a mimic of zenji (pale pink stripes) keeps drifting to the trained artists' mean colours.
    mimic_offset_noise: float = 0.3
    mimic_samples_per_subject: int = 4
    batch_size: int = 64  # images per sampling batch
    classifier_steps: int = 300

    def mimic_config(self) -> MimicConfig:
        return MimicConfig(
            method="full",
            steps=self.mimic_steps,
            batch_size=self.mimic_batch,
            prior_batch_size=self.mimic_prior_batch,
            lr=self.mimic_lr,
            train_text_encoder=self.mimic_text_encoder,
            offset_noise=self.mimic_offset_noise,
            seed=self.seed,
            samples_per_prompt=self.mimic_samples_per_subject,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            sample_batch=self.batch_size,
        )


def pixels_of(rows: list[dict]) -> torch.Tensor:
    """Paintings as pixels in [-1, 1], (N, 3, H, W)."""
    import numpy as np

    images = np.stack([np.asarray(Image.open(r["path"]).convert("RGB")) for r in rows])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def psnr_db(reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Per image PSNR of pixels in [-1, 1] measured on the [0, 1] scale (cloak.budget.psnr: 10 log10(1 / MSE))."""
    from fixative.cloak.budget import psnr

    return psnr((test.float().clamp(-1, 1) + 1) / 2, (reference.float() + 1) / 2)


def _accuracy(predicted: list[str], expected: list[str]) -> float:
    return sum(p == e for p, e in zip(predicted, expected)) / max(1, len(expected))


@dataclass
class ToyWorld:
    """What the parts measure: the model, the judge, the data set's splits; classifiers trained on first use."""

    folder: Path
    model: object
    judge: ToyJudge
    train_rows: list[dict]
    test_rows: list[dict]
    config: ReportConfig
    seconds: dict = field(default_factory=dict)

    @cached_property
    def train_pixels(self) -> torch.Tensor:
        return pixels_of(self.train_rows)

    def _classifier(self, column: str, labels: list[str]) -> PaintingClassifier:
        started = time.time()
        model = train_classifier(
            self.train_pixels,
            [r[column] for r in self.train_rows],
            labels,
            steps=self.config.classifier_steps,
            seed=self.config.seed,
        )
        self.seconds[f"{column}_classifier"] = time.time() - started
        return model

    @cached_property
    def subject_model(self) -> PaintingClassifier:
        """The subject check (the toy CLIP reads styles far better than shapes): a small CNN, a minute to train."""
        return self._classifier("subject", list(atelier.SUBJECTS))

    @cached_property
    def artist_model(self) -> PaintingClassifier:
        """A second opinion on artists."""
        return self._classifier("artist", atelier.artist_names())


@torch.no_grad()
def vae_part(world: ToyWorld, batch_size: int = 64) -> dict:
    model, rows = world.model, world.test_rows
    pixels = pixels_of(rows)
    reconstructions = torch.cat(
        [model.vae.decode(model.vae.encode(chunk).mode()).float() for chunk in pixels.split(batch_size)]
    )
    psnr = psnr_db(pixels, reconstructions)
    held = torch.tensor([r["held_out"] for r in rows])
    artists, _ = world.judge.classify(reconstructions)
    return {
        "vae_psnr_db": psnr.mean().item(),
        "vae_psnr_db_held_out_artists": psnr[held].mean().item() if held.any() else math.nan,
        "vae_attribution": _accuracy(artists, [r["artist"] for r in rows]),
        "images": len(rows),
    }


def clip_part(world: ToyWorld) -> dict:
    rows = world.test_rows
    pixels = pixels_of(rows)
    artists, subjects = world.judge.classify(pixels)
    return {
        "clip_artist_accuracy": _accuracy(artists, [r["artist"] for r in rows]),
        "clip_subject_accuracy": _accuracy(subjects, [r["subject"] for r in rows]),
        "classifier_subject_accuracy": _accuracy(world.subject_model.classify(pixels), [r["subject"] for r in rows]),
        "classifier_artist_accuracy": _accuracy(world.artist_model.classify(pixels), [r["artist"] for r in rows]),
        "images": len(rows),
    }


def generation_figures(
    model, world: ToyWorld, artists: list[str], samples_per_prompt: int, seed_offset: int = 0, classifiers: bool = True
) -> tuple[dict, torch.Tensor]:
    """Attribution of "a painting of a {subject} by {artist}" samples; also returns the pixels
    (artist-major, then subject, then sample)."""
    config = world.config
    prompts, expected, subjects = [], [], []
    for artist in artists:
        for subject in atelier.SUBJECTS:
            for _ in range(samples_per_prompt):
                prompts.append(atelier.caption(subject, artist))
                expected.append(artist)
                subjects.append(subject)
    seeds = [config.seed * 100_000 + seed_offset + i for i in range(len(prompts))]
    pixels = sample(model, prompts, seeds, config.mimic_config())
    predicted_artists, clip_subjects = world.judge.classify(pixels)
    per_artist = {
        a: _accuracy([p for p, e in zip(predicted_artists, expected) if e == a], [a] * (len(prompts) // len(artists)))
        for a in artists
    }
    figures = {
        "generation_attribution": _accuracy(predicted_artists, expected),
        "generation_subject_clip": _accuracy(clip_subjects, subjects),
        "per_artist": per_artist,
        "images": len(prompts),
    }
    if classifiers:
        figures["generation_subject"] = _accuracy(world.subject_model.classify(pixels), subjects)
        figures["generation_attribution_classifier"] = _accuracy(world.artist_model.classify(pixels), expected)
    return figures, pixels


def generation_part(world: ToyWorld) -> tuple[dict, list[torch.Tensor], list[str]]:
    """Figures, and one grid row per trained artist (one sample per subject)."""
    trained = atelier.artist_names(held_out=False)
    per_prompt = world.config.samples_per_prompt
    figures, pixels = generation_figures(world.model, world, trained, per_prompt)
    block = len(atelier.SUBJECTS) * per_prompt
    rows = [pixels[i * block : (i + 1) * block : per_prompt] for i in range(len(trained))]
    return figures, rows, trained


def mimic_data(world: ToyWorld, artist: str, name: str) -> tuple[torch.Tensor, list[str], ImageCaptions]:
    """The held-out artist's first ``mimic_images`` training paintings captioned with ``name``, and the prior:
    the trained artists' training paintings with their own captions."""
    from fixative.core.errors import FixativeError

    mimic_rows = [r for r in world.train_rows if r["artist"] == artist][: world.config.mimic_images]
    if len(mimic_rows) < world.config.mimic_images:
        raise FixativeError(f"the Toy Atelier has only {len(mimic_rows)} training paintings of {artist}")
    prior_rows = [r for r in world.train_rows if not r["held_out"]]
    prior = ImageCaptions(pixels_of(prior_rows), [r["text"] for r in prior_rows])
    return pixels_of(mimic_rows), [atelier.caption(r["subject"], name) for r in mimic_rows], prior


def mimicry_part(world: ToyWorld, artist: str) -> tuple[dict, torch.Tensor, str]:
    """Mimic one held-out artist; figures and one grid row (one sample per subject)."""
    config = world.config
    name = MIMIC_NAMES.get(artist, f"{artist}x")
    pixels, captions, prior = mimic_data(world, artist, name)
    mimic_config = config.mimic_config()
    mimic_model, seconds = fine_tune_mimic(world.model, pixels, captions, mimic_config, prior, log=lambda _: None)
    expected_subjects = [s for s in atelier.SUBJECTS for _ in range(config.mimic_samples_per_subject)]
    prompts = [atelier.caption(s, name) for s in expected_subjects]
    seeds = sample_seeds(config.seed, len(prompts))
    samples = sample(mimic_model, prompts, seeds, mimic_config)
    predicted, _ = world.judge.classify(samples)
    kept, _ = generation_figures(
        mimic_model, world, atelier.artist_names(held_out=False), 1, seed_offset=70_000, classifiers=False
    )
    figures = {
        "name": name,
        "fine_tune_seconds": seconds,
        "steps": config.mimic_steps,
        "mimic_attribution": _accuracy(predicted, [artist] * len(prompts)),
        "mimic_subject": _accuracy(world.subject_model.classify(samples), expected_subjects),
        "mimic_attribution_classifier": _accuracy(world.artist_model.classify(samples), [artist] * len(prompts)),
        "mimic_trained_attribution": kept["generation_attribution"],
        "attributed_to": {a: predicted.count(a) for a in sorted(set(predicted))},
    }
    return figures, samples[:: config.mimic_samples_per_subject], name


def _grid(rows_of_pixels: list[torch.Tensor], labels: list[str], path: Path) -> None:
    """One row per label, one column per image; pixels in [-1, 1]."""
    rows = [((pixels.clamp(-1, 1) + 1) * 127.5).round().byte() for pixels in rows_of_pixels]
    grid = labelled_grid(rows, labels, label_width=90, text_offset=12)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def atelier_for(folder: Path) -> Path:
    """The data set the toy world was built from: the build's own copy, or repainted (seconds) from build.json."""
    if (folder / "atelier" / "atelier.json").is_file():
        return folder / "atelier"
    from fixative.core.toy import fixative_home

    build = json.loads((folder / "build.json").read_text())
    config = AtelierConfig(seed=build["seed"], images_per_artist=build["plan"]["images_per_artist"])
    return atelier.write_atelier(
        fixative_home() / "toy" / f"atelier-seed{config.seed}-{config.images_per_artist}", config, progress=False
    )


def _line(name: str, value: float, target: float | None, unit: str = "%") -> str:
    shown = f"{value:.1f} dB" if unit == "dB" else f"{100 * value:.1f}%"
    if target is None:
        return f"  {name:<58} {shown:>9}"
    goal = f"{target:.0f} dB" if unit == "dB" else f"{100 * target:.0f}%"
    verdict = "ok" if value >= target else "BELOW TARGET"
    return f"  {name:<58} {shown:>9}   target >= {goal:<6} {verdict}"


def load_world(folder: str | Path | None, config: ReportConfig, device: str = "cpu") -> ToyWorld:
    from fixative.core.checkpoints import load_model
    from fixative.core.toy import toy_folder

    folder = Path(folder) if folder is not None else toy_folder()
    data = atelier_for(folder)
    return ToyWorld(
        folder,
        load_model(folder / "sd", device=device),
        ToyJudge(folder / "clip", device=device),
        atelier.load_split(data, "train"),
        atelier.load_split(data, "test"),
        config,
    )


def report(
    folder: str | Path | None = None,
    out: str | Path = "outputs/toy_report",
    config: ReportConfig | None = None,
    device: str = "cpu",
    log=print,
    parts: tuple[str, ...] = PARTS,
) -> dict:
    """Measure the toy world in ``folder`` (default: the one ``--model toy`` uses); print the figures beside
    their targets; write ``report.json`` and ``samples.png`` into ``out``. Returns the figures."""
    from fixative.core.errors import FixativeError

    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise FixativeError(f"unknown report part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    config = config or ReportConfig()
    torch.manual_seed(config.seed)
    world = load_world(folder, config, device)
    out = Path(out)
    figures: dict = {"folder": str(world.folder), "config": asdict(config), "targets": TARGETS}
    log(f"toy world report: {world.folder}")
    grid_rows, grid_labels = [], []

    if "vae" in parts:
        started = time.time()
        figures["vae"] = vae = vae_part(world)
        world.seconds["vae"] = time.time() - started
        log(f"VAE (test split, {vae['images']} paintings)")
        log(_line("reconstruction PSNR", vae["vae_psnr_db"], TARGETS["vae_psnr_db"], "dB"))
        log(_line("reconstruction PSNR, held-out artists", vae["vae_psnr_db_held_out_artists"], None, "dB"))
        log(_line("reconstructions attributed to their artist", vae["vae_attribution"], TARGETS["vae_attribution"]))
    if "clip" in parts:
        figures["clip"] = clip = clip_part(world)
        log(f"CLIP zero-shot (test split, {clip['images']} paintings, {len(world.judge.artists)} artists)")
        log(_line("artist", clip["clip_artist_accuracy"], TARGETS["clip_artist_accuracy"]))
        log(_line("subject (CLIP)", clip["clip_subject_accuracy"], None))
        log(
            _line(
                "subject (the report's subject classifier, on real paintings)",
                clip["classifier_subject_accuracy"],
                None,
            )
        )
        log(
            _line(
                "artist (the report's artist classifier, on real paintings)", clip["classifier_artist_accuracy"], None
            )
        )
    if "generation" in parts:
        started = time.time()
        generation, rows, labels = generation_part(world)
        figures["generation"] = generation
        world.seconds["generation"] = time.time() - started
        grid_rows += rows
        grid_labels += labels
        log(
            f"generation ({generation['images']} samples, {config.num_inference_steps} DDIM steps, "
            f"guidance {config.guidance_scale})"
        )
        log(
            _line(
                "attributed to the prompted artist",
                generation["generation_attribution"],
                TARGETS["generation_attribution"],
            )
        )
        log(
            _line(
                "attributed to the prompted artist by the artist classifier (second opinion)",
                generation["generation_attribution_classifier"],
                None,
            )
        )
        log(_line("subject recognised (subject classifier)", generation["generation_subject"], None))
        log(_line("subject recognised (CLIP)", generation["generation_subject_clip"], None))
    if "mimicry" in parts:
        figures["mimicry"] = {}
        for artist in config.mimic_artists:
            m, row, name = mimicry_part(world, artist)
            figures["mimicry"][artist] = m
            grid_rows.append(row)
            grid_labels.append(f"{name}\n(mimic of {artist})")
            log(
                f"mimicry of held-out {artist} as '{name}' ({config.mimic_images} paintings, {config.mimic_steps} "
                f"steps, {m['fine_tune_seconds']:.0f} s fine-tuning; target <= 180 s)"
            )
            log(_line(f"'{name}' samples attributed to {artist}", m["mimic_attribution"], TARGETS["mimic_attribution"]))
            log(
                _line(
                    f"'{name}' samples attributed to {artist} by the artist classifier",
                    m["mimic_attribution_classifier"],
                    None,
                )
            )
            log(_line(f"'{name}' samples whose subject is recognised", m["mimic_subject"], None))
            log(
                _line(
                    "trained artists' samples still attributed to them",
                    m["mimic_trained_attribution"],
                    TARGETS["mimic_trained_attribution"],
                )
            )
    figures["seconds"] = world.seconds
    out.mkdir(parents=True, exist_ok=True)
    if grid_rows:
        _grid(grid_rows, grid_labels, out / "samples.png")
        log(f"samples: {out / 'samples.png'} (one row per artist, one column per subject)")
    (out / "report.json").write_text(json.dumps(figures, indent=1, default=str))
    return figures
