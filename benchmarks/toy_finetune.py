"""Mimicry with `fixative finetune` on the toy world: 24 paintings of a held-out artist under a new name.

Writes the instance folder (24 training paintings of ARTIST captioned "a painting of a {subject} by NAME") and
a prior folder (the trained artists' training paintings with their own captions), runs `fixative finetune
--model toy` with the toy report's mimic recipe, full and LoRA, then samples "a painting of a {subject} by
NAME" (25 DDIM steps, guidance 5) and the trained artists' prompts, and judges them with the toy CLIP
(eval/attribution.py ToyJudge). Prints the share attributed to ARTIST, the share of trained artists' samples
still attributed to them, and the fine-tuning times.

    python benchmarks/toy_finetune.py [--artist zenji] [--steps 120] [--methods full,lora] [--threads 1] [--skip-base]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from fixative.core.checkpoints import load_model
from fixative.core.lora import apply_lora
from fixative.core.toy import atelier, clip_folder
from fixative.core.toy.atelier import AtelierConfig
from fixative.eval.attribution import ToyJudge
from fixative.eval.mimicry import MimicConfig
from fixative.eval.mimicry import sample as mimic_sample

RECIPE = [
    "--train-text-encoder",
    "--batch-size",
    "16",
    "--prior-batch-size",
    "8",
    "--prior-loss-weight",
    "0.5",
    "--weight-decay",
    "0",
    "--lr-schedule",
    "cosine",
    "--snr-gamma",
    "5",
    "--offset-noise",
    "0.3",
    "--mixed-precision",
    "bf16",
    "--cache-latents",
    "--center-crop",
    "--resolution",
    "64",
]


def write_folders(work: Path, artist: str, name: str, images: int) -> tuple[Path, Path]:
    data = atelier.write_atelier(work / "atelier", AtelierConfig(seed=0, images_per_artist=160), progress=False)
    rows = atelier.load_split(data, "train")
    instance = [r for r in rows if r["artist"] == artist][:images]
    prior = [r for r in rows if not r["held_out"]]
    folders = []
    for folder_name, chosen, caption in (
        ("instance", instance, lambda r: atelier.caption(r["subject"], name)),
        ("prior", prior, lambda r: r["text"]),
    ):
        folder = work / folder_name
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        lines = []
        for row in chosen:
            os.link(row["path"], folder / row["file_name"])
            lines.append(json.dumps({"file_name": row["file_name"], "text": caption(row)}) + "\n")
        (folder / "metadata.jsonl").write_text("".join(lines))
        folders.append(folder)
    return folders[0], folders[1]


def sample(model, prompts: list[str], seed: int) -> torch.Tensor:
    """eval's mimicry sampler (25 DDIM steps, guidance 5), seeds seed, seed + 1, ..."""
    return mimic_sample(model, prompts, [seed + i for i in range(len(prompts))], MimicConfig())


def judge_model(model, judge: ToyJudge, artist: str, name: str) -> dict:
    mimic_prompts = [atelier.caption(s, name) for s in atelier.SUBJECTS for _ in range(4)]
    predicted, _ = judge.classify(sample(model, mimic_prompts, 50_000))
    trained = atelier.artist_names(held_out=False)
    kept_prompts = [atelier.caption(s, a) for a in trained for s in atelier.SUBJECTS]
    kept, _ = judge.classify(sample(model, kept_prompts, 70_000))
    expected = [a for a in trained for _ in atelier.SUBJECTS]
    return {
        "mimic_attribution": predicted.count(artist) / len(predicted),
        "trained_kept": sum(p == e for p, e in zip(kept, expected)) / len(kept),
        "attributed_to": {a: predicted.count(a) for a in sorted(set(predicted))},
        "samples": len(predicted),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artist", default="zenji")
    parser.add_argument("--name", default="nabu")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--lr-full", default="1e-3")
    parser.add_argument("--lr-lora", default="1e-2")
    parser.add_argument("--rank", default="8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("outputs/toy_finetune"))
    parser.add_argument("--skip-base", action="store_true", help="do not judge the un-tuned model for reference")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    instance, prior = write_folders(args.work, args.artist, args.name, args.images)
    judge = ToyJudge(clip_folder())
    results = {}
    for method in args.methods.split(","):
        out = args.work / method
        if out.exists():
            shutil.rmtree(out)
        extra = ["--lr", args.lr_full] if method == "full" else ["--lr", args.lr_lora, "--rank", args.rank]
        command = [
            sys.executable,
            "-m",
            "fixative",
            "finetune",
            "--model",
            "toy",
            "--data",
            str(instance),
            "--prior-data",
            str(prior),
            "--out",
            str(out),
            "--method",
            method,
            "--max-steps",
            str(args.steps),
            "--warmup",
            str(max(1, args.steps // 10)),
            "--quiet",
            *RECIPE,
            *extra,
        ]
        started = time.time()
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        seconds = time.time() - started
        model = load_model("toy") if method == "lora" else load_model(out)
        if method == "lora":
            apply_lora(model, out / "pytorch_lora_weights.safetensors")
        results[method] = {"fine_tune_seconds": round(seconds, 1), **judge_model(model, judge, args.artist, args.name)}
        print(method, json.dumps(results[method]), flush=True)
    if not args.skip_base:
        results["base"] = judge_model(load_model("toy"), judge, args.artist, args.name)
        print("base", json.dumps(results["base"]))
    print(f"\n{'':6} {'attributed to ' + args.artist:>24} {'trained kept':>14} {'fine-tune s':>12}")
    for method, r in results.items():
        print(
            f"{method:6} {100 * r['mimic_attribution']:23.1f}% {100 * r['trained_kept']:13.1f}% "
            f"{r.get('fine_tune_seconds', 0):12.0f}"
        )
    (args.work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
