"""Protection against budget on the toy world: cloak 24 paintings of a held-out artist, let the toy mimic fine-tune on
them under a new name, sample, and count the samples the toy CLIP no longer attributes to the artist.

    .venv/bin/python benchmarks/cloak_efficacy.py --artists zenji tovik --cells plain:linf=32/255 glaze:psnr=24
    .venv/bin/python benchmarks/cloak_efficacy.py --table            # print the table of every finished cell

A cell is METHOD:BUDGET[:OPTION...] with METHOD one of clean, plain, glaze, mist, photoguard, anti-dreambooth, and
options jpeg (JPEG-75 before mimicry), eot (--robust jpeg,resize,blur,noise), pgd, steps=N, lr=X, strength=S.
"plain" is the issue's reference recipe: glaze's objective, img2img target at strength 0.6, 100 Adam steps,
L-inf budget. Each finished cell is cached in OUT/cells/*.json (re-running skips it).
Protection = share of the mimic's samples not attributed to the artist, with a Wilson 95% interval.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fixative.cloak.bounds import parse_budget
from fixative.cloak.optimise import OptimiserConfig
from fixative.cloak.protect import CloakConfig, cloak_pixels
from fixative.cloak.targets import StyleTargetConfig
from fixative.core.checkpoints import load_model

# The mimicry attack, its judge and the interval: eval's
from fixative.core.datasets import ImageCaptions
from fixative.core.toy import atelier, clip_folder, toy_folder
from fixative.eval.attribution import ToyJudge
from fixative.eval.mimicry import fine_tune_mimic, sample
from fixative.eval.rates import wilson_interval
from fixative.eval.toy_report import MIMIC_NAMES, ReportConfig, atelier_for, pixels_of

TARGETS = {"zenji": "lumo", "tovik": "dervo"}  # the plain-recipe targets
SAMPLES_PER_SUBJECT = 8  # 8 subjects x 8 = 64 mimic samples per cell


def parse_cell(cell: str) -> dict:
    method, _, rest = cell.partition(":")
    parts = [p for p in rest.split(":") if p]
    spec = {"method": method, "budget": [], "jpeg": False, "eot": False, "options": {}}
    for part in parts:
        if part == "jpeg":
            spec["jpeg"] = True
        elif part == "eot":
            spec["eot"] = True
        elif part == "pgd":
            spec["options"]["optimiser"] = "pgd"
        elif part.split("=")[0] in ("steps", "lr", "strength", "weight", "every", "slr"):
            key, value = part.split("=")
            spec["options"][key] = float(value)
        else:
            spec["budget"].append(part)
    return spec


def cloak_config(spec: dict, seed: int) -> CloakConfig:
    options = spec["options"]
    method = "glaze" if spec["method"] == "plain" else spec["method"]
    steps = int(options.get("steps", 100))
    optimiser = OptimiserConfig(
        steps=steps,
        lr=options.get("lr", 0.01 if spec["method"] == "plain" else 0.005),
        optimiser=options.get("optimiser", "adam"),
    )
    config = CloakConfig(
        method=method,
        budget=parse_budget(spec["budget"]),
        optimiser=optimiser,
        style_target=StyleTargetConfig(strength=options.get("strength", 0.6)),
        robust=("jpeg", "resize", "blur", "noise") if spec["eot"] else (),
        seed=seed,
    )
    if "weight" in options:
        config.mist_semantic_weight = options["weight"]
    if "every" in options:
        config.aspl.every = int(options["every"])
    if "slr" in options:
        config.aspl.surrogate_lr = options["slr"]
    return config


def _load(paths: list[str]) -> torch.Tensor:
    return (
        torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()) for p in paths])
        .permute(0, 3, 1, 2)
        .float()
        / 255
    )


def _jpeg75(pixels: torch.Tensor) -> torch.Tensor:
    import io

    out = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(buffer, "JPEG", quality=75)
        out.append(torch.from_numpy(np.asarray(Image.open(buffer).convert("RGB")).copy()).permute(2, 0, 1))
    return torch.stack(out).float() / 255


def run_cell(model, judge, rows, artist: str, cell: str, out: Path, seed: int) -> dict:
    spec = parse_cell(cell)
    report_config = ReportConfig(seed=seed)
    mimic_rows = [r for r in rows if r["artist"] == artist][: report_config.mimic_images]
    clean = _load([r["path"] for r in mimic_rows])
    record = {"artist": artist, "cell": cell, "seed": seed}
    started = time.time()
    if spec["method"] == "clean":
        stored, cloak_records = clean, []
    else:
        config = cloak_config(spec, seed)
        stored, cloak_records = cloak_pixels(model, clean, config, style=TARGETS[artist])
        record["cloak_settings"] = config.settings()
    record["cloak_seconds"] = time.time() - started
    if cloak_records:
        for key in ("psnr", "ssim", "linf"):
            record[key] = float(np.mean([r["values"][key] for r in cloak_records]))
        before = [r["latent_distance_before"] for r in cloak_records]
        after = [r["latent_distance_after"] for r in cloak_records]
        if before[0] is not None:
            record["latent_distance_reduced"] = 1 - float(np.sum(after) / np.sum(before))
        record["final_projection"] = sum(r["final_projection"] for r in cloak_records)
    published = _jpeg75(stored) if spec["jpeg"] else stored
    folder = out / "images" / f"{artist}-{_slug(cell)}"
    folder.mkdir(parents=True, exist_ok=True)
    for row, image in zip(mimic_rows, published):
        path = folder / Path(row["path"]).name
        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
    name = MIMIC_NAMES[artist]
    mimic_config = report_config.mimic_config()
    prior_rows = [r for r in rows if not r["held_out"]]
    prior = ImageCaptions(pixels_of(prior_rows), [r["text"] for r in prior_rows])
    captions = [atelier.caption(r["subject"], name) for r in mimic_rows]
    mimic_model, record["mimic_seconds"] = fine_tune_mimic(
        model, published * 2 - 1, captions, mimic_config, prior, log=lambda _: None
    )
    subjects = [s for s in atelier.SUBJECTS for _ in range(SAMPLES_PER_SUBJECT)]
    prompts = [atelier.caption(s, name) for s in subjects]
    seeds = [seed * 100_000 + 50_000 + i for i in range(len(prompts))]
    predicted, _ = judge.classify(sample(mimic_model, prompts, seeds, mimic_config))
    protected = sum(p != artist for p in predicted)
    record.update(
        samples=len(predicted),
        protection=protected / len(predicted),
        interval=wilson_interval(protected, len(predicted)),
        attributed_to={a: predicted.count(a) for a in sorted(set(predicted), key=predicted.count, reverse=True)},
    )
    return record


def _slug(cell: str) -> str:
    return cell.replace("/", "_").replace(":", "-").replace("=", "") + "-" + hashlib.sha1(cell.encode()).hexdigest()[:6]


def table(out: Path) -> str:
    records = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    lines = [
        "| artist | cell | PSNR dB | SSIM | L-inf | latent dist. reduced | projected | protection (95% CI) "
        "| samples went to |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["artist"], r["cell"])):
        low, high = r["interval"]
        went = ", ".join(f"{a} {n}" for a, n in r["attributed_to"].items())
        linf = f"{r['linf'] * 255:.1f}/255" if "linf" in r else "—"
        reduced = f"{100 * r['latent_distance_reduced']:.0f}%" if "latent_distance_reduced" in r else "—"
        lines.append(
            f"| {r['artist']} | {r['cell']} | {r.get('psnr', float('nan')):.1f} | {r.get('ssim', float('nan')):.3f} "
            f"| {linf} | {reduced} | {r.get('final_projection', 0)} | {100 * r['protection']:.0f}% "
            f"({100 * low:.0f}-{100 * high:.0f}%) | {went} |"
        )
    lines.append("")
    for artist in sorted({r["artist"] for r in records}):
        mine = [r for r in records if r["artist"] == artist and ":jpeg" not in r["cell"]]
        plain = [r for r in mine if r["cell"] == "plain:linf=32/255"]
        # "at 16/255 or the PSNR 16/255 gives": L-inf <= 16/255, or PSNR >= 24 dB (a saturated 16/255 box: 24.1 dB)
        half = [
            r
            for r in mine
            if not r["cell"].startswith(("plain", "clean"))
            and (r.get("linf", 1) <= 16 / 255 + 1e-6 or r.get("psnr", 0) >= 24.0 - 0.05)
        ]
        if plain and half:
            best = max(half, key=lambda r: r["protection"])
            verdict = "met" if best["protection"] >= plain[0]["protection"] else "NOT met"
            lines.append(
                f"{artist}: best at half the budget {best['cell']} {100 * best['protection']:.0f}% vs plain "
                f"32/255 {100 * plain[0]['protection']:.0f}%: requirement {verdict}"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artists", nargs="+", default=["zenji", "tovik"], help="held-out artists (default: both)")
    parser.add_argument(
        "--cells",
        nargs="+",
        default=[
            "clean",
            "plain:linf=8/255",
            "plain:linf=16/255",
            "plain:linf=32/255",
            "glaze:psnr=36",
            "glaze:psnr=32",
            "glaze:psnr=28",
            "glaze:psnr=24",
            "glaze:psnr=24:jpeg",
            "plain:linf=32/255:jpeg",
        ],
        help="cells to run (see the module docstring)",
    )
    parser.add_argument(
        "--out", default="outputs/cloak_efficacy", help="cache folder (default: outputs/cloak_efficacy)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of cloaking, mimicry and sampling (default: 0)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default: 1; faster than 2 on a shared machine)"
    )
    parser.add_argument("--table", action="store_true", help="only print the table of finished cells")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.table:
        print(table(out))
        return 0
    torch.set_num_threads(args.threads)
    model = load_model("toy")
    judge = ToyJudge(clip_folder())
    rows = atelier.load_split(atelier_for(toy_folder()), "train")
    (out / "cells").mkdir(parents=True, exist_ok=True)
    for artist in args.artists:
        for cell in args.cells:
            path = out / "cells" / f"{artist}-{_slug(cell)}.json"
            if path.is_file():
                continue
            record = run_cell(model, judge, rows, artist, cell, out, args.seed)
            path.write_text(json.dumps(record, indent=1))
            print(
                f"{artist} {cell}: protection {100 * record['protection']:.0f}% {record['attributed_to']} "
                f"psnr {record.get('psnr', float('nan')):.1f} reduced {record.get('latent_distance_reduced')} "
                f"cloak {record['cloak_seconds']:.0f}s mimic {record['mimic_seconds']:.0f}s",
                flush=True,
            )
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
