"""Protection against budget on the toy world (issue 10's grid): cloak 24 paintings of a held-out artist, let the toy
mimic fine-tune on them under a new name, sample, and count the samples the toy CLIP no longer attributes to the
artist. The grid is benchmarks/cloak_efficacy.toml, run by ``fixative bench`` (eval/bench.py, eval/protection.py);
this script runs it with the cells and artists of your choice and prints its table:

    .venv/bin/python benchmarks/cloak_efficacy.py                     # the whole grid of cloak_efficacy.toml
    .venv/bin/python benchmarks/cloak_efficacy.py --artists zenji --cells plain:linf=32/255 glaze:psnr=24:jpeg
    .venv/bin/python benchmarks/cloak_efficacy.py --table            # print the table of the last run
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/cloak_efficacy.py --jobs 2 --stages runs/toy_protection/stages
        # one process per artist; the cells it shares with benchmarks/toy_protection.toml from that run's cache

A cell is METHOD[:BUDGET...][:OPTION...] (eval/protection.py): METHOD one of clean, plain, glaze, mist, photoguard,
anti-dreambooth, best; options jpeg (JPEG-75 before mimicry), eot, robust=T,T, pgd, steps=N, lr=X, strength=S,
target=STYLE, weight=W, every=N, slr=X. "plain" is the issue's reference recipe: glaze's objective, img2img target
at strength 0.6, 100 Adam steps at lr 0.01, L-inf budget. --cells runs those cells without an adversary (add
:jpeg for JPEG-75 first). Finished stages are cached in OUT/stages (a re-run computes only what changed, e.g. a
cloak method whose code or settings changed). Protection = share of the mimic's samples not attributed to the
artist, with a Wilson 95% interval.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

CONFIG = Path(__file__).with_name("cloak_efficacy.toml")


def table(out: Path) -> str:
    """The finished run's rows with the cloaks' figures, then the half-budget verdict per artist."""
    path = out / "results.json"
    if not path.is_file():
        return f"{out} has no results.json yet: run the grid first"
    rows = json.loads(path.read_text())["figures"]["rows"]
    lines = [
        "| artist | cell | adversary | PSNR dB | SSIM | L-inf | latent dist. reduced | projected | protection (95% CI) "
        "| samples went to | sampler |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        low, high = r["protection_interval"]
        went = ", ".join(f"{a} {n}" for a, n in sorted(r["attributed_to"].items(), key=lambda x: -x[1]) if n)
        linf = f"{r['linf'] * 255:.1f}/255" if "linf" in r else "-"
        reduced = f"{100 * r['latent_distance_reduced']:.0f}%" if "latent_distance_reduced" in r else "-"
        psnr = f"{r['psnr']:.1f}" if "psnr" in r else "-"
        ssim = f"{r['ssim']:.3f}" if "ssim" in r else "-"
        lines.append(
            f"| {r['artist']} | {r['cell']} | {r['adversary']} | {psnr} | {ssim} | {linf} | {reduced} "
            f"| {r.get('final_projection', '-')} "
            f"| {100 * r['protection_rate']:.0f}% ({100 * low:.0f}-{100 * high:.0f}%) | {went} "
            f"| {r['sampler']['scheduler']}-{r['sampler']['num_inference_steps']} |"
        )
    lines.append("")
    for artist in dict.fromkeys(r["artist"] for r in rows):
        mine = [r for r in rows if r["artist"] == artist and r["adversary"] == "none" and ":jpeg" not in r["cell"]]
        plain = [r for r in mine if r["cell"] == "plain:linf=32/255"]
        # "at 16/255 or the PSNR 16/255 gives": L-inf <= 16/255, or PSNR >= 24 dB (a saturated 16/255 box: 24.1 dB)
        half = [
            r
            for r in mine
            if not r["cell"].startswith(("plain", "clean"))
            and (r.get("linf", 1) <= 16 / 255 + 1e-6 or r.get("psnr", 0) >= 24.0 - 0.05)
        ]
        if plain and half:
            best = max(half, key=lambda r: r["protection_rate"])
            verdict = "met" if best["protection_rate"] >= plain[0]["protection_rate"] else "NOT met"
            lines.append(
                f"{artist}: best at half the budget {best['cell']} {100 * best['protection_rate']:.0f}% vs plain "
                f"32/255 {100 * plain[0]['protection_rate']:.0f}%: requirement {verdict}"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artists", nargs="+", help="held-out artists (default: the config's, zenji and tovik)")
    parser.add_argument("--cells", nargs="+", help="cells to run, without an adversary (default: the config's grid)")
    parser.add_argument("--config", default=str(CONFIG), help=f"the grid (default: {CONFIG.name} beside this script)")
    parser.add_argument("--out", default="outputs/cloak_efficacy", help="run folder (default: outputs/cloak_efficacy)")
    parser.add_argument("--seed", type=int, default=0, help="seed of cloaking, mimicry and sampling (default: 0)")
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("OMP_NUM_THREADS", "1")),
        help="torch threads (default: $OMP_NUM_THREADS, else 1)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="artists run in this many processes (default: 1)")
    parser.add_argument("--stages", help="stage cache folder, e.g. a toy_protection run's (default: OUT/stages)")
    parser.add_argument("--quiet", action="store_true", help="no per-stage progress lines (default: show them)")
    parser.add_argument("--table", action="store_true", help="only print the table of the last finished run")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not args.table:
        import torch

        from fixative.core.errors import FixativeError
        from fixative.eval.bench import bench

        torch.set_num_threads(args.threads)
        changes = {}
        if args.artists:
            changes["artists"] = args.artists
        if args.cells:
            changes.update(cells=args.cells, adversaries=["none"], grid=None)
        try:
            bench(
                args.config,
                out,
                seed=args.seed,
                log=(lambda _: None) if args.quiet else (lambda line: print(line, flush=True)),
                overrides={"protection": changes},
                jobs=args.jobs,
                stages_dir=args.stages,
            )
        except FixativeError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
