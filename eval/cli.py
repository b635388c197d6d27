"""eval's sub-commands of the ``fixative`` command (entry point ``fixative.commands: eval``).

``fixative metrics fid|kid|clip-score|lpips|ssim|psnr`` over image folders, each printing one JSON object: the
value and what produced it. Heavy imports happen inside the command functions.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    metrics = subparsers.add_parser("metrics", help="FID, KID, CLIP score, LPIPS, SSIM, PSNR over image folders",
                                    description="Measure image folders; prints one JSON object with the value "
                                                "and its provenance (extractor, weights and image hashes).")
    commands = metrics.add_subparsers(dest="metric", metavar="METRIC", required=True)

    for name, help_text in (("fid", "Fréchet distance between the features of two image folders"),
                            ("kid", "kernel (MMD) distance between the features of two image folders")):
        parser = commands.add_parser(name, help=help_text)
        parser.add_argument("real", help="folder of reference images")
        parser.add_argument("fake", help="folder of generated images")
        parser.add_argument("--features", default="inception",
                            help="inception, or clip:FOLDER (a transformers CLIP folder; clip:toy = the toy CLIP) "
                                 "(default: %(default)s)")
        parser.add_argument("--inception-weights",
                            help="pt_inception-2015-12-05-6726825d.pth (default: looked up in the torch hub cache)")
        parser.add_argument("--cache", help="feature cache folder (default: $FIXATIVE_HOME/eval/features)")
        parser.add_argument("--no-cache", action="store_true", help="neither read nor write cached features "
                                                                    "(default: use the cache)")
        parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
        if name == "kid":
            parser.add_argument("--subsets", type=int, default=100, help="random subsets averaged (default: %(default)s)")
            parser.add_argument("--subset-size", type=int, default=1000,
                                help="images per subset; at most the smaller folder's count (default: %(default)s)")
        _common(parser)
        parser.set_defaults(func=_distribution)

    clip = commands.add_parser("clip-score", help="CLIP score of images against one prompt each")
    clip.add_argument("images", help="folder of images (file-name order)")
    clip.add_argument("--prompts", required=True, help="text file, one prompt per image in file-name order; required")
    clip.add_argument("--clip", default="toy", help="a transformers CLIP folder, or 'toy' (default: %(default)s)")
    clip.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    _common(clip)
    clip.set_defaults(func=_clip_score)

    for name in ("lpips", "ssim", "psnr"):
        parser = commands.add_parser(name, help=f"{name.upper()} of each image against the same-named reference")
        parser.add_argument("test", help="folder of images to measure")
        parser.add_argument("reference", help="folder of reference images (matched by file name)")
        if name == "lpips":
            parser.add_argument("--lpips-net", choices=("alex", "vgg"), default="alex",
                                help="LPIPS backbone network (default: %(default)s)")
            parser.add_argument("--lpips-weights", help="torchvision's backbone file (default: the torch hub cache)")
            parser.add_argument("--lpips-backbone", choices=("pretrained", "random"), default="pretrained",
                                help="random: an untrained trunk, for testing the mechanics only; recorded in the "
                                     "output (default: %(default)s)")
        _common(parser)
        parser.set_defaults(func=_paired)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps, or auto: cuda > mps > cpu "
                                                         "(default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (default: show them)")


def _device(name: str):
    from fixative.core.cli.generate import _device as resolve

    return resolve(name)


def provenance(args: argparse.Namespace, device) -> dict:
    """What every eval record carries: the command, versions, device, seed."""
    import platform

    import torch

    from fixative import __version__

    options = {k: v for k, v in vars(args).items() if k != "func"}
    return {"command": options, "fixative": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "seed": args.seed}


def _print(result: dict) -> int:
    print(json.dumps(result, indent=1, default=str))
    return 0


def _distribution(args: argparse.Namespace) -> int:
    import torch

    from .features import default_cache, folder_features, make_extractor
    from .fid import fid, kid

    torch.manual_seed(args.seed)
    device = _device(args.device)
    extractor = make_extractor(args.features, args.inception_weights, device)
    cache = None if args.no_cache else (args.cache or default_cache())
    real, real_record = folder_features(args.real, extractor, cache, args.batch_size, progress=not args.quiet)
    fake, fake_record = folder_features(args.fake, extractor, cache, args.batch_size, progress=not args.quiet)
    result = {"metric": args.metric}
    if args.metric == "fid":
        result["value"] = fid(real, fake)
    else:
        scores = kid(real, fake, args.subsets, args.subset_size, args.seed)
        result.update(value=scores.mean, std=scores.std, subsets=scores.subsets, subset_size=scores.subset_size)
    result.update(real=real_record, fake=fake_record, features=extractor.provenance,
                  provenance=provenance(args, device))
    return _print(result)


def _clip_score(args: argparse.Namespace) -> int:
    from fixative.core.errors import FixativeError

    from .clip_score import CLIPScorer, read_prompts
    from .features import file_sha256, image_files, read_uint8

    device = _device(args.device)
    folder = args.clip
    if folder == "toy":
        from fixative.core.toy import clip_folder

        folder = clip_folder()
    files = image_files(args.images)
    prompts = read_prompts(args.prompts)
    if len(prompts) != len(files):
        raise FixativeError(f"{args.prompts} has {len(prompts)} prompts for {len(files)} images in {args.images}; "
                            "give one prompt per image, in file-name order")
    pairs = [(f, p, read_uint8(f)) for f, p in zip(files, prompts)]
    skipped = [f.name for f, _, image in pairs if image is None]
    pairs = [(f, p, image) for f, p, image in pairs if image is not None]
    if not pairs:
        raise FixativeError(f"none of the images in {args.images} could be read")
    scorer = CLIPScorer(folder, device)
    result = scorer([image for _, _, image in pairs], [p for _, p, _ in pairs], args.batch_size)
    return _print({"metric": "clip-score", "value": result.value, "images": len(pairs), "skipped": skipped,
                   "per_image": {f.name: s for (f, _, _), s in zip(pairs, result.per_image)},
                   "prompts_sha256": file_sha256(args.prompts), "clip": scorer.provenance,
                   "provenance": provenance(args, device)})


def _paired(args: argparse.Namespace) -> int:
    from .similarity import compare_folders

    device = _device(args.device)
    options = {"device": device}
    if args.metric == "lpips":
        options.update(lpips_net=args.lpips_net, lpips_backbone=args.lpips_backbone, lpips_weights=args.lpips_weights)
    result = compare_folders(args.test, args.reference, args.metric, **options)
    result["provenance"] = {**result.pop("provenance"), **provenance(args, device)}
    return _print(result)
