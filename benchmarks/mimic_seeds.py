"""How much a protection cell moves with the mimic's own training seed: the cloaks of finished protection cells (from a
``fixative bench`` stage cache) mimicked again with other fine-tune seeds, 8 generations per subject with the same
sampling seeds for every mimic, judged by the toy CLIP. A cell's interval in the bench report is over the
generations of one mimic; this shows the spread between mimics.

    .venv/bin/python benchmarks/mimic_seeds.py --stages runs/toy_protection/stages \\
        --cells tovik/anti-dreambooth:psnr=24 tovik/photoguard:psnr=24 --seeds 1 2 [--steps 80 --lr 0.0015]
    .venv/bin/python benchmarks/mimic_seeds.py --pixels zenji=cloaked.pt --seeds 0 1 2

A cell is ARTIST/CLOAK_SPEC as the stage names write it (``cloak-ARTIST-CLOAK_SPEC-HASH.pt``), or ARTIST=FILE, a
torch file in a cloak stage's format ({"pixels": the artist's first N training paintings as stored, in [-1, 1]})
made outside a stage cache (``--pixels``); the mimic is
MimicConfig's (the toy report's: 120 steps at lr 1e-3) unless --steps / --lr say otherwise, sampled with 10-step
DDIM at guidance 5 as the protection benchmark samples.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def cached_cloak(stages: Path, artist: str, spec: str) -> torch.Tensor:
    found = sorted(stages.glob(f"cloak-{artist}-{spec}-*.pt"))
    if len(found) != 1:
        raise SystemExit(f"{len(found)} cloak stages for {artist}/{spec} in {stages}; run the protection bench first")
    return torch.load(found[0], weights_only=False)["pixels"]


def pixels_file(item: str) -> tuple[str, torch.Tensor]:
    """``ARTIST=FILE`` -> (artist, stored pixels in [-1, 1]) from a file in a cloak stage's format."""
    artist, sep, path = item.partition("=")
    if not sep or not artist or not path:
        raise SystemExit(f"--pixels takes ARTIST=FILE (e.g. zenji=cloaked.pt), got {item!r}")
    blob = torch.load(path, weights_only=False)
    pixels = blob.get("pixels") if isinstance(blob, dict) else None
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[1] != 3:
        raise SystemExit(f"{path}: expected a cloak stage's {{'pixels': (N, 3, H, W) tensor}}")
    if pixels.min() < -1 or pixels.max() > 1:
        raise SystemExit(f"{path}: stage pixels lie in [-1, 1], these span {pixels.min():g} to {pixels.max():g}")
    return artist, pixels


def went(counts: dict[str, int]) -> str:
    """{"zenji": 50, "kovra": 14, "lumo": 0} -> "zenji 50, kovra 14" (most first, none left out)."""
    return ", ".join(f"{a} {n}" for a, n in sorted(counts.items(), key=lambda item: -item[1]) if n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=Path, help="a protection run's stage cache (RUN/stages) for --cells")
    parser.add_argument("--cells", nargs="+", default=[], help="ARTIST/CLOAK_SPEC, e.g. tovik/photoguard:psnr=24")
    parser.add_argument(
        "--pixels",
        nargs="+",
        default=[],
        metavar="ARTIST=FILE",
        help="cloaks made outside a stage cache: torch files holding {'pixels': stored pixels in [-1, 1]}, the "
        "artist's first N training paintings in order (default: none)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="mimic seeds (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="fine-tune steps (default: MimicConfig's, 120)")
    parser.add_argument("--lr", type=float, default=None, help="fine-tune learning rate (default: MimicConfig's)")
    parser.add_argument(
        "--mixed-precision",
        choices=("bf16", "no"),
        default=None,
        help="the mimic's autocast (default: MimicConfig's, bf16; 'no' trains in fp32, for CPUs without native bf16)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = parser.parse_args()
    if not args.cells and not args.pixels:
        parser.error("give --cells (with --stages) or --pixels")
    if args.cells and args.stages is None:
        parser.error("--cells reads cloaks from a stage cache: give --stages")
    torch.set_num_threads(args.threads)
    cloaks = [pixels_file(item) + (item,) for item in args.pixels]  # bad files fail before any mimic trains

    from fixative.core.checkpoints import load_model
    from fixative.core.datasets import ImageCaptions
    from fixative.core.toy import atelier, clip_folder
    from fixative.eval.attribution import ToyJudge
    from fixative.eval.bench import _toy_rows
    from fixative.eval.mimicry import MimicConfig, fine_tune_mimic, protection, sample, sample_seeds
    from fixative.eval.toy_report import MIMIC_NAMES, pixels_of

    model = load_model("toy")
    train = _toy_rows("train")
    prior_rows = [r for r in train if not r["held_out"]]
    prior = ImageCaptions(pixels_of(prior_rows), [r["text"] for r in prior_rows])
    judge = ToyJudge(clip_folder(), "cpu")
    recipe = {
        k: v
        for k, v in (("steps", args.steps), ("lr", args.lr), ("mixed_precision", args.mixed_precision))
        if v is not None
    }
    print("| cell | mimic | seed | protection [95% CI] | samples went to | fine-tune s |\n|---|---|---|---|---|---|")
    for cell in args.cells:
        if "/" not in cell:
            raise SystemExit(f"--cells takes ARTIST/CLOAK_SPEC (e.g. tovik/photoguard:psnr=24), got {cell!r}")
        artist, spec = cell.split("/", 1)
        cloaks.append((artist, cached_cloak(args.stages, artist, spec), cell))
    for artist, pixels, cell in cloaks:
        if artist not in MIMIC_NAMES:
            raise SystemExit(f"{cell}: {artist!r} is not a held-out toy artist ({', '.join(MIMIC_NAMES)})")
        name = MIMIC_NAMES[artist]
        captions = [atelier.caption(r["subject"], name) for r in train if r["artist"] == artist][: len(pixels)]
        prompts = [atelier.caption(s, name) for s in atelier.SUBJECTS for _ in range(8)]
        seeds = sample_seeds(0, len(prompts))  # the same generations' seeds for every mimic
        for seed in args.seeds:
            config = MimicConfig(num_inference_steps=10, seed=seed, **recipe)
            started = time.time()
            mimic, _ = fine_tune_mimic(model, pixels, captions, config, prior, log=lambda _: None)
            seconds = time.time() - started
            predicted, _ = judge.classify(sample(mimic, prompts, seeds, config))
            share = protection(predicted, artist, list(judge.artists))
            print(
                f"| {cell} | {config.steps} steps, lr {config.finetune_config(True).lr:g}, {config.mixed_precision} | "
                f"{seed} | "
                f"{100 * share['protection_rate']:.1f}% [{100 * share['protection_interval'][0]:.1f}, "
                f"{100 * share['protection_interval'][1]:.1f}] | {went(share['attributed_to'])} | {seconds:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
