"""``fixative toy dataset | build``: the toy world's commands (entry point ``fixative.commands: toy``; eval adds
``toy report``)."""

from __future__ import annotations

import argparse

from ..cli.options import add_quiet, add_seed
from ..presets import TOY_VAES


def toy_commands(subparsers):
    """The ``toy`` command's sub-commands, created on first use: other packages add theirs to it too."""
    if "toy" not in subparsers.choices:
        toy = subparsers.add_parser("toy", help="the toy world: data set, build and quality report of the small model")
        toy.commands = toy.add_subparsers(dest="toy_command", metavar="TOY_COMMAND", required=True)
    return subparsers.choices["toy"].commands


def register(subparsers) -> None:
    commands = toy_commands(subparsers)

    dataset = commands.add_parser("dataset", help="paint the Toy Atelier data set (an imagefolder with captions)")
    dataset.add_argument(
        "--out", required=True, help="folder to write (created; a complete one is left as it is); required"
    )
    add_seed(dataset, "seed of the paintings")
    dataset.add_argument("--resolution", type=int, default=64, help="image size in pixels (default: %(default)s)")
    dataset.add_argument(
        "--images-per-artist",
        type=int,
        default=160,
        help="paintings per artist, all splits together (default: %(default)s)",
    )
    dataset.add_argument("--grid", help="also write a PNG of all styles (one row per artist) here (default: none)")
    add_quiet(dataset)
    dataset.set_defaults(func=_dataset)

    build = commands.add_parser("build", help="train the toy CLIP, VAE and UNet (about 36 minutes on 2 CPU cores)")
    build.add_argument("--out", help="finished build folder (default: $FIXATIVE_HOME/toy/<size>-seed<seed>)")
    add_seed(build, "seed of the data set, initialisations and batches")
    build.add_argument(
        "--size",
        choices=("full", "ci"),
        default="full",
        help="full: the shipped toy world; ci: a few steps per stage, to exercise the path (default: %(default)s)",
    )
    build.add_argument(
        "--vae",
        choices=sorted(TOY_VAES),
        default="f4",
        help="f4: the shipped toy VAE (4x down-sampling); f8: a more SD-like one (8x, mid-block attention, 5.3M "
        "parameters), for measuring cloaks against an SD-like encoder; build it under its own FIXATIVE_HOME, as "
        "every command under that home then uses it as the toy world (default: %(default)s)",
    )
    build.add_argument(
        "--clip",
        help="a finished toy CLIP folder to use instead of training one, e.g. core/toy/weights/clip, so that two "
        "worlds share one judge (default: train it)",
    )
    add_quiet(build)
    build.set_defaults(func=_build)


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

    build(args.out, seed=args.seed, size=args.size, vae=args.vae, clip=args.clip, progress=not args.quiet)
    return 0
