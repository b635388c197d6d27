"""Distilled samplers of the toy world against the teacher's DDIM: FID, attribution and speed.

    python benchmarks/consistency.py --images 128 --lcd RUNS/lcd --lora RUNS/lcm-lora/pytorch_lora_weights.safetensors \
        --mimic zenji

Prompts: the captions of the Toy Atelier's test split (the trained artists' paintings; seeds 0..n-1).
- FID on the toy CLIP's image features (``get_image_features``, 64-d) against the same test images; the
  teacher at 1, 2, 4 and 25 DDIM steps (guidance ``--guidance``), the full LCD student at 1, 2, 4 LCM steps
  (same guidance: it embeds w = guidance - 1) and the LCM-LoRA on the teacher at 1, 2, 4 LCM steps
  (guidance 1, as LCM-LoRA samples).
- Attribution: the share of samples the toy CLIP judge (eval/attribution.py) gives to the prompted artist.
- Carry-over (``--mimic ARTIST``): the toy report's mimic (its ``mimic``: 24 paintings of a held-out artist
  under a new name) sampled at 25 DDIM steps and with the LCM-LoRA (and ``--baseline-lora``) applied to it at
  1, 2 and 4 steps; the share of samples the judge attributes to the held-out artist, LCM-LoRA over DDIM.
- ``--seed S [S ...]``: prompt i is sampled with seed S + i (default 0); with several seeds every row (FID,
  attribution) is the mean over them, and the per-seed FIDs are printed: their spread is the FID's own noise
  at this image count, which one seed set leaves unknown.
- Speed: wall time of one batch (``--speed-batch``) at one LCM step against the teacher's 25 guided DDIM steps,
  decode included, interleaved ``--repeats`` times, medians.
- ``--ict``: a student trained without a teacher (``--method ict``), sampled like the LCM-LoRA (guidance 1).
The table puts the samplers side by side, a row per step count, every FID also as a ratio to the teacher's
25-step DDIM FID of the same run; then the issue-11 targets. The Fréchet distance is eval's (fixative.eval.fid).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fixative.consistency.toy import TOY_LCM_LORA, lcm_sampler
from fixative.core.checkpoints import load_model
from fixative.core.datasets import ImageCaptions
from fixative.core.pipelines import generate
from fixative.core.toy import clip_folder
from fixative.core.toy.atelier import AtelierConfig, load_split, write_atelier
from fixative.eval.attribution import ToyJudge
from fixative.eval.fid import fid as fid_metric
from fixative.eval.mimicry import fine_tune_mimic
from fixative.eval.toy_report import ReportConfig, pixels_of


def test_set(data: Path | None, limit: int | None) -> tuple[list[str], list[str], torch.Tensor]:
    """Captions, artists and pixels in [-1, 1] of the test split's trained-artist paintings."""
    import numpy as np
    from PIL import Image

    if data is None:
        data = Path("outputs") / "atelier"
        if not (data / "test" / "metadata.jsonl").is_file():
            write_atelier(data, AtelierConfig(), progress=False)
    rows = [r for r in load_split(data, "test") if not r["held_out"]]
    if limit:  # evenly spaced, so that every artist and subject stays represented
        rows = rows[:: max(1, len(rows) // limit)][:limit]
    pixels = (
        torch.stack(
            [torch.from_numpy(np.asarray(Image.open(r["path"]).convert("RGB"), dtype=np.float32)) for r in rows]
        ).permute(0, 3, 1, 2)
        / 127.5
        - 1
    )
    return [r["text"] for r in rows], [r["artist"] for r in rows], pixels


@torch.no_grad()
def clip_features(judge: ToyJudge, pixels: torch.Tensor, batch: int = 128) -> torch.Tensor:
    return torch.cat(
        [judge.clip.get_image_features(pixel_values=chunk).pooler_output.float() for chunk in pixels.split(batch)]
    )


def sample(
    model, prompts: list[str], steps: int, scheduler: str, guidance: float, batch: int, first_seed: int = 0
) -> torch.Tensor:
    """Pixels in [-1, 1]; prompt i is drawn with seed first_seed + i."""
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        images = generate(
            model,
            chunk,
            num_inference_steps=steps,
            scheduler=scheduler,
            guidance_scale=guidance,
            seed=list(range(first_seed + start, first_seed + start + len(chunk))),
            output="images",
            progress=False,
        )
        out.append(images * 2 - 1)
    return torch.cat(out)


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def carry_over(args, loras: dict[str, Path], judge: ToyJudge) -> None:
    """The share of the mimic's samples attributed to the mimicked artist: 25 DDIM steps, and each LCM-LoRA at
    1, 2 and 4 steps, all on the same mimic."""
    from fixative.core.toy.atelier import SUBJECTS, caption

    data = args.data or Path("outputs") / "atelier"
    config = ReportConfig()
    name = "sks"
    rows = load_split(data, "train")
    mimic_rows = [r for r in rows if r["artist"] == args.mimic][: config.mimic_images]
    prior_rows = [r for r in rows if not r["held_out"]]
    prior = ImageCaptions(pixels_of(prior_rows), [r["text"] for r in prior_rows])
    mimic_model, seconds = fine_tune_mimic(
        load_model("toy"),
        pixels_of(mimic_rows),
        [caption(r["subject"], name) for r in mimic_rows],
        config.mimic_config(),
        prior,
        log=lambda _: None,
    )
    prompts = [caption(subject, name) for subject in SUBJECTS for _ in range(config.mimic_samples_per_subject)]

    def share(model, steps: int, scheduler: str, guidance: float) -> float:
        attributed, _ = judge.classify(sample(model, prompts, steps, scheduler, guidance, args.batch))
        return sum(a == args.mimic for a in attributed) / len(prompts)

    ddim = share(mimic_model, 25, "ddim", args.guidance)
    print(
        f"\nmimic of {args.mimic} as '{name}' ({seconds:.0f} s fine-tuning), {len(prompts)} samples attributed "
        f"to {args.mimic}: DDIM 25 steps {ddim:.1%}"
    )
    for label, path in loras.items():
        sampler = lcm_sampler(mimic_model, path)
        cells = []
        for steps in (1, 2, 4):
            value = share(sampler, steps, "lcm", 1.0)
            cells.append(f"{steps} step(s) {value:.1%} ({value / max(ddim, 1e-9):.2f} of DDIM)")
        print(f"  {label} ({path}): " + ", ".join(cells))


def print_table(rows: dict, distilled: list[str], reference_fid: float) -> None:
    """The samplers side by side, a row per step count: FID, x = FID / the teacher's 25-step DDIM FID, and
    attribution; the teacher's DDIM at 1, 2, 4 and 25 steps in the first column."""
    names = ["teacher DDIM", *distilled]
    cell = 24
    print("\n" + f"{'steps':>5s} | " + " | ".join(f"{name:^{cell}s}" for name in names))
    print(f"{'':5s} | " + " | ".join(f"{'FID':>8s} {'x':>6s} {'attr.':>8s}" for _ in names))
    for steps in (1, 2, 4, 25):
        cells = []
        for name in names:
            if (name, steps) in rows:
                fid, attribution = rows[name, steps]
                cells.append(f"{fid:8.3f} {fid / reference_fid:6.2f} {attribution:8.1%}")
            else:
                cells.append(f"{'-':>{cell}s}")
        print(f"{steps:5d} | " + " | ".join(cells))


def weights_id(path: Path) -> str:
    """The path and a content hash of its weights (a file, or a model folder's .safetensors), so that cached
    rows are not reused for other weights at the same path."""
    from fixative.core.provenance import file_sha256

    files = [path] if path.is_file() else sorted(path.rglob("*.safetensors"))
    return f"{path}@" + "+".join(file_sha256(file)[:12] for file in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lcd", type=Path, default=None, help="a distilled student folder (fixative distill --method lcd)"
    )
    parser.add_argument(
        "--lora",
        type=Path,
        default=None,
        help="an LCM-LoRA file for the toy teacher (default: the shipped one, if any)",
    )
    parser.add_argument(
        "--ict",
        type=Path,
        default=None,
        help="a student folder trained without a teacher (fixative distill --method ict), sampled at guidance 1",
    )
    parser.add_argument(
        "--data", type=Path, default=None, help="a Toy Atelier folder (default: outputs/atelier, painted)"
    )
    parser.add_argument("--images", type=int, default=None, help="use N evenly spaced test images (default: all)")
    parser.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=[0],
        help="test prompt i is sampled with seed SEED + i; with several (e.g. 0 1000 2000) every row is the mean "
        "over them and the per-seed FIDs are printed (default: 0)",
    )
    parser.add_argument("--guidance", type=float, default=5.0, help="teacher and LCD guidance scale (the toy report's)")
    parser.add_argument("--batch", type=int, default=64, help="images per sampling batch (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats; 0: no timing (default: %(default)s)")
    parser.add_argument(
        "--mimic",
        default=None,
        help="also measure the LCM-LoRA on the toy report's mimic of this held-out artist (zenji, tovik)",
    )
    parser.add_argument(
        "--baseline-lora",
        type=Path,
        default=None,
        help="with --mimic: another LCM-LoRA whose carry-over is measured on the same mimic (default: none)",
    )
    parser.add_argument("--speed-batch", type=int, default=16, help="images per timed batch (default: %(default)s)")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path("outputs/consistency_bench.json"),
        help="rows already measured (same sampler, weights path, steps, image count and guidance) are "
        "read from and written to this file (default: %(default)s)",
    )
    parser.add_argument("--only-teacher", action="store_true", help="measure (and cache) the teacher's rows only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lora = args.lora or (TOY_LCM_LORA / "pytorch_lora_weights.safetensors")

    captions, artists, real = test_set(args.data, args.images)
    judge = ToyJudge(clip_folder())
    real_features = clip_features(judge, real)
    teacher = load_model("toy")
    samplers = {"teacher DDIM": (teacher, "ddim", args.guidance, (1, 2, 4, 25))}
    if args.lcd is not None:
        samplers["LCD"] = (load_model(args.lcd), "lcm", args.guidance, (1, 2, 4))
    if lora.is_file():
        samplers["LCM-LoRA"] = (lcm_sampler(teacher, lora), "lcm", 1.0, (1, 2, 4))
    if args.ict is not None:
        samplers["iCT"] = (load_model(args.ict), "lcm", 1.0, (1, 2, 4))

    if args.only_teacher:
        samplers = {"teacher DDIM": samplers["teacher DDIM"]}
    sources = {"teacher DDIM": "toy"}
    sources.update(
        {
            name: weights_id(path)
            for name, path in (("LCD", args.lcd), ("LCM-LoRA", lora), ("iCT", args.ict))
            if name in samplers
        }
    )
    cache = json.loads(args.cache.read_text()) if args.cache.is_file() else {}

    features = f"toy CLIP image features ({real_features.shape[1]}-d)"
    print(f"{len(captions)} test images; FID on {features} by fixative.eval.fid")
    rows = {}
    for name, (model, scheduler, guidance, step_counts) in samplers.items():
        for steps in step_counts:
            started = time.perf_counter()
            measured = []  # (FID, attribution) per seed
            for seed in args.seed:
                key = f"{name}|{sources[name]}|{steps} steps|{len(captions)} images|guidance {guidance}"
                key += f"|seeds from {seed}" if seed else ""
                if key not in cache:
                    pixels = sample(model, captions, steps, scheduler, guidance, args.batch, seed)
                    attributed, _ = judge.classify(pixels)
                    cache[key] = (
                        fid_metric(real_features, clip_features(judge, pixels)),
                        sum(a == b for a, b in zip(attributed, artists)) / len(artists),
                    )
                    args.cache.parent.mkdir(parents=True, exist_ok=True)
                    partial = args.cache.with_name(args.cache.name + ".partial")
                    partial.write_text(json.dumps(cache, indent=1))
                    partial.replace(args.cache)
                measured.append(cache[key])
            fid, attribution = rows[name, steps] = tuple(statistics.fmean(column) for column in zip(*measured))
            per_seed = f" (seeds {', '.join(f'{value:.3f}' for value, _ in measured)})" if len(measured) > 1 else ""
            print(
                f"  {name:13s} {steps:2d} steps  FID {fid:8.3f}{per_seed}  attribution {attribution:6.1%}  "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    if args.only_teacher:
        return

    reference_fid, reference_attribution = rows["teacher DDIM", 25]
    print_table(rows, [name for name in samplers if name != "teacher DDIM"], reference_fid)

    print("\nissue-11 targets (x = distilled FID / teacher 25-step FID):")
    for name in samplers:
        if name == "teacher DDIM":
            continue
        for steps, bound in ((1, 1.5), (2, 1.2), (4, 1.2)):
            ratio = rows[name, steps][0] / reference_fid
            below_ddim = rows[name, steps][0] < rows["teacher DDIM", steps][0]
            met = "met" if ratio <= bound else "NOT met"
            print(
                f"  {name} {steps} step(s): x = {ratio:.2f} (target <= {bound}: {met}); "
                f"FID below the teacher's own {steps}-step DDIM: {'yes' if below_ddim else 'NO'}"
            )
        share = rows[name, 2][1] / reference_attribution
        print(
            f"  {name} attribution at 2 steps: {share:.2f} of the teacher's 25-step "
            f"(target >= 0.90: {'met' if share >= 0.9 else 'NOT met'})"
        )

    if args.mimic and "LCM-LoRA" in samplers:
        loras = {"LCM-LoRA": lora}
        if args.baseline_lora is not None:
            loras["baseline LCM-LoRA"] = args.baseline_lora
        carry_over(args, loras, judge)

    fast = samplers.get("LCD") or samplers.get("LCM-LoRA")
    if fast is not None and args.repeats > 0:
        prompts = (captions * (args.speed_batch // len(captions) + 1))[: args.speed_batch]
        one_step, teacher_25 = [], []
        for _ in range(args.repeats):  # interleaved, so that load on the machine affects both alike
            one_step.append(timed(lambda: sample(fast[0], prompts, 1, "lcm", fast[2], args.speed_batch)))
            teacher_25.append(timed(lambda: sample(teacher, prompts, 25, "ddim", args.guidance, args.speed_batch)))
        one, many = statistics.median(one_step), statistics.median(teacher_25)
        which = "LCD" if "LCD" in samplers else "LCM-LoRA"
        print(
            f"\nspeed, batch {args.speed_batch}, decode included, median of {args.repeats}: "
            f"{which} 1 step {one:.3f} s, "
            f"teacher 25 guided DDIM steps {many:.3f} s: {many / one:.1f}x faster (target >= 20x: "
            f"{'met' if many / one >= 20 else 'NOT met'})"
        )


if __name__ == "__main__":
    main()
