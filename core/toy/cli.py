"""``fixative toy dataset | build | report``: the toy world's commands (entry point ``fixative.commands: toy``)."""

from __future__ import annotations

import argparse

from ..cli.options import add_quiet, add_seed


def register(subparsers) -> None:
    toy = subparsers.add_parser("toy", help="the toy world: data set, build and quality report of the small model")
    commands = toy.add_subparsers(dest="toy_command", metavar="TOY_COMMAND", required=True)

    dataset = commands.add_parser("dataset", help="paint the Toy Atelier data set (an imagefolder with captions)")
    dataset.add_argument("--out", required=True, help="folder to write (created; a complete one is left as it is); "
                                                      "required")
    add_seed(dataset, "seed of the paintings")
    dataset.add_argument("--resolution", type=int, default=64, help="image size in pixels (default: %(default)s)")
    dataset.add_argument("--images-per-artist", type=int, default=160,
                         help="paintings per artist, all splits together (default: %(default)s)")
    dataset.add_argument("--grid", help="also write a PNG of all styles (one row per artist) here (default: none)")
    add_quiet(dataset)
    dataset.set_defaults(func=_dataset)

    build = commands.add_parser("build", help="train the toy CLIP, VAE and UNet (about 36 minutes on 2 CPU cores)")
    build.add_argument("--out", help="finished build folder (default: $FIXATIVE_HOME/toy/<size>-seed<seed>)")
    add_seed(build, "seed of the data set, initialisations and batches")
    build.add_argument("--size", choices=("full", "ci"), default="full",
                       help="full: the shipped toy world; ci: a few steps per stage, to exercise the path "
                            "(default: %(default)s)")
    add_quiet(build)
    build.set_defaults(func=_build)

    report = commands.add_parser("report", help="measure the toy world against its quality targets")
    report.add_argument("--folder", help="a toy build folder (default: the one --model toy uses)")
    report.add_argument("--out", default="outputs/toy_report",
                        help="where report.json and samples.png go (default: %(default)s)")
    add_seed(report, "seed of the samples and the mimicry attack")
    report.add_argument("--parts", type=_parts, default=REPORT_PARTS,
                        help=f"comma-separated subset of {', '.join(REPORT_PARTS)} (default: all)")
    report.add_argument("--mimic-steps", type=int,
                        help="fine-tuning steps of the mimicry attack (default: the report's own)")
    report.set_defaults(func=_report)


REPORT_PARTS = ("vae", "clip", "generation", "mimicry")


def _parts(text: str) -> tuple[str, ...]:
    """--parts: known names only, so that a typo does not silently measure nothing."""
    parts = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [part for part in parts if part not in REPORT_PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"unknown part(s) {', '.join(unknown) or '(none given)'}; "
                                         f"choose from {', '.join(REPORT_PARTS)}")
    return parts


def _dataset(args: argparse.Namespace) -> int:
    from .atelier import AtelierConfig, style_grid, write_atelier

    config = AtelierConfig(seed=args.seed, resolution=args.resolution, images_per_artist=args.images_per_artist)
    out = write_atelier(args.out, config, progress=not args.quiet)
    print(f"Toy Atelier: {out}")
    if args.grid:
        style_grid(args.resolution, args.seed, args.grid)
        print(f"style grid: {args.grid}")
    return 0


def _build(args: argparse.Namespace) -> int:
    from .build import build

    build(args.out, seed=args.seed, size=args.size, progress=not args.quiet)
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import ReportConfig, report

    config = ReportConfig(seed=args.seed)
    if args.mimic_steps is not None:
        config.mimic_steps = args.mimic_steps
    report(args.folder, args.out, config, parts=args.parts)
    return 0
