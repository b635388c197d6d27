"""Which 8x toy VAE `fixative toy build --vae f8` uses: each candidate trained by the toy build's own VAE stage (the
full plan: 1000 steps, seed 0, the Toy Atelier's train split), then measured as `fixative toy report` measures the
VAE (PSNR of the posterior mode's reconstruction on the test split). The candidate with the highest PSNR is
core/presets.py's TOY_VAE_F8; nothing else decides (issue 10: "chosen by reconstruction quality alone").

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/toy_vae_candidates.py --out runs/toy_vae_candidates

On this project's 2-core machine (2026-12-01): a 21.61 dB (5.3M parameters, 322 s), b 21.13 dB (0.9M, 88 s),
c 21.22 dB (3.8M, 230 s); the shipped f4 VAE has 26.4 dB. A finished candidate is not trained again. With
``--steps 2000 --candidates a`` (twice the build's steps): 23.83 dB (626 s), above the toy report's 22 dB target.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from fixative.core.config import AutoencoderKLConfig
from fixative.core.presets import TOY_VAE_F8
from fixative.core.toy import atelier
from fixative.core.toy import build as toy_build
from fixative.core.toy.build import PLANS
from fixative.core.vae import AutoencoderKL
from fixative.eval.toy_report import pixels_of, psnr_db


def candidate(block_out_channels: tuple[int, ...], layers_per_block: int, attention: bool) -> AutoencoderKLConfig:
    return AutoencoderKLConfig(
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        norm_num_groups=8,
        sample_size=64,
        mid_block_add_attention=attention,
    )


CANDIDATES = {
    "a": TOY_VAE_F8,  # SD's layout at a quarter of its widths
    "b": candidate((16, 32, 64, 64), 1, False),  # the shipped f4 VAE with one more level
    "c": candidate((32, 64, 128, 128), 1, False),  # a's widths, one layer per level, no attention
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (one sub-folder per candidate)")
    parser.add_argument("--atelier", type=Path, help="a Toy Atelier folder (default: painted into OUT/atelier)")
    parser.add_argument("--candidates", nargs="+", default=sorted(CANDIDATES), choices=sorted(CANDIDATES))
    default_steps = PLANS["full"].vae_steps
    parser.add_argument("--steps", type=int, default=default_steps, help="VAE training steps (default: %(default)s)")
    args = parser.parse_args()
    plan = replace(PLANS["full"], vae_steps=args.steps)
    data = args.atelier or atelier.write_atelier(
        args.out / "atelier", atelier.AtelierConfig(seed=0, images_per_artist=160), progress=False
    )
    test_pixels = pixels_of(atelier.load_split(data, "test"))
    print("| candidate | levels (widths) | layers per level | mid attention | parameters | train s | test PSNR dB |")
    print("|---|---|---|---|---|---|---|")
    for name in args.candidates:
        config = CANDIDATES[name]
        work = args.out / (name if args.steps == default_steps else f"{name}-{args.steps}steps")
        work.mkdir(parents=True, exist_ok=True)
        started = time.time()
        toy_build._train_vae(work, data, plan, 0, False, config)
        seconds = time.time() - started
        vae = toy_build._load_network(AutoencoderKL, AutoencoderKLConfig, work / "vae" / "model")
        with torch.no_grad():
            reconstructions = torch.cat([vae.decode(vae.encode(c).mode()) for c in test_pixels.split(64)])
        psnr = psnr_db(test_pixels, reconstructions).mean().item()
        parameters = sum(p.numel() for p in vae.parameters()) / 1e6
        print(
            f"| {name} | {config.block_out_channels} | {config.layers_per_block} | {config.mid_block_add_attention} "
            f"| {parameters:.2f}M | {seconds:.0f} | {psnr:.2f} |",
            flush=True,
        )
        (work / "result.json").write_text(json.dumps({"config": asdict(config), "test_psnr_db": psnr}, default=list))


if __name__ == "__main__":
    main()
