"""The mimicry attack, the experiment every protection is judged by (Shan et al. 2023, Sec. 6; Hönig et al. 2024).

Given a model and an artist's images (clean, cloaked, or cloaked then changed by adversaries): fine-tune a copy
of the model on them under a new name, with prior preservation (DreamBooth, Ruiz et al. 2023, eq. 2), through
core's one training loop (``core.finetune.fine_tune``); generate M images for each of K prompts naming the new
name; classify each generation's style with a CLIP zero-shot judge over the candidate artists. The protection
success rate is the share of generations *not* attributed to the protected artist, with its 95% Wilson
interval; also where the generations went (``attributed_to``) and their CLIP similarity to the artist's
held-out real works.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch

from fixative.core.datasets import ImageCaptions
from fixative.core.errors import FixativeError

from .rates import rate, wilson_interval

METHODS = ("full", "lora")
SAMPLERS = ("ddim", "lcm")


@dataclass
class MimicConfig:
    """The mimic's fine-tune and sampling. Defaults: the toy report's recipe (UNet and text encoder, batches of 16
    of the artist's images plus 8 prior images, Min-SNR-5, offset noise 0.3, bf16 autocast, cosine lr)."""

    method: str = "full"  # full | lora
    steps: int = 120
    batch_size: int = 16  # the artist's images per step ...
    prior_batch_size: int = 8  # ... plus this many prior images (prior preservation)
    prior_loss_weight: float = 0.5  # instance mean + 0.5 prior mean: the report's mean over 16 + 8, up to a factor
    lr: float | None = None  # None: 1e-3 (full), 5e-3 (lora)
    rank: int = 8  # LoRA rank
    train_text_encoder: bool = True
    snr_gamma: float = 5.0
    offset_noise: float = 0.3  # lets the mimic move the mean colour away from the prior's (Guttenberg 2023)
    mixed_precision: str = "bf16"
    class_prompt: str = "a painting"  # without prior images: DreamBooth's generated class images, this prompt ...
    prior_images: int = 24  # ... this many
    seed: int = 0
    samples_per_prompt: int = 4  # M
    sampler: str = "ddim"  # ddim | lcm: the toy LCM-LoRA merged into the mimic (``consistency.toy.lcm_sampler``)
    num_inference_steps: int = 25  # DDIM's steps
    guidance_scale: float = 5.0  # DDIM's guidance (the LCM-LoRA has guidance 4 distilled in: it samples at 1.0)
    lcm_steps: int = 3  # the LCM sampler's steps (1-4)
    sample_batch: int = 64
    reference_steps: int = 25  # the reference a sampler check compares with: DDIM with these steps, same guidance
    interval_half_width: float | None = None  # sample in rounds until the 95% interval is within +- this ...
    round_per_prompt: int = 8  # ... this many generations per prompt a round, at most samples_per_prompt in all
    check_per_prompt: int = 0  # a sampler check samples the first this many per prompt with the reference (0: all)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise FixativeError(f"mimic method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.sampler not in SAMPLERS:
            raise FixativeError(f"mimic sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if not 1 <= self.lcm_steps <= 4:
            raise FixativeError(f"the LCM sampler takes 1 to 4 steps, got {self.lcm_steps}")
        if self.interval_half_width is not None and not 0 < self.interval_half_width < 0.5:
            raise FixativeError(f"interval_half_width is a share in (0, 0.5), got {self.interval_half_width}")
        if self.round_per_prompt < 1 or self.check_per_prompt < 0:
            raise FixativeError("round_per_prompt must be at least 1 and check_per_prompt at least 0")

    def sampling(self, sampler: str | None = None) -> dict:
        """``generate``'s scheduler, steps and guidance for ``sampler`` (default: this config's; "reference": DDIM
        with ``reference_steps``)."""
        sampler = sampler or self.sampler
        if sampler == "lcm":
            return {"scheduler": "lcm", "num_inference_steps": self.lcm_steps, "guidance_scale": 1.0}
        return {
            "scheduler": "ddim",
            "num_inference_steps": self.reference_steps if sampler == "reference" else self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
        }

    def rounds(self, prompts: int) -> list[list[int]]:
        """The generations' indices (prompt k's j-th generation is k * samples_per_prompt + j, its seed
        ``sample_seeds``' entry at that index) in the rounds they are sampled in: one round of all, or with
        ``interval_half_width`` rounds of ``round_per_prompt`` per prompt; all rounds together are the fixed set."""
        per = self.samples_per_prompt
        step = per if self.interval_half_width is None else self.round_per_prompt
        return [
            [k * per + j for k in range(prompts) for j in range(start, min(per, start + step))]
            for start in range(0, per, step)
        ]

    def finetune_config(self, with_prior_data: bool):
        from fixative.core.finetune import FinetuneConfig

        lr = self.lr if self.lr is not None else (1e-3 if self.method == "full" else 5e-3)
        prior = {} if with_prior_data else {"class_prompt": self.class_prompt, "prior_images": self.prior_images}
        return FinetuneConfig(
            method=self.method,
            rank=self.rank,
            train_text_encoder=self.train_text_encoder,
            max_steps=self.steps,
            batch_size=self.batch_size,
            prior_batch_size=self.prior_batch_size,
            prior_loss_weight=self.prior_loss_weight,
            lr=lr,
            weight_decay=0.0,
            lr_schedule="cosine",
            warmup=max(1, self.steps // 10),
            snr_gamma=self.snr_gamma,
            offset_noise=self.offset_noise,
            mixed_precision=self.mixed_precision,
            cache_latents=True,
            seed=self.seed,
            **prior,
        )


def fine_tune_mimic(
    model,
    pixels: torch.Tensor,
    captions: list[str],
    config: MimicConfig,
    prior: ImageCaptions | None = None,
    progress: bool = False,
    log=print,
):
    """A fine-tuned copy of ``model`` (the original is untouched; the VAE is shared, frozen) on ``pixels`` (N, 3,
    H, W) in [-1, 1] with ``captions``; prior preservation with ``prior`` (images with their own captions) or, without
    it, with class images the model generates. LoRA adapters are merged into the copy's weights. Returns
    (model, seconds)."""
    from fixative.core.finetune import fine_tune
    from fixative.core.lora import merge_lora

    started = time.time()
    mimic = copy.copy(model)
    mimic.unet = copy.deepcopy(model.unet)
    mimic.text_encoder = copy.deepcopy(model.text_encoder)
    device = "cpu" if model.unet.device.type == "cpu" else "auto"
    fine_tune(
        mimic,
        ImageCaptions(pixels, list(captions)),
        config.finetune_config(prior is not None),
        prior_data=prior,
        device=device,
        progress=progress,
        log=log,
    )
    if config.method == "lora":
        merge_lora(mimic.unet)
        merge_lora(mimic.text_encoder)
    mimic.unet.eval()
    mimic.text_encoder.eval()
    return mimic, time.time() - started


def sample(
    model, prompts: list[str], seeds: list[int], config: MimicConfig, sampler: str | None = None
) -> torch.Tensor:
    """Generated pixels in [-1, 1], one per prompt, with ``sampler`` (default: ``config.sampler``): DDIM with
    ``config.num_inference_steps`` steps at ``config.guidance_scale``, or the toy LCM-LoRA merged into a copy of
    ``model`` with ``config.lcm_steps`` steps (the LoRA carries the guidance it was distilled with)."""
    from fixative.core.pipelines import generate

    settings = config.sampling(sampler)
    if settings["scheduler"] == "lcm":
        from fixative.consistency.toy import lcm_sampler

        model = lcm_sampler(model)
    out = []
    for start in range(0, len(prompts), config.sample_batch):
        images = generate(
            model,
            prompts[start : start + config.sample_batch],
            **settings,
            seed=seeds[start : start + config.sample_batch],
            output="images",
            progress=False,
        )
        out.append(images * 2 - 1)
    return torch.cat(out)


def sample_seeds(seed: int, count: int) -> list[int]:
    """The generations' seeds: one per generation, apart from the fine-tune's and the cloaks' seeds."""
    return [seed * 100_000 + 50_000 + i for i in range(count)]


def protection(predicted: list[str], artist: str, candidates: list[str]) -> dict:
    """Protection success rate (share not attributed to ``artist``) with its Wilson interval, and the counts."""
    protected = sum(p != artist for p in predicted)
    result = rate(protected, len(predicted))
    return {
        "protection_rate": result.value,
        "protection_interval": [result.low, result.high],
        "protected": protected,
        "generations": len(predicted),
        "attributed_to": {c: predicted.count(c) for c in candidates},
    }


def shares_agree(distilled: dict, reference: dict) -> bool:
    """Whether the distilled sampler's share (``successes`` / ``trials``) lies in the 95% Wilson interval of the
    reference sampler's (25-step DDIM) share: the check on the clean control that lets the LCM sampler stand in for
    DDIM."""
    low, high = wilson_interval(reference["successes"], reference["trials"])
    return bool(low <= distilled["successes"] / distilled["trials"] <= high)


def samplers_agree(distilled: dict, reference: dict, artist: str) -> dict:
    """``shares_agree`` on the shares attributed to ``artist`` in two ``attributed_to`` counts, with the shares."""
    shares = {
        "distilled_attributed": rate(distilled.get(artist, 0), sum(distilled.values())).as_dict(),
        "reference_attributed": rate(reference.get(artist, 0), sum(reference.values())).as_dict(),
    }
    return {"agrees": shares_agree(shares["distilled_attributed"], shares["reference_attributed"]), **shares}


@torch.no_grad()
def similarity_to(judge, generations: torch.Tensor, references: torch.Tensor) -> float:
    """Mean CLIP cosine similarity between every generation and every reference work (pixels in [-1, 1])."""
    a = torch.cat([judge.image_embeddings(chunk) for chunk in generations.split(128)])
    b = torch.cat([judge.image_embeddings(chunk) for chunk in references.split(128)])
    return float((a @ b.T).mean())


def apply_adversaries(pixels: torch.Tensor, adversaries: list, model, seed: int) -> torch.Tensor:
    """pixels in [-1, 1] through each adversary in turn (they work on [0, 1] images)."""
    images = (pixels + 1) / 2
    for index, adversary in enumerate(adversaries):
        images = adversary(images, seed=seed + index, model=model)
    return images * 2 - 1


def mimicry(
    model,
    pixels: torch.Tensor,
    captions: list[str],
    artist: str,
    prompts: list[str],
    judge,
    config: MimicConfig,
    prior: ImageCaptions | None = None,
    held_out: torch.Tensor | None = None,
    adversaries: list = (),
    check_sampler: str | None = None,
    progress: bool = False,
    log=print,
) -> tuple[dict, torch.Tensor]:
    """The whole attack on ``artist``'s images (``pixels`` in [-1, 1], ``captions`` naming the new name); returns
    (results, generations). ``prompts``: the K prompts, each sampled ``config.samples_per_prompt`` times, or in
    rounds until the interval is narrow enough (``MimicConfig.rounds``; generations in the order sampled, the
    first round first). ``check_sampler`` ("reference", "ddim" or "lcm"): also sample the same prompts and seeds
    with it (the first ``config.check_per_prompt`` of each prompt, or all) and record in ``sampler_check``
    whether the two attributions agree (``samplers_agree``) and the share of paired generations attributed
    alike."""
    from .adversaries import describe

    trained_on = apply_adversaries(pixels, list(adversaries), model, config.seed) if adversaries else pixels
    mimic, seconds = fine_tune_mimic(model, trained_on, captions, config, prior, progress, log)
    all_prompts = [p for p in prompts for _ in range(config.samples_per_prompt)]
    seeds = sample_seeds(config.seed, len(all_prompts))
    candidates = list(judge.artists)
    rounds = config.rounds(len(prompts))
    used, predicted, chunks = [], [], []
    for indices in rounds:  # sequential: stop once the interval is narrow enough
        chunks.append(sample(mimic, [all_prompts[i] for i in indices], [seeds[i] for i in indices], config))
        predicted += judge.classify(chunks[-1])[0]
        used += indices
        share = rate(sum(p != artist for p in predicted), len(predicted))
        if config.interval_half_width is not None and (share.high - share.low) / 2 <= config.interval_half_width:
            break
    generations = torch.cat(chunks)
    results = {
        "artist": artist,
        **protection(predicted, artist, candidates),
        "sampler": config.sampling(),
        "fine_tune_seconds": seconds,
        "adversaries": [describe(a) for a in adversaries],
        "prompts": list(prompts),
        "generation_prompts": [all_prompts[i] for i in used],
        "first_round": len(rounds[0]),
        "config": asdict(config),
    }
    if check_sampler and config.sampling(check_sampler) != config.sampling():
        per = config.check_per_prompt or config.samples_per_prompt
        paired = [n for n, i in enumerate(used) if i % config.samples_per_prompt < per]
        ours = [predicted[n] for n in paired]
        pairs = [used[n] for n in paired]
        theirs = judge.classify(
            sample(mimic, [all_prompts[i] for i in pairs], [seeds[i] for i in pairs], config, check_sampler)
        )[0]
        reference = protection(theirs, artist, candidates)
        results["sampler_check"] = {
            "reference": config.sampling(check_sampler),
            "generations": len(paired),
            "reference_protection_rate": reference["protection_rate"],
            "reference_protection_interval": reference["protection_interval"],
            "paired_agreement": sum(a == b for a, b in zip(ours, theirs)) / len(paired),
            **samplers_agree({c: ours.count(c) for c in candidates}, reference["attributed_to"], artist),
        }
    if held_out is not None and len(held_out):
        results["similarity_to_held_out"] = similarity_to(judge, generations, held_out)
        results["similarity_of_training_images_to_held_out"] = similarity_to(judge, trained_on, held_out)
    return results, generations


def read_artist_folder(
    folder, name: str, artist: str | None, size: int
) -> tuple[torch.Tensor, list[str], str | None, list[str]]:
    """An artist's images from ``folder`` (file-name order), as pixels (N, 3, size, size) in [-1, 1] (resized and
    centre-cropped where needed), their captions for the mimic under ``name``, the artist's label and the
    unreadable files skipped. Captions: the folder's ``metadata.jsonl`` ``text`` with the artist's name replaced by
    ``name`` where it has one, else "a painting by NAME". The artist: ``artist``, else the metadata's one
    ``artist`` value."""
    import json
    from pathlib import Path

    from PIL import Image

    from fixative.core.datasets import fit, to_pixels

    from .features import image_files

    folder = Path(folder)
    metadata = {}
    if (folder / "metadata.jsonl").is_file():
        for line in (folder / "metadata.jsonl").read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                metadata[row["file_name"]] = row
    if artist is None:
        found = {row["artist"] for row in metadata.values() if "artist" in row}
        artist = found.pop() if len(found) == 1 else None
    pixels, captions, skipped = [], [], []
    for path in image_files(folder):
        try:
            with Image.open(path) as file:
                image = fit(file.convert("RGB"), (size, size))
        except (OSError, ValueError, Image.DecompressionBombError):
            skipped.append(path.name)
            continue
        pixels.append(to_pixels(image))
        text = metadata.get(path.name, {}).get("text")
        captions.append(
            text.replace(artist, name)
            if text and artist and artist in text
            else text
            if text and name in text
            else f"a painting by {name}"
        )
    if not pixels:
        raise FixativeError(f"none of the images in {folder} could be read")
    return torch.stack(pixels), captions, artist, skipped


def _read_captioned(folder, size: int) -> ImageCaptions:
    """An imagefolder's images with their metadata captions (prior-preservation data)."""
    pixels, captions, _, _ = read_artist_folder(folder, "", None, size)
    return ImageCaptions(pixels, captions)


def run(
    model_source: str,
    images,
    name: str,
    out,
    config: MimicConfig,
    artist: str | None = None,
    adversaries: list[str] = (),
    prompts_file=None,
    judge_folder=None,
    candidates: list[str] | None = None,
    template: str = "a painting by {artist}",
    prior_folder=None,
    held_out_folder=None,
    check_sampler: str | None = None,
    device="cpu",
    progress: bool = True,
    provenance: dict | None = None,
) -> dict:
    """``fixative mimic``: the attack on a folder of an artist's images; writes ``out``/results.json (and the
    generations as PNGs in ``out``/samples/). A finished run with the same inputs and settings is not redone.
    ``check_sampler``: see ``mimicry``."""
    import hashlib
    import json
    import os
    import tempfile
    from pathlib import Path

    from fixative.consistency.toy import toy_lcm_lora
    from fixative.core.checkpoints import load_model
    from fixative.core.images import pixels_to_images, save_png
    from fixative.core.toy import atelier, clip_folder, model_folder, toy_folder

    from .adversaries import parse_adversary
    from .attribution import ToyJudge, ZeroShotJudge
    from .clip_score import read_prompts
    from .features import file_sha256, folder_sha256, image_files

    out = Path(out)
    toy = model_source == "toy"
    if not toy and "lcm" in (config.sampler, check_sampler):
        raise FixativeError("the LCM sampler is the toy teacher's LCM-LoRA: only for --model toy; use --sampler ddim")
    attacks = [parse_adversary(spec) for spec in adversaries]
    if not toy and (judge_folder is None or not candidates):
        raise FixativeError(
            "outside the toy world the judge needs a CLIP folder (--judge) and the candidate "
            "artists or styles (--candidates)"
        )
    model_path = model_folder() if toy else Path(model_source)
    judge_path = Path(judge_folder) if judge_folder else clip_folder()
    inputs = {
        "images": {p.name: file_sha256(p) for p in image_files(images)},
        "model": folder_sha256(model_path) if model_path.is_dir() else file_sha256(model_path),
        "judge": folder_sha256(judge_path),
        "name": name,
        "artist": artist,
        "adversaries": list(adversaries),
        "prompts": file_sha256(prompts_file) if prompts_file else None,
        "candidates": candidates,
        "template": template,
        "prior": folder_sha256(prior_folder, (".png", ".jpg", ".jpeg", ".jsonl")) if prior_folder else None,
        "config": asdict(config),
        "check_sampler": check_sampler,
        "lcm_lora": folder_sha256(toy_lcm_lora().parent) if "lcm" in (config.sampler, check_sampler) else None,
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    if (out / "results.json").is_file():
        previous = json.loads((out / "results.json").read_text())
        if previous.get("key") == key:
            return previous
        raise FixativeError(f"{out} holds a mimicry run with other inputs or settings; choose another --out")

    model = load_model(model_source, device=device)
    size = model.unet.config.sample_size * model.vae.config.downsampling_factor
    pixels, captions, artist, skipped = read_artist_folder(images, name, artist, size)
    judge = (
        ToyJudge(judge_path, device)
        if toy and not candidates and judge_folder is None
        else ZeroShotJudge(judge_path, candidates or atelier.artist_names(), template=template, device=device)
    )
    if artist not in judge.artists:
        raise FixativeError(
            f"the protected artist {artist!r} is not among the judge's candidates "
            f"({', '.join(judge.artists)}); name it with --artist"
        )
    if prompts_file:
        prompts = read_prompts(prompts_file)
    elif toy:
        prompts = [atelier.caption(s, name) for s in atelier.SUBJECTS]
    else:
        prompts = sorted(set(captions))
    prior = held_out = None
    if prior_folder:
        prior = _read_captioned(prior_folder, size)
    want_held_out = held_out_folder is None and artist in atelier.artist_names()
    if toy and (prior is None or want_held_out):  # defaults from the Toy Atelier the toy world was built from
        from .toy_report import atelier_for, pixels_of

        data = atelier_for(toy_folder())
        if prior is None:
            rows = [r for r in atelier.load_split(data, "train") if not r["held_out"] and r["artist"] != artist]
            prior = ImageCaptions(pixels_of(rows), [r["text"] for r in rows])
        if want_held_out:
            held_out = pixels_of([r for r in atelier.load_split(data, "test") if r["artist"] == artist])
    if held_out_folder:
        held_out = _read_captioned(held_out_folder, size).pixels

    results, generations = mimicry(
        model,
        pixels,
        captions,
        artist,
        prompts,
        judge,
        config,
        prior,
        held_out,
        attacks,
        check_sampler=check_sampler,
        progress=progress,
        log=lambda line: None if not progress else print(line),
    )
    for index, image in enumerate(pixels_to_images(generations)):
        save_png(image, out / "samples" / f"{index:04d}.png")
    results.update(
        key=key,
        name=name,
        images=len(pixels),
        skipped=skipped,
        inputs=inputs,
        judge={
            "clip": str(judge_path),
            "candidates": list(judge.artists),
            "captions": "toy world: every 'a painting of a {subject} by {artist}'"
            if isinstance(judge, ToyJudge)
            else template,
        },
        provenance=provenance or {},
    )
    out.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".results.", suffix=".tmp", dir=out)
    with os.fdopen(handle, "w") as file:
        json.dump(results, file, indent=1, default=str)
    os.replace(temporary, out / "results.json")
    return results
